"""Look at what the backend sees: the captured graph, its blocks and the plan.

    from cqil_fx.inspect import inspect_model
    print(inspect_model(model, input_ids, CQILConfig(start=12, end=28)))

The same report is printed by ``cqil-fx inspect``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from passes import find_blocks
from passes.find_blocks import Block

from .backend import plan_for_blocks
from .config import CQILConfig, Plan


@dataclasses.dataclass(eq=False)
class Inspection:
    """The blocks of a captured graph and the plan a config gives for them."""

    graph: torch.fx.GraphModule
    blocks: list[Block]
    plan: Plan

    def __str__(self) -> str:
        return f"{format_blocks(self.blocks)}\n{self.plan}"


def capture_graph(model: torch.nn.Module, *args, **kwargs) -> torch.fx.GraphModule:
    """The FX graph Dynamo hands a backend for ``model(*args, **kwargs)`` (one graph, no breaks)."""
    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, example_inputs: list):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        torch.compile(model, backend=record, fullgraph=True)(*args, **kwargs)
    except torch._dynamo.exc.Unsupported as e:
        raise RuntimeError(
            f"Dynamo cannot capture {type(model).__name__} as one graph; cqil_fx rewrites "
            "whole decoder stacks only (call the model with use_cache=False)"
        ) from e
    finally:
        torch._dynamo.reset()
    return graphs[0]


def inspect_model(model: torch.nn.Module, input_ids: torch.Tensor, config: CQILConfig | None = None,
                  **kwargs) -> Inspection:
    """Capture ``model(input_ids, **kwargs)``, find its blocks and plan them with ``config``."""
    kwargs.setdefault("use_cache", False)
    with torch.no_grad():
        gm = capture_graph(model, input_ids, **kwargs)
    blocks = find_blocks(gm)
    return Inspection(gm, blocks, plan_for_blocks(blocks, config or CQILConfig()))


def format_blocks(blocks: Sequence[Block]) -> str:
    """A table: index, module path, kind, node count, parameter count."""
    if not blocks:
        return "no decoder blocks"
    width = max(len(b.path) for b in blocks)
    lines = [f"{len(blocks)} decoder blocks", f"{'block':>5}  {'module':<{width}}  {'kind':<10}  {'nodes':>5}  {'params':>11}"]
    lines += [
        f"{b.index:>5}  {b.path:<{width}}  {b.kind:<10}  {len(b.nodes):>5}  {b.param_count:>11,}" for b in blocks
    ]
    return "\n".join(lines)
