"""SPMD placement: keep one member of every group on this rank, sum the deltas with a collective.

Run on each of W ranks on the :class:`~cqil_fx.passes.concurrent_groups.RewrittenGraph`
(after :func:`~cqil_fx.passes.bypass.add_bypass_edges`), with W equal to every group's
size.  Rank r keeps member r of each group and drops the other members' nodes
(cache writes included); the sum of the deltas becomes an in-graph functional
``all_reduce``, so the inner compiler (Inductor) schedules it like any other op.
Group [g0, g1] on rank 1 (before -> after)::

    d0  = a0 + m0(x + a0)                   d1  = a1 + m1(x + a1)
    d1  = a1 + m1(x + a1)          ==>      s   = all_reduce(d1, "sum")
    out = x + (d0 + d1)                     out = x + wait_tensor(s)

Generation graphs: the other members' cache writes go with them, but nodes
the graph's outputs need (the cache tensors a prefill allocates, length
counters) stay, so every rank returns a complete cache.  The other members'
cache tensors become one element expanded to their shape (a static cache's
``zeros``, a dynamic cache's ``cat``), so a rank neither holds nor computes
K/V for a layer it never computes, and the cache's lengths stay right.

With bypass (D > 0) member k's MLP reads attention outputs of members other
ranks compute.  Every rank all-gathers its member's attention output once per
group (one collective, before the MLPs) and reads the ones it needs from the
gathered tensor::

    a1 = attn1(x)                           a1 = attn1(x)
    u1 = (x + a1) + a0             ==>      a  = wait_tensor(all_gather(a1, dim 0))
                                            u1 = (x + a1) + chunk(a, W)[0]

Blocks outside groups stay on every rank.  The placeholders of dropped members'
weights stay too (Dynamo's calling convention), unused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
from collections.abc import Sequence

import torch
import torch.fx
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from cqil_fx.errors import SpmdPlacementError

from .concurrent_groups import GroupRewrite, RewrittenGraph
from .find_blocks import Block
from .mutation import mutates_in_place
from .records import Placement

_functional = torch.ops._c10d_functional
_LINEARS = (torch._C._nn.linear, torch.nn.functional.linear)


def place_members(rewritten: RewrittenGraph, rank: int, world_size: int, group_name: str) -> RewrittenGraph:
    """Keep member ``rank`` of every group (in place), summing deltas with ``all_reduce``.

    The result's ``blocks`` are the blocks this rank still computes and its ``placement``
    says what was kept and inserted.
    """
    rewrites = rewritten.rewrites
    check_placeable(rewrites, world_size)
    if not 0 <= rank < world_size:
        raise SpmdPlacementError(f"rank {rank} is outside a world of {world_size}")
    gm = rewritten.gm
    owner = rewritten.member_of_nodes()
    gathers = 0
    for g, rewrite in enumerate(rewrites):
        members = [rewritten.block(i) for i in rewrite.members]
        if rewritten.bypass:
            local = {n for n, gk in owner.items() if gk == (g, rank)}
            _exchange_attention(gm.graph, members, rank, world_size, group_name, local)
            gathers += 1
        _all_reduce_deltas(gm.graph, rewrite, rank, group_name)
    removed = _drop_other_members(gm.graph, owner, rank)
    released = _release_other_caches(gm.graph, owner, rank)
    if released:  # a dynamic cache's K/V projections fed only the cache tensors just released
        removed += _drop_other_members(gm.graph, owner, rank)
    gm.graph.lint()
    gm.recompile()
    dropped = tuple(i for r in rewrites for k, i in enumerate(r.members) if k != rank)
    placement = Placement(
        rank, world_size, kept=tuple(r.members[rank] for r in rewrites), dropped=dropped,
        all_reduces=len(rewrites), all_gathers=gathers, nodes_removed=removed, caches_released=released,
    )
    blocks = tuple(b for b in rewritten.blocks if b.index not in dropped)
    return dataclasses.replace(rewritten, blocks=blocks, placement=placement)


def check_placeable(rewrites: Sequence[GroupRewrite], world_size: int) -> None:
    """Every group needs exactly one member per rank."""
    for rewrite in rewrites:
        if len(rewrite.members) != world_size:
            raise SpmdPlacementError(
                f"group {list(rewrite.members)} has {len(rewrite.members)} members but the world has "
                f"{world_size} ranks; SPMD runs one member per rank, so use parallel={world_size} "
                f"(or launch {len(rewrite.members)} ranks)"
            )


def _all_reduce_deltas(graph: torch.fx.Graph, rewrite: GroupRewrite, rank: int, group_name: str) -> None:
    """``out = x + all_reduce(term_r)`` (``+ bias`` with a correction; term_r is ``d_r`` or its corrected
    term, computed by the member's own nodes)."""
    term = rewrite.terms[rank] if rewrite.terms else rewrite.deltas[rank]
    with graph.inserting_before(term.next):
        reduced = graph.call_function(_functional.all_reduce.default, (term, "sum", group_name))
        total = graph.call_function(_functional.wait_tensor.default, (reduced,))
        if rewrite.bias is not None:
            total = graph.call_function(operator.add, (total, rewrite.bias))
            # shared, like the group output: no member's module stack
            total.meta = {k: v for k, v in rewrite.output.meta.items() if k != "nn_module_stack"}
    out = rewrite.output
    out.args = (rewrite.input, total)
    for node in reversed(rewrite.sums[:-1]):  # the local chain of sums is no longer read
        graph.erase_node(node)


def _exchange_attention(graph: torch.fx.Graph, members: list[Block], rank: int, world_size: int,
                        group_name: str, local: set) -> None:
    """All-gather this rank's attention output; the local member reads the others' from it."""
    mine = members[rank]
    with graph.inserting_before(mine.attention.next):
        gathered = graph.call_function(
            _functional.all_gather_into_tensor.default, (mine.attention, world_size, group_name))
        gathered = graph.call_function(_functional.wait_tensor.default, (gathered,))
        chunks = graph.call_function(torch.chunk, (gathered, world_size), {"dim": 0})
        parts = [graph.call_function(operator.getitem, (chunks, k)) for k in range(world_size)]
    for k, member in enumerate(members):
        if k == rank:
            continue
        for user in list(member.attention.users):
            if user in local:  # a bypass add of the local member
                user.replace_input_with(member.attention, parts[k])


def _drop_other_members(graph: torch.fx.Graph, owner: dict, rank: int) -> int:
    """Erase the other ranks' members' nodes, except what the graph's outputs still need.

    After the sums are collectives nothing of another member feeds the residual
    stream; what can still reach the output is generation state: the KV-cache
    tensors a prefill graph allocates and returns, and length counters.  Those
    stay (unwritten: their cache writes go), so every rank hands transformers a
    complete cache object; the in-place length-counter adds stay too, so the
    cache's length is right on every rank whichever layer it is read from.
    """
    others = {n for n in graph.nodes if n in owner and owner[n][1] != rank}
    needed = _ancestors([n for n in others if _is_counter_update(n)] + list(graph.find_nodes(op="output")))
    doomed = [n for n in graph.nodes if n in others and n not in needed]
    doomed_set = set(doomed)
    for node in doomed:
        outside = [u for u in node.users if u not in doomed_set]
        assert not outside, f"{node.name} (another rank's member) is still read by {outside}"
    for node in reversed(doomed):
        graph.erase_node(node)
    return len(doomed)


def _release_other_caches(graph: torch.fx.Graph, owner: dict, rank: int) -> int:
    """Make the other members' KV-cache tensors one element, expanded to their shape.

    What :func:`_drop_other_members` keeps of another member is what the graph
    hands back as its layer's cache:

    * a static cache's ``torch.zeros`` (transformers allocates it at the first
      update, in a prefill graph, and keeps it on the cache object);
    * a dynamic cache's ``torch.cat([past, new], dim=-2)`` (a sliding-window
      layer slices it), which needs the member's K/V projections.

    No graph of this rank reads either: the member's attention went with it.
    So each becomes ``zeros(()).expand(shape)``, which has the shape and dtype
    the next graph is traced with (and transformers reads the cache's length
    from) but holds one element, and the projections behind a ``cat`` go (the
    caller drops them).  (Filling such a view, as ``Cache.reset`` does, works;
    writing part of it would raise, and never happens.)  A symbolic size is
    rebuilt from the graph's ``SymInt`` inputs; one that cannot be is left as
    it was.
    """
    symbols = {p.meta["example_value"].node.expr: p for p in graph.find_nodes(op="placeholder")
               if isinstance(p.meta.get("example_value"), torch.SymInt)}
    released = 0
    for node in list(graph.nodes):
        if not (node in owner and owner[node][1] != rank and node.op == "call_function"
                and all(u.op == "output" for u in node.users) and node.users):  # only handed back
            continue
        value = node.meta.get("example_value")
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            continue
        if node.target is torch.zeros and len(node.args) == 1 and isinstance(node.args[0], (tuple, list)):
            sizes = node.args[0]
            if not all(isinstance(n, int) for n in sizes) or value.numel() <= 1:
                continue
            kwargs = dict(node.kwargs)
        elif _is_cache_concatenation(node):
            if not all(isinstance(n, int) or _buildable(n.node.expr, symbols) for n in value.shape):
                continue
            with graph.inserting_before(node):
                sizes = [n if isinstance(n, int) else _build(graph, n.node.expr, symbols)[0] for n in value.shape]
            kwargs = dict(dtype=value.dtype, device=value.device)
        else:
            continue
        with graph.inserting_before(node):
            one = graph.call_function(torch.zeros, ((),), kwargs)
            view = graph.call_method("expand", (one, *sizes))
        with value.fake_mode if hasattr(value, "fake_mode") else contextlib.nullcontext():
            one.meta = {**node.meta, "example_value": torch.zeros((), dtype=value.dtype, device=value.device)}
            view.meta = {**node.meta, "example_value": one.meta["example_value"].expand(*value.shape)}
        node.replace_all_uses_with(view)
        if node.target is torch.zeros:
            graph.erase_node(node)
        released += 1
    return released


def _is_cache_concatenation(node: torch.fx.Node) -> bool:
    """``torch.cat`` (a dynamic cache's update), or slices of one (a sliding-window layer's)."""
    while (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node)
           and len(node.args[0].users) == 1):
        node = node.args[0]
    return node.op == "call_function" and node.target is torch.cat


