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

import copy
from collections.abc import Collection, Hashable, Mapping
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


def without_blocks(model: nn.Module, removed: Collection[int]) -> nn.Module:
    """``model`` without the decoder blocks at the indices in ``removed``, weights shared: the
    "ideal" of a plan in the benchmarks (the same model with the blocks the plan saves removed).

    Shallow copies along the path to the decoder-layer list, each with a child table of its own,
    so ``model`` (and every other shallow copy of it, e.g. a compiled twin) keeps all of its
    blocks: ``copy.copy`` of a module shares its ``_modules`` dict, and assigning a child to the
    copy would replace the original's. The config is shared: the kept blocks keep their layer
    index, hence their slot in a static cache made from it.
    """
    layers = decoder_layers(model)
    path = next(name for name, module in model.named_modules() if module is layers).split(".")
    removed = set(removed)
    kept = nn.ModuleList(layer for i, layer in enumerate(layers) if i not in removed)
    return _with_child(model, path, kept)


def _with_child(root: nn.Module, path: list[str], new: nn.Module) -> nn.Module:
    twin = copy.copy(root)
    twin._modules = dict(root._modules)  # noqa: SLF001 - a table of its own (see without_blocks)
    twin._modules[path[0]] = new if len(path) == 1 else _with_child(root._modules[path[0]], path[1:], new)
    return twin
