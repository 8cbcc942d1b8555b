"""The cqil ``torch.compile`` backend: find blocks, plan, rewrite, place, compile, execute.

Usage::

    import torch
    from cqil_fx import cqil_backend, make_backend, CQILConfig

    fast = torch.compile(model, backend=cqil_backend)         # default plan
    fast = torch.compile(model, backend=make_backend(start=20, end=28, parallel=2, bypass=1))
    fast = torch.compile(model, backend="cqil")                # registered entry point

A backend is a callable ``(gm, example_inputs) -> callable``.  For each
graph Dynamo hands it, :class:`CQILBackend` runs the pipeline::

    plan_graph (find_blocks -> choose_plan) -> apply_plan (rewrite_groups -> add_bypass_edges)
      mode "local":      inner compiler on the whole graph
      mode "concurrent": split_segments -> ConcurrentProgram (inner compiler per segment)
      mode "spmd":       agree -> place_members -> choose_transport -> inner compiler

A graph with nothing to rewrite (no decoder stack, a fragment after a graph
break, a plan with no groups) is compiled unchanged, with one log line saying
why.  What each graph went through is counted in
``torch._dynamo.utils.counters["cqil"]`` and kept in ``backend.reports``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn
from torch._dynamo.utils import counters

from ..config import CQILConfig, Plan
from ..errors import CQILPlanError, SpmdPlacementError
from ..passes import Block, GroupRewrite, Placement, RewrittenGraph, Sharding
from .rewrite import Unchanged, apply_plan, plan_graph

log = logging.getLogger(__name__)

CompilerFn = Callable[[torch.fx.GraphModule, list], Callable[..., Any]]


@dataclasses.dataclass(frozen=True, eq=False)
class CompileReport:
    """What the backend did with one graph (built once, when the graph is placed)."""

    nodes_before: int
    nodes_after: int
    blocks: tuple[Block, ...]  # as the graph holds them now (members: with their delta)
    plan: Plan | None
    rewrites: tuple[GroupRewrite, ...]
    bypass_edges: int
    fallback: str | None  # why the graph was compiled unchanged, or None
    placement: Placement | None = None  # mode="spmd": what this rank kept
    transport: str | None = None  # mode="spmd": what carries the collectives
    sharding: Sharding | None = None  # mode="spmd", tensor_parallel=True: what this rank split

    @classmethod
    def unchanged(cls, nodes: int, outcome: Unchanged) -> CompileReport:
        return cls(nodes, nodes, outcome.blocks, outcome.plan, (), 0, outcome.why)

    @classmethod
    def rewritten(cls, nodes_before: int, plan: Plan, rewritten: RewrittenGraph,
                  transport: str | None = None) -> CompileReport:
        return cls(nodes_before, len(rewritten.gm.graph.nodes), rewritten.blocks, plan, rewritten.rewrites,
                   rewritten.bypass_edges, None, rewritten.placement, transport, rewritten.sharding)

    @property
    def collectives(self) -> int:
        """Collectives per forward of this rank's graph (groups, bypass, tensor parallelism)."""
        tp = self.sharding.all_reduces + self.sharding.all_gathers if self.sharding else 0
        return (self.placement.collectives if self.placement else 0) + tp

    def __repr__(self) -> str:
        if self.fallback:
            return f"CompileReport(unchanged: {self.fallback})"
        where = ""
        if self.placement is not None:
            p = self.placement
            split = f", splits blocks {list(self.sharding.blocks)}" if self.sharding else ""
            where = (f", rank {p.rank}/{p.world_size} keeps {list(p.kept)}{split}, {self.collectives} collectives "
                     f"over {self.transport}")
        return (
            f"CompileReport({len(self.blocks)} blocks, {self.plan}, {len(self.rewrites)} groups "
            f"rewritten, {self.bypass_edges} bypass edges, nodes {self.nodes_before} -> {self.nodes_after}{where})"
        )


