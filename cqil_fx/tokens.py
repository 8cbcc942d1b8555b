"""Token ids in, windows and perplexity out: the two helpers every quality measurement shares.

    windows = token_windows(ids, (1, 256))               # consecutive (1, 256) windows, remainder dropped
    loss = NextTokenLoss()
    for w in windows:
        loss.add(model(w).logits, w)
    loss.perplexity
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .errors import CQILConfigError


def token_windows(ids: torch.Tensor | Sequence[torch.Tensor], shape: int | Sequence[int],
                  count: int | None = None) -> list[torch.Tensor]:
    """Consecutive, non-overlapping windows of ``shape`` cut from ``ids`` (flattened, concatenated).

    ``shape`` is a window's shape, or its length for ``(1, length)`` windows; a
    final partial window is dropped. ``count`` keeps the first ``count``
    windows and makes having fewer an error. The windows are views of one
    tensor holding the ids.
    """
    shape = (1, shape) if isinstance(shape, int) else tuple(shape)
    size = math.prod(shape)
    if size < 1:
        raise CQILConfigError(f"a window of shape {shape} holds no tokens")
    if isinstance(ids, torch.Tensor):
        flat = ids.flatten()
    else:
        flat = torch.cat([torch.as_tensor(t).flatten() for t in ids]) if len(ids) else torch.empty(0, dtype=torch.long)
    available = flat.numel() // size
    wanted = available if count is None else count
    if wanted > available or wanted < 1:
        raise CQILConfigError(f"{flat.numel()} tokens make {available} windows of shape {shape}, "
                              f"fewer than the {max(wanted, 1)} needed; give more tokens or shorter windows")
    return list(flat[: wanted * size].view(wanted, *shape).unbind(0))


def repeated_windows(windows: Sequence[torch.Tensor], fraction: float, seed: int = 0) -> list[torch.Tensor]:
    """A seeded random ``fraction`` of ``windows`` (each (batch, tokens)), each with its second half replaced
    by its first: text that exercises in-context copying, which the grouped blocks of a plan lose and
    ordinary text rarely asks for (docs/notes/distillation.md, "In-context copying"); ``cqil-fx recover --repeats``
    trains on it, ``docs/notes/studies/plan_transfer.py --repeats`` calibrates on it."""
    if not 0 <= fraction <= 1:
        raise CQILConfigError(f"the fraction of repeated windows must be in [0, 1], got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    picked = torch.randperm(len(windows), generator=generator)[:int(fraction * len(windows))]
    out = []
    for i in sorted(picked.tolist()):
        half = windows[i][:, :windows[i].shape[1] // 2]
        out.append(torch.cat([half, half], dim=1))
    return out


class NextTokenLoss:
    """Next-token cross-entropy summed over every predicted token of every batch added."""

    def __init__(self) -> None:
        self.nll = 0.0
        self.tokens = 0

    def add(self, logits: torch.Tensor, ids: torch.Tensor) -> None:
        """``logits`` (batch, tokens, vocab) of the model run on ``ids`` (batch, tokens)."""
        targets = ids[:, 1:]
        self.nll += nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="sum").item()
        self.tokens += targets.numel()

    @property
    def perplexity(self) -> float:
        if not self.tokens:
            raise CQILConfigError("perplexity needs at least one batch with two or more tokens")
        return math.exp(self.nll / self.tokens)
