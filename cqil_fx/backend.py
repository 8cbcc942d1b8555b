"""The cqil ``torch.compile`` backend: find blocks, plan, rewrite, hand to Inductor.

Usage::

    import torch
    from cqil_fx import cqil_backend, make_backend, CQILConfig

    fast = torch.compile(model, backend=cqil_backend)         # default plan
    fast = torch.compile(model, backend=make_backend(start=20, end=28, parallel=2, bypass=1))
    fast = torch.compile(model, backend="cqil")                # registered entry point

A backend is a plain function ``(gm, example_inputs) -> callable``.  For each
graph Dynamo hands it:

    find_blocks -> config.plan_for -> rewrite_groups -> add_bypass_edges -> inner compiler
                                       mode="concurrent": -> split_segments -> ConcurrentProgram
                                       mode="spmd":       -> agree -> place_members -> transport

A graph with nothing to rewrite (no decoder stack, a fragment after a graph
break, a plan with no groups) is compiled unchanged, with one log line saying
why.  What each graph went through is counted in
``torch._dynamo.utils.counters["cqil"]`` and kept in ``backend.reports``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch._dynamo.utils import counters

from passes import GroupRewrite, Placement, SpmdPlacementError, UnrecognisedBlockError, find_blocks
from passes.find_blocks import Block

from .config import CQILConfig, Plan
from .errors import CQILPlanError
from .rewrite import apply_plan

log = logging.getLogger(__name__)

CompilerFn = Callable[[torch.fx.GraphModule, list], Callable[..., Any]]


@dataclasses.dataclass(eq=False)
class CompileReport:
    """What the backend did with one graph."""

    nodes_before: int
    nodes_after: int
    blocks: list[Block]
    plan: Plan | None
    rewrites: list[GroupRewrite]
    bypass_edges: int
    fallback: str | None  # why the graph was compiled unchanged, or None
    placement: Placement | None = None  # mode="spmd": what this rank kept
    transport: str | None = None  # mode="spmd": what carries the collectives

    def __repr__(self) -> str:
        if self.fallback:
            return f"CompileReport(unchanged: {self.fallback})"
        where = ""
        if self.placement is not None:
            p = self.placement
            where = (f", rank {p.rank}/{p.world_size} keeps {list(p.kept)}, {p.collectives} collectives "
                     f"over {self.transport}")
        return (
            f"CompileReport({len(self.blocks)} blocks, {self.plan}, {len(self.rewrites)} groups "
            f"rewritten, {self.bypass_edges} bypass edges, nodes {self.nodes_before} -> {self.nodes_after}{where})"
        )


def make_backend(config: CQILConfig | Plan | None = None, **fields: Any) -> CompilerFn:
    """A cqil backend for ``config`` (or ``CQILConfig(**fields)``; fields override ``config``).

    ``config`` may also be a :class:`Plan` (from the planner or ``Plan.load``).
    The config and the inner compiler are checked here, before any compile work.
    """
    if isinstance(config, Plan):
        config = CQILConfig(plan=config, **fields)
    elif config is None:
        config = CQILConfig(**fields)
    elif fields:
        config = dataclasses.replace(config, **fields)
    inner = resolve_inner(config.inner)
    reports: list[CompileReport] = []

    def cqil(gm: torch.fx.GraphModule, example_inputs: list) -> Callable[..., Any]:
        mode = execution_mode(config)
        if mode == "spmd":
            return compile_spmd(gm, config, inner, example_inputs, reports)
        report = rewrite_graph(gm, config, example_inputs)
        reports.append(report)
        if report.fallback is None and mode == "concurrent":
            return compile_concurrent(gm, report, inner, example_inputs, cuda_graphs=config.cuda_graphs)
        return inner(gm, example_inputs)

    cqil.config = config  # type: ignore[attr-defined]
    cqil.reports = reports  # type: ignore[attr-defined]
    return cqil


def cqil_backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable[..., Any]:
    """The cqil backend with the default :class:`CQILConfig` (registered as ``"cqil"``)."""
    return _default_backend()(gm, example_inputs)


def rewrite_graph(gm: torch.fx.GraphModule, config: CQILConfig, example_inputs: Sequence = ()) -> CompileReport:
    """Apply the CQIL passes to ``gm`` in place for ``config``; report what was done.

    ``example_inputs`` (real tensors, as Dynamo passes them) are needed only
    for automatic planning, which runs copies of the graph on calibration data.
    """
    nodes_before = len(gm.graph.nodes)
    counters["cqil"]["graphs"] += 1

    def unchanged(why: str, blocks: list[Block] = (), plan: Plan | None = None, level=logging.INFO):
        counters["cqil"]["fallbacks"] += 1
        log.log(level, "cqil: compiling graph of %d nodes unchanged: %s", nodes_before, why)
        return CompileReport(nodes_before, nodes_before, list(blocks), plan, [], 0, why)

    try:
        blocks = find_blocks(gm)
    except UnrecognisedBlockError as e:
        return unchanged(f"decoder blocks not understood ({e})", level=logging.WARNING)
    if not blocks:
        return unchanged("no decoder blocks found")
    counters["cqil"]["blocks_found"] += len(blocks)
    plan = choose_plan(gm, example_inputs, blocks, config)
    if not plan.groups:
        return unchanged(f"{plan} has no groups of two or more blocks", blocks, plan)

    rewrites, edges = apply_plan(gm, blocks, plan)
    counters["cqil"]["groups_rewritten"] += len(rewrites)
    counters["cqil"]["bypass_edges"] += edges
    report = CompileReport(nodes_before, len(gm.graph.nodes), blocks, plan, rewrites, edges, None)
    log.info("cqil: %s", report)
    return report


def execution_mode(config: CQILConfig) -> str:
    """The mode a config runs in now.

    "auto" is "spmd" under an initialised process group of more than one rank,
    otherwise "local" (concurrent mode loses to plain two-thread execution on
    the machines measured so far: docs/performance.md).
    """
    if config.mode != "auto":
        return config.mode
    from .distributed import distributed_world_size

    return "spmd" if distributed_world_size() > 1 else "local"


def compile_spmd(gm: torch.fx.GraphModule, config: CQILConfig, inner: CompilerFn, example_inputs: list,
                 reports: list[CompileReport]) -> Callable[..., Any]:
    """Rewrite, agree with the other ranks, keep this rank's members, compile (mode="spmd")."""
    from passes.spmd import check_placeable, place_members

    from .distributed import agree, choose_transport, guard_collectives, spmd_world

    world = spmd_world(config.collective_timeout)
    report = rewrite_graph(gm, config, example_inputs)
    reports.append(report)
    try:
        check_placeable(report.rewrites, world.world_size)
    except SpmdPlacementError as e:
        raise CQILPlanError(f"rank {world.rank}: {e}") from e
    agree(world, f"unchanged ({report.fallback})" if report.fallback else f"{report.plan!r}")
    if report.fallback is None:
        report.placement = place_members(gm, report.blocks, report.rewrites, report.plan.bypass,
                                         world.rank, world.world_size, world.group_name)
        report.transport = choose_transport(gm, world, config.transport)
        report.nodes_after = len(gm.graph.nodes)
        counters["cqil"]["collectives"] += report.placement.collectives
        log.info("cqil: %s", report)
    return guard_collectives(inner(gm, example_inputs), world)


