"""What a plan costs in quality: perplexity under CQIL, and under layer removal for comparison.

    ppl = perplexity(model, batches)                              # the original model
    ppl = perplexity(model, batches, plan=CQILConfig(start=12, end=28))
    ppl = perplexity(model, batches, removed=[25, 26, 27])        # ShortGPT-style removal

Perplexity is exp of the mean next-token cross-entropy over every predicted
token of every batch, computed eagerly with the reference semantics
(:func:`cqil_fx.eager.reference.cqil_semantics`): the backend computes the same
logits (tests check it), so the numbers hold for compiled models too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from ..config import CQILConfig, Plan
from ..errors import CQILConfigError
from ..progress import progress as _progress
from ..stack import decoder_layers
from ..tokens import NextTokenLoss
from .reference import cqil_semantics, layer_input


def perplexity(model: nn.Module, batches: Iterable[torch.Tensor], plan: Plan | CQILConfig | None = None,
               removed: Sequence[int] = (), progress: bool = False) -> float:
    """Perplexity of ``model`` on ``batches`` of token ids, under ``plan`` or with ``removed`` blocks."""
    if plan is not None and removed:
        raise CQILConfigError("give plan= or removed=, not both")
    semantics = cqil_semantics(model, plan) if plan is not None else removed_blocks(model, removed)
    loss = NextTokenLoss()
    with semantics, torch.no_grad():
        for ids in _progress(batches, progress, "perplexity"):
            loss.add(model(ids, use_cache=False).logits, ids)
    return loss.perplexity


@contextlib.contextmanager
def removed_blocks(model: nn.Module, indices: Sequence[int]) -> Iterator[None]:
    """Within the block, the listed decoder blocks pass their input through unchanged."""
    layers = decoder_layers(model)
    bad = [i for i in indices if not 0 <= i < len(layers)]
    if bad:
        raise CQILConfigError(f"cannot remove blocks {bad}: the model has {len(layers)} blocks")
    handles = [layers[i].register_forward_hook(_pass_through, with_kwargs=True) for i in indices]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _pass_through(module, args, kwargs, output):
    hidden = layer_input(args, kwargs)
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
