"""Automatic planning on the eager model: the groups that save the most block-time within a quality budget.

    search = plan_auto(model, token_batches(tokenizer, "calibration", 256, 8), parallel=2, budget=0.10)
    print(search.plan)            # Plan(30 blocks: ..., bypass 1, saves 5 block-times)
    search.plan.save("plan.json")
    fast = torch.compile(model, backend=make_backend(search.plan))

    search = plan_default(model)  # what backend="cqil" runs with no arguments: no data needed

The search itself (rank by similarity, screen windows, grow greedily) is
:func:`cqil_fx.planning.search_plan`; this module measures its candidates with
module hooks on calibration batches only. Two measures:

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
reports measure; :class:`cqil_fx.planning.CopyingFloor`).

:func:`plan_default` is the data-free plan of ``backend="cqil"``: the model
writes its own calibration text (:func:`self_generated_text`), and the search
runs on it with the KL measure and corrections, at the budget scaled by
:data:`SAFETY` (the margin measured between calibration promise and held-out
outcome, docs/quality.md), keeping :data:`KEEP_COPYING` of the original's
copying.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import nn

from ..config import DEFAULT_BUDGET, Plan
from ..errors import CQILConfigError
from ..planning import (COPYING_SEED, KEEP_COPYING, CopyingFloor, Groups, PlanSearch, check_keep_copying,
                        check_search_args, search_plan)
from ..progress import progress as _progress
from ..stack import decoder_layers
from ..tokens import token_windows
from .correction import fit_corrections
from .quality import measure_copying, perplexity
from .reference import branches_of, cqil_semantics
from .replay import BlockOutputs, first_group
from .similarity import measure_similarity

log = logging.getLogger(__name__)

MEASURES = ("perplexity", "kl")
# plan_default searches at SAFETY * budget. Measured (benchmarks/plan_transfer.py, docs/quality-notes.md):
# the promise on self-written text (KL, corrections) was within 0.2 points of the cost on held-out licence
# text for the plans found at +6 % and +10 %; the 10 % margin is for what two plans cannot show.
SAFETY = 0.9
SELF_TOKENS = 2048  # tokens the model writes for plan_default
SELF_WINDOW = 256  # ... in windows of this many tokens
# plan_default keeps KEEP_COPYING (cqil_fx.planning) of the original's copying. Measured
# (benchmarks/plan_transfer.py --keep-copying, docs/quality-notes.md): on SmolLM2 the search without it chose
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
    similarity = measure_similarity(model, calibration, progress=progress)
    meter = DistortionMeter(model, held, measure)
    fit_outputs = BlockOutputs.of(model, fit) if correct else None  # the fit batches' original, once
    built: dict[tuple[Groups, int], Plan] = {}

    def build(groups: Groups, d: int) -> Plan:
        if (groups, d) not in built:
            plan = Plan(len(layers), groups, d)
            built[groups, d] = fit_corrections(model, plan, fit, outputs=fit_outputs) if correct else plan
        return built[groups, d]

    def evaluate(groups: Groups, d: int) -> float:
        return meter(build(groups, d))

    def uncorrected(groups: Groups, d: int) -> float:  # orders the windows; kept ones are measured corrected
        return meter(Plan(len(layers), groups, d))

    floor = None if keep_copying is None else CopyingFloor(
        lambda plan: measure_copying(model, plan, seed=COPYING_SEED), keep_copying, build)

    return search_plan(len(layers), parallel, budget, distances, similarity, meter.base, evaluate, screen,
                       progress, build=build, measure=measure, screen_evaluate=uncorrected if correct else None,
                       beam=beam, admissible=floor)


class DistortionMeter:
    """What a plan costs on fixed batches: perplexity, or exp(mean KL) to the original's distribution.

    A plan is measured from its first group on (:mod:`cqil_fx.eager.replay`):
    the original's block outputs are recorded in the pass that measures the
    original, once.
    """

    def __init__(self, model: nn.Module, batches: Sequence[torch.Tensor], measure: str = "kl"):
        self.model, self.batches, self.measure = model, list(batches), measure
        self.outputs = BlockOutputs(model)
        with torch.no_grad(), self.outputs.recording():  # the original, once
            if measure == "kl":
                self.reference = [_log_probs(model, ids) for ids in self.batches]
                self.base = 1.0
            else:
                self.base = perplexity(model, self.batches)

    def __call__(self, plan: Plan) -> float:
        if self.measure == "kl":
            return math.exp(self.kl(plan))
        start = first_group(plan)
        return perplexity(self.model, self.batches, plan, per_batch=lambda b: self.outputs.replayed(b, start))

    def kl(self, plan: Plan) -> float:
        """Mean KL(original || plan) over every position of every batch."""
        total, count = 0.0, 0
        with torch.no_grad(), cqil_semantics(self.model, plan):
            for b, (ids, reference) in enumerate(zip(self.batches, self.reference)):
                with self.outputs.replayed(b, first_group(plan)):
                    logp = _log_probs(self.model, ids)
                total += (reference.exp() * (reference - logp)).sum().item()
                count += reference[..., 0].numel()
        return total / count


def _log_probs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(ids, use_cache=False).logits.float(), dim=-1)


# Openings of many kinds of text, for self-written text that covers more than what a model writes from
# its BOS token alone (``self_generated_text(openings=...)``, ``cqil-fx recover --self-openings varied``).
# Chosen to vary the kind (prose, dialogue, code, data, instructions, letters, science, news, fiction);
# nothing legal or licence-like, the kind of text the quality measurements hold out.
VARIED_OPENINGS = (
    "Chapter 1\n\n", "Ingredients:\n- ", "Q: How do", "Abstract. We study", "Dear Sam,\n\n", "BREAKING: ",
    "def main():\n    ", "Once upon a time", "Step 1:", "User: Can you", "| Name | Age |", "In mathematics, ",
    "The patient", "I bought this", "#include <stdio.h>\n", "Dialogue:\nA: ",
)


def self_generated_text(model: nn.Module, tokens: int | None = None, window: int | None = None,
                        seed: int = 0, batch: int | None = None, progress: bool = False,
                        openings: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """``tokens`` tokens the model writes itself, from its BOS token, as (1, window) batches of ids.

    Sampled at temperature 1 with top-p 0.95, ``batch`` sequences at a time
    (default: one sequence per window, at most 16 at a time, so each window is
    a text from its start and the steps of generation are few),
    with a private random generator seeded by ``seed`` (the same text for the
    same model and seed). Text the model writes is text of its own
    distribution, so the plan search needs no data from the user (the
    data-free calibration of LLM-QAT, Liu et al. 2023). ``tokens`` and
    ``window`` default to :data:`SELF_TOKENS` and :data:`SELF_WINDOW`.

    ``openings``: 1-D token ids (e.g. :data:`VARIED_OPENINGS` encoded) that
    each text starts from, after the BOS token, one opening per round of
    ``batch`` texts in turn; each window holds the opening and what follows.
    By default ``batch`` is then chosen so that every opening is used.
    """
    tokens = SELF_TOKENS if tokens is None else tokens
    window = SELF_WINDOW if window is None else window
    windows = tokens // max(window, 1)
    openings = list(openings or ())
    batch = batch or max(1, min(16, windows // max(len(openings), 1)))
    if tokens < window or window < 2:
        raise CQILConfigError(f"tokens={tokens} and window={window}: need at least one window of two or more tokens")
    if any(o.dim() != 1 or not 0 < len(o) < window for o in openings):
        raise CQILConfigError(f"openings must be 1-D token ids shorter than the window ({window}), got shapes "
                              f"{[tuple(o.shape) for o in openings]}")
    start = _start_token(model)
    device = next(model.parameters()).device
    ids = torch.full((batch, 1), start, dtype=torch.long, device=device)
    with torch.no_grad(), torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(seed)
        if windows <= batch and not openings:  # one round of sequences long enough for every window
            out = _sample(model, ids, -(-tokens // batch), progress)
            return token_windows(out[:, 1:].cpu(), window, windows)
        # Rounds of ``batch`` sequences of one window each, so each window is a text from its start
        # and no cache grows past a window (16 sequences of 2,048 tokens took over half an hour on
        # 2 cores, most of it copying the growing caches); each round from the next opening, if any.
        prompts = [torch.cat([ids, o.to(device).expand(batch, -1)], dim=1) for o in openings] or [ids]
        rounds = []
        for r in _progress(range(-(-windows // batch)), progress, "self-generated text"):
            prompt = prompts[r % len(prompts)]
            rounds.append(_sample(model, prompt, window + 1 - prompt.shape[1], False)[:, 1:].cpu())
    return token_windows(torch.cat(rounds), window, windows)


def _sample(model: nn.Module, ids: torch.Tensor, new_tokens: int, progress: bool) -> torch.Tensor:
    """Top-p sampling with a KV cache, through ``generate`` when the model has it."""
    generate = getattr(type(model), "generate", None)
    if generate is not None:
        plain = _uncompiled(model)
        steps = iter(_progress(range(new_tokens), progress, "self-generated text"))
        out = plain.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                             top_p=0.95, top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=_start_token(model), use_cache=True,
                             stopping_criteria=[_StepCounter(steps)])
        for _ in steps:  # closes the bar
            pass
        return out
    for _ in _progress(range(new_tokens), progress, "self-generated text"):  # any causal LM: no cache
        logits = model(ids).logits[:, -1].float()
        ids = torch.cat([ids, _top_p(logits, 0.95)], dim=1)
    return ids


class _StepCounter:
    """A ``generate`` stopping criterion that never stops and advances ``steps`` once per token."""

    def __init__(self, steps):
        self.steps = steps

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        next(self.steps, None)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    probs = torch.softmax(logits, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs < p
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(-1, keepdim=True), 1)
    return order.gather(-1, choice)


def _uncompiled(model: nn.Module) -> nn.Module:
    """``model`` with its class's own forward (a compiled ``forward`` attribute set aside), eager."""
    if "forward" not in vars(model):
        return model
    import copy

    plain = copy.copy(model)
    del plain.forward
    return plain