def _buildable(expr, symbols: dict) -> bool:
    """Whether :func:`_build` can compute the size ``expr``: sums and products of integers and of
    symbols the graph takes as ``SymInt`` inputs."""
    if expr.is_Integer or expr.is_Symbol:
        return expr.is_Integer or expr in symbols
    return (expr.is_Add or expr.is_Mul) and all(_buildable(arg, symbols) for arg in expr.args)


def _build(graph: torch.fx.Graph, expr, symbols: dict) -> tuple:
    """(an int or a node computing the size ``expr``, its value); see :func:`_buildable`."""
    if expr.is_Integer:
        return int(expr), int(expr)
    if expr.is_Symbol:
        return symbols[expr], symbols[expr].meta["example_value"]
    combine = operator.add if expr.is_Add else operator.mul
    node, value = _build(graph, expr.args[0], symbols)
    for arg in expr.args[1:]:
        term, term_value = _build(graph, arg, symbols)
        node, value = graph.call_function(combine, (node, term)), combine(value, term_value)
        node.meta["example_value"] = value
    return node, value


def _ancestors(roots: list[torch.fx.Node]) -> set[torch.fx.Node]:
    seen, stack = set(roots), list(roots)
    while stack:
        for arg in stack.pop().all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                stack.append(arg)
    return seen


