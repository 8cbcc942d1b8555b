"""Which nodes write a tensor in place: the one rule every pass and the executor use.

``index_copy_`` of a KV cache, ``add_`` of its length counter, ``t[i] = v``
(``operator.setitem``) and any ATen overload whose schema marks an argument
as written all count. Callers need it to keep cache writes with their block
(:func:`~cqil_fx.passes.find_blocks.find_blocks`), to keep length counters on
every SPMD rank, and to copy inputs back after a CUDA-graph replay.
"""

from __future__ import annotations

import operator

import torch.fx


def mutates_in_place(node: torch.fx.Node) -> bool:
    """Whether ``node`` writes one of its arguments in place."""
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function":
        if node.target is operator.setitem:
            return True
        schema = getattr(node.target, "_schema", None)  # an ATen OpOverload
        if schema is not None:
            return schema.is_mutable
        name = getattr(node.target, "__name__", "")
    else:
        return False
    return isinstance(name, str) and name.endswith("_") and not name.startswith("_")


def has_inplace_ops(gm: torch.fx.GraphModule) -> bool:
    """Whether any node of ``gm`` writes in place (see :func:`mutates_in_place`)."""
    return any(mutates_in_place(n) for n in gm.graph.nodes)
