"""The cqil ``torch.compile`` backend: find blocks, plan, rewrite, place, compile, execute.

Usage::

    import torch
    from cqil_fx import cqil_backend, make_backend, CQILConfig

    fast = torch.compile(model, backend=cqil_backend)         # default plan
    fast = torch.compile(model, backend=make_backend(start=20, end=28, parallel=2, bypass=1))
    fast = torch.compile(model, backend="cqil")                # registered entry point

A backend is a callable ``(gm, example_inputs) -> callable``.  For each
graph Dynamo hands it, :class:`CQILBackend` runs the pipeline::

    plan_graph (find_blocks -> choose_plan) -> apply_plan (rewrite_groups -> add_bypass_edges)
      mode "local":      inner compiler on the whole graph
      mode "concurrent": split_segments -> ConcurrentProgram (inner compiler per segment)
      mode "spmd":       agree -> place_members -> choose_transport -> inner compiler

A graph with nothing to rewrite (no decoder stack, a fragment after a graph
break, a plan with no groups) is compiled unchanged, with one log line saying
why.  What each graph went through is counted in
``torch._dynamo.utils.counters["cqil"]`` and kept in ``backend.reports``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn
from torch._dynamo.utils import counters

from ..config import CQILConfig, Plan
from ..errors import CQILPlanError, CQILUnsupportedError, SpmdPlacementError
from ..passes import Block, GroupRewrite, Placement, RewrittenGraph, Sharding
from .rewrite import Planned, Unchanged, apply_plan, plan_graph

log = logging.getLogger(__name__)

CompilerFn = Callable[[torch.fx.GraphModule, list], Callable[..., Any]]


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


class CQILBackend:
    """A Dynamo backend for one :class:`CQILConfig`; ``reports`` holds a report per compiled graph."""

    def __init__(self, config: CQILConfig):
        self.config = config  # validated when it was built, before any compile work
        self.reports: list[CompileReport] = []

    @functools.cached_property
    def inner(self) -> CompilerFn:
        """The compiler the rewritten graph is handed to (Inductor imported on first use)."""
        return resolve_inner(self.config.inner)

    def __repr__(self) -> str:
        return f"CQILBackend({self.config!r}, {len(self.reports)} graphs compiled)"

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list, mode: str | None = None,
                 options: dict | None = None) -> Callable[..., Any]:
        """Compile one graph. ``mode`` and ``options`` are what ``torch.compile(..., mode=, options=)``
        passes a backend: ``mode="reduce-overhead"`` lets "auto" use CUDA graphs on a GPU, and every
        mode's Inductor options (``torch._inductor.list_mode_options``) and ``options`` apply to the
        inner Inductor."""
        gm = own_copy(gm)
        choice = execution_mode(self.config, example_inputs, mode)
        with _inductor_options(mode, options, keep_cudagraphs=choice.mode != "concurrent"):
            if choice.mode == "spmd":
                return self._compile_spmd(gm, example_inputs)
            report, rewritten = _rewrite(gm, self.config, example_inputs, choice.mode)
            self.reports.append(report)
            if rewritten is None:
                return self.inner(gm, example_inputs)
            log.info("cqil: mode %s: %s", choice.mode, choice.why)
            inputs = [*example_inputs, *rewritten.constants]
            if choice.mode == "concurrent":
                compiled = compile_concurrent(rewritten, self.inner, inputs, cuda_graphs=choice.cuda_graphs)
            else:
                compiled = self.inner(gm, inputs)
            return with_constants(compiled, rewritten.constants)

    def _compile_spmd(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable[..., Any]:
        """Rewrite, agree with the other ranks, keep this rank's members, compile."""
        from ..passes import place_members, shard_blocks
        from ..passes.spmd import check_placeable
        from .distributed import agree, check_inputs, choose_transport, guard_collectives, spmd_world

        world = spmd_world(self.config.collective_timeout)
        nodes = len(gm.graph.nodes)
        counters["cqil"]["graphs"] += 1
        outcome = plan_graph(gm, self.config, example_inputs)
        tensor_parallel = self.config.tensor_parallel and world.world_size > 1
        if isinstance(outcome, Unchanged) and tensor_parallel and outcome.blocks and outcome.plan is not None:
            outcome = Planned(list(outcome.blocks), outcome.plan)  # no groups: plain tensor parallelism
        # Ranks called with other shapes raise at the agreement below, naming them; other values
        # raise at the first calls (check_inputs).
        inputs = user_inputs(gm, example_inputs)
        shapes = input_shapes(inputs, example_inputs)
        if isinstance(outcome, Unchanged):
            agree(world, f"unchanged ({outcome.why}); inputs {shapes}")
            released = released_inputs(inputs, example_inputs)
            if released:
                raise CQILUnsupportedError(
                    f"rank {world.rank}: a graph compiled unchanged ({outcome.why}) would read {', '.join(released)}, "
                    "the KV cache of a layer another rank computes, which this rank holds as one element; "
                    "every graph that reads the cache must run the plan (docs/architecture.md)")
            report = _fallback(nodes, outcome)
        else:
            plan = outcome.plan
            rewritten = apply_plan(gm, outcome.blocks, plan)
            try:
                check_placeable(rewritten.rewrites, world.world_size)
            except SpmdPlacementError as e:
                raise CQILPlanError(f"rank {world.rank}: {e}") from e
            agree(world, repr(plan) + (", tensor parallel" if tensor_parallel else "") + f"; inputs {shapes}")
            rewritten = place_members(rewritten, world.rank, world.world_size, world.group_name)
            if tensor_parallel:
                rewritten = shard_blocks(rewritten, world.rank, world.world_size, world.group_name,
                                         presharded_weights(gm, example_inputs), fallback=self.config.tp_fallback)
            transport = choose_transport(gm, world, self.config.transport)
            report = CompileReport.rewritten(nodes, outcome, rewritten, "spmd", transport)
            counters["cqil"]["collectives"] += report.collectives
            log.info("cqil: %s", report)
            if rewritten.constants:
                compiled = self.inner(gm, [*example_inputs, *rewritten.constants])
                self.reports.append(report)
                compiled = with_constants(compiled, rewritten.constants)
                return guard_collectives(check_inputs(compiled, world, inputs, self.config.check_inputs), world)
        self.reports.append(report)
        compiled = self.inner(gm, example_inputs)
        return guard_collectives(check_inputs(compiled, world, inputs, self.config.check_inputs), world)