def _gathered_along(wait: torch.fx.Node, world_size: int) -> tuple[torch.fx.Node, int] | None:
    """(the cat, its dim) when ``wait``'s only use is ``cat(chunk(wait, world_size, dim=0), dim=d)``, d != 0."""
    if len(wait.users) != 1:
        return None
    (chunk,) = wait.users
    if not (chunk.target is torch.chunk and chunk.args[:2] == (wait, world_size)
            and chunk.kwargs.get("dim", chunk.args[2] if len(chunk.args) > 2 else 0) == 0 and len(chunk.users) == 1):
        return None
    (cat,) = chunk.users
    if cat.target is not torch.cat or cat.args[:1] != (chunk,) or len(cat.args) > 1:
        return None
    dim = cat.kwargs.get("dim", 0)
    value = wait.meta.get("example_value")
    if dim < 0 and isinstance(value, torch.Tensor):
        dim += value.dim()
    return (cat, dim) if dim > 0 else None


def _is_counter_update(node: torch.fx.Node) -> bool:
    """An in-place add to a one-element tensor: a cache's length counter, not a K/V write."""
    if not mutates_in_place(node) or getattr(node.target, "__name__", node.target) != "add_":
        return False
    value = node.meta.get("example_value")
    return isinstance(value, torch.Tensor) and value.numel() == 1


