"""FX passes of cqil_fx, one per file; each is a function over a GraphModule.

Analysis:  :func:`find_blocks` (decoder blocks and their residual paths).
Rewrite:   :func:`rewrite_groups` (members read the group input, deltas summed),
           :func:`add_bypass_edges` (earlier members' attention outputs into later MLPs).
Placement: :func:`split_segments` (shared and per-member segments, for mode="concurrent"),
           :func:`place_members` (one member per rank, collectives, for mode="spmd").

The passes import nothing from :mod:`cqil_fx`; they take and return plain values.
"""

from .bypass import add_bypass_edges
from .concurrent_groups import GroupRewrite, member_of_nodes, rewrite_groups
from .find_blocks import Block, UnrecognisedBlockError, find_blocks
from .module_stack import LayerRef, layer_of
from .segments import Segment, SplitGraph, split_segments
from .spmd import Placement, SpmdPlacementError, place_members

__all__ = [
    "Block",
    "GroupRewrite",
    "LayerRef",
    "Placement",
    "Segment",
    "SplitGraph",
    "SpmdPlacementError",
    "UnrecognisedBlockError",
    "add_bypass_edges",
    "find_blocks",
    "layer_of",
    "member_of_nodes",
    "place_members",
    "rewrite_groups",
    "split_segments",
]
