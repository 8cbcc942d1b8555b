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

Why this form: measured on SmolLM2 (docs/quality.md), a scale per member and
channel with a bias transfers to text of another kind, where a full linear
map of the deltas fitted the calibration far better and made unseen text
worse (issue 16's first measurement).

The activations: the model runs under :func:`cqil_semantics` of the plan
without corrections; each group's input ``x`` and member deltas are recorded
there, and ``seq(x)`` is the group's blocks run one after the other on that
``x`` with the same call arguments.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable

import torch
from torch import nn

from ..config import GroupCorrection, Plan
from ..errors import CQILConfigError
from ..progress import progress as _progress
from ..stack import decoder_layers
from .reference import cqil_semantics, resolve_plan
from .replay import BlockOutputs, first_group

DEFAULT_RIDGE = 0.05


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
                    progress: bool = False, outputs: BlockOutputs | None = None) -> Plan:
    """``plan`` with a correction fitted for every group on ``batches`` of token ids (see module docs).

    ``outputs``: the original's block outputs on the same ``batches``
    (:class:`~cqil_fx.eager.replay.BlockOutputs`); with them, the blocks before
    the first group replay instead of computing. Either way a batch's forward
    stops at the last group's sum: nothing after it is needed.
    """
    plan = resolve_plan(model, plan.without_corrections())
    if not plan.groups:
        return plan
    layers = decoder_layers(model)
    last = max(range(len(plan.groups)), key=lambda g: plan.groups[g][0])
    equations: dict[int, NormalEquations] = {}
    for b, ids in enumerate(_progress(list(batches), progress, "fit corrections")):
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
        with torch.no_grad():  # outside the semantics: the blocks one after the other, hooks gone
            for g, (x, deltas, (args, kwargs)) in seen.items():
                target = x
                for i in plan.groups[g]:
                    target = _call_layer(layers[i], target, args, kwargs)
                eq = equations.setdefault(g, NormalEquations(len(deltas), x.shape[-1]))
                eq.add(x, deltas, target)
    corrections = tuple(equations[g].solve(ridge) if g in equations else None for g in range(len(plan.groups)))
    return dataclasses.replace(plan, corrections=corrections)


class _Seen(Exception):
    """Raised at the last group's sum: the rest of the forward is not needed for fitting."""


def _call_layer(layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """``layer`` on ``hidden`` with the other arguments of a recorded call; its new residual stream."""
    if args:
        out = layer(hidden, *args[1:], **kwargs)
    else:
        out = layer(**{**kwargs, "hidden_states": hidden})
    return out[0] if isinstance(out, tuple) else out