def collective_inputs(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The tensors the functional collectives of ``gm`` send (in graph order)."""
    kinds = (_functional.all_reduce.default, _functional.all_gather_into_tensor.default)
    return [n.args[0] for n in gm.graph.nodes if n.target in kinds]


def fold_linear_gathers(gm: torch.fx.GraphModule, all_gather, linear_all_gather) -> int:
    """Swap ``all_gather(linear(x, w, b), channel, after, d)`` for ``linear_all_gather(x, w, b, channel, after)``.

    Only where the gather concatenates along the linear's output features (``d``
    its last dim), is the linear's only use, and the linear's output has its
    inputs' dtype (under autocast it does not, and the op would compute in the
    inputs' dtype), and the weight is a plain tensor (a quantized weight, a
    tensor subclass, has no implementation of the fused op): the vocabulary-split LM head of
    :func:`cqil_fx.passes.tensor_parallel.shard_blocks`, whose rank-local logits
    ``linear_all_gather`` computes straight into the transport's buffer.
    Returns how many it folded.
    """
    folded = 0
    for gather in list(gm.graph.find_nodes(op="call_function", target=all_gather)):
        linear = gather.args[0]
        value = linear.meta.get("example_value") if isinstance(linear, torch.fx.Node) else None
        dim = gather.args[3] if len(gather.args) > 3 else gather.kwargs.get("dim", 0)
        if not (isinstance(value, torch.Tensor) and linear.op == "call_function" and linear.target in _LINEARS
                and len(linear.users) == 1 and dim in (-1, value.dim() - 1)):
            continue
        x, weight = linear.args[0], linear.args[1] if len(linear.args) > 1 else linear.kwargs["weight"]
        bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
        if any(getattr(n.meta.get("example_value"), "dtype", value.dtype) != value.dtype
               for n in (x, weight, bias) if isinstance(n, torch.fx.Node)) or _from_tensor_subclass(weight):
            continue
        with gm.graph.inserting_before(gather):
            fused = gm.graph.call_function(linear_all_gather, (x, weight, bias, *gather.args[1:3]))
        fused.meta = dict(gather.meta)
        gather.replace_all_uses_with(fused)
        gm.graph.erase_node(gather)
        gm.graph.erase_node(linear)
        folded += 1
    if folded:
        gm.graph.lint()
        gm.recompile()
    return folded


def _from_tensor_subclass(node) -> bool:
    """Whether ``node`` is, or slices or views, an input whose traced value is a tensor subclass."""
    while isinstance(node, torch.fx.Node):
        if is_traceable_wrapper_subclass(node.meta.get("example_value")):
            return True
        if node.op == "placeholder" or not node.args:
            return False
        node = node.args[0]
    return False


def replace_collectives(gm: torch.fx.GraphModule, all_reduce, all_gather, channel: str) -> int:
    """Swap ``wait_tensor(functional collective(x))`` for ``op(x, channel, previous)`` (another transport).

    ``all_reduce(x, channel, after)`` must sum over the ranks and ``all_gather(x,
    channel, after, dim)`` concatenate along ``dim``.  ``after`` is the previous
    collective's output (None for the first): a data dependency that keeps the
    graph order of the collectives, which every rank must share, through any
    reordering compiler.  A gather along dim 0 whose only use is
    ``cat(chunk(gathered, W), dim=d)`` (a gather along dim d, as
    :func:`cqil_fx.passes.tensor_parallel.shard_blocks` writes it for the logits)
    becomes one ``all_gather(x, channel, after, d)``.
    """
    ops = {_functional.all_reduce.default: all_reduce, _functional.all_gather_into_tensor.default: all_gather}
    previous = None
    for node in list(gm.graph.nodes):
        if node.target in ops:
            (wait,) = node.users
            assert wait.target is _functional.wait_tensor.default, wait
            args, replaced, dead = (node.args[0], channel, previous), wait, [wait, node]
            gather = node.target is _functional.all_gather_into_tensor.default
            concatenated = _gathered_along(wait, node.args[1]) if gather else None
            if concatenated is not None:
                cat, dim = concatenated
                args, replaced, dead = (*args, dim), cat, [cat, *cat.args[0:1], *dead]
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(ops[node.target], args)
            replaced.replace_all_uses_with(new)
            for n in dead:
                gm.graph.erase_node(n)
            previous = new
    gm.graph.lint()
    gm.recompile()
    return len(gm.graph.find_nodes(op="call_function", target=all_reduce)) + len(
        gm.graph.find_nodes(op="call_function", target=all_gather))
