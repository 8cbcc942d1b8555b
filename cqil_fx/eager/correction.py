"""Closed-form group corrections: a per-channel affine map of each group's deltas, fitted by least squares.

    plan = fit_corrections(model, Plan(30, ((20, 21), (22, 23)), 0), calibration_batches)
    plan.corrections[0].scale, plan.corrections[0].bias      # per member and channel; per channel
    fast = torch.compile(model, backend=make_backend(plan))   # every mode applies them

A group computes ``x + Σ_k Δ_k(x)`` where the blocks one after the other
compute ``seq(x)``. The correction makes it ``x + Σ_k s_k ⊙ Δ_k(x) + b`` with
``s_k`` and ``b`` chosen, channel by channel, to minimise
``Σ_tokens (seq(x) - x - Σ_k s_k Δ_k - b)²`` on calibration activations, a
``(P + 1)``-unknown least-squares problem per channel, solved in closed form
from the normal equations accumulated over the batches. ``ridge`` pulls the
solution towards no correction (``s = 1``, ``b = 0``) by that fraction of each
channel's mean squared delta, against overfitting a small calibration set.

At run time it costs one multiply per member and one add per group,
elementwise, which Inductor fuses into the group's sum.

``low_rank=r`` adds, per group, a linear term of rank r on top:
``x + Σ_k (s_k ⊙ Δ_k + (Δ_k D_k) U) + b`` (:class:`~cqil_fx.config.LowRank`),
fitted in a second pass by ridge regression of what the affine correction
still misses on the concatenated deltas, truncated to rank r by reduced-rank
regression (:class:`LowRankEquations`). It costs two matmuls per member,
``2 · hidden · r`` multiply-adds per token, in the member's own segment
(before the all-reduce in SPMD mode); its normal equations hold
``(P · hidden)²`` float64 numbers per group while fitting.

Why these forms: measured on SmolLM2 (docs/results/quality.md), a scale per member
and channel with a bias transfers to text of another kind even when fitted on
2,048 tokens, where a linear map of the deltas fitted on as few made unseen
text worse (issue 16's first measurement); fitted on ~100k tokens the linear
map carries over and takes a further quarter to two fifths off the cost
(docs/notes/quality-notes.md).

The activations: the model runs under :func:`cqil_semantics` of the plan
without corrections; each group's input ``x`` and member deltas are recorded
there, and ``seq(x)`` is the group's blocks run one after the other on that
``x`` with the same call arguments.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ..config import GroupCorrection, LowRank, Plan
from ..errors import CQILConfigError
from ..progress import progress as _progress
from ..stack import decoder_layers
from .reference import cqil_semantics, resolve_plan
from .replay import BlockOutputs, first_group

DEFAULT_RIDGE = 0.05
DEFAULT_LOW_RANK_RIDGE = 0.1  # the study's (docs/notes/studies/linear_correction.py)


class NormalEquations:
    """``AᵀA`` and ``Aᵀy`` per channel for ``y = target - x ≈ Σ_k s_k Δ_k + b``, summed over tokens."""

    def __init__(self, members: int, hidden: int):
        self.members = members
        self.gram = torch.zeros(hidden, members + 1, members + 1, dtype=torch.float64)
        self.rhs = torch.zeros(hidden, members + 1, dtype=torch.float64)
        self.tokens = 0

    def add(self, x: torch.Tensor, deltas: list[torch.Tensor], target: torch.Tensor) -> None:
        """One batch: ``x``, each delta and ``target`` shaped (..., hidden)."""
        hidden = x.shape[-1]
        columns = [d.reshape(-1, hidden).double() for d in deltas]
        columns.append(torch.ones_like(columns[0]))
        a = torch.stack(columns, dim=-1)  # (tokens, hidden, P + 1)
        y = (target - x).reshape(-1, hidden).double()
        self.gram += torch.einsum("thi,thj->hij", a, a)
        self.rhs += torch.einsum("thi,th->hi", a, y)
        self.tokens += a.shape[0]

    def solve(self, ridge: float = DEFAULT_RIDGE) -> GroupCorrection:
        """The per-channel least-squares solution, pulled towards ``s = 1, b = 0`` by ``ridge``."""
        if not self.tokens:
            raise CQILConfigError("a correction needs calibration activations: no tokens were seen")
        p = self.members
        prior = torch.zeros(p + 1, dtype=torch.float64)
        prior[:p] = 1.0
        strength = ridge * self.gram.diagonal(dim1=1, dim2=2)[:, :p].mean(-1)  # per channel
        penalty = torch.zeros_like(self.gram)
        penalty[:, range(p), range(p)] = strength[:, None]
        penalty[:, p, p] = strength + 1e-12 * self.tokens  # keeps a constant column solvable
        solution = torch.linalg.solve(self.gram + penalty, self.rhs + penalty @ prior)
        solution = torch.where(solution.isfinite(), solution, prior)
        scale = tuple(tuple(solution[:, k].tolist()) for k in range(p))
        return GroupCorrection(scale, tuple(solution[:, p].tolist()))


def fit_corrections(model: nn.Module, plan: Plan, batches: Iterable[torch.Tensor], ridge: float = DEFAULT_RIDGE,
                    progress: bool = False, outputs: BlockOutputs | None = None, low_rank: int = 0,
                    low_rank_ridge: float = DEFAULT_LOW_RANK_RIDGE) -> Plan:
    """``plan`` with a correction fitted for every group on ``batches`` of token ids (see module docs).

    ``outputs``: the original's block outputs on the same ``batches``
    (:class:`~cqil_fx.eager.replay.BlockOutputs`); with them, the blocks before
    the first group replay instead of computing. Either way a batch's forward
    stops at the last group's sum: nothing after it is needed.

    ``low_rank``: with a positive rank r, a second pass over ``batches`` (under
    the affine corrections) fits each group's :class:`~cqil_fx.config.LowRank`
    term of rank ``min(r, hidden)`` on what the affine correction still misses
    (:class:`LowRankEquations`). It needs far more text than the affine
    correction to carry to unseen text (docs/notes/quality-notes.md).
    """
    if low_rank < 0:
        raise CQILConfigError(f"low_rank must be 0 (no low-rank term) or a positive rank, got {low_rank}")
    batches = list(batches)
    plan = resolve_plan(model, plan.without_corrections())
    if not plan.groups:
        return plan
    equations: dict[int, NormalEquations] = {}
    for g, x, deltas, target in group_activations(model, plan, batches, outputs, progress, "fit corrections"):
        equations.setdefault(g, NormalEquations(len(deltas), x.shape[-1])).add(x, deltas, target)
    corrections = tuple(equations[g].solve(ridge) if g in equations else None for g in range(len(plan.groups)))
    plan = dataclasses.replace(plan, corrections=corrections)
    if not low_rank:
        return plan
    linear = low_rank_equations(model, plan, batches, progress, outputs)
    corrections = tuple(dataclasses.replace(c, low_rank=linear[g].solve(low_rank, low_rank_ridge))
                        if g in linear else c for g, c in enumerate(plan.corrections))
    return dataclasses.replace(plan, corrections=corrections)


def low_rank_equations(model: nn.Module, plan: Plan, batches: Iterable[torch.Tensor], progress: bool = False,
                       outputs: BlockOutputs | None = None) -> dict[int, LowRankEquations]:
    """Per group of ``plan`` (affine corrections fitted, no low-rank terms), the equations of a
    low-rank term on what its correction still misses, the earlier groups corrected: solve them at
    any rank and ridge (:meth:`LowRankEquations.solve`) without another pass over ``batches``."""
    if any(c is None or c.low_rank is not None for c in plan.corrections) or not plan.corrections:
        raise CQILConfigError("low-rank equations are gathered under a plan whose every group has an affine "
                              "correction and no low-rank term yet (fit_corrections without low_rank)")
    linear: dict[int, LowRankEquations] = {}
    for g, x, deltas, target in group_activations(model, plan, list(batches), outputs, progress,
                                                  "fit low-rank terms"):
        correction = plan.correction(g)
        _, bias = correction.tensors(x)
        corrected = x + (sum(correction.member_terms(deltas)) + bias)
        linear.setdefault(g, LowRankEquations(len(deltas), x.shape[-1])).add(deltas, target - corrected)
    return linear


class LowRankEquations:
    """``XᵀX`` and ``XᵀR`` for ``R ≈ X W``: X the members' deltas side by side (tokens, P·hidden), R
    what the group's output still misses (tokens, hidden); solved by ridge, then reduced rank."""

    def __init__(self, members: int, hidden: int):
        self.hidden = hidden
        self.gram = torch.zeros(members * hidden, members * hidden, dtype=torch.float64)
        self.cross = torch.zeros(members * hidden, hidden, dtype=torch.float64)
        self.tokens = 0

    def add(self, deltas: list[torch.Tensor], residual: torch.Tensor) -> None:
        xs = torch.cat(deltas, -1).reshape(-1, self.gram.shape[0]).double()
        self.gram += xs.T @ xs
        self.cross += xs.T @ residual.reshape(-1, self.hidden).double()
        self.tokens += xs.shape[0]

    def solve(self, rank: int, ridge: float = DEFAULT_LOW_RANK_RIDGE) -> LowRank:
        """The ridge solution ``W`` (``ridge`` times the mean diagonal of XᵀX on the diagonal), kept to the
        ``rank`` directions that carry most of its fitted values ``X W`` (reduced-rank regression):
        ``W_r = W V Vᵀ`` with V the top eigenvectors of ``Wᵀ XᵀX W``, factored as down ``W V``, up ``Vᵀ``."""
        if not self.tokens:
            raise CQILConfigError("a low-rank correction needs calibration activations: no tokens were seen")
        scale = float(self.gram.diagonal().mean()) or 1.0
        eye = torch.eye(self.gram.shape[0], dtype=self.gram.dtype)
        w = torch.linalg.solve(self.gram + (ridge + 1e-9) * scale * eye, self.cross)
        _, vectors = torch.linalg.eigh(w.T @ self.gram @ w)
        top = vectors[:, -min(rank, self.hidden):]
        down = (w @ top).float()
        return LowRank(tuple(d.contiguous() for d in down.split(self.hidden)), top.T.float().contiguous())


