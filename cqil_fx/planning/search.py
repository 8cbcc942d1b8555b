"""The budgeted plan search, whatever measures the plans.

The search takes an ``evaluate(groups, bypass) -> perplexity`` and a
:class:`~cqil_fx.eager.similarity.SimilarityReport`; who runs the model does
not matter here. A :class:`~cqil_fx.planning.meter.Meter` supplies both: the
eager model with module hooks (:class:`~cqil_fx.planning.meter.EagerMeter`,
behind :func:`cqil_fx.planning.auto.plan_auto`) or copies of the captured
graph (:class:`~cqil_fx.planning.graph_meter.GraphMeter`, behind
:func:`cqil_fx.planning.auto.search_graph_plan`).

1. *Rank* every window of ``parallel`` adjacent blocks by the similarity of
   its members' inputs (the paper's signal, cheap: one pass).
2. *Screen* the best-ranked windows alone, measuring the perplexity each
   costs (one evaluation per window and bypass distance).
3. *Grow* the plan greedily: try the windows in order of measured cost, keep
   each that does not overlap a chosen one and keeps the whole plan's
   perplexity within ``(1 + budget)`` times the original's; the bypass
   distance is re-chosen (lowest perplexity) at every step. Growing stops
   after :data:`GROW_PATIENCE` windows in a row that do not fit.
   With ``beam=B > 1`` it grows ``B`` plans at once instead (a beam search):
   every step extends each kept plan by its ``2 B`` cheapest non-overlapping
   windows (cheapest alone, as screened), measures each extension *as a
   whole*, so windows that interact are judged together, and keeps the ``B``
   cheapest extensions within the budget; it ends when no extension fits and
   returns the plan with the most groups (the cheapest among those).

``admissible(groups, bypass)`` (optional) is a second condition every grown
plan must meet besides the budget, checked only on plans within the budget:
:class:`CopyingFloor`, the in-context copying a plan must keep (the eager
planner's ``keep_copying``, and the backend's searches on the graph).

The measured error decides; similarity only orders the work.  Windows can
land anywhere in the stack, so the plan need not be uniform or contiguous.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

from ..config import Plan
from ..eager.similarity import SimilarityReport
from ..errors import CQILConfigError
from ..progress import progress as _progress

log = logging.getLogger(__name__)

GROW_PATIENCE = 4  # growing stops after this many windows in a row that do not fit the budget
KEEP_COPYING = 0.9  # the share of the original's in-context copying the backend's plans keep (CopyingFloor)
COPYING_SEED = 1  # the repeated random sequences the floor measures (quality reports measure seed 0)
MIN_COPYING = 0.05  # no floor for a model that copies less than this (random weights: nothing to keep)


@dataclasses.dataclass(frozen=True)
class Trial:
    """One measured plan of the search; ``accepted``: the best bypass distance of these groups, within
    the budget (the greedy growth keeps every accepted plan of more than one group, the beam its cheapest)."""

    groups: tuple[tuple[int, ...], ...]
    bypass: int
    perplexity: float
    accepted: bool


@dataclasses.dataclass(frozen=True)
class PlanSearch:
    """The chosen plan and how it was found.

    ``perplexity`` and ``base_perplexity`` are what the search measured for the
    plan and the original: perplexities for ``measure="perplexity"``; for
    ``measure="kl"``, ``exp(mean KL)`` to the original's next-token
    distribution against 1.0 (the perplexity ratio the plan costs on text the
    original itself writes). ``cost`` is the relative increase either way: the
    plan's promise, within ``budget``.
    """

    plan: Plan
    base_perplexity: float
    perplexity: float
    budget: float
    similarity: SimilarityReport
    trials: tuple[Trial, ...]
    measure: str = "perplexity"

    @property
    def cost(self) -> float:
        return self.perplexity / self.base_perplexity - 1

    def __str__(self) -> str:
        if self.measure == "kl":
            measured = f"calibration cost {self.cost:+.1%} (exp KL to the original)"
        else:
            measured = (f"calibration perplexity {self.base_perplexity:.3f} -> {self.perplexity:.3f} "
                        f"({self.cost:+.1%})")
        return f"{self.plan}: {measured}, budget +{self.budget:.0%}; {len(self.trials)} plans measured"


class CopyingFloor:
    """``admissible`` for :func:`search_plan`: the plan keeps ``share`` of the original's in-context copying.

    ``copying(plan)`` measures it (``plan`` None: the original) on repeated random sequences
    (:func:`cqil_fx.eager.quality.repeated_random_tokens` of seed :data:`COPYING_SEED`); ``build(groups,
    bypass)`` makes the plan measured. Perplexity and KL on ordinary text hardly see copying, which runs
    through attention composing across blocks, so a plan within its budget can lose most of it
    (docs/notes/quality-notes.md, "In-context copying"). A model that copies less than :data:`MIN_COPYING` has
    none to keep: every plan passes.
    """

    def __init__(self, copying: Callable[[Plan | None], float], share: float,
                 build: Callable[[Groups, int], Plan]) -> None:
        check_keep_copying(share)
        self.copying, self.build = copying, build
        self.original = copying(None)
        self.floor = share * self.original
        if self.original < MIN_COPYING:
            log.info("planner: the model copies %.1f %% of repeated random tokens: no copying to keep",
                     100 * self.original)

    def __call__(self, groups: Groups, bypass: int) -> bool:
        if self.original < MIN_COPYING:
            return True
        kept = self.copying(self.build(groups, bypass))
        if kept < self.floor:
            log.info("planner: %s copies %.1f %% (the original %.1f %%), below the floor %.1f %%: not kept",
                     [list(g) for g in groups], 100 * kept, 100 * self.original, 100 * self.floor)
        return kept >= self.floor


def check_keep_copying(share: float | None) -> None:
    """Refuse a copying floor that is not a share in (0, 1] (None: no floor)."""
    if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1):
        raise CQILConfigError(f"keep_copying={share!r} must be a share in (0, 1], e.g. 0.9, or None")


def check_search_args(parallel: int, budget: float) -> None:
    """Refuse a search that cannot make a plan."""
    if parallel < 2:
        raise CQILConfigError(f"parallel={parallel}: automatic planning needs groups of at least 2 blocks")
    if budget < 0:
        raise CQILConfigError(f"budget={budget} must be >= 0 (a relative perplexity increase, e.g. 0.1)")


Groups = tuple[tuple[int, ...], ...]


def search_plan(num_blocks: int, parallel: int, budget: float, distances: Sequence[int],
                similarity: SimilarityReport, base: float, evaluate: Callable[[Groups, int], float],
                screen: int | None = None, progress: bool = True, *,
                build: Callable[[Groups, int], Plan] | None = None, measure: str = "perplexity",
                screen_evaluate: Callable[[Groups, int], float] | None = None, beam: int = 1,
                admissible: Callable[[Groups, int], bool] | None = None) -> PlanSearch:
    """The rank / screen / grow search over any ``evaluate(groups, bypass) -> perplexity``.

    ``base`` is the original's value of the same measure. ``build(groups,
    bypass)`` makes the chosen plan (default: a plain :class:`Plan`); give it
    when ``evaluate`` measures something more than the groups, such as fitted
    corrections, so the result is the plan that was measured.
    ``screen_evaluate`` (default ``evaluate``) measures the windows alone, to
    order them; a cheaper measure may do there, since every plan the search
    keeps is measured again with ``evaluate``. ``beam``: grow this many plans at once (module docs);
    1 is the greedy growth. ``admissible``: see the module docs; the windows alone are screened without it.
    """
    check_search_args(parallel, budget)
    if beam < 1:
        raise CQILConfigError(f"beam={beam} must be >= 1 (1: greedy growth)")
    windows = [tuple(range(i, i + parallel)) for i in range(num_blocks - parallel + 1)]
    windows.sort(key=similarity.group_similarity, reverse=True)
    windows = windows[:screen] if screen else windows
    limit = base * (1 + budget)
    trials: list[Trial] = []

    def best(groups: tuple[tuple[int, ...], ...], accept_below: float, measure=evaluate,
             check: bool = True) -> tuple[float, int, bool]:
        """The cheapest bypass distance's measure, the distance, and whether the plan is kept."""
        scored = [(measure(groups, d), d) for d in distances]
        ppl, d = min(scored)
        ok = ppl <= accept_below and (not check or admissible is None or admissible(groups, d))
        trials.extend(Trial(groups, dd, p, p == ppl and ok) for p, dd in scored)
        return ppl, d, ok

    screen_measure = screen_evaluate or evaluate
    screened = {w: best((w,), limit, screen_measure, check=False)
                for w in _progress(windows, progress, "screen windows")}

    def alone(w: tuple[int, ...]) -> tuple[float, int, bool]:
        """A window alone as the screen measured it with ``evaluate`` (not measured again), kept only if
        it is admissible too."""
        ppl, d, ok = screened[w]
        if ok and admissible is not None and not admissible((w,), d):
            trials.append(Trial((w,), d, ppl, False))
            ok = False
        return ppl, d, ok

    reuse = alone if screen_evaluate is None else None
    cost = {w: ppl for w, (ppl, _, _) in screened.items()}
    ordered = sorted(windows, key=cost.__getitem__)
    if beam > 1:
        usable = [w for w in ordered if cost[w] <= limit or screen_evaluate is not None]
        chosen, chosen_ppl, chosen_d = _grow_beam(usable, beam, base, limit, best, reuse, progress)
        plan = build(chosen, chosen_d) if build is not None and chosen else Plan(num_blocks, chosen, chosen_d)
        return PlanSearch(plan, base, chosen_ppl, budget, similarity, tuple(trials), measure)
    chosen: tuple[tuple[int, ...], ...] = ()
    chosen_ppl, chosen_d = base, 0
    misses = 0
    for w in _progress(ordered, progress, "grow plan"):
        if (cost[w] > limit and screen_evaluate is None) or any(set(w) & set(g) for g in chosen):
            continue
        if misses >= GROW_PATIENCE:  # the windows left cost more alone than those that did not fit
            break
        groups = tuple(sorted(chosen + (w,)))
        # a first window alone was measured by the screen, unless the screen measured otherwise
        ppl, d, ok = reuse(w) if reuse is not None and not chosen else best(groups, limit)
        if ok:
            chosen, chosen_ppl, chosen_d, misses = groups, ppl, d, 0
            log.info("planner: kept %s (perplexity %.3f, bypass %d)", list(w), ppl, d)
        else:
            misses += 1
    plan = build(chosen, chosen_d) if build is not None and chosen else Plan(num_blocks, chosen, chosen_d)
    return PlanSearch(plan, base, chosen_ppl, budget, similarity, tuple(trials), measure)


