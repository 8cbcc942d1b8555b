"""Find the decoder blocks of a Dynamo graph and their residual paths (analysis only).

A block is the set of nodes traced inside one entry of the model's decoder-layer
list, with the chain of residual ``add`` nodes from the block input to the block
output.  Two shapes are recognised::

    sequential (pre-norm, GPT-2, LLaMA ...)      parallel residual (Phi, GPT-J)
      x ──────────┬──────────┐                      x ──────┬────────┐
      attn(x) = a │          │                     attn(x)  mlp(x)   │
      mid = x + a ┤ (add #1) │                      s = attn + mlp   │
      mlp(mid) = m│          │                      out = s + x  (the only residual add)
      out = mid + m (add #2)

At every residual ``add`` the residual operand is the one the other operand
depends on (``x`` feeds ``a``; ``mid`` feeds ``m``), a reachability question
answered with networkx on a DiGraph view of the FX graph.

Nodes traced outside the layer list (embedding, rotary tables, masks, final
norm) belong to no block.  KV-cache writes carry the stack of the attention
module that makes them and so belong to that block: with a static cache each
block writes its own buffers in place (``index_copy_`` of K and V, ``add_`` of
the cache's length counter), listed in ``Block.cache_writes``.  A block that
writes in place a tensor that another block reads cannot be regrouped (the
members' order would matter), so that is refused.
"""

from __future__ import annotations

import dataclasses
import operator
from collections import defaultdict

import networkx as nx
import torch
import torch.fx

from cqil_fx.errors import UnrecognisedBlockError
from cqil_fx.stack import pick_decoder_stack

from .module_stack import layer_of
from .mutation import mutates_in_place

SEQUENTIAL = "sequential"
PARALLEL = "parallel"

_ADD_TARGETS = {operator.add, operator.iadd, torch.add, torch.Tensor.add}
_INPUTS = ("placeholder", "get_attr")


@dataclasses.dataclass(frozen=True, eq=False)
class Block:
    """One decoder block of a captured graph.

    ``residual`` is the chain of residual adds, input side first: ``(mid, out)``
    for a sequential block, ``(out,)`` for a parallel-residual one.
    ``attention`` and ``mlp`` are the branch outputs entering those adds
    (``attention`` includes any post-norm); for a parallel-residual block
    ``attention`` is None and ``mlp`` is the summed branches.  ``mlp_inputs``
    are the nodes of the MLP branch that read ``mid`` (empty when parallel).
    ``cache_writes`` are the block's in-place writes (KV-cache updates), in
    graph order; only this block reads the tensors they write.

    Once its group is rewritten (:func:`~cqil_fx.passes.concurrent_groups.rewrite_groups`)
    a member's record says so: ``input`` is the group input, ``delta`` the node
    holding its contribution, and ``residual`` keeps only the mid-block add
    (the block output is gone, so ``output`` is None).
    """

    index: int
    path: str
    kind: str
    nodes: tuple[torch.fx.Node, ...]
    params: tuple[torch.fx.Node, ...]
    input: torch.fx.Node
    residual: tuple[torch.fx.Node, ...]
    attention: torch.fx.Node | None
    mlp: torch.fx.Node
    mlp_inputs: tuple[torch.fx.Node, ...]
    cache_writes: tuple[torch.fx.Node, ...] = ()
    delta: torch.fx.Node | None = None  # set when the block's group is rewritten

    @property
    def output(self) -> torch.fx.Node | None:
        """The block's last residual add; None once its group is rewritten."""
        return None if self.delta is not None else self.residual[-1]

    @property
    def mid(self) -> torch.fx.Node | None:
        """The mid-block residual ``x + a`` of a sequential block (the MLP branch reads it)."""
        return self.residual[0] if self.kind == SEQUENTIAL else None

    @property
    def delta_terms(self) -> tuple[torch.fx.Node, ...]:
        """Nodes whose sum is the block's contribution Δ(x) to the residual stream."""
        return (self.mlp,) if self.attention is None else (self.attention, self.mlp)

    @property
    def param_count(self) -> int:
        return sum(_numel(p) for p in self.params)

    def __repr__(self) -> str:
        end = f"output={self.output.name}" if self.delta is None else f"delta={self.delta.name}"
        return (
            f"Block({self.index}, {self.path!r}, {self.kind}, {len(self.nodes)} nodes, "
            f"{self.param_count} params, input={self.input.name}, {end})"
        )


def find_blocks(gm: torch.fx.GraphModule) -> list[Block]:
    """The decoder blocks of ``gm`` in layer order; ``[]`` if it has no layer list.

    Raises :class:`UnrecognisedBlockError` when layers are there but their
    residual structure is not one of the two shapes above, or when the graph
    holds only part of the stack (a fragment around a graph break: layers not
    starting at 0, or the last layer's output going straight to the graph output).
    """
    lists = _nodes_by_layer(gm.graph)
    if not lists:
        return []
    # The decoder stack: the module list holding the most parameters (the rule cqil_fx.stack
    # states once for the graph and the eager side); here, the parameters traced inside it.
    list_path = pick_decoder_stack({path: sum(_numel(n) for nodes in layers.values() for n in nodes
                                              if n.op in _INPUTS) for path, layers in lists.items()})
    layers = lists[list_path]
    indices = sorted(layers)
    if indices != list(range(len(indices))):
        raise UnrecognisedBlockError(
            f"the graph holds layers {indices} of {list_path}, not a whole stack from 0 "
            "(a graph break inside the stack?)"
        )
    dag = _dataflow(gm.graph)
    blocks = [_analyse(i, f"{list_path}.{i}", layers[i], dag) for i in indices]
    if all(u.op == "output" for u in blocks[-1].output.users):
        raise UnrecognisedBlockError(
            f"the stack ends in the graph output after layer {blocks[-1].index} "
            "(a graph break inside the stack?)"
        )
    for before, after in zip(blocks, blocks[1:]):
        if after.input is not before.output:
            raise UnrecognisedBlockError(
                f"block {after.index} reads {after.input.name}, not block {before.index}'s "
                f"output {before.output.name}: the stack is not a plain residual chain"
            )
    _check_cache_writes(blocks)
    return blocks