class CQILBackend:
    """A Dynamo backend for one :class:`CQILConfig`; ``reports`` holds a report per compiled graph."""

    def __init__(self, config: CQILConfig):
        self.config = config
        self.inner: CompilerFn = resolve_inner(config.inner)
        self.reports: list[CompileReport] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable[..., Any]:
        mode = execution_mode(self.config)
        if mode == "spmd":
            return self._compile_spmd(gm, example_inputs)
        report, rewritten = _rewrite(gm, self.config, example_inputs)
        self.reports.append(report)
        if rewritten is not None and mode == "concurrent":
            return compile_concurrent(rewritten, self.inner, example_inputs, cuda_graphs=self.config.cuda_graphs)
        return self.inner(gm, example_inputs)

    def _compile_spmd(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable[..., Any]:
        """Rewrite, agree with the other ranks, keep this rank's members, compile."""
        from ..passes import place_members, shard_blocks
        from ..passes.spmd import check_placeable
        from .distributed import agree, choose_transport, guard_collectives, spmd_world

        world = spmd_world(self.config.collective_timeout)
        nodes = len(gm.graph.nodes)
        counters["cqil"]["graphs"] += 1
        outcome = plan_graph(gm, self.config, example_inputs)
        tensor_parallel = self.config.tensor_parallel and world.world_size > 1
        if isinstance(outcome, Unchanged) and tensor_parallel and outcome.blocks and outcome.plan is not None:
            outcome = list(outcome.blocks), outcome.plan  # no groups: plain tensor parallelism
        shapes = input_shapes(gm, example_inputs)  # ranks called with other shapes raise here, naming them
        if isinstance(outcome, Unchanged):
            agree(world, f"unchanged ({outcome.why}); inputs {shapes}")
            report = _fallback(nodes, outcome)
        else:
            blocks, plan = outcome
            rewritten = apply_plan(gm, blocks, plan)
            try:
                check_placeable(rewritten.rewrites, world.world_size)
            except SpmdPlacementError as e:
                raise CQILPlanError(f"rank {world.rank}: {e}") from e
            agree(world, repr(plan) + (", tensor parallel" if tensor_parallel else "") + f"; inputs {shapes}")
            rewritten = place_members(rewritten, world.rank, world.world_size, world.group_name)
            if tensor_parallel:
                rewritten = shard_blocks(rewritten, world.rank, world.world_size, world.group_name,
                                         presharded_weights(gm, example_inputs), fallback=self.config.tp_fallback)
            transport = choose_transport(gm, world, self.config.transport)
            report = CompileReport.rewritten(nodes, plan, rewritten, transport)
            counters["cqil"]["collectives"] += report.collectives
            log.info("cqil: %s", report)
        self.reports.append(report)
        return guard_collectives(self.inner(gm, example_inputs), world)


def input_shapes(gm: torch.fx.GraphModule, example_inputs: Sequence) -> str:
    """The shapes of the graph's inputs that are not parameters or buffers (token ids, masks, positions)."""
    placeholders = gm.graph.find_nodes(op="placeholder")
    shown = [f"{p.target}: {list(x.shape)}" for p, x in zip(placeholders, example_inputs)
             if isinstance(x, torch.Tensor) and not isinstance(x, nn.Parameter)
             and "_parameters_" not in p.target and "_buffers_" not in p.target]
    return ", ".join(shown)


def presharded_weights(gm: torch.fx.GraphModule, example_inputs: Sequence) -> dict[str, str]:
    """Placeholder name -> "colwise"/"rowwise" for weights a per-rank loader left holding only a slice
    (:func:`cqil_fx.graph.weights.load_rank_weights` marks them)."""
    from .weights import SHARD_ATTRIBUTE

    placeholders = gm.graph.find_nodes(op="placeholder")
    return {p.name: getattr(x, SHARD_ATTRIBUTE) for p, x in zip(placeholders, example_inputs)
            if hasattr(x, SHARD_ATTRIBUTE)}


def make_backend(config: CQILConfig | Plan | None = None, **fields: Any) -> CQILBackend:
    """A cqil backend for ``config`` (or ``CQILConfig(**fields)``; fields override ``config``).

    ``config`` may also be a :class:`Plan` (from the planner or ``Plan.load``).
    The config and the inner compiler are checked here, before any compile work.
    """
    if isinstance(config, Plan):
        config = CQILConfig(plan=config, **fields)
    elif config is None:
        config = CQILConfig(**fields)
    elif fields:
        config = dataclasses.replace(config, **fields)
    return CQILBackend(config)


def cqil_backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable[..., Any]:
    """The cqil backend with the default :class:`CQILConfig` (registered as ``"cqil"``)."""
    return _default_backend()(gm, example_inputs)


@functools.cache
def _default_backend() -> CQILBackend:
    return CQILBackend(CQILConfig())


def rewrite_graph(gm: torch.fx.GraphModule, config: CQILConfig, example_inputs: Sequence = ()) -> CompileReport:
    """Apply the CQIL passes to ``gm`` in place for ``config``; report what was done."""
    return _rewrite(gm, config, example_inputs)[0]


def _rewrite(gm: torch.fx.GraphModule, config: CQILConfig,
             example_inputs: Sequence) -> tuple[CompileReport, RewrittenGraph | None]:
    nodes = len(gm.graph.nodes)
    counters["cqil"]["graphs"] += 1
    outcome = plan_graph(gm, config, example_inputs)
    if isinstance(outcome, Unchanged):
        return _fallback(nodes, outcome), None
    blocks, plan = outcome
    rewritten = apply_plan(gm, blocks, plan)
    report = CompileReport.rewritten(nodes, plan, rewritten)
    log.info("cqil: %s", report)
    return report, rewritten


def _fallback(nodes: int, outcome: Unchanged) -> CompileReport:
    counters["cqil"]["fallbacks"] += 1
    log.log(outcome.level, "cqil: compiling graph of %d nodes unchanged: %s", nodes, outcome.why)
    return CompileReport.unchanged(nodes, outcome)


def execution_mode(config: CQILConfig) -> str:
    """The mode a config runs in now.

    "auto" is "spmd" under an initialised process group of more than one rank,
    otherwise "local" (docs/performance.md).
    """
    if config.mode != "auto":
        return config.mode
    from .distributed import distributed_world_size

    return "spmd" if distributed_world_size() > 1 else "local"


def compile_concurrent(rewritten: RewrittenGraph, inner: CompilerFn, example_inputs: list,
                       cuda_graphs: bool = False) -> Callable[..., Any]:
    """Split the rewritten graph into segments, compile each, and run groups on worker threads
    (CPU) or streams (CUDA), the CUDA program captured into a CUDA graph if ``cuda_graphs``."""
    from ..passes import has_inplace_ops, split_segments
    from .executor import ConcurrentProgram, CudaGraphProgram, static_inputs

    gm = rewritten.gm
    if any(isinstance(x, torch.SymInt) for x in example_inputs):
        # Segments are compiled on concrete inputs; a graph with symbolic sizes would need
        # each of them compiled dynamically.  Run it as one graph instead.
        log.info("cqil: graph has dynamic shapes; running it in local mode, not concurrent")
        counters["cqil"]["concurrent_fallbacks"] += 1
        return inner(gm, example_inputs)
    split = split_segments(rewritten)
    program = ConcurrentProgram(split).compile(inner, example_inputs)
    counters["cqil"]["segments"] += len(split.segments)
    log.info("cqil: concurrent mode: %d segments in %d steps", len(split.segments), len(program.steps))
    if not cuda_graphs:
        return program
    if not any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs):
        log.info("cqil: cuda_graphs=True but the graph's inputs are not on a CUDA device; running without them")
        return program
    return CudaGraphProgram(program, static_inputs(gm, example_inputs), has_inplace_ops(gm))


def resolve_inner(inner: str | CompilerFn) -> CompilerFn:
    """The compiler a rewritten graph is handed to."""
    if callable(inner):
        return inner
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx  # heavy: import on first use

        return compile_fx
    return torch._dynamo.lookup_backend(inner)