def own_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of Dynamo's graph module for the passes to rewrite.

    Dynamo reads its graph's placeholders again after the backend returns, and
    a corrected plan adds inputs; the copy keeps node names and metadata.
    """
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    copy = torch.fx.GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    return copy


def with_constants(fn: Callable[..., Any], constants: Sequence[torch.Tensor]) -> Callable[..., Any]:
    """``fn`` called with ``constants`` after the caller's arguments (the inputs the rewrite appended).

    ``fn`` is what a Dynamo backend returned, and Dynamo calls that with the inputs unpacked,
    so this does too. (Inductor's result carries ``_boxed_call = True`` all the same: AOT
    autograd's unboxed ``forward`` is ``functools.wraps`` of a boxed function, which copies its
    ``__dict__``. Taking that flag at its word passed the inputs as one list.)
    """
    if not constants:
        return fn
    constants = tuple(constants)

    @functools.wraps(fn)
    def run(*args):
        return fn(*args, *constants)

    run.__dict__.pop("_boxed_call", None)  # see above: copied by wraps, and untrue of ``run``
    return run


def user_inputs(gm: torch.fx.GraphModule, example_inputs: Sequence) -> dict[int, str]:
    """Position -> name of the graph's tensor inputs that are not parameters or buffers (token ids, masks,
    positions, caches)."""
    placeholders = gm.graph.find_nodes(op="placeholder")
    return {i: p.target for i, (p, x) in enumerate(zip(placeholders, example_inputs))
            if isinstance(x, torch.Tensor) and not isinstance(x, nn.Parameter)
            and "_parameters_" not in p.target and "_buffers_" not in p.target}


def input_shapes(named: dict[int, str], example_inputs: Sequence) -> str:
    """``name: [sizes]`` of the inputs ``named`` (:func:`user_inputs`: token ids, masks, positions)."""
    return ", ".join(f"{name}: {list(example_inputs[i].shape)}" for i, name in named.items())


def released_inputs(named: dict[int, str], example_inputs: Sequence) -> list[str]:
    """Names of the inputs ``named`` (:func:`user_inputs`) that are one element expanded to a larger shape:
    the KV-cache tensors an SPMD rank released for other ranks' members (:mod:`cqil_fx.passes.spmd`)."""
    return [name for i, name in named.items()
            if isinstance(x := example_inputs[i], torch.Tensor) and x.dim() > 0
            and all(isinstance(s, int) and s == 0 for s in x.stride())
            and not all(isinstance(n, int) and n <= 1 for n in x.shape)]


