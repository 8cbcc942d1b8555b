"""The plan of ``backend="cqil"`` with no plan fields: measured, remembered, never guessed.

    found = default_plan(gm, example_inputs, blocks, config)   # found.plan, found.source: "chosen" | "cached" | ...

1. **Cache.** The key (:class:`cqil_fx.planning.cache.PlanKey`) is computed
   from the graph: the blocks' kinds and a fingerprint of their weights,
   which Dynamo passes as example inputs. The plan chosen for these weights
   ahead of time (:func:`cqil_fx.planning.plan`) comes first; then a plan
   searched earlier for the same budget and group size. A hit is used as it
   is, with no search (a second process compiling the same model).
2. **Search on text the model writes.** On a miss, the backend looks for the
   model object whose parameters the graph reads (a fallback: Dynamo hands a
   backend the graph and its inputs, not the module, so :func:`find_model`
   walks the Python frames of the call being compiled for an ``nn.Module``
   that owns every parameter the graph takes, checked by identity; a model
   held by a pipeline or called through another object may not be found).
   With it, :func:`cqil_fx.planning.auto.plan_default` lets the model write
   its own calibration text and searches under the budget; the plan is
   cached. A model that search cannot run (not a transformers causal LM: no
   ``.logits``, no ``use_cache``) gets a WARNING and step 3.
3. **First inputs.** Without a model object, the graph itself is searched on
   the token ids it was traced with, if there are at least
   :data:`MIN_FIRST_TOKENS` of them (:func:`cqil_fx.planning.auto.search_graph_plan`).
4. **Nothing.** Otherwise, or when no plan fits the budget, the graph is
   compiled unchanged, with one log line saying why and what to do.

Weights that cannot be fingerprinted have no key: steps 2-4 run every time,
uncached, with one log line. Under a process group of more than one rank,
rank 0 goes through these steps alone and the other ranks receive its answer
(:mod:`cqil_fx.planning.shared`), so their weights (released or sharded per
rank) need not match and no rank searches while another waits in a collective.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Sequence

import torch
import torch.fx
from torch import nn

from ..config import CQILConfig, Plan
from ..passes import Block
from ..stack import decoder_layers
from . import cache
from .auto import SAFETY, default_search_settings, plan_default, search_graph_plan
from .shared import on_rank0

log = logging.getLogger(__name__)

MIN_FIRST_TOKENS = 256


@dataclasses.dataclass(frozen=True)
class DefaultPlan:
    """The plan and where it came from: "chosen" (by :func:`cqil_fx.planning.plan`), "cached", "searched"
    (text the model wrote), "searched on the first inputs", or None with ``why`` when there is no plan."""

    plan: Plan | None
    source: str | None
    cost: float | None = None  # the promise: relative perplexity increase on the calibration text
    why: str = ""

    def to_json(self) -> dict:
        return {"plan": self.plan.to_dict() if self.plan is not None else None, "source": self.source,
                "cost": self.cost, "why": self.why}

    @classmethod
    def from_json(cls, data: dict) -> DefaultPlan:
        plan = Plan.from_dict(data["plan"]) if data["plan"] is not None else None
        return cls(plan, data["source"], data["cost"], data["why"])


def default_plan(gm: torch.fx.GraphModule, example_inputs: Sequence, blocks: Sequence[Block],
                 config: CQILConfig) -> DefaultPlan:
    """The default plan for this graph's model (see the module docstring)."""
    found = on_rank0(lambda: _resolve(gm, example_inputs, blocks, config), DefaultPlan.to_json,
                     DefaultPlan.from_json, config.collective_timeout, "the default plan")
    return _checked(found, blocks)


def _resolve(gm: torch.fx.GraphModule, example_inputs: Sequence, blocks: Sequence[Block],
             config: CQILConfig) -> DefaultPlan:
    key = graph_plan_key(gm, example_inputs, blocks, config)
    cached = lookup(key)
    if cached is not None:
        return cached
    if key is None:
        log.info("cqil: the model's weights cannot be fingerprinted, so its plan is searched without the cache")
    model = find_model(example_inputs)
    without = "no model object to plan on"
    if model is not None:
        without = "a model object the search cannot run (the WARNING above)"
        log.info("cqil: no plan for this model in the cache; searching one now (minutes; run cqil_fx.plan(model) "
                 "once ahead of time to skip this)")
        try:
            return search_and_cache(model, key, config)
        except Exception as e:  # noqa: BLE001 - a model the eager search cannot run: say so, plan on the graph
            log.warning("cqil: the default plan's search cannot run %s (%s: %s), which it calls as a "
                        "transformers causal LM (model(ids, use_cache=False).logits); searching the graph on "
                        "its first inputs instead", type(model).__name__, type(e).__name__, str(e)[:200])
    return _first_inputs(gm, example_inputs, blocks, config, without)


