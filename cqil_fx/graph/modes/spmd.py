"""``mode="spmd"``: one member of each group per rank, under torch.distributed.

Placing a graph here is three steps of its own: the ranks agree on what they
compile (the plan and the shapes of their inputs, :func:`~cqil_fx.graph.distributed.agree`),
each keeps its members (:func:`cqil_fx.passes.place_members`) and, with
``tensor_parallel=True``, its shards of the other blocks
(:func:`cqil_fx.passes.shard_blocks`), and the collectives get a transport
(:func:`~cqil_fx.graph.distributed.choose_transport`). Each compiled graph
then runs behind two guards: the first calls compare the ranks' inputs
(:func:`~cqil_fx.graph.distributed.check_inputs`), and a collective that
fails is re-raised naming the rank (:func:`~cqil_fx.graph.distributed.guard_collectives`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn
from torch._dynamo.utils import counters

from ...errors import CQILPlanError, CQILUnsupportedError, SpmdPlacementError
from ...fingerprint import is_quantized
from ...passes import RewrittenGraph, place_members, shard_blocks
from ...passes.spmd import check_placeable
from ...planning import Planned, Unchanged
from ..distributed import agree, check_inputs, choose_transport, guard_collectives, spmd_world
from ..report import CompileReport, unchanged
from ..weights import SHARD_ATTRIBUTE
from . import ExecutionMode, GraphContext, ModeChoice, Placed, with_constants

log = logging.getLogger(__name__)


class SpmdMode(ExecutionMode):
    name = "spmd"

    def __init__(self, config, choice):
        super().__init__(config, choice)
        self.world = spmd_world(config.collective_timeout)  # every rank gets here: cqil's process group
        self.tensor_parallel = config.tensor_parallel and self.world.world_size > 1
        self.inputs: dict[int, str] = {}

    @classmethod
    def suits(cls, context: GraphContext) -> ModeChoice | None:
        if context.world_size > 1:
            return ModeChoice(cls.name, why="a process group of more than one rank")
        return None

    def adjust(self, outcome: Planned | Unchanged) -> Planned | Unchanged:
        if isinstance(outcome, Unchanged) and self.tensor_parallel and outcome.blocks and outcome.plan is not None:
            return Planned(list(outcome.blocks), outcome.plan)  # no groups: plain tensor parallelism
        return outcome

    def place(self, gm: torch.fx.GraphModule, example_inputs: Sequence, outcome: Planned | Unchanged,
              rewritten: RewrittenGraph | None, nodes: int) -> Placed:
        world = self.world
        # Ranks called with other shapes raise at the agreement below, naming them; other values
        # raise at the first calls (check_inputs).
        self.inputs = user_inputs(gm, example_inputs)
        shapes = input_shapes(self.inputs, example_inputs)
        if rewritten is None:
            agree(world, f"unchanged ({outcome.why}); inputs {shapes}")
            released = released_inputs(self.inputs, example_inputs)
            if released:
                raise CQILUnsupportedError(
                    f"rank {world.rank}: a graph compiled unchanged ({outcome.why}) would read {', '.join(released)}, "
                    "the KV cache of a layer another rank computes, which this rank holds as one element; "
                    "every graph that reads the cache must run the plan (docs/architecture.md)")
            return Placed(gm, list(example_inputs), unchanged(nodes, outcome))
        try:
            check_placeable(rewritten.rewrites, world.world_size)
        except SpmdPlacementError as e:
            raise CQILPlanError(f"rank {world.rank}: {e}") from e
        agree(world, repr(outcome.plan) + (", tensor parallel" if self.tensor_parallel else "") + f"; inputs {shapes}")
        rewritten = place_members(rewritten, world.rank, world.world_size, world.group_name)
        if self.tensor_parallel:
            _refuse_quantized_splits(example_inputs, world.rank)
            rewritten = shard_blocks(rewritten, world.rank, world.world_size, world.group_name,
                                     presharded_weights(gm, example_inputs), fallback=self.config.tp_fallback)
        transport = choose_transport(gm, world, self.config.transport)
        report = CompileReport.rewritten(nodes, outcome, rewritten, self.name, transport)
        counters["cqil"]["collectives"] += report.collectives
        log.info("cqil: %s", report)
        return Placed(gm, [*example_inputs, *rewritten.constants], report, rewritten)

    def run(self, compiled: Callable[..., Any], placed: Placed) -> Callable[..., Any]:
        compiled = with_constants(compiled, placed.constants)
        return guard_collectives(check_inputs(compiled, self.world, self.inputs, self.config.check_inputs),
                                 self.world)


def _refuse_quantized_splits(example_inputs: Sequence, rank: int) -> None:
    """Tensor parallelism splits weights in the graph (narrows of each linear's rows or columns): refuse,
    before any compile and naming the combination, the quantized weights where that cannot give the plan's
    numbers. torchao's int8 weight-only ``Int8Tensor`` slices exactly; its int4 tensors cannot be sliced, and
    with dynamic activation quantization a row-parallel half would scale its activations by half the features."""
    refused = set()
    for x in example_inputs:
        if not (isinstance(x, nn.Parameter) and is_quantized(x)):
            continue
        if type(x).__name__ != "Int8Tensor":
            refused.add(f"{type(x).__name__} (cannot be sliced)")
        elif getattr(x, "act_quant_kwargs", None) is not None:
            refused.add(f"{type(x).__name__} with dynamic activation quantization (each rank would scale "
                        "activations by its half of the features)")
    if refused:
        raise CQILUnsupportedError(
            f"rank {rank}: tensor_parallel=True on quantized weights {', '.join(sorted(refused))} is not supported: "
            "the blocks outside groups are split in the graph by slicing each weight; use tensor_parallel=False "
            "(one group member per rank works on quantized weights) or int8 weight-only quantization")


def user_inputs(gm: torch.fx.GraphModule, example_inputs: Sequence) -> dict[int, str]:
    """Position -> name of the graph's tensor inputs that are not parameters or buffers (token ids, masks,
    positions, caches)."""
    placeholders = gm.graph.find_nodes(op="placeholder")
    return {i: p.target for i, (p, x) in enumerate(zip(placeholders, example_inputs))
            if isinstance(x, torch.Tensor) and not isinstance(x, nn.Parameter)
            and "_parameters_" not in p.target and "_buffers_" not in p.target}


def input_shapes(named: dict[int, str], example_inputs: Sequence) -> str:
    """``name: [sizes]`` of the inputs ``named`` (:func:`user_inputs`: token ids, masks, positions)."""
    return ", ".join(f"{name}: {list(example_inputs[i].shape)}" for i, name in named.items())


def released_inputs(named: dict[int, str], example_inputs: Sequence) -> list[str]:
    """Names of the inputs ``named`` (:func:`user_inputs`) that are one element expanded to a larger shape:
    the KV-cache tensors an SPMD rank released for other ranks' members (:mod:`cqil_fx.passes.spmd`)."""
    return [name for i, name in named.items()
            if isinstance(x := example_inputs[i], torch.Tensor) and x.dim() > 0
            and all(isinstance(s, int) and s == 0 for s in x.stride())
            and not all(isinstance(n, int) and n <= 1 for n in x.shape)]


def presharded_weights(gm: torch.fx.GraphModule, example_inputs: Sequence) -> dict[str, str]:
    """Placeholder name -> "colwise"/"rowwise" for weights a per-rank loader left holding only a slice
    (:func:`cqil_fx.graph.weights.load_rank_weights` marks them)."""
    placeholders = gm.graph.find_nodes(op="placeholder")
    return {p.name: getattr(x, SHARD_ATTRIBUTE) for p, x in zip(placeholders, example_inputs)
            if hasattr(x, SHARD_ATTRIBUTE)}


MODE = SpmdMode
