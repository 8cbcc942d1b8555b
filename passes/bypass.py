"""Bypass edges: feed earlier group members' attention outputs into later members' MLPs.

With distance D, member k's MLP reads ``u_k = mid_k + a_{k-D} + ... + a_{k-1}``
instead of ``mid_k = x + a_k``.  Only the MLP branch's reads of ``mid_k`` change;
the residual (and so the group sum) still uses ``a_k`` alone, so nothing is
counted twice.  Group [g0, g1], D = 1 (before -> after)::

    mid1 = x + a1                       mid1 = x + a1
    h    = norm(mid1)           ==>     u1   = mid1 + a0
    m1   = mlp(h)                       h    = norm(u1)
                                        m1   = mlp(h)

Run on the :class:`~cqil_fx.passes.concurrent_groups.RewrittenGraph` of
:func:`~cqil_fx.passes.concurrent_groups.rewrite_groups`.
"""

from __future__ import annotations

import dataclasses
import operator

import torch.fx

from cqil_fx.errors import CQILPlanError

from .concurrent_groups import RewrittenGraph
from .find_blocks import SEQUENTIAL, Block


def add_bypass_edges(rewritten: RewrittenGraph, distance: int) -> RewrittenGraph:
    """Add the bypass edges of every group at ``distance``; the result counts the routed outputs."""
    if distance < 0:
        raise CQILPlanError(f"bypass distance must be >= 0, got {distance}")
    edges = 0
    for rewrite in rewritten.rewrites:
        members = [rewritten.block(i) for i in rewrite.members]
        for k, member in enumerate(members):
            sources = [m.attention for m in members[max(0, k - distance):k]]
            if sources:
                _route_into_mlp(rewritten.gm.graph, member, sources)
                edges += len(sources)
    rewritten.gm.graph.lint()
    rewritten.gm.recompile()
    return dataclasses.replace(rewritten, bypass=distance, bypass_edges=edges)


def _route_into_mlp(graph: torch.fx.Graph, member: Block, sources: list[torch.fx.Node]) -> None:
    if member.kind != SEQUENTIAL or any(a is None for a in sources):
        raise CQILPlanError(
            f"block {member.index}'s group has parallel-residual blocks: their MLP reads the "
            "block input, so there is no MLP input to bypass into (or no attention output to send)"
        )
    mid = member.mid
    with graph.inserting_before(mid.next):
        u = mid
        for a in sources:
            u = graph.call_function(operator.add, (u, a))
            u.meta = dict(mid.meta)
    for user in member.mlp_inputs:
        user.replace_input_with(mid, u)
