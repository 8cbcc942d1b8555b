"""Rewrite each group of consecutive blocks to read one input and sum its deltas.

For a group [g0, g1] with input x (before -> after)::

    mid0 = x + a0                       mid0 = x + a0
    out0 = mid0 + m0(mid0)              d0   = a0 + m0(mid0)
    mid1 = out0 + a1(out0)      ==>     mid1 = x + a1(x)         # g1 reads x
    out1 = mid1 + m1(mid1)              d1   = a1 + m1(mid1)
    ... uses of out1 ...                out  = x + (d0 + d1)     # replaces out1

A parallel-residual block already has its delta as one node (attn + mlp).
With a group correction (scales ``s_k`` per member, bias ``b``, optionally
low-rank factors ``D_k``, ``U``; see :class:`cqil_fx.config.GroupCorrection`)
member k adds the term ``t_k = d_k * s_k`` (``+ (d_k @ D_k) @ U``), made of
nodes of the member itself (its segment computes it), and the sum is ``out = x
+ ((t0 + t1) + b)``; ``s_k``, ``b``, ``D_k`` and ``U`` become new graph inputs,
appended after the existing placeholders, whose values the result carries in
``constants`` (the backend passes them on every call). The old block outputs are erased.  The pass returns a :class:`RewrittenGraph`,
the one value every later pass takes and returns: the module, the blocks as
they now are (members read x and carry their delta), what each group became,
and later the bypass distance and the SPMD placement.
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
from collections.abc import Sequence

import torch.fx

from .find_blocks import Block
from .module_stack import layer_of
from .records import Placement, Sharding

_INPUTS_OUTPUT = ("placeholder", "get_attr", "output")


@dataclasses.dataclass(frozen=True, eq=False)
class GroupRewrite:
    """What :func:`rewrite_groups` made of one group."""

    members: tuple[int, ...]
    input: torch.fx.Node
    deltas: tuple[torch.fx.Node, ...]
    output: torch.fx.Node
    sums: tuple[torch.fx.Node, ...]  # the nodes that make ``output`` from the deltas (output last)
    terms: tuple[torch.fx.Node, ...] = ()  # what each member adds: its delta, or its corrected term
    bias: torch.fx.Node | None = None  # the correction's bias input, if any

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
    constants: tuple[torch.Tensor, ...] = ()  # values of the inputs the rewrite appended (corrections)
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


def rewrite_groups(gm: torch.fx.GraphModule, blocks: Sequence[Block], groups: Sequence[Sequence[int]],
                   corrections: Sequence | None = None) -> RewrittenGraph:
    """Rewrite every group of two or more blocks of ``gm`` in place.

    ``corrections``: None, or one :class:`~cqil_fx.config.GroupCorrection` (or
    None) per group of two or more blocks, in order.
    """
    by_index = {b.index: b for b in blocks}
    rewrites: list[GroupRewrite] = []
    constants = _Constants(gm.graph)
    renamed: dict[torch.fx.Node, torch.fx.Node] = {}  # erased block output -> its replacement
    for g in [g for g in groups if len(g) > 1]:
        members = [by_index[i] for i in g]
        correction = corrections[len(rewrites)] if corrections else None
        rewrite = _rewrite_group(gm.graph, members, renamed.get(members[0].input, members[0].input),
                                 correction, constants, len(rewrites))
        renamed[members[-1].output] = rewrite.output
        rewrites.append(rewrite)
    gm.graph.lint()
    gm.recompile()
    blocks = tuple(_updated(b, rewrites, renamed) for b in blocks)
    return RewrittenGraph(gm, blocks, tuple(rewrites), tuple(constants.values))


class _Constants:
    """New graph inputs, appended after the existing placeholders, and their values."""

    def __init__(self, graph: torch.fx.Graph):
        self.graph = graph
        self.values: list[torch.Tensor] = []

    def add(self, name: str, value: torch.Tensor) -> torch.fx.Node:
        last = list(self.graph.find_nodes(op="placeholder"))[-1]
        with self.graph.inserting_after(last):
            node = self.graph.placeholder(name)
        node.meta["example_value"] = value
        self.values.append(value)
        return node


def _rewrite_group(graph: torch.fx.Graph, members: list[Block], x: torch.fx.Node, correction,
                   constants: _Constants, index: int) -> GroupRewrite:
    for member in members[1:]:
        _read_from(member, x)
    deltas = tuple(_delta(graph, m) for m in members)
    last = members[-1].output
    terms, bias = list(deltas), None
    if correction is not None:
        like = deltas[0].meta.get("example_value", deltas[0].meta.get("val"))
        like = like if isinstance(like, torch.Tensor) else torch.empty(0)
        scale_values, bias_value = correction.tensors(like)
        scales = [constants.add(f"cqil_scale_{index}_{k}", v) for k, v in enumerate(scale_values)]
        bias = constants.add(f"cqil_bias_{index}", bias_value)
        downs, up = [None] * len(deltas), None
        if correction.low_rank is not None:
            down_values, up_value = correction.low_rank.tensors(like)
            downs = [constants.add(f"cqil_down_{index}_{k}", v) for k, v in enumerate(down_values)]
            up = constants.add(f"cqil_up_{index}", up_value)
        terms = [_member_term(graph, d, s, down, up) for d, s, down in zip(deltas, scales, downs)]
    sums = []
    position = {n: i for i, n in enumerate(graph.nodes)}
    with graph.inserting_before(max(terms, key=position.__getitem__).next):
        total = terms[0]
        for t in terms[1:]:
            total = _op_like(graph, operator.add, total, t, last)
            sums.append(total)
        if bias is not None:
            total = _op_like(graph, operator.add, total, bias, last)
            sums.append(total)
        out = _op_like(graph, operator.add, x, total, last)
        sums.append(out)
    last.replace_all_uses_with(out)
    for m in members:
        if not m.output.users:
            graph.erase_node(m.output)
    return GroupRewrite(tuple(m.index for m in members), x, deltas, out, tuple(sums), tuple(terms), bias)


def _member_term(graph: torch.fx.Graph, delta: torch.fx.Node, scale: torch.fx.Node,
                 down: torch.fx.Node | None, up: torch.fx.Node | None) -> torch.fx.Node:
    """``delta * scale`` (``+ (delta @ down) @ up``) right after ``delta``, with its metadata: the
    member's own nodes, so they run in its segment (and before the all-reduce in SPMD mode)."""
    with graph.inserting_before(delta.next):
        term = _op_like(graph, operator.mul, delta, scale, delta)
        if down is None:
            return term
        inner = _op_like(graph, torch.matmul, delta, down, delta)
        value = delta.meta.get("example_value", delta.meta.get("val"))
        if isinstance(value, torch.Tensor):
            with value.fake_mode if hasattr(value, "fake_mode") else contextlib.nullcontext():
                narrow = value.new_empty((*value.shape[:-1], up.meta["example_value"].shape[0]))
            inner.meta.update({k: narrow for k in ("example_value", "val") if k in delta.meta})
        inner.meta.pop("tensor_meta", None)
        linear = _op_like(graph, torch.matmul, inner, up, delta)
        return _op_like(graph, operator.add, term, linear, delta)


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
        return _op_like(graph, operator.add, terms[0], terms[1], member.output)


def _op_like(graph: torch.fx.Graph, op, lhs, rhs, like: torch.fx.Node) -> torch.fx.Node:
    """``op(lhs, rhs)`` carrying ``like``'s metadata (module stack, shape, stack trace)."""
    node = graph.call_function(op, (lhs, rhs))
    node.meta = dict(like.meta)
    return node
