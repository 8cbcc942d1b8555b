"""Automatic planning: the groups that save the most block-time within a quality budget.

    search = plan_auto(model, token_batches(tokenizer, "calibration", 256, 8), parallel=2, budget=0.10)
    print(search.plan)            # Plan(30 blocks: ..., bypass 1, saves 5 block-times)
    search.plan.save("plan.json")
    fast = torch.compile(model, backend=make_backend(search.plan))

The search, on the calibration split only:

1. *Rank* every window of ``parallel`` adjacent blocks by the similarity of
   its members' inputs (the paper's signal, cheap: one pass).
2. *Screen* the best-ranked windows alone, measuring the perplexity each
   costs (one evaluation per window and bypass distance).
3. *Grow* the plan greedily: try the windows in order of measured cost, keep
   each that does not overlap a chosen one and keeps the whole plan's
   perplexity within ``(1 + budget)`` times the original's; the bypass
   distance is re-chosen (lowest perplexity) at every step.

The measured error decides; similarity only orders the work.  Windows can
land anywhere in the stack, so the plan need not be uniform or contiguous.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .config import DEFAULT_BUDGET, CQILConfig, Plan
from .errors import CQILConfigError
from .quality import perplexity
from .reference import branches_of, decoder_layers
from .similarity import SimilarityReport, _progress, measure_similarity

log = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class Trial:
    """One measured plan of the search."""

    groups: tuple[tuple[int, ...], ...]
    bypass: int
    perplexity: float
    accepted: bool


@dataclasses.dataclass(frozen=True)
class PlanSearch:
    """The chosen plan and how it was found."""

    plan: Plan
    base_perplexity: float
    perplexity: float
    budget: float
    similarity: SimilarityReport
    trials: tuple[Trial, ...]

    def __str__(self) -> str:
        return (
            f"{self.plan}: calibration perplexity {self.base_perplexity:.3f} -> {self.perplexity:.3f} "
            f"({self.perplexity / self.base_perplexity - 1:+.1%}, budget +{self.budget:.0%}; "
            f"{len(self.trials)} plans measured)"
        )


def plan_auto(model: nn.Module, calibration: Sequence[torch.Tensor], parallel: int = 2,
              budget: float = DEFAULT_BUDGET, bypass: Sequence[int] | None = None,
              screen: int | None = None, progress: bool = True) -> PlanSearch:
    """Search a plan for ``model`` on ``calibration`` batches of token ids (see module docs).

    ``bypass``: the distances to consider (default: every legal one for the
    model's block kind and ``parallel``).  ``screen``: how many of the
    best-ranked windows to measure (default: all).
    """
    if parallel < 2:
        raise CQILConfigError(f"parallel={parallel}: automatic planning needs groups of at least 2 blocks")
    if budget < 0:
        raise CQILConfigError(f"budget={budget} must be >= 0 (a relative perplexity increase, e.g. 0.1)")
    layers = decoder_layers(model)
    sequential = all(branches_of(layer).kind == "sequential" for layer in layers)
    distances = tuple(bypass) if bypass is not None else (tuple(range(parallel)) if sequential else (0,))
    similarity = measure_similarity(model, calibration, progress=progress)

    def evaluate(groups: tuple[tuple[int, ...], ...], d: int) -> float:
        return perplexity(model, calibration, plan=Plan(len(layers), groups, d))

    return search_plan(len(layers), parallel, budget, distances, similarity,
                       perplexity(model, calibration), evaluate, screen, progress)


def search_graph_plan(gm: torch.fx.GraphModule, example_inputs: Sequence, blocks: Sequence,
                      config: CQILConfig) -> PlanSearch:
    """:func:`plan_auto` on a captured graph (inside the backend), per ``config``'s
    ``parallel``, ``budget`` and ``calibration``."""
    from .calibration import GraphCalibration

    runner = GraphCalibration(gm, example_inputs, config.calibration)
    sequential = all(b.kind == "sequential" for b in blocks)
    distances = tuple(range(config.parallel)) if sequential else (0,)

    def evaluate(groups: tuple[tuple[int, ...], ...], d: int) -> float:
        return runner.perplexity(Plan(len(blocks), groups, d))

    return search_plan(len(blocks), config.parallel, config.budget, distances, runner.similarity(blocks),
                       runner.perplexity(), evaluate, progress=False)


def search_plan(num_blocks: int, parallel: int, budget: float, distances: Sequence[int],
                similarity: SimilarityReport, base: float,
                evaluate: Callable[[tuple[tuple[int, ...], ...], int], float],
                screen: int | None = None, progress: bool = True) -> PlanSearch:
    """The rank / screen / grow search over any ``evaluate(groups, bypass) -> perplexity``."""
    windows = [tuple(range(i, i + parallel)) for i in range(num_blocks - parallel + 1)]
    windows.sort(key=similarity.group_similarity, reverse=True)
    windows = windows[:screen] if screen else windows
    limit = base * (1 + budget)
    trials: list[Trial] = []

    def best(groups: tuple[tuple[int, ...], ...], accept_below: float) -> tuple[float, int]:
        scored = [(evaluate(groups, d), d) for d in distances]
        ppl, d = min(scored)
        trials.extend(Trial(groups, dd, p, p == ppl and p <= accept_below) for p, dd in scored)
        return ppl, d

    cost = {w: best((w,), limit)[0] for w in _progress(windows, progress, "screen windows")}
    chosen: tuple[tuple[int, ...], ...] = ()
    chosen_ppl, chosen_d = base, 0
    for w in _progress(sorted(windows, key=cost.__getitem__), progress, "grow plan"):
        if cost[w] > limit or any(set(w) & set(g) for g in chosen):
            continue
        groups = tuple(sorted(chosen + (w,)))
        ppl, d = best(groups, limit)
        if ppl <= limit:
            chosen, chosen_ppl, chosen_d = groups, ppl, d
            log.info("planner: kept %s (perplexity %.3f, bypass %d)", list(w), ppl, d)
    plan = Plan(num_blocks, chosen, chosen_d)
    return PlanSearch(plan, base, chosen_ppl, budget, similarity, tuple(trials))
