"""The plan of ``backend="cqil"`` with no arguments: measured, remembered, never guessed.

    plan, source = default_plan(gm, example_inputs, blocks, config)   # source: "cached" | "searched" | ...

1. **Cache.** The key (:class:`cqil_fx.plan_cache.PlanKey`) is computed from
   the graph: the blocks' kinds and a fingerprint of their weights, which
   Dynamo passes as example inputs, plus budget and group size. A hit is used
   as it is, with no search (a second process compiling the same model).
2. **Search on text the model writes.** On a miss, the backend looks for the
   model object whose parameters the graph reads: Dynamo hands a backend the
   graph and its inputs, not the module, so :func:`find_model` walks the
   Python frames of the call being compiled (``torch.compile(model)(...)``,
   ``model.generate`` with a compiled ``forward``) for an ``nn.Module`` that
   owns every parameter the graph takes, checked by identity. With it,
   :func:`cqil_fx.eager.planner.plan_default` lets the model write its own
   calibration text and searches under the budget; the plan is cached. A
   model that search cannot run (not a transformers causal LM: no ``.logits``,
   no ``use_cache``) gets a WARNING and step 3.
3. **First inputs.** Without a model object, the graph itself is searched on
   the token ids it was traced with, if there are at least
   :data:`MIN_FIRST_TOKENS` of them (:func:`cqil_fx.graph.calibration.search_graph_plan`).
4. **Nothing.** Otherwise, or when no plan fits the budget, the graph is
   compiled unchanged, with one log line saying why and what to do.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Sequence

import torch
import torch.fx
from torch import nn

from .. import plan_cache
from ..config import CQILConfig, Plan
from ..passes import Block

log = logging.getLogger(__name__)

MIN_FIRST_TOKENS = 256


@dataclasses.dataclass(frozen=True)
class DefaultPlan:
    """The plan and where it came from: "cached", "searched" (text the model wrote), "searched on the
    first inputs", or None with ``why`` when there is no plan."""

    plan: Plan | None
    source: str | None
    cost: float | None = None  # the promise: relative perplexity increase on the calibration text
    why: str = ""


def default_plan(gm: torch.fx.GraphModule, example_inputs: Sequence, blocks: Sequence[Block],
                 config: CQILConfig) -> DefaultPlan:
    """The default plan for this graph's model (see the module docstring)."""
    key = graph_plan_key(gm, example_inputs, blocks, config)
    cached = plan_cache.load_plan(key)
    if cached is not None:
        plan, info = cached
        return _checked(DefaultPlan(plan, "cached", info.get("cost")), blocks)
    model = find_model(example_inputs)
    without = "no model object to plan on"
    if model is not None:
        without = "a model object the search cannot run (the WARNING above)"
        try:
            return _checked(search_and_cache(model, key, config), blocks)
        except Exception as e:  # noqa: BLE001 - a model the eager search cannot run: say so, plan on the graph
            log.warning("cqil: the default plan's search cannot run %s (%s: %s), which it calls as a "
                        "transformers causal LM (model(ids, use_cache=False).logits); searching the graph on "
                        "its first inputs instead", type(model).__name__, type(e).__name__, str(e)[:200])
    return _first_inputs(gm, example_inputs, blocks, config, without)


def model_plan_key(model: nn.Module, kinds: Sequence[str], config: CQILConfig) -> plan_cache.PlanKey:
    """The cache key of the default plan, from the model object (equal to the graph's for the same model)."""
    from ..stack import decoder_layers

    layers = decoder_layers(model)
    return plan_cache.PlanKey.of(kinds, [list(layer.parameters()) for layer in layers], config.budget,
                                 config.parallel)


def default_plan_for_model(model: nn.Module, kinds: Sequence[str], config: CQILConfig) -> DefaultPlan:
    """The default plan of a model object: cached, or searched on text it writes and cached."""
    key = model_plan_key(model, kinds, config)
    cached = plan_cache.load_plan(key)
    if cached is not None:
        return DefaultPlan(cached[0], "cached", cached[1].get("cost"))
    return search_and_cache(model, key, config)


def search_and_cache(model: nn.Module, key: plan_cache.PlanKey, config: CQILConfig) -> DefaultPlan:
    from ..eager.planner import plan_default

    with torch.compiler.set_stance("force_eager"), torch.no_grad():
        search = plan_default(model, parallel=config.parallel, budget=config.budget, progress=True)
    plan_cache.store_plan(key, search.plan, {"cost": search.cost, "measure": search.measure,
                                             "trials": len(search.trials)})
    return DefaultPlan(search.plan, "searched", search.cost)


def graph_plan_key(gm: torch.fx.GraphModule, example_inputs: Sequence, blocks: Sequence[Block],
                   config: CQILConfig) -> plan_cache.PlanKey:
    """The cache key of the default plan, from the graph's blocks and their weights."""
    index = {node: i for i, node in enumerate(gm.graph.find_nodes(op="placeholder"))}
    # Parameters only: a decode graph also takes the layers' KV caches, whose contents change every step.
    weights = [[example_inputs[index[p]] for p in b.params if p in index
                and isinstance(example_inputs[index[p]], nn.Parameter)] for b in blocks]
    return plan_cache.PlanKey.of([b.kind for b in blocks], weights, config.budget, config.parallel)


def find_model(example_inputs: Sequence) -> nn.Module | None:
    """The ``nn.Module`` being compiled, found on the Python stack: it owns every parameter the graph takes.

    Returns the module itself (not a ``torch.compile`` wrapper), or None.
    """
    wanted = {id(x) for x in example_inputs if isinstance(x, nn.Parameter)}
    if not wanted:
        return None
    frame = sys._getframe(1)
    seen: set[int] = set()
    while frame is not None:
        for value in list(frame.f_locals.values()):
            module = getattr(value, "_orig_mod", value)  # torch.compile's OptimizedModule
            module = getattr(module, "__self__", module)  # a bound (compiled) forward
            if isinstance(module, nn.Module) and id(module) not in seen:
                seen.add(id(module))
                if wanted <= {id(p) for p in module.parameters()}:
                    return module
        frame = frame.f_back
    return None


def _first_inputs(gm: torch.fx.GraphModule, example_inputs: Sequence, blocks: Sequence[Block],
                  config: CQILConfig, without: str) -> DefaultPlan:
    from ..eager.planner import SAFETY
    from .calibration import _token_input_index, search_graph_plan

    try:
        ids = example_inputs[_token_input_index(gm)]
    except Exception:  # noqa: BLE001 - not calibratable: say so below
        ids = None
    if not isinstance(ids, torch.Tensor) or ids.numel() < MIN_FIRST_TOKENS:
        return DefaultPlan(None, None, why=(
            f"no cached plan, {without}, and too few traced tokens to plan on "
            f"(fewer than {MIN_FIRST_TOKENS}); compile with torch.compile(model, ...) and call it, run "
            "`cqil-fx plan --model DIR --default` once, or pass calibration= or a plan"))
    search = search_graph_plan(gm, example_inputs, blocks,
                               dataclasses.replace(config, calibration=[ids], budget=SAFETY * config.budget))
    if search is None:
        return DefaultPlan(None, None, why="the graph cannot be run on its own inputs to plan")
    return _checked(DefaultPlan(search.plan, "searched on the first inputs", search.cost), blocks)


def _checked(found: DefaultPlan, blocks: Sequence[Block]) -> DefaultPlan:
    plan = found.plan
    if plan is None or not plan.groups:
        return DefaultPlan(None, found.source, found.cost, why="no group of blocks fits the quality budget")
    plan.check_block_kinds({b.index: b.kind for b in blocks})
    return found
