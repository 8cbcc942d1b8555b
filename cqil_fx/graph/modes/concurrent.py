"""``mode="concurrent"``: a group's members at the same time, in one process.

The rewritten graph is split at group boundaries (:func:`cqil_fx.passes.split_segments`),
each segment compiled by the inner compiler, and a small executor
(:class:`~cqil_fx.graph.executor.ConcurrentProgram`) runs the members of a
group side by side: as one parallel region of the process's OpenMP runtime on
CPU, on CUDA streams on a GPU, the whole program captured into one CUDA graph
with ``cuda_graphs`` (:class:`~cqil_fx.graph.executor.CudaGraphProgram`). It
computes what local computes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch._dynamo.utils import counters

from ...passes import RewrittenGraph, has_inplace_ops, split_segments
from ..executor import ConcurrentProgram, CudaGraphProgram, static_inputs
from . import CompilerFn, ExecutionMode, GraphContext, ModeChoice, Placed

log = logging.getLogger(__name__)


class ConcurrentMode(ExecutionMode):
    name = "concurrent"
    keeps_inductor_cudagraphs = False  # the executor captures the whole program in one CUDA graph itself

    @classmethod
    def asked(cls, context: GraphContext) -> ModeChoice:
        return ModeChoice(cls.name, context.wants_cuda_graphs)

    @classmethod
    def suits(cls, context: GraphContext) -> ModeChoice | None:
        if context.device.type == "cuda":
            if context.wants_cuda_graphs:
                return ModeChoice(cls.name, True, "CUDA, with CUDA graphs (reduce-overhead): members on streams")
            return None  # concurrency without graphs measured slower than local on a GPU
        if context.device.type == "cpu" and context.threads >= 2:
            return ModeChoice(cls.name, why=f"CPU with {context.threads} threads: members side by side")
        return None

    def compile(self, placed: Placed, inner: CompilerFn) -> Callable[..., Any]:
        if placed.rewritten is None:
            return inner(placed.gm, placed.inputs)
        return compile_concurrent(placed.rewritten, inner, placed.inputs, self.choice.cuda_graphs)


def compile_concurrent(rewritten: RewrittenGraph, inner: CompilerFn, example_inputs: list,
                       cuda_graphs: bool = False) -> Callable[..., Any]:
    """Split the rewritten graph into segments, compile each, and run groups on worker threads
    (CPU) or streams (CUDA), the CUDA program captured into a CUDA graph if ``cuda_graphs``.

    ``example_inputs`` include the values of the inputs the rewrite appended (``rewritten.constants``).
    """
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


MODE = ConcurrentMode
