"""Execution modes: one protocol, one module per mode, chosen from one table.

Every mode runs the same pipeline (the backend drives it: plan, rewrite,
then these three steps), and differs only in them:

    placed = mode.place(gm, example_inputs, outcome, rewritten)   # what the rewritten graph becomes here
    compiled = mode.compile(placed, inner)                         # how it is turned into code
    runnable = mode.run(compiled, placed)                          # what wraps each call

``local.py`` (everything in sequence, the exact semantics), ``concurrent.py``
(a group's members at the same time in one process: OpenMP threads, CUDA
streams, one CUDA graph) and ``spmd.py`` (one member per rank under
torch.distributed) each define ``MODE``, a subclass of :class:`ExecutionMode`.
Which modes exist, and which config options apply to each, is the table
:data:`cqil_fx.config.MODE_TABLE`; ``"auto"`` is a rule over that table
(:func:`execution_mode`): each mode's :meth:`ExecutionMode.suits` says
whether it is the one to use for a graph, and why.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.fx

from ...config import AUTO, MODE_TABLE, CQILConfig, mode_row
from ...passes import RewrittenGraph
from ...planning import Planned, Unchanged
from ..distributed import distributed_world_size
from ..report import CompileReport, unchanged

log = logging.getLogger(__name__)

CompilerFn = Callable[[torch.fx.GraphModule, list], Callable[..., Any]]


@dataclasses.dataclass(frozen=True)
class ModeChoice:
    """The execution mode a graph is compiled for, and why."""

    mode: str
    cuda_graphs: bool = False
    why: str = "asked for"


@dataclasses.dataclass(frozen=True)
class GraphContext:
    """What the backend knows at compile time that decides ``"auto"``."""

    device: torch.device  # where the graph's inputs are
    threads: int  # torch.get_num_threads()
    world_size: int  # ranks of the initialised process group (1: none)
    compile_mode: str | None  # torch.compile(mode=...)
    config: CQILConfig

    @property
    def wants_cuda_graphs(self) -> bool:
        return self.config.cuda_graphs or self.compile_mode == "reduce-overhead"


@dataclasses.dataclass(frozen=True)
class Placed:
    """A graph ready for the inner compiler: the module, the inputs to compile it with (the example
    inputs, then the values of the inputs the rewrite appended), the report, and the rewrite."""

    gm: torch.fx.GraphModule
    inputs: list
    report: CompileReport
    rewritten: RewrittenGraph | None = None

    @property
    def constants(self) -> tuple:
        """What every call appends to Dynamo's arguments (the corrections' tensors, say)."""
        return tuple(self.rewritten.constants) if self.rewritten is not None else ()


class ExecutionMode:
    """One execution mode. The defaults are the local mode's: the rewritten graph as it is, compiled
    whole by the inner compiler, run as compiled."""

    name: ClassVar[str]
    keeps_inductor_cudagraphs: ClassVar[bool] = True  # False: the mode runs CUDA graphs itself

    def __init__(self, config: CQILConfig, choice: ModeChoice):
        self.config, self.choice = config, choice

    @classmethod
    def asked(cls, context: GraphContext) -> ModeChoice:
        """The choice when the user names this mode."""
        return ModeChoice(cls.name)

    @classmethod
    def suits(cls, context: GraphContext) -> ModeChoice | None:
        """Under ``mode="auto"``: this mode for the graph, and why; None to leave it to another row."""
        return None

    def adjust(self, outcome: Planned | Unchanged) -> Planned | Unchanged:
        """The planning outcome as this mode takes it (before the rewrite)."""
        return outcome

    def place(self, gm: torch.fx.GraphModule, example_inputs: Sequence, outcome: Planned | Unchanged,
              rewritten: RewrittenGraph | None, nodes: int) -> Placed:
        """What the rewritten graph becomes in this mode (``rewritten`` None: the graph stays unchanged)."""
        if rewritten is None:
            return Placed(gm, list(example_inputs), unchanged(nodes, outcome))
        report = CompileReport.rewritten(nodes, outcome, rewritten, self.name)
        log.info("cqil: %s", report)
        return Placed(gm, [*example_inputs, *rewritten.constants], report, rewritten)

    def compile(self, placed: Placed, inner: CompilerFn) -> Callable[..., Any]:
        return inner(placed.gm, placed.inputs)

    def run(self, compiled: Callable[..., Any], placed: Placed) -> Callable[..., Any]:
        return with_constants(compiled, placed.constants)


@functools.cache
def mode_class(name: str) -> type[ExecutionMode]:
    """The class of the mode named ``name`` (its row's module, imported on first use)."""
    return importlib.import_module(mode_row(name).module).MODE


def execution_mode(config: CQILConfig, example_inputs: Sequence = (), compile_mode: str | None = None) -> ModeChoice:
    """The mode a config runs in for a graph with these inputs (docs/user-guide.md, "Execution modes").

    ``"auto"`` tries the rows of :data:`~cqil_fx.config.MODE_TABLE` from the last (most specialised) to the
    first and takes the first whose mode :meth:`~ExecutionMode.suits` the graph: spmd under a process group
    of more than one rank; concurrent on CPU with two or more threads, or on CUDA with CUDA graphs
    (``torch.compile(..., mode="reduce-overhead")``); else local.
    """
    context = GraphContext(device_of(example_inputs), torch.get_num_threads(), distributed_world_size(),
                           compile_mode, config)
    if config.mode != AUTO:
        return mode_class(config.mode).asked(context)
    for row in reversed(MODE_TABLE):
        choice = mode_class(row.name).suits(context)
        if choice is not None:
            return choice
    raise AssertionError("the first row of MODE_TABLE must suit every graph")


def device_of(example_inputs: Sequence) -> torch.device:
    """The accelerator the graph's inputs are on, else the CPU (a CPU scalar among CUDA inputs stays CUDA)."""
    return next((x.device for x in example_inputs if isinstance(x, torch.Tensor) and x.device.type != "cpu"),
                torch.device("cpu"))


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
