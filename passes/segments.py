"""Split a rewritten graph at group boundaries into shared and per-member segments.

For concurrent execution each member of a group must be its own callable.
After :func:`~passes.concurrent_groups.rewrite_groups`, a graph with one group
[g0, g1] is cut into (before -> after)::

    embed, rotary ...            shared 0     (everything before the group)
    block g0 (reads x) -> d0     group 0, member 0 --+ run at the same time
    block g1 (reads x) -> d1     group 0, member 1 --+
    out = x + (d0 + d1) ...      shared 1     (the sum, later blocks, head)

With bypass (D > 0) member k's MLP needs the attention outputs of earlier
members, so each member is cut once more at its mid-block residual: phase 0
(attention halves of all members, concurrently), then phase 1 (MLP halves).

When the next group follows at once, the sum is all that lies between the two
groups: a shared segment of one add per member.  It is folded into the next
group instead: member 0 of the next group computes ``out = x + (d0 + d1)``
and every other member computes its own copy, so consecutive groups become
consecutive member steps, which the executor runs in one parallel region
(``ConcurrentProgram``).  The copies add one elementwise sum per member; the
values are the same, op for op.

The cut itself is torch.fx's ``split_module_simple``; this pass only says
which node goes where and describes the segments it produced.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import networkx as nx
import torch.fx
from torch.fx.passes import split_module as _split

from .concurrent_groups import GroupRewrite, member_of_nodes
from .find_blocks import Block
from .module_stack import layer_of

# split_module_simple (torch >= 2.12) skips split_module's topological sort and lazy-compiles
# the submodules; older torch gets the general splitter with the same partition ids.
_split_simple = getattr(_split, "split_module_simple", None)


@dataclasses.dataclass(frozen=True)
class Segment:
    """One submodule of the split graph: shared (group is None) or one member's phase."""

    name: str
    group: int | None = None
    member: int | None = None
    phase: int = 0

    @property
    def shared(self) -> bool:
        return self.group is None


@dataclasses.dataclass(eq=False)
class SplitGraph:
    """``module`` calls ``submod_*`` in graph order; ``segments`` says what each one is."""

    module: torch.fx.GraphModule
    segments: dict[str, Segment]


def split_segments(gm: torch.fx.GraphModule, blocks: Sequence[Block], rewrites: Sequence[GroupRewrite],
                   phased: bool) -> SplitGraph:
    """Cut ``gm`` (already rewritten) into shared and member segments; ``phased`` for bypass.

    Nodes go to members as :func:`~passes.concurrent_groups.member_of_nodes`
    says; every other node is shared, except the sum of a group that is all
    that lies between it and the next group, which is folded into the next
    group's members (:func:`_fold_sum`).
    """
    by_index = {b.index: b for b in blocks}
    owner = member_of_nodes(gm, rewrites)
    mlp_half = set()
    if phased:
        within_layers = _within_layer_dataflow(gm)
        for r in rewrites:
            for i in r.members:
                mlp_half |= _mlp_half(within_layers, by_index[i])
    partition_of: dict[torch.fx.Node, tuple] = {}
    groups_started = 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        if node in owner:
            g, k = owner[node]
            groups_started = max(groups_started, g + 1)
            partition_of[node] = (g, 0, int(node in mlp_half), k)
        else:
            partition_of[node] = (groups_started - 1, 1, 0, 0)  # shared: after the groups begun so far
    shared_after: dict[int, set] = collections.defaultdict(set)  # group -> the shared nodes that follow it
    for node, (g, kind, _, _) in partition_of.items():
        if kind == 1:
            shared_after[g].add(node)
    folded = False
    for g, (done, following) in enumerate(zip(rewrites, rewrites[1:])):
        if following.input is done.output and shared_after[g] == set(done.sums):
            _fold_sum(gm.graph, done, g + 1, len(following.members), owner, partition_of)
            folded = True
    if folded:
        gm.graph.lint()
        gm.recompile()
    keys = sorted(set(partition_of.values()))
    pid = {k: i for i, k in enumerate(keys)}
    partitions = {n: pid[k] for n, k in partition_of.items()}
    if _split_simple is not None:
        module = _split_simple(gm, partitions)
    else:
        module = _split.split_module(gm, None, partitions.__getitem__, keep_original_order=True)
    segments = {f"submod_{pid[k]}": _describe(f"submod_{pid[k]}", k) for k in keys}
    return SplitGraph(module, segments)


def _fold_sum(graph: torch.fx.Graph, done: GroupRewrite, group: int, width: int, owner: dict,
              partition_of: dict) -> None:
    """Move ``done``'s sum into the ``width`` members of ``group`` (the group after it): the
    nodes to member 0, a copy to each other member, whose nodes then read their copy's output."""
    for node in done.sums:
        partition_of[node] = (group, 0, 0, 0)
    anchor = done.output
    for k in range(1, width):
        copies: dict[torch.fx.Node, torch.fx.Node] = {}
        for node in done.sums:
            with graph.inserting_after(anchor):
                copies[node] = anchor = graph.node_copy(node, lambda n: copies.get(n, n))
            partition_of[anchor] = (group, 0, 0, k)
        for user in list(done.output.users):
            if owner.get(user) == (group, k):
                user.replace_input_with(done.output, copies[done.output])


def _within_layer_dataflow(gm: torch.fx.GraphModule) -> nx.DiGraph:
    """Data-flow edges between nodes of the same layer (built once for all members)."""
    layer = {n: ref.index for n in gm.graph.nodes if (ref := layer_of(n)) is not None}
    dag = nx.DiGraph()
    dag.add_edges_from((n, u) for n in layer for u in n.users if layer.get(u) == layer[n])
    return dag


def _mlp_half(within_layers: nx.DiGraph, block: Block) -> set:
    """Nodes of ``block``'s layer that depend on its mid-block residual: the MLP branch and delta."""
    if len(block.residual) != 2:
        return set()
    mid = block.residual[0]
    return nx.descendants(within_layers, mid) if mid in within_layers else set()


def _describe(name: str, key: tuple) -> Segment:
    group, kind, phase, member = key
    return Segment(name) if kind == 1 else Segment(name, group, member, phase)
