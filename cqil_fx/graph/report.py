"""What the backend did with one graph: :class:`CompileReport`, built once the graph is placed.

    fast = torch.compile(model, backend=backend); fast(ids)
    print(backend.reports[-1])   # CompileReport(30 blocks, Plan(...) (chosen ...), mode concurrent, ...)

A graph compiled unchanged gets a report that says why (:func:`unchanged`,
which also logs that one line and counts it in ``counters["cqil"]["fallbacks"]``).
"""

from __future__ import annotations

import dataclasses
import logging

from torch._dynamo.utils import counters

from ..config import Plan
from ..passes import Block, GroupRewrite, Placement, RewrittenGraph, Sharding
from ..planning import Planned, Unchanged

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class CompileReport:
    """What the backend did with one graph (built once, when the graph is placed)."""

    nodes_before: int
    nodes_after: int
    blocks: tuple[Block, ...]  # as the graph holds them now (members: with their delta)
    plan: Plan | None
    rewrites: tuple[GroupRewrite, ...]
    bypass_edges: int
    fallback: str | None  # why the graph was compiled unchanged, or None
    placement: Placement | None = None  # mode="spmd": what this rank kept
    transport: str | None = None  # mode="spmd": what carries the collectives
    sharding: Sharding | None = None  # mode="spmd", tensor_parallel=True: what this rank split
    mode: str | None = None  # the execution mode the graph was compiled for
    source: str | None = None  # where the plan came from: "given", "searched", "cached", ...
    cost: float | None = None  # the plan's promised relative perplexity increase, when measured

    @classmethod
    def unchanged(cls, nodes: int, outcome: Unchanged) -> CompileReport:
        return cls(nodes, nodes, outcome.blocks, outcome.plan, (), 0, outcome.why)

    @classmethod
    def rewritten(cls, nodes_before: int, planned: Planned, rewritten: RewrittenGraph, mode: str,
                  transport: str | None = None) -> CompileReport:
        return cls(nodes_before, len(rewritten.gm.graph.nodes), rewritten.blocks, planned.plan, rewritten.rewrites,
                   rewritten.bypass_edges, None, rewritten.placement, transport, rewritten.sharding, mode,
                   planned.source, planned.cost)

    @property
    def collectives(self) -> int:
        """Collectives per forward of this rank's graph (groups, bypass, tensor parallelism)."""
        tp = self.sharding.all_reduces + self.sharding.all_gathers if self.sharding else 0
        return (self.placement.collectives if self.placement else 0) + tp

    def __repr__(self) -> str:
        if self.fallback:
            return f"CompileReport(unchanged: {self.fallback})"
        where = ""
        if self.placement is not None:
            p = self.placement
            split = f", splits blocks {list(self.sharding.blocks)}" if self.sharding else ""
            where = (f", rank {p.rank}/{p.world_size} keeps {list(p.kept)}{split}, {self.collectives} collectives "
                     f"over {self.transport}")
        cost = f", promised cost {self.cost:+.1%} on its calibration text" if self.cost is not None else ""
        return (
            f"CompileReport({len(self.blocks)} blocks, {self.plan} ({self.source}{cost}), mode {self.mode}, "
            f"{len(self.rewrites)} groups rewritten, {self.bypass_edges} bypass edges, "
            f"nodes {self.nodes_before} -> {self.nodes_after}{where})"
        )


def unchanged(nodes: int, outcome: Unchanged) -> CompileReport:
    """The report of a graph compiled unchanged, with its one log line."""
    counters["cqil"]["fallbacks"] += 1
    log.log(outcome.level, "cqil: compiling graph of %d nodes unchanged: %s", nodes, outcome.why)
    return CompileReport.unchanged(nodes, outcome)