def compile_concurrent(gm: torch.fx.GraphModule, report: CompileReport, inner: CompilerFn,
                       example_inputs: list, cuda_graphs: bool = False) -> Callable[..., Any]:
    """Split the rewritten graph into segments, compile each, and run groups on worker threads
    (CPU) or streams (CUDA), the CUDA program captured into a CUDA graph if ``cuda_graphs``."""
    from passes.segments import split_segments

    from .executor import ConcurrentProgram, CudaGraphProgram, has_inplace_ops, static_inputs

    if any(isinstance(x, torch.SymInt) for x in example_inputs):
        # Segments are compiled on concrete inputs; a graph with symbolic sizes would need
        # each of them compiled dynamically.  Run it as one graph instead.
        log.info("cqil: graph has dynamic shapes; running it in local mode, not concurrent")
        counters["cqil"]["concurrent_fallbacks"] += 1
        return inner(gm, example_inputs)
    split = split_segments(gm, report.blocks, report.rewrites, phased=report.plan.bypass > 0)
    program = ConcurrentProgram(split).compile(inner, example_inputs)
    counters["cqil"]["segments"] += len(split.segments)
    log.info("cqil: concurrent mode: %d segments in %d steps", len(split.segments), len(program.steps))
    if not cuda_graphs:
        return program
    if not any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs):
        log.info("cqil: cuda_graphs=True but the graph's inputs are not on a CUDA device; running without them")
        return program
    return CudaGraphProgram(program, static_inputs(gm, example_inputs), has_inplace_ops(gm))


def resolve_inner(inner: str | CompilerFn) -> CompilerFn:
    """The compiler a rewritten graph is handed to."""
    if callable(inner):
        return inner
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx  # heavy: import on first use

        return compile_fx
    return torch._dynamo.lookup_backend(inner)


_DEFAULT: list[CompilerFn] = []


def _default_backend() -> CompilerFn:
    if not _DEFAULT:
        _DEFAULT.append(make_backend())
    return _DEFAULT[0]


def choose_plan(gm: torch.fx.GraphModule, example_inputs: Sequence, blocks: Sequence[Block],
                config: CQILConfig) -> Plan:
    """The config's plan; searched on calibration data when it asks for an automatic one."""
    if config.wants_auto_plan:
        from .calibration import UncalibratableGraphError
        from .planner import search_graph_plan

        try:
            search = search_graph_plan(gm, example_inputs, blocks, config)
        except UncalibratableGraphError as e:
            log.warning("cqil: cannot calibrate this graph (%s); using the default uniform plan", e)
            return plan_for_blocks(blocks, dataclasses.replace(config, plan=None, calibration=None))
        log.info("cqil: automatic plan %s", search)
        return search.plan
    if config.plan is None and config.groups is None and config.start is None:
        log.info("cqil: no calibration data, so the default uniform plan over the middle of the stack "
                 "(give calibration= for an automatic, quality-budgeted plan)")
    return plan_for_blocks(blocks, config)


def plan_for_blocks(blocks: Sequence[Block], config: CQILConfig) -> Plan:
    """The plan ``config`` gives for these blocks, checked against their kinds."""
    plan = config.plan_for(len(blocks))
    plan.check_block_kinds({b.index: b.kind for b in blocks})
    return plan
