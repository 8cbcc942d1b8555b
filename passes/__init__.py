"""FX passes of cqil_fx, one per file; each is a function over a GraphModule.

Analysis:  :func:`find_blocks` (decoder blocks and their residual paths).
Rewrite:   :func:`rewrite_groups` (members read the group input, deltas summed),
           :func:`add_bypass_edges` (earlier members' attention outputs into later MLPs).
Placement: :func:`split_segments` (shared and per-member segments, for mode="concurrent").

The passes import nothing from :mod:`cqil_fx`; they take and return plain values.
"""

from .bypass import add_bypass_edges
from .concurrent_groups import GroupRewrite, rewrite_groups
from .find_blocks import Block, UnrecognisedBlockError, find_blocks
from .module_stack import LayerRef, layer_of
from .segments import Segment, SplitGraph, split_segments

__all__ = [
    "Block",
    "GroupRewrite",
    "LayerRef",
    "Segment",
    "SplitGraph",
    "UnrecognisedBlockError",
    "add_bypass_edges",
    "find_blocks",
    "layer_of",
    "rewrite_groups",
    "split_segments",
]