def group_activations(model: nn.Module, plan: Plan, batches: list, outputs: BlockOutputs | None = None,
                      progress: bool = False, what: str = "group activations"
                      ) -> Iterator[tuple[int, torch.Tensor, list, torch.Tensor]]:
    """``(group, x, deltas, seq(x))`` for every group and batch, under the semantics of ``plan`` (its
    corrections applied to what later groups read; ``deltas`` uncorrected): what every correction is
    fitted on, and what studies of other corrections read (docs/notes/studies/correction_features.py)."""
    layers = decoder_layers(model)
    last = max(range(len(plan.groups)), key=lambda g: plan.groups[g][0])
    for b, ids in enumerate(_progress(batches, progress, what)):
        seen: dict[int, tuple] = {}

        def observe(g: int, x: torch.Tensor, deltas: list, call: tuple) -> None:
            seen[g] = (x.detach(), [d.detach() for d in deltas], call)
            if g == last:
                raise _Seen

        replay = outputs.replayed(b, first_group(plan)) if outputs is not None else contextlib.nullcontext()
        with torch.no_grad(), cqil_semantics(model, plan, observe=observe), replay:
            try:
                model(ids, use_cache=False)
            except _Seen:
                pass
        found = []
        with torch.no_grad():  # outside the semantics: the blocks one after the other, hooks gone
            for g, (x, deltas, (args, kwargs)) in seen.items():
                target = x
                for i in plan.groups[g]:
                    target = _call_layer(layers[i], target, args, kwargs)
                found.append((g, x, deltas, target))
        yield from found


class _Seen(Exception):
    """Raised at the last group's sum: the rest of the forward is not needed for fitting."""


def _call_layer(layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """``layer`` on ``hidden`` with the other arguments of a recorded call; its new residual stream."""
    if args:
        out = layer(hidden, *args[1:], **kwargs)
    else:
        out = layer(**{**kwargs, "hidden_states": hidden})
    return out[0] if isinstance(out, tuple) else out