def _start_token(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        value = value[0] if isinstance(value, (list, tuple)) and value else value
        if isinstance(value, int) and 0 <= value < getattr(config, "vocab_size", value + 1):
            return value
    return 0


def default_search_settings() -> dict[str, object]:
    """What :func:`plan_default` searches with besides the model, the budget and P: part of the
    plan cache's key, so that a change to any of them searches again instead of reusing a plan
    found under other settings."""
    from ..planning import GROW_PATIENCE
    from .correction import DEFAULT_RIDGE

    return {"self_tokens": SELF_TOKENS, "self_window": SELF_WINDOW, "seed": 0, "safety": SAFETY,
            "measure": "kl", "bypass": [0], "correct": True, "ridge": DEFAULT_RIDGE,
            "grow_patience": GROW_PATIENCE, "keep_copying": KEEP_COPYING, "copying_seed": COPYING_SEED}


def plan_default(model: nn.Module, parallel: int = 2, budget: float = DEFAULT_BUDGET, seed: int = 0,
                 tokens: int | None = None, progress: bool = True) -> PlanSearch:
    """The plan ``backend="cqil"`` uses with no arguments: measured on text the model writes itself.

    Bypass distance 0 (one step per group in concurrent mode), the KL measure,
    corrections, ``SAFETY * budget`` as the search's limit, and ``KEEP_COPYING`` of the original's
    in-context copying kept. The returned
    search's ``budget`` is ``budget``; its ``cost`` is the promise on the
    calibration text.
    """
    check_search_args(parallel, budget)
    tokens = SELF_TOKENS if tokens is None else tokens
    log.info("cqil: planning with no user data: the model writes %d tokens to calibrate on", tokens)
    model = _uncompiled(model)  # its forward, not a compiled one: this runs inside a compile
    calibration = self_generated_text(model, tokens=tokens, seed=seed, progress=progress)
    search = plan_auto(model, calibration, parallel=parallel, budget=SAFETY * budget, bypass=(0,),
                       progress=progress, measure="kl", correct=True, keep_copying=KEEP_COPYING)
    return PlanSearch(search.plan, search.base_perplexity, search.perplexity, budget, search.similarity,
                      search.trials, search.measure)
