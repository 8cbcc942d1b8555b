"""Look at what the backend sees and does: the captured graph, its blocks, the plan, the rewrite.

    from cqil_fx.tools.inspect import inspect_model
    report = inspect_model(model, input_ids, CQILConfig(start=12, end=28))
    print(report)                    # block table, plan, ideal saving, before/after summary
    report.write_dot("cqil.dot")     # the rewritten graph, one cluster per block, groups outlined

The same report is printed by ``cqil-fx inspect`` (``--dot FILE`` writes the graph).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ..config import CQILConfig, Plan
from ..eager.quality import perplexity
from ..errors import CQILUnsupportedError
from ..graph.backend import CompileReport, rewrite_graph
from ..passes import Block, find_blocks, layer_of
from ..planning.default import default_plan_for_model
from ..planning.graph_plan import plan_for_blocks


@dataclasses.dataclass(eq=False)
class Inspection:
    """A captured graph's blocks, the plan a config gives for them, and the rewritten graph."""

    graph: torch.fx.GraphModule  # rewritten
    blocks: list[Block]  # as found before the rewrite
    plan: Plan
    report: CompileReport
    nodes_per_block_before: dict[int, int]
    perplexity: tuple[float, float] | None = None  # calibration perplexity: original, under the plan
    source: str = "given"  # where the plan came from

    def __str__(self) -> str:
        plan = format_plan(self.plan) + ("" if self.source == "given" else f"\nplan source: {self.source}")
        return "\n".join([format_blocks(self.blocks), plan, self.quality_cost(),
                          self.rewrite_summary()])

    def quality_cost(self) -> str:
        """The plan's expected quality cost: perplexity on the calibration batches, if given."""
        if self.perplexity is None:
            return "quality cost: not measured (pass calibration batches; cqil-fx inspect --windows N)"
        base, planned = self.perplexity
        return f"quality cost: calibration perplexity {base:.3f} -> {planned:.3f} ({planned / base - 1:+.1%})"

    def nodes_per_block_after(self) -> dict[int, int]:
        return _nodes_per_block(self.graph)

    def rewrite_summary(self) -> str:
        """Nodes per rewritten block before/after, nodes added and removed, collectives inserted."""
        after = self.nodes_per_block_after()
        grouped = [i for g in self.plan.groups for i in g]
        lines = [f"rewrite: {self.report.nodes_before} -> {self.report.nodes_after} nodes, "
                 f"{len(self.report.rewrites)} groups, {self.report.bypass_edges} bypass edges, "
                 f"0 collectives (mode local)"]
        lines += [f"  block {i}: {self.nodes_per_block_before[i]} -> {after.get(i, 0)} nodes" for i in grouped]
        return "\n".join(lines)

    def write_dot(self, path: str) -> None:
        """The rewritten graph in Graphviz DOT: a cluster per block, group clusters around them."""
        with open(path, "w") as f:
            f.write(to_dot(self.graph, self.plan))


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
        raise CQILUnsupportedError(
            f"Dynamo cannot capture {type(model).__name__} as one graph; cqil_fx rewrites "
            "whole decoder stacks only (call the model with use_cache=False)"
        ) from e
    finally:
        torch._dynamo.reset()
    return graphs[0]


def inspect_model(model: torch.nn.Module, input_ids: torch.Tensor, config: CQILConfig | None = None,
                  calibration: Sequence[torch.Tensor] | None = None, **kwargs) -> Inspection:
    """Capture ``model(input_ids, **kwargs)``, find its blocks and plan them with ``config``.

    With ``calibration`` batches of token ids, also measure the plan's perplexity cost on them.
    """
    kwargs.setdefault("use_cache", False)
    config = config or CQILConfig()
    with torch.no_grad():
        gm = capture_graph(model, input_ids, **kwargs)
    blocks = find_blocks(gm)
    source = "given"
    if config.wants_default_plan:  # what backend="cqil" would use: cached, or searched now and cached
        found = default_plan_for_model(model, [b.kind for b in blocks], config)
        plan, source = found.plan, f"default plan, {found.source}"
    else:
        plan = plan_for_blocks(blocks, config)
    before = _nodes_per_block(gm)
    report = rewrite_graph(gm, dataclasses.replace(config, groups=None, bypass=0, start=None, end=None,
                                                   plan=plan, calibration=None))
    cost = None
    if calibration is not None:
        cost = (perplexity(model, calibration), perplexity(model, calibration, plan=plan))
    return Inspection(gm, blocks, plan, report, before, cost, source)


def format_plan(plan: Plan) -> str:
    """The plan and its ideal latency reduction: the share of block-time a perfect CQIL saves."""
    share = plan.saved_blocks / plan.num_blocks if plan.num_blocks else 0.0
    return f"{plan}\nideal: {plan.saved_blocks} of {plan.num_blocks} block-times saved ({share:.0%} of block time)"


def to_dot(gm: torch.fx.GraphModule, plan: Plan) -> str:
    """DOT text for ``gm``: placeholders (inputs, weights) left out, each block a cluster,
    each group a cluster of clusters.  ``dot -Tsvg`` renders it."""
    by_block: dict[int | None, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            continue  # one per weight: they would drown the picture
        ref = layer_of(node)
        by_block.setdefault(ref.index if ref else None, []).append(node)
    lines = ["digraph cqil {", "  rankdir=TB; node [shape=box, fontsize=9];"]
    lines += [f'  "{n.name}" [label="{n.name}\\n{_label(n)}"];' for n in by_block.get(None, [])]
    for group in plan.cover():
        if len(group) > 1:
            lines.append(f'  subgraph "cluster_group_{group[0]}" {{ label="group {list(group)}"; color=red;')
        for i in group:
            lines.append(f'  subgraph "cluster_block_{i}" {{ label="block {i}"; color=gray;')
            lines += [f'    "{n.name}" [label="{n.name}\\n{_label(n)}"];' for n in by_block.get(i, [])]
            lines.append("  }")
        if len(group) > 1:
            lines.append("  }")
    shown = {n for nodes in by_block.values() for n in nodes}
    lines += [f'  "{n.name}" -> "{u.name}";' for n in shown for u in n.users if u in shown]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _label(node: torch.fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op}: {target}".replace('"', "'")


def _nodes_per_block(gm: torch.fx.GraphModule) -> dict[int, int]:
    counts: dict[int, int] = {}
    for node in gm.graph.nodes:
        ref = layer_of(node)
        if ref is not None and node.op not in ("placeholder", "get_attr"):
            counts[ref.index] = counts.get(ref.index, 0) + 1
    return counts


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
