"""Which decoder layer a node comes from, read off ``node.meta["nn_module_stack"]``.

This is the one place that parses module paths.  Dynamo records, for every node
it traces, the stack of modules it was called inside as ``{key: (path, type)}``,
outermost first.  The path's prefix depends on how the model was called
(``L['self'].model.layers.3.mlp``, ``L['args'][0].transformer.h.3``), so we
strip the source prefix and look for the first module that is an element of a
``ModuleList`` (a path ending in an integer): that is the layer.
"""

from __future__ import annotations

import dataclasses
import re

import torch.fx

# L['self'], L['args'][0], L['fn'].__self__ ... followed by a dot.
_SOURCE_PREFIX = re.compile(r"^L\['[^']*'\](?:\[\d+\])?(?:\.__self__)?\.?")
# ._modules['layers'] spellings some Dynamo versions use for attribute access.
_MODULES_ITEM = re.compile(r"\._modules\['([^']+)'\]")
_LIST_ELEMENT = re.compile(r"^(?P<list>.+)\.(?P<index>\d+)$")


@dataclasses.dataclass(frozen=True)
class LayerRef:
    """A node's place in a module list: ``model.layers`` and index 3."""

    list_path: str
    index: int

    @property
    def path(self) -> str:
        return f"{self.list_path}.{self.index}"


def normalise_path(path: str) -> str:
    """``L['self'].model.layers[3]`` -> ``model.layers.3``."""
    path = _MODULES_ITEM.sub(r".\1", path)
    path = _SOURCE_PREFIX.sub("", path)
    return re.sub(r"\[(\d+)\]", r".\1", path)


def layer_of(node: torch.fx.Node) -> LayerRef | None:
    """The outermost module-list element ``node`` was traced inside, or None."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _cls in stack.values():
        m = _LIST_ELEMENT.match(normalise_path(path))
        if m:
            return LayerRef(m["list"], int(m["index"]))
    return None
