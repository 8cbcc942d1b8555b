"""Split a rewritten graph at group boundaries into shared and per-member segments.

For concurrent execution each member of a group must be its own callable.
After :func:`~cqil_fx.passes.concurrent_groups.rewrite_groups`, a graph with one group
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

The pass is four named steps around one printable value, the
:class:`PartitionAssignment` (node -> :class:`Partition`):

    assign_partitions -> fold_sums -> _cut (torch.fx's split_module_simple) -> _name_segments

and the submodules are named for what they hold (``shared_1``,
``group_0_member_1``, ``group_2_member_0_phase_1``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import networkx as nx
import torch.fx
from torch.fx.passes import split_module as _split

from .concurrent_groups import GroupRewrite, RewrittenGraph
from .find_blocks import Block
from .module_stack import layer_of

# split_module_simple (torch >= 2.12) skips split_module's topological sort and lazy-compiles
# the submodules; older torch gets the general splitter with the same partition ids.
_split_simple = getattr(_split, "split_module_simple", None)
_PARTITION_KEY = "cqil_partition"  # node.meta key: survives the cut, names the submodule
_INPUTS_OUTPUT = ("placeholder", "get_attr", "output")


@dataclasses.dataclass(frozen=True, order=True)
class Partition:
    """Where a node runs. Sorted in execution order: group g's members, then what is shared after g.

    ``group`` of a shared partition is the last group begun before it (-1: before every group).
    """

    group: int
    shared: bool
    phase: int = 0
    member: int = 0

    @property
    def name(self) -> str:
        if self.shared:
            return f"shared_{self.group + 1}"
        phase = f"_phase_{self.phase}" if self.phase else ""
        return f"group_{self.group}_member_{self.member}{phase}"

    def __str__(self) -> str:
        if self.shared:
            return "shared, before every group" if self.group < 0 else f"shared, after group {self.group}"
        return f"group {self.group}, member {self.member}, phase {self.phase}"


@dataclasses.dataclass(eq=False)
class PartitionAssignment:
    """Which partition every computing node of the graph goes to."""

    of: dict[torch.fx.Node, Partition]

    def partitions(self) -> list[Partition]:
        return sorted(set(self.of.values()))

    def nodes(self, partition: Partition) -> Iterator[torch.fx.Node]:
        return (n for n, p in self.of.items() if p == partition)

    def __str__(self) -> str:
        lines = []
        for p in self.partitions():
            nodes = list(self.nodes(p))
            lines.append(f"{p.name:<28} {len(nodes):>5} nodes  {nodes[0].name} .. {nodes[-1].name}  ({p})")
        return "\n".join(lines)


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
    """``module`` calls its segments in graph order; ``segments`` says what each one is."""

    module: torch.fx.GraphModule
    segments: dict[str, Segment]


def split_segments(rewritten: RewrittenGraph) -> SplitGraph:
    """Cut the rewritten graph into shared and member segments (phased when it has bypass edges)."""
    assignment = assign_partitions(rewritten)
    fold_sums(rewritten, assignment)
    module = _cut(rewritten.gm, assignment)
    return SplitGraph(module, _name_segments(module))


def assign_partitions(rewritten: RewrittenGraph) -> PartitionAssignment:
    """Member nodes to their member (and phase, with bypass); every other node shared, after the
    groups begun before it in graph order."""
    owner = rewritten.member_of_nodes()
    mlp_half = _mlp_halves(rewritten) if rewritten.bypass else set()
    of: dict[torch.fx.Node, Partition] = {}
    groups_started = 0
    for node in rewritten.gm.graph.nodes:
        if node.op in _INPUTS_OUTPUT:
            continue
        if node in owner:
            g, k = owner[node]
            groups_started = max(groups_started, g + 1)
            of[node] = Partition(g, shared=False, phase=int(node in mlp_half), member=k)
        else:
            of[node] = Partition(groups_started - 1, shared=True)
    return PartitionAssignment(of)


def fold_sums(rewritten: RewrittenGraph, assignment: PartitionAssignment) -> int:
    """Fold each group's sum into the next group's members where it is all that lies between
    them (consecutive groups); returns how many sums were folded."""
    shared_after: dict[int, set] = {}
    for node, p in assignment.of.items():
        if p.shared:
            shared_after.setdefault(p.group, set()).add(node)
    owner = rewritten.member_of_nodes()
    folded = 0
    for g, (done, following) in enumerate(zip(rewritten.rewrites, rewritten.rewrites[1:])):
        if following.input is done.output and shared_after.get(g, set()) == set(done.sums):
            _fold_sum(rewritten.gm.graph, done, g + 1, len(following.members), owner, assignment)
            folded += 1
    if folded:
        rewritten.gm.graph.lint()
        rewritten.gm.recompile()
    return folded


def _fold_sum(graph: torch.fx.Graph, done: GroupRewrite, group: int, width: int, owner: dict,
              assignment: PartitionAssignment) -> None:
    """Move ``done``'s sum into the ``width`` members of ``group`` (the group after it): the
    nodes to member 0, a copy to each other member, whose nodes then read their copy's output."""
    for node in done.sums:
        assignment.of[node] = Partition(group, shared=False)
    anchor = done.output
    for k in range(1, width):
        copies: dict[torch.fx.Node, torch.fx.Node] = {}
        for node in done.sums:
            with graph.inserting_after(anchor):
                copies[node] = anchor = graph.node_copy(node, lambda n: copies.get(n, n))
            assignment.of[anchor] = Partition(group, shared=False, member=k)
        for user in list(done.output.users):
            if owner.get(user) == (group, k):
                user.replace_input_with(done.output, copies[done.output])


