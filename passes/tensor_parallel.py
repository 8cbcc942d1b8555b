"""Tensor parallelism for the blocks outside groups: heads and MLP columns split over the ranks.

Run on each of W ranks after :func:`~cqil_fx.passes.spmd.place_members`.  In
every block that is in no group, each branch (attention, MLP; the one fused
branch region of a parallel-residual block) is split the Megatron way: the
linears that read the branch input are column-parallel (rank r keeps output
features ``[r*n/W, (r+1)*n/W)``: its heads, its MLP columns), the linear that
ends the branch is row-parallel (the matching input features), and one
all-reduce after it sums the partial outputs.  The LM head is column-parallel
over the vocabulary and its logits are all-gathered; the input embedding is
split over the vocabulary too (rank r looks up the ids in its rows, zeros the
others, and one all-reduce sums the lookups), so that a tied table is held in
parts.  The weights stay whole placeholders (Dynamo's calling convention);
the graph reads slices of them::

    q = linear(h, Wq)                    q = linear(h, narrow(Wq, 0, r*32/W, 32/W))
    q = view(q, (2, 11, -1, 8))   ==>    q = view(q, (2, 11, -1, 8))             # -1: nothing to fix
    k = expand(k, 2, 2, 2, 11, 8)        k = expand(k, 2, 2 / W, 2, 11, 8)       # traced constants
    o = linear(attn, Wo, bo)             o = wait(all_reduce(linear(attn, narrow(Wo, 1, ...)))) + bo

Dynamo specialises shapes into constants (``expand(2, 2, 2, 11, 8)`` in
``repeat_kv``), so the pass walks each branch from its column linears to its
row linear in graph order, fixes the size arguments of ``view``/``reshape``/
``expand``/``split`` on the split dimension, and re-runs every such node on
fake tensors: each value must be the original with exactly one dimension
divided by W, and no op may reduce, slice or concatenate along that dimension.
Anything else raises: :class:`~cqil_fx.errors.CQILPlanError` when head
counts do not divide by W (naming them), :class:`~cqil_fx.errors.CQILUnsupportedError`
for shapes the pass does not know how to split.  Never a wrong answer.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from collections.abc import Iterable, Mapping, Sequence

import networkx as nx
import torch
import torch.fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode

from cqil_fx.errors import CQILPlanError, CQILUnsupportedError

from .concurrent_groups import RewrittenGraph
from .find_blocks import Block
from .module_stack import layer_of
from .mutation import mutates_in_place
from .records import Sharding

log = logging.getLogger(__name__)
_functional = torch.ops._c10d_functional
_LINEAR = (torch._C._nn.linear,)
_RESHAPES = {"view", "reshape"}
# Contracted dimension of each operand (query and key over head_dim, value over the keys).
_CONTRACTIONS = {"matmul": (-1, -2), "bmm": (-1, -2), "scaled_dot_product_attention": (-1, -1, -2)}
# Ops whose ``dim`` argument must not be the split dimension (position of a positional dim).
_DIM_OPS = {"softmax": 1, "log_softmax": 1, "cat": 1, "cumsum": 1, "mean": 1, "sum": 1, "amax": 1,
            "max": 1, "norm": 2, "layer_norm": None, "rms_norm": None}


def shard_blocks(rewritten: RewrittenGraph, rank: int, world_size: int, group_name: str,
                 presharded: Mapping[str, str] | None = None, fallback: bool = False) -> RewrittenGraph:
    """Split the blocks outside groups and the LM head over ``world_size`` ranks (in place).

    ``presharded`` names weight placeholders whose tensors already hold only
    this rank's slice ("colwise" or "rowwise", as a per-rank loader made them):
    the graph was traced with those shapes, so their linears get only the collectives.
    With ``fallback``, a branch whose head counts do not divide by ``world_size``
    stays whole on every rank (no collective) instead of raising
    :class:`~cqil_fx.errors.CQILPlanError`: attention replicated, MLP split.
    """
    gm = rewritten.gm
    grouped = {i for r in rewritten.rewrites for i in r.members}
    shard = _Shard(gm.graph, rank, world_size, group_name, dict(presharded or {}))
    sharded, whole = [], []
    for block in rewritten.blocks:
        if block.index not in grouped:
            for region in _branch_regions(block):
                if not shard.branch(block, region, fallback):
                    whole.append(block.index)
            sharded.append(block.index)
    lm_head = _lm_head(gm.graph, rewritten.blocks)
    split_head = lm_head is not None and shard.lm_head(lm_head)
    embedding = _input_embedding(gm.graph, rewritten.blocks)
    split_embedding = embedding is not None and shard.embedding(embedding)
    gm.graph.lint()
    gm.recompile()
    sharding = Sharding(rank, world_size, tuple(sharded), shard.columns, shard.rows, split_head, tuple(whole),
                        split_embedding)
    return dataclasses.replace(rewritten, sharding=sharding)


def _dynamic_input(graph: torch.fx.Graph) -> tuple[str, object] | None:
    """A graph input with symbolic sizes (name, example value), or None when every size is an int."""
    for node in graph.find_nodes(op="placeholder"):
        value = node.meta.get("example_value")
        sizes = value.shape if isinstance(value, torch.Tensor) else (value,)
        if any(isinstance(size, torch.SymInt) for size in sizes):
            return node.name, value
    return None


def _branch_regions(block: Block) -> list[set[torch.fx.Node]]:
    """The block's nodes per branch: attention and MLP (sequential), or one region (parallel)."""
    body = set(block.nodes) - set(block.residual)
    if block.mid is None:
        return [body]
    mlp = _descendants([block.mid], body)
    return [body - mlp, mlp]


