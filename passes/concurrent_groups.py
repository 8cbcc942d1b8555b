"""Rewrite each group of consecutive blocks to read one input and sum its deltas.

For a group [g0, g1] with input x (before -> after)::

    mid0 = x + a0                       mid0 = x + a0
    out0 = mid0 + m0(mid0)              d0   = a0 + m0(mid0)
    mid1 = out0 + a1(out0)      ==>     mid1 = x + a1(x)         # g1 reads x
    out1 = mid1 + m1(mid1)              d1   = a1 + m1(mid1)
    ... uses of out1 ...                out  = x + (d0 + d1)     # replaces out1

A parallel-residual block already has its delta as one node (attn + mlp).
The old block outputs are erased.  The pass returns a :class:`RewrittenGraph`,
the one value every later pass takes and returns: the module, the blocks as
they now are (members read x and carry their delta), what each group became,
and later the bypass distance and the SPMD placement.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch.fx

from .find_blocks import Block
from .module_stack import layer_of

if TYPE_CHECKING:
    from .spmd import Placement
    from .tensor_parallel import Sharding

_INPUTS_OUTPUT = ("placeholder", "get_attr", "output")


@dataclasses.dataclass(frozen=True, eq=False)
class GroupRewrite:
    """What :func:`rewrite_groups` made of one group."""

    members: tuple[int, ...]
    input: torch.fx.Node
    deltas: tuple[torch.fx.Node, ...]
    output: torch.fx.Node
    sums: tuple[torch.fx.Node, ...]  # the adds that make ``output`` from the deltas (output last)

    def __repr__(self) -> str:
        return (
            f"GroupRewrite({list(self.members)}, input={self.input.name}, "
            f"deltas={[d.name for d in self.deltas]}, output={self.output.name})"
        )


@dataclasses.dataclass(frozen=True, eq=False)
class RewrittenGraph:
    """A graph after the group rewrite, as every later pass takes and returns it.

    ``blocks`` are up to date: a member's ``input`` is its group's input and
    its ``delta`` is set; a block after a group reads the group's output.
    ``bypass``/``bypass_edges`` are set by
    :func:`~cqil_fx.passes.bypass.add_bypass_edges`, ``placement`` by
    :func:`~cqil_fx.passes.spmd.place_members` (whose graph then holds only the
    blocks in ``blocks``: the other ranks' members are gone), ``sharding`` by
    :func:`~cqil_fx.passes.tensor_parallel.shard_blocks`.
    """

    gm: torch.fx.GraphModule
    blocks: tuple[Block, ...]
    rewrites: tuple[GroupRewrite, ...]
    bypass: int = 0
    bypass_edges: int = 0
    placement: Placement | None = None
    sharding: Sharding | None = None  # set by shard_blocks (tensor_parallel=True)

    def block(self, index: int) -> Block:
        return next(b for b in self.blocks if b.index == index)

    def member_of_nodes(self) -> dict[torch.fx.Node, tuple[int, int]]:
        """(group, member) of every node that belongs to one member of a rewritten group.

        A node belongs to member k of group g when it was traced in (or, for nodes
        the rewrite passes made, carries the module stack of) that member's layer;
        the group's sum nodes and the graph's inputs (weights) belong to no member.
        """
        member = {i: (g, k) for g, r in enumerate(self.rewrites) for k, i in enumerate(r.members)}
        sums = {n for r in self.rewrites for n in r.sums}
        owned = {}
        for node in self.gm.graph.nodes:
            ref = layer_of(node)
            if ref is not None and ref.index in member and node not in sums and node.op not in _INPUTS_OUTPUT:
                owned[node] = member[ref.index]
        return owned


def rewrite_groups(gm: torch.fx.GraphModule, blocks: Sequence[Block],
                   groups: Sequence[Sequence[int]]) -> RewrittenGraph:
    """Rewrite every group of two or more blocks of ``gm`` in place."""
    by_index = {b.index: b for b in blocks}
    rewrites: list[GroupRewrite] = []
    renamed: dict[torch.fx.Node, torch.fx.Node] = {}  # erased block output -> its replacement
    for g in groups:
        if len(g) > 1:
            members = [by_index[i] for i in g]
            rewrite = _rewrite_group(gm.graph, members, renamed.get(members[0].input, members[0].input))
            renamed[members[-1].output] = rewrite.output
            rewrites.append(rewrite)
    gm.graph.lint()
    gm.recompile()
    return RewrittenGraph(gm, tuple(_updated(b, rewrites, renamed) for b in blocks), tuple(rewrites))


def _rewrite_group(graph: torch.fx.Graph, members: list[Block], x: torch.fx.Node) -> GroupRewrite:
    for member in members[1:]:
        _read_from(member, x)
    deltas = tuple(_delta(graph, m) for m in members)
    last = members[-1].output
    sums = []
    with graph.inserting_before(deltas[-1].next):
        total = deltas[0]
        for d in deltas[1:]:
            total = _add_like(graph, total, d, last)
            sums.append(total)
        out = _add_like(graph, x, total, last)
        sums.append(out)
    last.replace_all_uses_with(out)
    for m in members:
        if not m.output.users:
            graph.erase_node(m.output)
    return GroupRewrite(tuple(m.index for m in members), x, deltas, out, tuple(sums))


def _updated(block: Block, rewrites: Sequence[GroupRewrite], renamed: dict) -> Block:
    """``block``'s record after the rewrite: a member reads x and has a delta; others may read a group output."""
    for r in rewrites:
        if block.index in r.members:
            k = r.members.index(block.index)
            return dataclasses.replace(block, input=r.input, residual=block.residual[:-1], delta=r.deltas[k])
    return dataclasses.replace(block, input=renamed.get(block.input, block.input))


def _read_from(member: Block, x: torch.fx.Node) -> None:
    """Make ``member``'s own nodes read ``x`` where they read the block input."""
    inside = set(member.nodes)
    for user in list(member.input.users):
        if user in inside:
            user.replace_input_with(member.input, x)


def _delta(graph: torch.fx.Graph, member: Block) -> torch.fx.Node:
    """The node holding Δ = a + m (sequential) or the summed branches (parallel)."""
    terms = member.delta_terms
    if len(terms) == 1:
        return terms[0]
    with graph.inserting_before(member.output.next):
        return _add_like(graph, terms[0], terms[1], member.output)


def _add_like(graph: torch.fx.Graph, lhs, rhs, like: torch.fx.Node) -> torch.fx.Node:
    """``lhs + rhs`` carrying ``like``'s metadata (module stack, shape, stack trace)."""
    node = graph.call_function(operator.add, (lhs, rhs))
    node.meta = dict(like.meta)
    return node