def _nodes_by_layer(graph: torch.fx.Graph) -> dict[str, dict[int, list[torch.fx.Node]]]:
    out: dict[str, dict[int, list[torch.fx.Node]]] = defaultdict(lambda: defaultdict(list))
    for node in graph.nodes:
        ref = layer_of(node)
        if ref is not None:
            out[ref.list_path][ref.index].append(node)
    return out


def _dataflow(graph: torch.fx.Graph) -> nx.DiGraph:
    dag = nx.DiGraph()
    dag.add_nodes_from(graph.nodes)
    dag.add_edges_from((n, user) for n in graph.nodes for user in n.users)
    return dag


def _analyse(index: int, path: str, nodes: list[torch.fx.Node], dag: nx.DiGraph) -> Block:
    params = tuple(n for n in nodes if n.op in _INPUTS)
    body = tuple(n for n in nodes if n.op not in _INPUTS)
    inside = set(body)
    # Tensor adds only: a static sliding-window cache also adds to a Python int counter
    # (``cumulative_length_int += 1``) that leaves the graph as an output.
    outputs = [n for n in body if _is_add(n) and _is_tensor(n) and any(u not in inside for u in n.users)]
    if len(outputs) != 1:
        raise UnrecognisedBlockError(
            f"block {index} ({path}): expected one residual add read outside the block, "
            f"found {[n.name for n in outputs]}"
        )
    chain, x = _residual_chain(outputs[0], inside, dag, path)
    writes = tuple(n for n in body if mutates_in_place(n))
    if len(chain) == 2:
        mid, out = chain
        mlp_inputs = tuple(u for u in mid.users if u is not out)
        stray = [u.name for u in mlp_inputs if u not in inside]
        if stray:
            raise UnrecognisedBlockError(f"block {index} ({path}): mid-block residual read outside: {stray}")
        return Block(index, path, SEQUENTIAL, body, params, x, chain,
                     _other(mid, x), _other(out, mid), mlp_inputs, writes)
    if len(chain) == 1:
        return Block(index, path, PARALLEL, body, params, x, chain, None, _other(chain[0], x), (), writes)
    raise UnrecognisedBlockError(f"block {index} ({path}): {len(chain)} residual adds; expected 1 or 2")


def _residual_chain(output: torch.fx.Node, inside: set, dag: nx.DiGraph, path: str):
    """Walk from the block output back along residual operands to the block input."""
    chain = []
    node = output
    while node in inside:
        if not _is_add(node) or not all(isinstance(a, torch.fx.Node) for a in node.args[:2]):
            raise UnrecognisedBlockError(f"{path}: residual path passes through {node.name} ({node.target})")
        lhs, rhs = node.args[:2]
        if nx.has_path(dag, lhs, rhs):
            residual = lhs
        elif nx.has_path(dag, rhs, lhs):
            residual = rhs
        else:
            raise UnrecognisedBlockError(f"{path}: neither operand of {node.name} feeds the other")
        chain.append(node)
        node = residual
    return tuple(reversed(chain)), node


def _check_cache_writes(blocks: list[Block]) -> None:
    """Each block's in-place writes touch tensors only that block reads (its own cache).

    Grouped members run in any order (or at the same time), so a write one block
    makes and another block reads would make the result depend on that order.
    """
    owner = {n: b for b in blocks for n in b.nodes}
    for block in blocks:
        for write in block.cache_writes:
            target = write.args[0]
            if not isinstance(target, torch.fx.Node):
                continue
            readers = {owner.get(n) for n in (target, *target.users) if n.op not in ("placeholder", "output")}
            others = sorted(b.index for b in readers - {block} if b is not None)
            if others:
                raise UnrecognisedBlockError(
                    f"block {block.index} writes {target.name} in place ({write.name}), and blocks "
                    f"{others} read it: only a block's own cache may be written in place"
                )


def _other(add: torch.fx.Node, operand: torch.fx.Node) -> torch.fx.Node:
    lhs, rhs = add.args[:2]
    return rhs if lhs is operand else lhs


def _is_add(node: torch.fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADD_TARGETS and len(node.args) == 2 and not node.kwargs
    return node.op == "call_method" and node.target == "add" and len(node.args) == 2 and not node.kwargs


def _is_tensor(node: torch.fx.Node) -> bool:
    value = node.meta.get("example_value", node.meta.get("val"))
    return value is None or isinstance(value, torch.Tensor)  # graphs without metadata: assume a tensor


def _numel(node: torch.fx.Node) -> int:
    value = node.meta.get("example_value", node.meta.get("val"))
    return value.numel() if isinstance(value, torch.Tensor) else 0
