"""The rewrite driver: the passes that apply a plan, always in one order.

    rewritten = apply_plan(gm, blocks, plan)         # in place: rewrite_groups, then add_bypass_edges
    copy, constants = rewritten_copy(gm, plan)       # the same on a copy; gm untouched

The backend, the graph meter of planning and inspection all rewrite through
:func:`apply_plan`. A plan crosses into the passes as anything with
``groups`` (consecutive block indices), ``bypass`` (an int) and
``corrections`` (empty, or one group correction or None per group), such as
:class:`cqil_fx.config.Plan`; the passes never import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.fx
from torch._dynamo.utils import counters

from .bypass import add_bypass_edges
from .concurrent_groups import RewrittenGraph, rewrite_groups
from .find_blocks import Block, find_blocks


class PlanLike(Protocol):
    groups: Sequence[Sequence[int]]
    bypass: int
    corrections: Sequence[Any]


def apply_plan(gm: torch.fx.GraphModule, blocks: Sequence[Block], plan: PlanLike) -> RewrittenGraph:
    """Rewrite ``gm`` in place: concurrent groups (with the plan's corrections), then bypass edges."""
    rewritten = rewrite_groups(gm, blocks, plan.groups, plan.corrections or None)
    if plan.bypass:
        rewritten = add_bypass_edges(rewritten, plan.bypass)
    counters["cqil"]["groups_rewritten"] += len(rewritten.rewrites)
    counters["cqil"]["bypass_edges"] += rewritten.bypass_edges
    return rewritten


def own_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of a graph module for the passes to rewrite, with node names and metadata kept.

    Dynamo reads its graph's placeholders again after a backend returns, and a
    corrected plan adds inputs, so the backend rewrites a copy.
    """
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    copy = torch.fx.GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    return copy


def rewritten_copy(gm: torch.fx.GraphModule, plan: PlanLike) -> tuple[torch.fx.GraphModule, tuple[torch.Tensor, ...]]:
    """A copy of ``gm`` with ``plan`` applied (``gm`` itself is untouched), and the values of the
    inputs the rewrite appended (call the copy with ``*inputs, *constants``)."""
    copy = own_copy(gm)
    return copy, apply_plan(copy, find_blocks(copy), plan).constants
