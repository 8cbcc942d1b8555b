"""FX passes of cqil_fx, one per file; each is a function over a GraphModule.

Installed as :mod:`cqil_fx.passes` (the folder stays ``passes/`` at the top of
the repository). In pipeline order::

    find_blocks(gm) -> [Block]                                   analysis
    rewrite_groups(gm, blocks, groups) -> RewrittenGraph         rewrite
    add_bypass_edges(rewritten, D) -> RewrittenGraph             rewrite (D > 0)
    split_segments(rewritten) -> SplitGraph                      placement, mode="concurrent"
    place_members(rewritten, rank, W, group) -> RewrittenGraph   placement, mode="spmd"
    shard_blocks(rewritten, rank, W, group) -> RewrittenGraph    placement, tensor_parallel=True

    apply_plan(gm, blocks, plan) -> RewrittenGraph               the driver: rewrite_groups, add_bypass_edges

:class:`RewrittenGraph` is the one value between the rewrite and the
placements: the module, the blocks as they now are, what each group became,
the bypass distance and the SPMD placement. The passes import nothing from
:mod:`cqil_fx` but its shared value types (errors, the decoder-stack rule).
"""

from .bypass import add_bypass_edges
from .concurrent_groups import GroupRewrite, RewrittenGraph, rewrite_groups
from .find_blocks import Block, find_blocks
from .module_stack import LayerRef, layer_of
from .mutation import has_inplace_ops, mutates_in_place
from .pipeline import apply_plan, own_copy, rewritten_copy
from .segments import Partition, PartitionAssignment, Segment, SplitGraph, assign_partitions, split_segments
from .records import Placement, Sharding
from .spmd import place_members
from .tensor_parallel import shard_blocks

__all__ = [
    "Block",
    "GroupRewrite",
    "LayerRef",
    "Partition",
    "PartitionAssignment",
    "Placement",
    "RewrittenGraph",
    "Segment",
    "Sharding",
    "SplitGraph",
    "add_bypass_edges",
    "apply_plan",
    "assign_partitions",
    "find_blocks",
    "has_inplace_ops",
    "layer_of",
    "mutates_in_place",
    "own_copy",
    "place_members",
    "rewrite_groups",
    "rewritten_copy",
    "shard_blocks",
    "split_segments",
]
