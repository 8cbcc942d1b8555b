"""Planning, one stage between finding the blocks and rewriting them: which groups, measured how.

    import cqil_fx
    plan = cqil_fx.plan(model, budget=0.10)                 # ahead of time: search (or cache), remember
    fast = torch.compile(model, backend="cqil")              # finds that plan; no search inside the compile

The stage holds, bottom up:

* ``search.py``: the budgeted search (rank by similarity, screen, grow), :class:`PlanSearch`, the copying floor;
* ``meter.py``: :class:`Meter`, what measures a plan for the search, and :class:`EagerMeter` (the model
  object, module hooks); ``graph_meter.py``: :class:`GraphMeter` (copies of the captured graph);
* ``self_text.py``: text the model writes itself, the default plan's calibration;
* ``auto.py``: :func:`plan_auto` (the model, any text, perplexity or KL, corrections), :func:`plan_default`,
  :func:`plan_on_text`, :func:`search_graph_plan` (the graph, ``calibration=``);
* ``cache.py``: the on-disk plan cache; ``shared.py``: rank 0 plans for every rank under torch.distributed;
* ``default.py``: the default plan of ``backend="cqil"`` (cache, then search);
* ``graph_plan.py``: :func:`plan_graph`, what the backend asks for one captured graph.

Planning imports the passes (to find blocks and rewrite copies for the graph
meter) and the eager side (the reference semantics its eager meter runs); it
imports neither the runtime nor the compile path, which import it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from ..config import DEFAULT_BUDGET, CQILConfig, Plan
from ..eager.reference import branches_of
from ..errors import CQILConfigError
from ..stack import decoder_layers
from . import cache
from .auto import plan_auto, plan_default, plan_on_text, search_graph_plan
from .default import DefaultPlan, model_plan_key, search_and_cache
from .graph_plan import Planned, Unchanged, plan_graph
from .meter import EagerMeter, Meter
from .search import CopyingFloor, PlanSearch, Trial, search_plan
from .shared import on_rank0

log = logging.getLogger(__name__)

__all__ = ["CopyingFloor", "EagerMeter", "Meter", "PlanSearch", "Planned", "Trial", "Unchanged", "plan",
           "plan_auto", "plan_default", "plan_graph", "plan_on_text", "search_graph_plan", "search_plan"]


def plan(model: nn.Module, budget: float = DEFAULT_BUDGET, parallel: int = 2,
         calibration: Sequence[torch.Tensor] | None = None, *, progress: bool = True, remember: bool = True,
         collective_timeout: float = 300.0) -> Plan:
    """Plan ``model`` ahead of time: the groups that save the most block-time within ``budget``.

    Without ``calibration`` this is the plan ``backend="cqil"`` would search
    inside its first compile (:func:`~cqil_fx.planning.auto.plan_default`: the
    model writes its own text; KL to the original, corrections, a copying
    floor), taken from the plan cache when it was searched before for these
    weights, budget and group size. With ``calibration`` (batches of token
    ids of your own text) the same search runs on that text instead.

    It runs on the model's own device and dtype, shows progress, and (with
    ``remember``) records the result as the plan chosen for these weights,
    which ``torch.compile(model, backend="cqil")`` then uses however the model
    is called (a pipeline, a serving object, a compiled ``model.forward``),
    in this process and, through the plan cache, in later ones. Under
    ``torchrun`` call it on every rank: rank 0 searches, the others receive
    its plan, and no rank waits in a collective meanwhile (a rank gives up
    after ``collective_timeout`` seconds without a sign of rank 0).

    Returns the plan; one with no groups when nothing fits the budget (the
    backend then compiles the model unchanged).
    """
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd module
    if not isinstance(model, nn.Module):
        raise CQILConfigError(f"cqil_fx.plan needs the model (an nn.Module), got {type(model).__name__}")
    config = CQILConfig(budget=budget, parallel=parallel, collective_timeout=collective_timeout)
    if parallel < 2:
        raise CQILConfigError(f"parallel={parallel}: a plan needs groups of at least 2 blocks")
    layers = decoder_layers(model)
    kinds = [branches_of(layer).kind for layer in layers]
    key = model_plan_key(model, kinds, config)
    calibration = list(calibration) if calibration is not None else None

    def search() -> DefaultPlan:
        if calibration is None:
            hit = cache.load_plan(key) if key is not None else None
            return DefaultPlan(hit[0], "cached", hit[1].get("cost")) if hit else search_and_cache(model, key, config,
                                                                                                   progress)
        with torch.compiler.set_stance("force_eager"), torch.no_grad():
            found = plan_on_text(model, calibration, parallel, budget, progress)
        return DefaultPlan(found.plan, "searched on calibration=", found.cost)

    found = on_rank0(search, DefaultPlan.to_json, DefaultPlan.from_json, collective_timeout, "the plan")
    chosen = found.plan if found.plan is not None else Plan(len(layers), (), 0)
    if remember and key is not None:
        cache.store_plan(key.chosen(), chosen, {"cost": found.cost, "source": found.source, "budget": budget})
    elif remember:
        log.warning("cqil: the model's weights cannot be fingerprinted, so backend='cqil' cannot find this plan "
                    "by itself; compile with make_backend(plan) instead")
    promise = f", promised cost {found.cost:+.1%} on its calibration text" if found.cost is not None else ""
    log.info("cqil: plan for %s: %s (%s%s)", type(model).__name__, chosen, found.source, promise)
    return chosen