def _cut(gm: torch.fx.GraphModule, assignment: PartitionAssignment) -> torch.fx.GraphModule:
    """The split module: one submodule per partition, called in execution order."""
    ids = {p: i for i, p in enumerate(assignment.partitions())}
    for node, p in assignment.of.items():
        node.meta[_PARTITION_KEY] = p  # copied into the submodule with the node
    partition_ids = {n: ids[p] for n, p in assignment.of.items()}
    if _split_simple is not None:
        return _split_simple(gm, partition_ids)
    return _split.split_module(gm, None, partition_ids.__getitem__, keep_original_order=True)


def _name_segments(module: torch.fx.GraphModule) -> dict[str, Segment]:
    """Rename every submodule for the partition its nodes carry; describe each."""
    segments = {}
    for node in module.graph.find_nodes(op="call_module"):
        submodule = module.get_submodule(node.target)
        # An input placeholder carries the meta of the node it stands for (another partition's).
        p = next(n.meta[_PARTITION_KEY] for n in submodule.graph.nodes
                 if n.op not in _INPUTS_OUTPUT and _PARTITION_KEY in n.meta)
        delattr(module, node.target)
        module.add_submodule(p.name, submodule)
        node.target = p.name
        segments[p.name] = Segment(p.name) if p.shared else Segment(p.name, p.group, p.member, p.phase)
    module.recompile()
    return segments


def _mlp_halves(rewritten: RewrittenGraph) -> set[torch.fx.Node]:
    """Nodes of the members' layers that depend on their mid-block residual: MLP branches and deltas."""
    within_layers = _within_layer_dataflow(rewritten.gm)
    members = [rewritten.block(i) for r in rewritten.rewrites for i in r.members]
    return set().union(*(_mlp_half(within_layers, b) for b in members))


def _within_layer_dataflow(gm: torch.fx.GraphModule) -> nx.DiGraph:
    """Data-flow edges between nodes of the same layer (built once for all members)."""
    layer = {n: ref.index for n in gm.graph.nodes if (ref := layer_of(n)) is not None}
    dag = nx.DiGraph()
    dag.add_edges_from((n, u) for n in layer for u in n.users if layer.get(u) == layer[n])
    return dag


def _mlp_half(within_layers: nx.DiGraph, block: Block) -> set:
    """Nodes of ``block``'s layer that depend on its mid-block residual: the MLP branch and delta."""
    mid = block.mid
    return nx.descendants(within_layers, mid) if mid is not None and mid in within_layers else set()
