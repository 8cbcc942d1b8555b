"""The cqil ``torch.compile`` backend: one pipeline for every execution mode.

Usage::

    import torch
    from cqil_fx import cqil_backend, make_backend, CQILConfig

    fast = torch.compile(model, backend=cqil_backend)         # default plan
    fast = torch.compile(model, backend=make_backend(start=20, end=28, parallel=2, bypass=1))
    fast = torch.compile(model, backend="cqil")                # registered entry point

A backend is a callable ``(gm, example_inputs) -> callable``.  For each
graph Dynamo hands it, :class:`CQILBackend` runs the same steps whatever the
mode::

    plan     plan_graph (cqil_fx.planning): find_blocks, then the plan        -> Planned | Unchanged
    rewrite  apply_plan (cqil_fx.passes): rewrite_groups, add_bypass_edges    -> RewrittenGraph
    place    mode.place: local / concurrent as is; spmd agree, place_members, shard_blocks, transport
    compile  mode.compile: the inner compiler on the graph, or on its segments (concurrent)
    guard    mode.run: appended constants; spmd input checks and collective guard

The mode is chosen by :func:`~cqil_fx.graph.modes.execution_mode` from the
table :data:`cqil_fx.config.MODE_TABLE`; each mode is one module under
``cqil_fx/graph/modes/``. A graph with nothing to rewrite (no decoder stack,
a fragment after a graph break, a plan with no groups) is compiled
unchanged, with one log line saying why.  What each graph went through is
counted in ``torch._dynamo.utils.counters["cqil"]`` and kept in
``backend.reports``.
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
from torch._dynamo.utils import counters

from ..config import CQILConfig, Plan
from ..passes import RewrittenGraph, apply_plan, own_copy
from ..planning import Planned, Unchanged, plan_graph
from .modes import CompilerFn, ExecutionMode, ModeChoice, execution_mode, mode_class
from .report import CompileReport

log = logging.getLogger(__name__)


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
        execution = mode_class(choice.mode)(self.config, choice)
        with _inductor_options(mode, options, keep_cudagraphs=execution.keeps_inductor_cudagraphs):
            outcome, rewritten, nodes = _plan_and_rewrite(gm, self.config, example_inputs, execution)
            placed = execution.place(gm, example_inputs, outcome, rewritten, nodes)
            self.reports.append(placed.report)
            if rewritten is not None:
                log.info("cqil: mode %s: %s", choice.mode, choice.why)
            return execution.run(execution.compile(placed, self.inner), placed)


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
    local = mode_class("local")(config, ModeChoice("local"))
    return local.place(gm, example_inputs, *_plan_and_rewrite(gm, config, example_inputs, local)).report


def _plan_and_rewrite(gm: torch.fx.GraphModule, config: CQILConfig, example_inputs: Sequence,
                      execution: ExecutionMode) -> tuple[Planned | Unchanged, RewrittenGraph | None, int]:
    """The pipeline's first two steps: the plan (as ``execution`` takes it), then the rewrite in place.
    Returns the outcome, the rewritten graph (None: unchanged) and the graph's size before."""
    nodes = len(gm.graph.nodes)
    counters["cqil"]["graphs"] += 1
    outcome = execution.adjust(plan_graph(gm, config, example_inputs))
    rewritten = apply_plan(gm, outcome.blocks, outcome.plan) if isinstance(outcome, Planned) else None
    return outcome, rewritten, nodes


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


def resolve_inner(inner: str | CompilerFn) -> CompilerFn:
    """The compiler a rewritten graph is handed to."""
    if callable(inner):
        return inner
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx  # heavy: import on first use

        return compile_fx
    return torch._dynamo.lookup_backend(inner)
