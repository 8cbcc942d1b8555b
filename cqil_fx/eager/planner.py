"""Automatic planning on the eager model: the groups that save the most block-time within a quality budget.

    search = plan_auto(model, token_batches(tokenizer, "calibration", 256, 8), parallel=2, budget=0.10)
    print(search.plan)            # Plan(30 blocks: ..., bypass 1, saves 5 block-times)
    search.plan.save("plan.json")
    fast = torch.compile(model, backend=make_backend(search.plan))

The search itself (rank by similarity, screen windows, grow greedily) is
:func:`cqil_fx.planning.search_plan`; this module measures its candidates with
module hooks (:func:`cqil_fx.eager.quality.perplexity`) on the calibration split only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..config import DEFAULT_BUDGET, Plan
from ..planning import PlanSearch, check_search_args, search_plan
from ..stack import decoder_layers
from .quality import perplexity
from .reference import branches_of
from .similarity import measure_similarity


def plan_auto(model: nn.Module, calibration: Sequence[torch.Tensor], parallel: int = 2,
              budget: float = DEFAULT_BUDGET, bypass: Sequence[int] | None = None,
              screen: int | None = None, progress: bool = True) -> PlanSearch:
    """Search a plan for ``model`` on ``calibration`` batches of token ids (see module docs).

    ``bypass``: the distances to consider (default: every legal one for the
    model's block kind and ``parallel``).  ``screen``: how many of the
    best-ranked windows to measure (default: all).
    """
    check_search_args(parallel, budget)
    layers = decoder_layers(model)
    sequential = all(branches_of(layer).kind == "sequential" for layer in layers)
    distances = tuple(bypass) if bypass is not None else (tuple(range(parallel)) if sequential else (0,))
    similarity = measure_similarity(model, calibration, progress=progress)

    def evaluate(groups: tuple[tuple[int, ...], ...], d: int) -> float:
        return perplexity(model, calibration, plan=Plan(len(layers), groups, d))

    return search_plan(len(layers), parallel, budget, distances, similarity,
                       perplexity(model, calibration), evaluate, screen, progress)
