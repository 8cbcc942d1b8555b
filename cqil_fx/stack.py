"""The one definition of a model's decoder stack, shared by the graph and the eager side.

A model may hold several module lists (the decoder layers, a vision tower's
layers, a list of heads); the decoder stack is **the module list holding the
most parameters**. The eager side counts ``parameters()`` of each
``nn.ModuleList``; the graph side (:func:`cqil_fx.passes.find_blocks`)
counts the parameter placeholders Dynamo traced inside each list's elements.
Both then ask :func:`pick_decoder_stack`, so they cannot disagree::

    >>> pick_decoder_stack({"model.layers": 134_000_000, "model.heads": 12_000})
    'model.layers'
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import TypeVar

from torch import nn

from .errors import CQILUnsupportedError

K = TypeVar("K", bound=Hashable)


def pick_decoder_stack(parameter_counts: Mapping[K, int]) -> K:
    """The key of the module list with the most parameters (the first such key on a tie)."""
    if not parameter_counts:
        raise CQILUnsupportedError("no module list of decoder layers to choose from")
    return max(parameter_counts, key=parameter_counts.__getitem__)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder-layer list (see the module docstring)."""
    lists = {name: m for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)}
    if not lists:
        raise CQILUnsupportedError(f"{type(model).__name__} has no ModuleList of decoder layers")
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in lists.items()}
    return lists[pick_decoder_stack(counts)]