def presharded_weights(gm: torch.fx.GraphModule, example_inputs: Sequence) -> dict[str, str]:
    """Placeholder name -> "colwise"/"rowwise" for weights a per-rank loader left holding only a slice
    (:func:`cqil_fx.graph.weights.load_rank_weights` marks them)."""
    from .weights import SHARD_ATTRIBUTE

    placeholders = gm.graph.find_nodes(op="placeholder")
    return {p.name: getattr(x, SHARD_ATTRIBUTE) for p, x in zip(placeholders, example_inputs)
            if hasattr(x, SHARD_ATTRIBUTE)}


def make_backend(config: CQILConfig | Plan | None = None, **fields: Any) -> CQILBackend:
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
    return CQILBackend(config)


# The backend with the default config, registered as "cqil" (the torch_dynamo_backends entry point):
# its reports say what torch.compile(model, backend="cqil") did.
cqil_backend = CQILBackend(CQILConfig())


def rewrite_graph(gm: torch.fx.GraphModule, config: CQILConfig, example_inputs: Sequence = ()) -> CompileReport:
    """Apply the CQIL passes to ``gm`` in place for ``config`` (the local rewrite); report what was done."""
    return _rewrite(gm, config, example_inputs, "local")[0]


def _rewrite(gm: torch.fx.GraphModule, config: CQILConfig, example_inputs: Sequence,
             mode: str) -> tuple[CompileReport, RewrittenGraph | None]:
    nodes = len(gm.graph.nodes)
    counters["cqil"]["graphs"] += 1
    outcome = plan_graph(gm, config, example_inputs)
    if isinstance(outcome, Unchanged):
        return _fallback(nodes, outcome), None
    rewritten = apply_plan(gm, outcome.blocks, outcome.plan)
    report = CompileReport.rewritten(nodes, outcome, rewritten, mode)
    log.info("cqil: %s", report)
    return report, rewritten


def _fallback(nodes: int, outcome: Unchanged) -> CompileReport:
    counters["cqil"]["fallbacks"] += 1
    log.log(outcome.level, "cqil: compiling graph of %d nodes unchanged: %s", nodes, outcome.why)
    return CompileReport.unchanged(nodes, outcome)


@dataclasses.dataclass(frozen=True)
class ModeChoice:
    """The execution mode a graph is compiled for, and why."""

    mode: str
    cuda_graphs: bool = False
    why: str = "asked for"