def lookup(key: cache.PlanKey | None) -> DefaultPlan | None:
    """The chosen plan for the key's weights, else the plan searched for the key, else None."""
    if key is None:
        return None
    for entry, source in ((key.chosen(), "chosen"), (key, "cached")):
        hit = cache.load_plan(entry)
        if hit is not None:
            return DefaultPlan(hit[0], source, hit[1].get("cost"))
    return None


def plan_key(kinds: Sequence[str], block_weights: Sequence[Sequence[torch.Tensor]],
             config: CQILConfig) -> cache.PlanKey | None:
    """The cache key of the default plan for these blocks, weights and ``config``'s budget and group size."""
    return cache.PlanKey.of(kinds, block_weights, config.budget, config.parallel, search=default_search_settings())


def model_plan_key(model: nn.Module, kinds: Sequence[str], config: CQILConfig) -> cache.PlanKey | None:
    """The cache key of the default plan, from the model object (equal to the graph's for the same model)."""
    return plan_key(kinds, [list(layer.parameters()) for layer in decoder_layers(model)], config)


def graph_plan_key(gm: torch.fx.GraphModule, example_inputs: Sequence, blocks: Sequence[Block],
                   config: CQILConfig) -> cache.PlanKey | None:
    """The cache key of the default plan, from the graph's blocks and their weights."""
    index = {node: i for i, node in enumerate(gm.graph.find_nodes(op="placeholder"))}
    # Parameters only: a decode graph also takes the layers' KV caches, whose contents change every step.
    weights = [[example_inputs[index[p]] for p in b.params if p in index
                and isinstance(example_inputs[index[p]], nn.Parameter)] for b in blocks]
    return plan_key([b.kind for b in blocks], weights, config)


def default_plan_for_model(model: nn.Module, kinds: Sequence[str], config: CQILConfig,
                           progress: bool = True) -> DefaultPlan:
    """The default plan of a model object: chosen or cached, or searched on text it writes and cached."""
    key = model_plan_key(model, kinds, config)
    return lookup(key) or search_and_cache(model, key, config, progress)


def search_and_cache(model: nn.Module, key: cache.PlanKey | None, config: CQILConfig,
                     progress: bool = True) -> DefaultPlan:
    """:func:`~cqil_fx.planning.auto.plan_default` on ``model``, stored under ``key`` (None: not stored)."""
    with torch.compiler.set_stance("force_eager"), torch.no_grad():
        search = plan_default(model, parallel=config.parallel, budget=config.budget, progress=progress)
    if key is not None:
        cache.store_plan(key, search.plan, {"cost": search.cost, "measure": search.measure,
                                            "trials": len(search.trials)})
    return DefaultPlan(search.plan, "searched", search.cost)


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
    from .graph_meter import token_input_index

    try:
        ids = example_inputs[token_input_index(gm)]
    except Exception:  # noqa: BLE001 - not calibratable: say so below
        ids = None
    if not isinstance(ids, torch.Tensor) or ids.numel() < MIN_FIRST_TOKENS:
        return DefaultPlan(None, None, why=(
            f"no cached plan, {without}, and too few traced tokens to plan on "
            f"(fewer than {MIN_FIRST_TOKENS}); run cqil_fx.plan(model) once before compiling, "
            "or pass calibration= or a plan"))
    search = search_graph_plan(gm, example_inputs, blocks,
                               dataclasses.replace(config, calibration=[ids], budget=SAFETY * config.budget))
    if search is None:
        return DefaultPlan(None, None, why="the graph cannot be run on its own inputs to plan")
    return DefaultPlan(search.plan, "searched on the first inputs", search.cost)


def _checked(found: DefaultPlan, blocks: Sequence[Block]) -> DefaultPlan:
    plan = found.plan
    if plan is None or not plan.groups:
        why = found.why or "no group of blocks fits the quality budget"
        return DefaultPlan(None, found.source, found.cost, why=why)
    plan.check_block_kinds({b.index: b.kind for b in blocks})
    return found
