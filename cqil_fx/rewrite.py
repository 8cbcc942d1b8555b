"""Apply a plan to a graph: the rewrite passes in their fixed order."""

from __future__ import annotations

from collections.abc import Sequence

import torch.fx

from passes import GroupRewrite, add_bypass_edges, rewrite_groups
from passes.find_blocks import Block

from .config import Plan


def apply_plan(gm: torch.fx.GraphModule, blocks: Sequence[Block], plan: Plan) -> tuple[list[GroupRewrite], int]:
    """Rewrite ``gm`` in place: concurrent groups, then bypass edges; returns (rewrites, edges)."""
    rewrites = rewrite_groups(gm, blocks, plan.groups)
    edges = add_bypass_edges(gm, blocks, plan.groups, plan.bypass) if plan.bypass else 0
    return rewrites, edges
