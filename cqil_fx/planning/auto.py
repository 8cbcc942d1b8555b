"""Automatic planning: the groups that save the most block-time within a quality budget.

    search = plan_auto(model, token_batches(tokenizer, "calibration", 256, 8), parallel=2, budget=0.10)
    print(search.plan)            # Plan(30 blocks: ..., bypass 1, saves 5 block-times)
    search.plan.save("plan.json")
    fast = torch.compile(model, backend=make_backend(search.plan))

    search = plan_default(model)  # what backend="cqil" runs with no arguments: no data needed
    search = search_graph_plan(gm, example_inputs, blocks, config)   # inside the backend, on the graph

The search itself (rank by similarity, screen windows, grow greedily) is
:func:`cqil_fx.planning.search.search_plan`; a
:class:`~cqil_fx.planning.meter.Meter` measures its candidates, on the model
object (:func:`plan_auto`, :func:`plan_default`) or on the captured graph
(:func:`search_graph_plan`), with :func:`search_with` between them. Two
measures on the model:

* ``measure="perplexity"``: the perplexity of the calibration text under the
  plan against the original's;
* ``measure="kl"``: the mean KL divergence from the original's next-token
  distribution to the plan's, over every position, reported as ``exp(KL)``:
  on text the original wrote itself (temperature 1) that is, in expectation,
  the perplexity ratio the plan costs, and it uses the whole distribution at
  every position rather than one sampled token, so it needs fewer tokens.

``correct=True`` fits a closed-form correction for every group
(:mod:`cqil_fx.eager.correction`) on half of the calibration batches and
measures on the other half, so a plan's promise is not measured on the data
its corrections were fitted to.

``keep_copying=F`` keeps only plans that keep at least a share ``F`` of the
original's in-context copying (:func:`~cqil_fx.eager.quality.measure_copying`,
on repeated random sequences of another seed than the ones the quality
reports measure; :class:`cqil_fx.planning.search.CopyingFloor`).

:func:`plan_default` is the data-free plan of ``backend="cqil"``: the model
writes its own calibration text (:mod:`cqil_fx.planning.self_text`), and the
search runs on it with the KL measure and corrections, at the budget scaled
by :data:`SAFETY` (the margin measured between calibration promise and
held-out outcome, docs/results/quality.md), keeping :data:`KEEP_COPYING` of the
original's copying.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.fx
from torch import nn

from ..config import DEFAULT_BUDGET, CQILConfig, Plan
from ..eager.correction import DEFAULT_RIDGE, fit_corrections
from ..eager.reference import branches_of
from ..eager.replay import BlockOutputs
from ..errors import CQILConfigError, UncalibratableGraphError
from ..passes import Block
from ..stack import decoder_layers
from . import self_text
from .graph_meter import GraphMeter
from .meter import MEASURES, EagerMeter, Meter
from .search import (COPYING_SEED, GROW_PATIENCE, KEEP_COPYING, CopyingFloor, Groups, PlanSearch,
                     check_keep_copying, check_search_args, search_plan)

log = logging.getLogger(__name__)

# plan_default searches at SAFETY * budget. Measured (docs/notes/studies/plan_transfer.py, docs/notes/quality-notes.md):
# the promise on self-written text (KL, corrections) was within 0.2 points of the cost on held-out licence
# text for the plans found at +6 % and +10 %; the 10 % margin is for what two plans cannot show.
SAFETY = 0.9
# plan_default keeps KEEP_COPYING (cqil_fx.planning.search) of the original's copying. Measured
# (docs/notes/studies/plan_transfer.py --keep-copying, docs/notes/quality-notes.md): on SmolLM2 the search without it chose
# [17-18] [26-27] (copying 62.7 % -> 35.3 %, licences +8.1 %), with it [14-15] [26-27] (63.5 %, +6.5 %).


def plan_auto(model: nn.Module, calibration: Sequence[torch.Tensor], parallel: int = 2,
              budget: float = DEFAULT_BUDGET, bypass: Sequence[int] | None = None,
              screen: int | None = None, progress: bool = True, measure: str = "perplexity",
              correct: bool = False, beam: int = 1, keep_copying: float | None = None) -> PlanSearch:
    """Search a plan for ``model`` on ``calibration`` batches of token ids (see module docs).

    ``bypass``: the distances to consider (default: every legal one for the
    model's block kind and ``parallel``).  ``screen``: how many of the
    best-ranked windows to measure (default: all). ``beam``: plans grown at once
    (:func:`cqil_fx.planning.search_plan`; 1, the default, grows one greedily).
    ``keep_copying``: the share of the original's in-context copying a plan must keep (module docs;
    None: not measured).
    """
    check_search_args(parallel, budget)
    if measure not in MEASURES:
        raise CQILConfigError(f"measure={measure!r} is unknown; use one of {', '.join(MEASURES)}")
    check_keep_copying(keep_copying)
    calibration = list(calibration)
    if correct and len(calibration) < 2:
        raise CQILConfigError("correct=True needs at least two calibration batches (one to fit, one to measure)")
    layers = decoder_layers(model)
    sequential = all(branches_of(layer).kind == "sequential" for layer in layers)
    distances = tuple(bypass) if bypass is not None else (tuple(range(parallel)) if sequential else (0,))
    fit, held = (calibration[::2], calibration[1::2]) if correct else ([], calibration)
    meter = EagerMeter(model, held, measure, similarity_batches=calibration, progress=progress)
    fit_outputs = BlockOutputs.of(model, fit) if correct else None  # the fit batches' original, once
    built: dict[tuple[Groups, int], Plan] = {}

    def build(groups: Groups, d: int) -> Plan:
        if (groups, d) not in built:
            plan = Plan(len(layers), groups, d)
            built[groups, d] = fit_corrections(model, plan, fit, outputs=fit_outputs) if correct else plan
        return built[groups, d]

    return search_with(meter, len(layers), parallel, budget, distances, build=build, correct=correct,
                       screen=screen, progress=progress, beam=beam, keep_copying=keep_copying)


def search_with(meter: Meter, num_blocks: int, parallel: int, budget: float, distances: Sequence[int], *,
                build: Callable[[Groups, int], Plan] | None = None, correct: bool = False,
                screen: int | None = None, progress: bool = True, beam: int = 1,
                keep_copying: float | None = None) -> PlanSearch:
    """:func:`~cqil_fx.planning.search.search_plan` with everything it measures taken from ``meter``.

    ``build(groups, bypass)`` makes the plan measured (default: a plain :class:`Plan`); with
    ``correct=True`` it fits corrections, and the windows are ordered by their uncorrected cost.
    """
    build = build or (lambda groups, d: Plan(num_blocks, groups, d))
    similarity = meter.similarity()
    base = meter.base

    def evaluate(groups: Groups, d: int) -> float:
        return meter(build(groups, d))

    def uncorrected(groups: Groups, d: int) -> float:  # orders the windows; kept ones are measured corrected
        return meter(Plan(num_blocks, groups, d))

    floor = None if keep_copying is None else CopyingFloor(meter.copying, keep_copying, build)
    return search_plan(num_blocks, parallel, budget, distances, similarity, base, evaluate, screen,
                       progress, build=build, measure=meter.measure, screen_evaluate=uncorrected if correct else None,
                       beam=beam, admissible=floor)


def search_graph_plan(gm: torch.fx.GraphModule, example_inputs: Sequence, blocks: Sequence[Block],
                      config: CQILConfig) -> PlanSearch | None:
    """The automatic plan for a captured graph (inside the backend), per ``config``'s ``parallel``,
    ``budget`` and ``calibration``; None, with a WARNING, when the graph cannot be calibrated.

    It measures perplexity on the graph, without corrections (the graph meter has no model to fit
    them on); :func:`cqil_fx.planning.plan` with ``calibration=`` searches the model with the KL
    measure and corrections, whose promise held on text of another kind (docs/user-guide.md)."""
    try:
        meter = GraphMeter(gm, example_inputs, config.calibration, blocks)
    except UncalibratableGraphError as e:
        log.warning("cqil: cannot calibrate this graph (%s); using the default plan", e)
        return None
    sequential = all(b.kind == "sequential" for b in blocks)
    distances = tuple(range(config.parallel)) if sequential else (0,)
    return search_with(meter, len(blocks), config.parallel, config.budget, distances, progress=False,
                       keep_copying=KEEP_COPYING)


def default_search_settings() -> dict[str, object]:
    """What :func:`plan_default` searches with besides the model, the budget and P: part of the
    plan cache's key, so that a change to any of them searches again instead of reusing a plan
    found under other settings."""
    return {"self_tokens": self_text.SELF_TOKENS, "self_window": self_text.SELF_WINDOW, "seed": 0, "safety": SAFETY,
            "measure": "kl", "bypass": [0], "correct": True, "ridge": DEFAULT_RIDGE,
            "grow_patience": GROW_PATIENCE, "keep_copying": KEEP_COPYING, "copying_seed": COPYING_SEED}


def plan_default(model: nn.Module, parallel: int = 2, budget: float = DEFAULT_BUDGET, seed: int = 0,
                 tokens: int | None = None, progress: bool = True) -> PlanSearch:
    """The plan ``backend="cqil"`` uses with no arguments: :func:`plan_on_text` on text the model writes
    itself (:func:`~cqil_fx.planning.self_text.self_generated_text`, ``tokens`` of it, seeded by ``seed``)."""
    check_search_args(parallel, budget)
    tokens = self_text.SELF_TOKENS if tokens is None else tokens
    log.info("cqil: planning with no user data: the model writes %d tokens to calibrate on", tokens)
    model = self_text.uncompiled(model)  # its forward, not a compiled one: this may run inside a compile
    calibration = self_text.self_generated_text(model, tokens=tokens, seed=seed, progress=progress)
    return plan_on_text(model, calibration, parallel, budget, progress)


def plan_on_text(model: nn.Module, calibration: Sequence[torch.Tensor], parallel: int = 2,
                 budget: float = DEFAULT_BUDGET, progress: bool = True) -> PlanSearch:
    """The default plan's search on ``calibration`` batches of token ids: bypass distance 0 (one step
    per group in concurrent mode), the KL measure, corrections, ``SAFETY * budget`` as the search's
    limit, and ``KEEP_COPYING`` of the original's in-context copying kept.

    The returned search's ``budget`` is ``budget``; its ``cost`` is the promise on the calibration text.
    """
    check_search_args(parallel, budget)
    search = plan_auto(self_text.uncompiled(model), calibration, parallel=parallel, budget=SAFETY * budget,
                       bypass=(0,), progress=progress, measure="kl", correct=True, keep_copying=KEEP_COPYING)
    return PlanSearch(search.plan, search.base_perplexity, search.perplexity, budget, search.similarity,
                      search.trials, search.measure)