def _grow_beam(windows: Sequence[tuple[int, ...]], width: int, base: float, limit: float,
               best: Callable[[Groups, float], tuple[float, int, bool]],
               alone: Callable[[tuple[int, ...]], tuple[float, int, bool]] | None,
               progress: bool) -> tuple[Groups, float, int]:
    """The beam growth of :func:`search_plan` over ``windows`` (cheapest alone first): the plan with the most
    groups kept by ``best`` (within ``limit`` and admissible; the cheapest of those), its measure and bypass
    distance. ``alone(window)``: a window alone as the screen measured it, when the screen measured with
    ``evaluate`` (None: measure it again)."""
    measured: dict[Groups, tuple[float, int, bool]] = {}
    kept: list[tuple[Groups, float, int]] = [((), base, 0)]
    result = kept[0]
    step = 0
    while kept:
        step += 1
        extensions: dict[Groups, tuple[float, int]] = {}
        for groups, _, _ in _progress(kept, progress, f"grow plans, step {step}"):
            free = [w for w in windows if not any(set(w) & set(g) for g in groups)][:2 * width]
            for w in free:
                grown = tuple(sorted(groups + (w,)))
                if grown not in measured:
                    measured[grown] = alone(w) if alone is not None and not groups else best(grown, limit)
                if measured[grown][2]:
                    extensions[grown] = measured[grown][:2]
        kept = sorted(((g, p, d) for g, (p, d) in extensions.items()), key=lambda e: e[1])[:width]
        if kept:
            result = kept[0]  # more groups than any plan of the steps before
            log.info("planner: beam step %d: best %s (%.3f), %d plans measured", step,
                     [list(g) for g in result[0]], result[1], len(measured))
    return result