def _descendants(roots: Iterable[torch.fx.Node], within: set) -> set[torch.fx.Node]:
    """Nodes of ``within`` reachable from ``roots`` along data flow, through nodes of ``within`` only."""
    roots = list(roots)
    dag = _dataflow(within, roots)
    return set().union(*(nx.descendants(dag, r) for r in roots)) & within


def _ancestors(node: torch.fx.Node, within: set) -> set[torch.fx.Node]:
    """Nodes of ``within`` that ``node`` reads, directly or through nodes of ``within`` only."""
    return nx.ancestors(_dataflow(within, [node]), node) & within


def _dataflow(within: set, ends: list) -> nx.DiGraph:
    """Data-flow edges among ``within`` and from/to ``ends`` (a DiGraph view for reachability)."""
    dag = nx.DiGraph()
    dag.add_nodes_from(ends)
    dag.add_edges_from((n, u) for n in within | set(ends) for u in n.users if u in within or u in ends)
    return dag


def _is_linear(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in _LINEAR and isinstance(_arg(node, 1, "weight"), torch.fx.Node)


def _arg(node: torch.fx.Node, position: int, name: str, default=None):
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def _lm_head(graph: torch.fx.Graph, blocks: Sequence[Block]) -> torch.fx.Node | None:
    """The last linear outside the blocks that reads the stack's output and feeds the graph output."""
    last = blocks[-1]
    after = _descendants([last.output if last.output is not None else last.delta], set(graph.nodes))
    outputs = set(graph.find_nodes(op="output"))
    heads = [n for n in graph.nodes if n in after and _is_linear(n) and layer_of(n) is None
             and _descendants([n], set(graph.nodes)) & outputs]
    return heads[-1] if heads else None


def _input_embedding(graph: torch.fx.Graph, blocks: Sequence[Block]) -> torch.fx.Node | None:
    """The embedding lookup outside the blocks whose output the first block reads (its weight a graph input)."""
    first = set(blocks[0].nodes)
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.nn.functional.embedding and layer_of(node) is None:
            weight = _arg(node, 1, "weight")
            if isinstance(weight, torch.fx.Node) and weight.op == "placeholder" and (
                    _descendants([node], set(graph.nodes)) & first):
                return node
    return None


def _value(node) -> torch.Tensor | None:
    value = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, torch.fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


class _Shard:
    """The rewrite of one rank's graph, branch by branch; counts what it split."""

    def __init__(self, graph: torch.fx.Graph, rank: int, world_size: int, group_name: str,
                 presharded: dict[str, str]):
        self.graph, self.rank, self.world, self.group = graph, rank, world_size, group_name
        self.presharded = presharded
        # A dynamic graph (a dynamic KV cache's growing length) is split only where a per-rank loader
        # sharded the weights: no traced size to fix; its values are recomputed over Dynamo's symbols.
        self.dynamic = _dynamic_input(graph)
        shape_env = None
        if self.dynamic:
            shape_env = detect_fake_mode([n.meta.get("example_value") for n in graph.find_nodes(op="placeholder")
                                          ]).shape_env
        self.fake = FakeTensorMode(allow_non_fake_inputs=True, shape_env=shape_env)
        self.columns = self.rows = 0

    def _require_static(self, what: str) -> None:
        """The size arguments the pass fixes are the ints Dynamo traced; symbolic sizes it cannot split."""
        if self.dynamic:
            name, value = self.dynamic
            raise CQILUnsupportedError(
                f"tensor_parallel=True splits {what} in graphs with static shapes only, and this graph has dynamic "
                f"sizes ({name}: {value}; Dynamo makes a graph dynamic once it sees a second input shape, e.g. "
                "the decode steps of a dynamic KV cache): compile with torch.compile(..., dynamic=False) and a "
                "static cache, or give each rank its shards before compiling: load them with "
                "cqil_fx.graph.weights.load_rank_weights, or cut a model in memory with shard_rank_weights")

    # -- the branch: column linears -> split values -> row linear + all_reduce
    def branch(self, block: Block, region: set[torch.fx.Node], fallback: bool = False) -> bool:
        """Split one branch; False when ``fallback`` left it whole (its heads do not divide)."""
        saved = {n: (n.args, n.kwargs, dict(n.meta)) for n in region}
        before, counts = set(self.graph.nodes), (self.columns, self.rows)
        try:
            self._split_branch(block, region)
        except CQILPlanError as e:
            if not fallback:
                raise
            for node, (args, kwargs, meta) in saved.items():  # undo: the branch as it was traced
                node.args, node.kwargs, node.meta = args, kwargs, meta
            for node in reversed([n for n in self.graph.nodes if n not in before]):
                self.graph.erase_node(node)
            self.columns, self.rows = counts
            log.info("cqil: block %d keeps a branch whole on every rank: %s", block.index, e)
            return False
        return True

    def _split_branch(self, block: Block, region: set[torch.fx.Node]) -> None:
        linears = [n for n in self.graph.nodes if n in region and _is_linear(n)]
        if not linears:
            raise CQILUnsupportedError(
                f"tensor_parallel=True: block {block.index} ({block.path}) has a branch without "
                "torch.nn.functional.linear projections (e.g. GPT-2's Conv1D, traced as addmm); "
                "this version splits only linear layers: use tensor_parallel=False for this model")
        within = set(linears)
        columns = [n for n in linears if not (_ancestors(n, region) & within)]
        rows = [n for n in linears if n not in columns]
        loaded = {n: self.presharded.get(_arg(n, 1, "weight").name) for n in linears}
        if any(loaded.values()):
            wrong = [n.name for n in linears if loaded[n] != ("rowwise" if n in rows else "colwise")]
            if wrong:
                raise CQILUnsupportedError(
                    f"tensor_parallel=True: block {block.index}'s weights were loaded sharded, but not as this "
                    f"branch's linears need ({wrong}: column-parallel {[n.name for n in columns]}, row-parallel "
                    f"{[n.name for n in rows]}); load the model whole")
            for row in rows:  # traced with this rank's slices: only the collectives are missing
                self._all_reduce(row, _arg(row, 2, "bias"))
            self.columns += len(columns)
            return
        self._require_static(f"block {block.index}'s branches")
        split: dict[torch.fx.Node, int] = {}  # node -> the dimension its value is split along
        for col in columns:
            self._column(col, block, split)
        for node in list(self.graph.nodes):
            if node in split or node in rows or not any(a in split for a in node.all_input_nodes):
                continue
            self._propagate(node, block, region, split)
        for row in rows:
            self._row(row, block, split)

    def _column(self, linear: torch.fx.Node, block: Block, split: dict) -> None:
        weight, bias = _arg(linear, 1, "weight"), _arg(linear, 2, "bias")
        out_features = _value(weight).shape[0]
        if out_features % self.world:
            raise CQILPlanError(
                f"tensor_parallel=True: block {block.index}'s {linear.name} has {out_features} output "
                f"features, which do not divide by the world size {self.world}")
        size = out_features // self.world
        with self.graph.inserting_before(linear):
            linear.update_arg(1, self._narrow(weight, 0, size))
            if isinstance(bias, torch.fx.Node):
                linear.update_arg(2, self._narrow(bias, 0, size))
        self._refresh(linear)
        split[linear] = _value(linear).dim() - 1
        self.columns += 1

    def _row(self, linear: torch.fx.Node, block: Block, split: dict) -> None:
        x, weight, bias = linear.args[0], _arg(linear, 1, "weight"), _arg(linear, 2, "bias")
        if x not in split or split[x] != _value(x).dim() - 1:
            raise CQILUnsupportedError(
                f"tensor_parallel=True: block {block.index}'s {linear.name} reads a linear's output "
                "that is not split along its features; this branch shape cannot be split")
        size = _value(x).shape[-1]
        with self.graph.inserting_before(linear):
            linear.args = (x, self._narrow(weight, 1, size), bias)
            linear.kwargs = {}
        self._all_reduce(linear, bias)

    def _all_reduce(self, linear: torch.fx.Node, bias) -> None:
        """``linear`` (a partial sum, its bias dropped) all-reduced, the bias added once after."""
        linear.args = (linear.args[0], _arg(linear, 1, "weight"), None)
        linear.kwargs = {}
        self._refresh(linear)
        self._sum_over_ranks(linear, bias)
        self.rows += 1

    def _sum_over_ranks(self, partial: torch.fx.Node, bias=None) -> None:
        """Every user of ``partial`` reads its all-reduced sum instead (plus ``bias``, once)."""
        users = list(partial.users)
        with self.graph.inserting_after(partial):
            reduced = self.graph.call_function(_functional.all_reduce.default, (partial, "sum", self.group))
        with self.graph.inserting_after(reduced):
            total = self.graph.call_function(_functional.wait_tensor.default, (reduced,))
        for n in (reduced, total):
            n.meta = dict(partial.meta)
        out = total
        if isinstance(bias, torch.fx.Node):
            with self.graph.inserting_after(total):
                out = self.graph.call_function(operator.add, (total, bias))
            out.meta = dict(partial.meta)
        for user in users:
            user.replace_input_with(partial, out)

    def _narrow(self, tensor: torch.fx.Node, dim: int, size: int) -> torch.fx.Node:
        node = self.graph.call_function(torch.narrow, (tensor, dim, self.rank * size, size))
        self._refresh(node)
        return node

    # -- the values between: fix traced sizes, re-run on fake tensors, check the split
    def _propagate(self, node: torch.fx.Node, block: Block, region: set, split: dict) -> None:
        where = f"block {block.index}'s {node.name} ({node.target})"
        writes = mutates_in_place(node)  # a cache write is not on the block's data path: not in region
        if node.op == "output" or (node not in region and not writes) or (
                writes and not self._shard_written_input(node, region, split)):
            raise CQILUnsupportedError(
                f"tensor_parallel=True: a split value leaves its branch at {where} (a dynamic KV cache "
                "written or returned by the graph?); use a static cache (cache_implementation=\"static\"), "
                "call the model with use_cache=False, or use tensor_parallel=False")
        old = _value(node)
        dims = [split[a] for a in node.all_input_nodes if a in split]
        if len(set(dims)) != 1:
            raise CQILUnsupportedError(f"tensor_parallel=True: {where} mixes values split along different dims")
        source = next(a for a in node.all_input_nodes if a in split)
        self._check_dim_argument(node, split[source], where, split)
        self._fix_sizes(node, source, split[source], block)
        try:
            self._refresh(node)
        except RuntimeError as e:  # e.g. a whole per-head tensor broadcast against the rank's heads
            raise CQILUnsupportedError(
                f"tensor_parallel=True: {where} cannot run on this rank's part of its inputs "
                f"({str(e).splitlines()[0][:200]}); use tensor_parallel=False") from e
        new = _value(node)
        if old is None:  # a tuple (split): its getitems carry the values
            split[node] = split[source]
            return
        changed = [i for i in range(new.dim()) if new.dim() == old.dim() and new.shape[i] != old.shape[i]]
        if len(changed) != 1 or old.shape[changed[0]] != new.shape[changed[0]] * self.world:
            raise CQILUnsupportedError(
                f"tensor_parallel=True: {where} does not keep one dimension split over {self.world} ranks "
                f"(shape {tuple(old.shape)} became {tuple(new.shape)}); use tensor_parallel=False")
        split[node] = changed[0]

    def _shard_written_input(self, node: torch.fx.Node, region: set, split: dict) -> bool:
        """A split value written in place into a whole tensor from outside the branch (a static KV
        cache's ``index_copy_``): the branch reads and writes the rank's slice of that tensor instead,
        a ``narrow`` view, so the write lands in place and the attention reads this rank's heads.
        The tensor is a graph input (a cache made before) or made in this graph from nothing (the
        cache transformers creates at its first update, which the graph returns whole: this rank
        fills and reads only its heads of it). False (the caller raises) unless the tensor is
        exactly the world size times the value's slice along the split dimension, nothing reads it
        before this write, and nothing outside the branch reads it at all (the graph's output aside).
        The write itself may be outside ``region``: its result is not on the block's path to the
        residual."""
        target = node.args[0] if node.args else None
        made_here = isinstance(target, torch.fx.Node) and target.op == "call_function" and not target.all_input_nodes
        if not isinstance(target, torch.fx.Node) or target in split or not (target.op == "placeholder" or made_here):
            return False
        source = next(a for a in node.all_input_nodes if a in split)
        dim, whole, part = split[source], _value(target), _value(source)
        if whole is None or part is None or whole.dim() != part.dim() or whole.shape[dim] != part.shape[dim] * self.world:
            return False
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        uses = sorted((u for u in target.users if (u in region or u is node) and u.op != "output"),
                      key=order.__getitem__)
        others = [u for u in target.users if u not in uses and u.op != "output"]
        if uses[0] is not node or others:  # read before the write, or by another branch: left whole
            return False
        with self.graph.inserting_before(node):
            view = self._narrow(target, dim, part.shape[dim])
        view.meta["cqil_old_shape"] = tuple(whole.shape)
        for use in uses:
            use.replace_input_with(target, view)
        split[view] = dim
        return True

    def _check_dim_argument(self, node: torch.fx.Node, dim: int, where: str, split: dict) -> None:
        name = _name(node)
        if name in _CONTRACTIONS:  # a product over the split dimension would be a partial sum
            for position, contracted in enumerate(_CONTRACTIONS[name]):
                arg = node.args[position] if len(node.args) > position else None
                if arg in split and split[arg] % _value(arg).dim() == contracted % _value(arg).dim():
                    raise CQILUnsupportedError(
                        f"tensor_parallel=True: {where} contracts over the split dimension (a head split "
                        "inside its head dimension?); launch a world size that divides the head counts, "
                        "or use tensor_parallel=False")
        value = _value(node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None)
        if name == "getitem" and value is not None:
            index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
            if _indexes_dim(index, dim, value.dim()):
                raise CQILUnsupportedError(f"tensor_parallel=True: {where} indexes the split dimension")
        if name not in _DIM_OPS:
            return
        position = _DIM_OPS[name]
        chosen = node.kwargs.get("dim", node.args[position] if position and len(node.args) > position else None)
        rank_ = (value.dim() if value is not None else None)
        if name == "cat":
            first = node.args[0][0] if isinstance(node.args[0], (list, tuple)) else None
            rank_ = _value(first).dim() if _value(first) is not None else None
            chosen = 0 if chosen is None else chosen
        if chosen is None or rank_ is None:
            if name in ("layer_norm", "rms_norm"):
                raise CQILUnsupportedError(f"tensor_parallel=True: {where} normalises a split value")
            return
        chosen = chosen if isinstance(chosen, (list, tuple)) else [chosen]
        if any(c % rank_ == dim for c in chosen if isinstance(c, int)):
            raise CQILUnsupportedError(f"tensor_parallel=True: {where} reduces or joins along the split dimension")

    def _fix_sizes(self, node: torch.fx.Node, source: torch.fx.Node, dim: int, block: Block) -> None:
        name = _name(node)
        if name in _RESHAPES and node.op == "call_method" and len(node.args) > 1:
            packed = isinstance(node.args[1], (tuple, list))
            sizes = list(node.args[1] if packed else node.args[1:])
            if all(isinstance(s, int) for s in sizes):
                j = self._split_output_dim(source, dim, tuple(_value(node).shape), block, node)
                if sizes[j] != -1:
                    sizes[j] //= self.world
                node.args = (node.args[0], tuple(sizes)) if packed else (node.args[0], *sizes)
        elif name == "expand" and node.op == "call_method":
            sizes = list(node.args[1] if isinstance(node.args[1], (tuple, list)) else node.args[1:])
            offset = len(sizes) - _value(source).dim()
            if sizes[dim + offset] != -1:
                sizes[dim + offset] = _value(source).shape[dim]
            node.args = (node.args[0], *sizes)
        elif name == "split":
            size = node.args[1] if len(node.args) > 1 else node.kwargs["split_size"]
            split_dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
            if split_dim % _value(source).dim() == dim:
                if isinstance(size, int) and size % self.world == 0:
                    node.update_arg(1, size // self.world)
                else:
                    raise CQILUnsupportedError(f"tensor_parallel=True: {node.name} splits the split dimension")

    def _split_output_dim(self, source: torch.fx.Node, dim: int, out: tuple, block: Block,
                          node: torch.fx.Node) -> int:
        """The output dimension of a reshape where the rank's contiguous chunk of input ``dim`` ends.

        Within one row of the dimensions before ``dim``, rank r's part of the input
        is a contiguous run of ``piece`` elements.  The output dimension j whose
        stride ``s`` satisfies ``s <= piece < s * out[j]`` is where the runs meet;
        it must cut evenly (``piece % s == 0``).  A reshape that splits features
        into (heads, head_dim) must cut the heads, never the innermost part.
        """
        old_in = tuple(source.meta["cqil_old_shape"])
        inner_in = _prod(old_in[dim + 1:])
        extent = old_in[dim] * inner_in
        piece = extent // self.world
        strides = [_prod(out[j + 1:]) for j in range(len(out))]
        for j, stride in enumerate(strides):
            if stride <= piece < stride * out[j] and extent % (stride * out[j]) == 0:
                # The cut falls in the innermost part of a (heads, head_dim) split: inside a head.  With
                # one head the (1, head_dim) view looks like any unsqueeze; a leading 1 is taken as it.
                innermost = stride == inner_in and len(out) > len(old_in) and j > 0 and (
                    stride * out[j] < extent or out[j - 1] == 1)
                if piece % stride or innermost:
                    heads = out[j - 1] if innermost and j else out[j]
                    raise CQILPlanError(
                        f"tensor_parallel=True: block {block.index} views a dimension of {old_in[dim]} as "
                        f"{heads} heads x {extent // heads // inner_in} ({node.name}); {heads} heads do not divide "
                        f"by the world size {self.world}: launch a world size that divides every head count "
                        "(attention and key/value heads), or use tensor_parallel=False")
                return j
        raise CQILUnsupportedError(
            f"tensor_parallel=True: block {block.index}'s {node.name} reshapes {old_in} to {out} across the "
            "split dimension; use tensor_parallel=False for this model")

    def _refresh(self, node: torch.fx.Node) -> None:
        """Recompute ``node``'s example value on fake tensors (the old shape kept for reshapes)."""
        old = _value(node)
        if old is not None and "cqil_old_shape" not in node.meta:
            node.meta["cqil_old_shape"] = tuple(old.shape)
        with self.fake:
            args = torch.fx.node.map_arg(node.args, self._fake_of)
            kwargs = torch.fx.node.map_arg(node.kwargs, self._fake_of)
            if node.op == "call_method":
                value = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                value = node.target(*args, **kwargs)
        node.meta["example_value"] = value

    def _fake_of(self, node: torch.fx.Node):
        value = node.meta.get("example_value", node.meta.get("val"))
        return _refake(value, self.fake)

    # -- the LM head: vocabulary split, logits all-gathered
    def lm_head(self, linear: torch.fx.Node) -> bool:
        vocab = _value(_arg(linear, 1, "weight")).shape[0]
        weight, bias = _arg(linear, 1, "weight"), _arg(linear, 2, "bias")
        if self.presharded.get(weight.name) == "colwise":
            return self._gather_logits(linear)
        if vocab % self.world:
            return False  # documented: a vocabulary that does not divide stays whole on every rank
        self._require_static("the LM head")
        size = vocab // self.world
        with self.graph.inserting_before(linear):
            linear.update_arg(1, self._narrow(weight, 0, size))
            if isinstance(bias, torch.fx.Node):
                linear.update_arg(2, self._narrow(bias, 0, size))
        self._refresh(linear)
        return self._gather_logits(linear)

    def _gather_logits(self, linear: torch.fx.Node) -> bool:
        users = list(linear.users)
        last = _value(linear).dim() - 1
        with self.graph.inserting_before(linear.next):
            gathered = self.graph.call_function(
                _functional.all_gather_into_tensor.default, (linear, self.world, self.group))
            gathered = self.graph.call_function(_functional.wait_tensor.default, (gathered,))
            parts = self.graph.call_function(torch.chunk, (gathered, self.world), {"dim": 0})
            logits = self.graph.call_function(torch.cat, (parts,), {"dim": last})
        for n in (gathered, parts, logits):
            n.meta = {k: v for k, v in linear.meta.items() if k != "example_value"}
        gathered.meta["example_value"] = _fake_like(self.fake, _value(linear), 0, self.world)
        logits.meta["example_value"] = _fake_like(self.fake, _value(linear), last, self.world)
        for user in users:
            user.replace_input_with(linear, logits)
        return True

    # -- the input embedding: vocabulary split, the lookups all-reduced
    def embedding(self, lookup: torch.fx.Node) -> bool:
        """Rank r looks up the ids in its rows ``[r V/W, (r+1) V/W)`` and zeros the others; the sum over
        the ranks is the whole lookup (Megatron's vocabulary-parallel embedding). False: left whole."""
        ids, weight = lookup.args[0], _arg(lookup, 1, "weight")
        if _arg(lookup, 3, "max_norm") is not None:
            return False  # max_norm renormalises the rows it reads, in place: keep the table whole
        rows = _value(weight).shape[0]
        if self.presharded.get(weight.name) == "colwise":
            size, table = rows, weight  # traced with this rank's rows
        elif rows % self.world:
            return False  # documented: a vocabulary that does not divide stays whole on every rank
        else:
            self._require_static("the input embedding")
            size = rows // self.world
            with self.graph.inserting_before(lookup):
                table = self._narrow(weight, 0, size)
        users = list(lookup.users)
        with self.graph.inserting_before(lookup):
            local = self._call(operator.sub, ids, self.rank * size)
            outside = self._call(torch.logical_or, self._call(torch.lt, local, 0), self._call(torch.ge, local, size))
            local = self._call(torch.masked_fill, local, outside, 0)
        # padding_idx only shapes gradients, and names a row of the whole table: dropped
        lookup.args, lookup.kwargs = (local, table), {}
        self._refresh(lookup)
        with self.graph.inserting_before(lookup.next):
            mine = self._call(torch.masked_fill, lookup, self._call(torch.unsqueeze, outside, -1), 0.0)
        for user in users:
            user.replace_input_with(lookup, mine)
        self._sum_over_ranks(mine)
        return True

    def _call(self, target, *args) -> torch.fx.Node:
        node = self.graph.call_function(target, args)
        self._refresh(node)
        return node


def _fake_like(mode: FakeTensorMode, value: torch.Tensor, dim: int, factor: int) -> torch.Tensor:
    shape = list(value.shape)
    shape[dim] *= factor
    with mode:
        return torch.empty(shape, dtype=value.dtype, device=value.device)


def _refake(value, mode: FakeTensorMode):
    if isinstance(value, torch.Tensor):
        with mode:
            return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)
    if isinstance(value, (tuple, list)):
        return type(value)(_refake(v, mode) for v in value)
    return value


def _name(node: torch.fx.Node) -> str:
    if node.op == "call_method":
        return node.target
    return getattr(node.target, "__name__", str(node.target)).split(".")[-1]


def _prod(sizes: Sequence[int]) -> int:
    out = 1
    for s in sizes:
        out *= s
    return out


def _indexes_dim(index: tuple, dim: int, ndim: int) -> bool:
    """Whether a getitem index tuple selects anything but the whole of input dimension ``dim``."""
    entries = [e for e in index if e is not None]
    if Ellipsis in entries:
        cut = entries.index(Ellipsis)
        front, back = entries[:cut], entries[cut + 1:]
        positions = list(range(len(front))) + list(range(ndim - len(back), ndim))
        entries = front + back
    else:
        positions = list(range(len(entries)))
    return any(p == dim and e != slice(None) for p, e in zip(positions, entries))