def execution_mode(config: CQILConfig, example_inputs: Sequence = (), compile_mode: str | None = None) -> ModeChoice:
    """The mode a config runs in for a graph with these inputs (docs/performance.md, "What auto chooses").

    ``"auto"``, in order: ``spmd`` under a process group of more than one rank;
    on CUDA, ``concurrent`` with CUDA graphs when the user opted into graph
    replay (``torch.compile(..., mode="reduce-overhead")`` or
    ``cuda_graphs=True``), else ``local`` (concurrency without graphs measured
    slower than local on a GPU); on CPU with two or more threads,
    ``concurrent``; on one thread ``local``, where nothing runs side by side.
    """
    wants_graphs = config.cuda_graphs or compile_mode == "reduce-overhead"
    if config.mode != "auto":
        return ModeChoice(config.mode, config.mode == "concurrent" and wants_graphs)
    from .distributed import distributed_world_size

    if distributed_world_size() > 1:
        return ModeChoice("spmd", why="a process group of more than one rank")
    device = _device_of(example_inputs)
    if device.type == "cuda":
        if wants_graphs:
            return ModeChoice("concurrent", True, "CUDA, with CUDA graphs (reduce-overhead): members on streams")
        return ModeChoice("local", why="CUDA without CUDA graphs (launch-bound; torch.compile(..., "
                                       "mode='reduce-overhead') runs the members concurrently in one graph)")
    if device.type == "cpu" and torch.get_num_threads() >= 2:
        return ModeChoice("concurrent", why=f"CPU with {torch.get_num_threads()} threads: members side by side")
    return ModeChoice("local", why=f"{device.type} with {torch.get_num_threads()} thread(s): nothing runs side by "
                                   "side, so CQIL saves no time here")


def _device_of(example_inputs: Sequence) -> torch.device:
    """The accelerator the graph's inputs are on, else the CPU (a CPU scalar among CUDA inputs stays CUDA)."""
    return next((x.device for x in example_inputs if isinstance(x, torch.Tensor) and x.device.type != "cpu"),
                torch.device("cpu"))


def _inductor_options(compile_mode: str | None, options: dict | None, keep_cudagraphs: bool):
    """The Inductor settings ``torch.compile(mode=, options=)`` asks for, for the inner compile.

    In concurrent mode CUDA graphs are the executor's business (one graph for the
    whole program), so Inductor's own are left off there.
    """
    settings = {}
    if compile_mode and compile_mode != "default":
        settings.update(torch._inductor.list_mode_options(compile_mode))
    settings.update(options or {})
    if not keep_cudagraphs:
        settings.pop("triton.cudagraphs", None)
    return torch._inductor.config.patch(settings) if settings else contextlib.nullcontext()


def compile_concurrent(rewritten: RewrittenGraph, inner: CompilerFn, example_inputs: list,
                       cuda_graphs: bool = False) -> Callable[..., Any]:
    """Split the rewritten graph into segments, compile each, and run groups on worker threads
    (CPU) or streams (CUDA), the CUDA program captured into a CUDA graph if ``cuda_graphs``.

    ``example_inputs`` include the values of the inputs the rewrite appended (``rewritten.constants``).
    """
    from ..passes import has_inplace_ops, split_segments
    from .executor import ConcurrentProgram, CudaGraphProgram, static_inputs

    gm = rewritten.gm
    if any(isinstance(x, torch.SymInt) for x in example_inputs):
        # Segments are compiled on concrete inputs; a graph with symbolic sizes would need
        # each of them compiled dynamically.  Run it as one graph instead.
        log.info("cqil: graph has dynamic shapes; running it in local mode, not concurrent")
        counters["cqil"]["concurrent_fallbacks"] += 1
        return inner(gm, example_inputs)
    split = split_segments(rewritten)
    program = ConcurrentProgram(split).compile(inner, example_inputs)
    counters["cqil"]["segments"] += len(split.segments)
    log.info("cqil: concurrent mode: %d segments in %d steps", len(split.segments), len(program.steps))
    if not cuda_graphs:
        return program
    if not any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs):
        log.info("cqil: cuda_graphs=True but the graph's inputs are not on a CUDA device; running without them")
        return program
    constants = range(len(example_inputs) - len(rewritten.constants), len(example_inputs))  # they never move
    return CudaGraphProgram(program, [*static_inputs(gm, example_inputs), *constants], has_inplace_ops(gm))


def resolve_inner(inner: str | CompilerFn) -> CompilerFn:
    """The compiler a rewritten graph is handed to."""
    if callable(inner):
        return inner
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx  # heavy: import on first use

        return compile_fx
    return torch._dynamo.lookup_backend(inner)
