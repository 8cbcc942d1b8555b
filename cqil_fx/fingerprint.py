"""Fingerprints of weights: one digest that tells whether two models hold the same blocks.

    digest = weights_fingerprint([list(layer.parameters()) for layer in layers])   # str, or None

The plan cache keys a searched plan by it, and recovered adapters check their
base model with it. A weight is digested by its shape, dtype and an evenly
strided sample of its values, never by reading all of it.

Quantized weights are tensor subclasses (torchao's ``Int8Tensor``,
``Int4Tensor``, ...) whose own ``view``/``reshape`` may be unimplemented, so
they are never read as plain tensors: a traceable wrapper subclass is
digested through its plain components (``__tensor_flatten__``: the int8 data,
the scales, ...) together with its class name and outer shape. A weight that
cannot be read either way makes the whole fingerprint None, with one INFO
line naming its type; callers then go without a cache, never fail.

The digest is stored in plan cache keys and in saved adapters, which check
their base model with it: a change to how it is computed makes every saved
adapter refuse its base model. Change it only with :data:`VERSION` and a
reader of the older digest (as :mod:`cqil_fx.eager.distill` keeps one).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

log = logging.getLogger(__name__)

VERSION = 2  # of the digest below (1: the plan cache's before quantized weights)
SAMPLE = 4096  # elements of each plain tensor hashed (evenly strided), plus its shape and dtype


class UnreadableWeight(Exception):
    """A weight the fingerprint cannot read (kept inside this module: callers get None)."""


def plain_components(t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """``t``'s plain tensors: ``[("", t)]`` for a plain tensor, the inner tensors of a traceable wrapper
    subclass (recursively, named by their path) otherwise."""
    if not is_traceable_wrapper_subclass(t):
        return [("", t)]
    names, _ = t.__tensor_flatten__()
    out = []
    for name in names:
        inner = getattr(t, name)
        if inner is None:
            continue
        out.extend((f"{name}.{sub}" if sub else name, x) for sub, x in plain_components(inner))
    return out


def is_quantized(t: torch.Tensor) -> bool:
    """Whether ``t`` is a tensor subclass (a quantized weight, typically), not a plain tensor or Parameter."""
    return is_traceable_wrapper_subclass(t) or type(t) not in (torch.Tensor, torch.nn.Parameter)


def tensor_digest(t: torch.Tensor) -> str:
    """A digest of a weight: class, shape, dtype, and an evenly strided sample of each plain component."""
    h = hashlib.sha256(f"{type(t).__name__ if is_quantized(t) else ''}|{tuple(t.shape)}|{t.dtype}".encode())
    for name, part in plain_components(t):
        if is_quantized(part) or part.device.type == "meta":
            raise UnreadableWeight(type(t).__name__)
        try:
            flat = part.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // SAMPLE)].to("cpu")
            data = sample.view(torch.uint8) if sample.dtype.itemsize == 1 else sample.to(torch.float32)
            h.update(f"{name}|{tuple(part.shape)}|{part.dtype}|".encode())
            h.update(data.contiguous().numpy().tobytes())
        except (RuntimeError, NotImplementedError, TypeError) as e:
            raise UnreadableWeight(f"{type(t).__name__} ({type(e).__name__}: {str(e)[:120]})") from e
    return h.hexdigest()


def weights_fingerprint(block_weights: Sequence[Iterable[torch.Tensor]]) -> str | None:
    """One digest for every block's weights, in block order; within a block, order does not matter
    (the graph and the module list their parameters in different orders). None, with an INFO line,
    when a weight cannot be read."""
    h = hashlib.sha256()
    try:
        for weights in block_weights:
            h.update(("|".join(sorted(tensor_digest(w) for w in weights)) + ";").encode())
    except UnreadableWeight as e:
        log.info("cqil: cannot fingerprint a weight of type %s; going without the plan cache", e)
        return None
    return h.hexdigest()
