"""Concurrent execution inside one process (``mode="concurrent"``).

The rewritten graph is cut into segments (:func:`cqil_fx.passes.split_segments`);
every segment is compiled by the inner compiler, and :class:`ConcurrentProgram`
runs them: shared segments on the calling thread with all its threads, the
members of a group at the same time, each with its share of the threads,
their deltas then summed in memory by the next shared segment (or, for
consecutive groups, by each member of the next group).

CPU threads: with T = ``torch.get_num_threads()`` when the segments are
compiled, each member of a group of P runs on k = max(1, T // P) threads
(:func:`member_threads`; 1 where no OpenMP runtime is found).  Inductor bakes
its OpenMP thread count into the C++ kernels it generates, so member segments
are compiled under ``torch._inductor.config.cpp.threads = k`` and shared
segments with the default (T); k cannot change after compiling.  A run of
consecutive member steps (consecutive groups, the phases of a bypassed group)
is handed out in one go, in parts of steps with the same k
(:mod:`cqil_fx.graph.omp_team` has the mechanisms and their trade-offs):

* k = 1 (two cores and P = 2, say): one parallel region of the OpenMP runtime
  ATen already uses (:meth:`cqil_fx.graph.omp_team.OpenMPTeam.run_stages`),
  the calling thread being thread 0, each step a stage that ends at the
  runtime's barrier: the runtime's other threads are still spinning from the
  shared segment just before, so the later member starts sooner than a
  sleeping worker thread, which has to wait for the scheduler
  (docs/notes/performance.md has the measured hand-off, ``docs/notes/studies/handoff.py``).
  Inside the region ATen runs its ops on the calling thread, so each member
  has one intra-op thread.  The region has T threads (the members claim P of
  them), so that the runtime keeps the pool the shared segments use.
* k > 1 (P = 2 on 16 cores: 8 each): member i runs on persistent thread i of
  :func:`cqil_fx.graph.omp_team.primary_threads` (k), each an OpenMP primary
  thread of its own with k threads: the regions its kernels and ATen's ops
  open get k threads from a pool kept for that thread.  The calling thread
  hands the step's members out, waits for them, then hands out the next step.
  Nested OpenMP regions under the team were measured and rejected: libgomp
  creates new threads for every nested region.
* no OpenMP runtime: each step runs on its own, one thread per member: a
  persistent pool of worker threads (:func:`worker_pool`, created once per
  process, no thread per call) runs members 1..P-1 — each worker sets
  ``torch.set_num_threads(1)`` when it starts — and the calling thread runs
  member 0 with ``torch.set_num_threads(1)`` for its length.

The GIL: Inductor's default Python wrapper calls each generated C++ kernel
through a binding that holds the GIL, so two members compiled that way take
turns on every fused kernel and on the wrapper's Python.  On CPU every segment
is therefore compiled with ``cpp_wrapper = True`` (:func:`segment_settings`):
the whole segment is one C++ call that releases the GIL on entry, and the
shared segments lose the wrapper's per-kernel Python too.  A segment that
fails to compile or run that way is compiled again without it (one WARNING,
counter ``cpp_wrapper_fallbacks``).  docs/notes/performance.md has the measured
effect.  The wrapper is built apart from the kernels
(``cpp_wrapper_build_separate``): the kernels at -O3 as before, the wrapper's
straight-line calls at -O1, which shortens a cold compile (measured in
docs/notes/performance.md, "The default backend").

Every segment is compiled under a tracing context of its own whose fake mode
has a shape env, so Inductor's FX graph cache and AOTAutograd's cache serve
it: the members of every group of one model share a graph and compile once,
and a second process compiles nothing. Its inputs reach the inner compiler as
fake tensors of static shape, as a Dynamo graph's reach a backend: the program
only runs graphs of static shapes, which need no kernels generated over
symbolic sizes (what AOTAutograd makes of real inputs under a shape env).

On CUDA no worker threads are involved: kernel launches do not block, so the
calling thread launches each member's segment on a stream of its own (one per
member position, owned by the program) after making that stream wait for the
caller's pending work, and then makes the caller's stream wait for every
member stream.  The GPU overlaps the members; the Python launch work stays
serial, as in local mode.  Because every member stream waits for the caller's
stream before it allocates, memory freed on either side is only reused after
the work that read it: no ``record_stream`` is needed.

With ``CQILConfig(cuda_graphs=True)`` the whole program (shared segments and
member streams) is captured into one CUDA graph by :class:`CudaGraphProgram`
and replayed.

An exception in a member reaches the caller after all members of the step
have finished (CPU; the first member's if several raise, and no later step
starts) or been launched (CUDA); the team, the primary threads, the pool and
the program stay usable.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import logging
import operator
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch._dynamo.utils import counters
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ..fingerprint import plain_components
from ..passes import Segment, SplitGraph

from .omp_team import autograd_modes, openmp_team, primary_threads, run_in_modes

log = logging.getLogger(__name__)


def member_threads(width: int, device_type: str) -> int:
    """OpenMP threads of each member of a step of ``width`` members: ``torch.get_num_threads() // width``.

    Decided when the segments are compiled, from what the backend knows then:
    the calling thread's thread count T, which the shared segments use.  At
    least 1; 1 on other devices than CPU, and where no OpenMP runtime is found
    (members then run on :func:`worker_pool`, whose threads cannot each have
    a count of their own).
    """
    if device_type != "cpu" or openmp_team() is None:
        return 1
    return max(1, torch.get_num_threads() // width)


def segment_settings(shared: bool, device_type: str, threads: int = 1) -> dict[str, Any]:
    """The Inductor settings a segment is compiled under; ``threads``: a member's (see the module docstring)."""
    settings: dict[str, Any] = {} if shared else {"cpp.threads": threads}
    if device_type == "cpu":
        settings.update(cpp_wrapper=True, cpp_wrapper_build_separate=True)
    return settings


_POOL_LOCK = threading.Lock()
_POOL: list[concurrent.futures.ThreadPoolExecutor] = []
_POOL_SIZE = [0]


def worker_pool(size: int) -> concurrent.futures.ThreadPoolExecutor:
    """The process's pool of single-threaded workers, grown to at least ``size`` threads."""
    with _POOL_LOCK:
        if not _POOL or _POOL_SIZE[0] < size:
            if _POOL:
                _POOL.pop().shutdown(wait=False)
            _POOL.append(concurrent.futures.ThreadPoolExecutor(
                max_workers=size, thread_name_prefix="cqil-member", initializer=torch.set_num_threads,
                initargs=(1,)))
            _POOL_SIZE[0] = size
        return _POOL[0]


@dataclasses.dataclass
class _Call:
    node: torch.fx.Node
    segment: Segment
    fn: Callable[..., Any] | None = None
    threads: int = 1  # a member's OpenMP threads, decided by compile (member_threads)
    unpack: list[tuple[torch.fx.Node, int]] = dataclasses.field(default_factory=list)
    single: bool = False  # the segment returns one value, compiled as a 1-tuple


class ConcurrentProgram:
    """Runs a :class:`SplitGraph` step by step: a shared segment, or the members of a group phase."""

    def __init__(self, split: SplitGraph):
        graph = split.module.graph
        self.placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        self.output = next(n for n in graph.nodes if n.op == "output")
        self.steps: list[list[_Call]] = []
        step_of: dict[tuple, list[_Call]] = {}
        calls: dict[torch.fx.Node, _Call] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                segment = split.segments[node.target]
                call = calls[node] = _Call(node, segment)
                key = (node.target,) if segment.shared else (segment.group, segment.phase)
                if key not in step_of:
                    step_of[key] = []
                    self.steps.append(step_of[key])
                step_of[key].append(call)
            elif node.op == "call_function" and node.target is operator.getitem:
                calls[node.args[0]].unpack.append((node, node.args[1]))
        self.modules = {name: split.module.get_submodule(name) for name in split.segments}
        self.width = max(len(s) for s in self.steps)
        # What __call__ runs: a shared segment, or consecutive member steps (consecutive groups, or
        # the phases of one group) as one run, the stages of one parallel region on CPU.
        self.runs: list[_Call | list[list[_Call]]] = []
        for step in self.steps:
            if step[0].segment.shared:  # a shared segment is a step of its own
                self.runs.append(step[0])
            elif self.runs and isinstance(self.runs[-1], list):
                self.runs[-1].append(step)
            else:
                self.runs.append([step])
        self.device: torch.device | None = None  # of the compile-time inputs (compile)
        self.threads = 1  # the calling thread's OpenMP threads at compile time: the shared segments'
        self._cuda_streams: list[torch.cuda.Stream] = []
        self.team = openmp_team()  # None: members go to the thread pool instead
        self._check_order()

    def _check_order(self) -> None:
        ready = set(self.placeholders)
        for step in self.steps:
            for call in step:
                missing = [a.name for a in call.node.all_input_nodes if a not in ready]
                if missing:
                    raise RuntimeError(f"segment {call.node.target} needs {missing} before they are computed")
            for call in step:
                ready.add(call.node)
                ready.update(n for n, _ in call.unpack)

    def compile(self, inner: Callable, example_inputs: Sequence) -> ConcurrentProgram:
        """Compile every segment with ``inner`` on the values it sees for ``example_inputs``."""
        env = dict(zip(self.placeholders, _scratch_inputs(example_inputs)))
        # The accelerator the graph runs on, if any (a CPU scalar among CUDA inputs does not make it CPU).
        tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
        self.device = next((x.device for x in tensors if x.device.type != "cpu"), torch.device("cpu"))
        device_type = self.device.type
        self.threads = torch.get_num_threads()
        for step in self.steps:
            threads = 1 if step[0].segment.shared else member_threads(len(step), device_type)
            for call in step:
                args = [env[a] for a in call.node.args]
                call.single = _return_tuple(self.modules[call.node.target])
                call.threads = threads
                settings = segment_settings(call.segment.shared, device_type, threads)
                try:
                    value = self._compile_segment(call, inner, args, settings)
                except Exception as error:
                    if not settings.pop("cpp_wrapper", False):
                        raise
                    settings.pop("cpp_wrapper_build_separate", None)
                    value = self._compile_segment(call, inner, args, settings)
                    log.warning("cqil: segment %s failed with Inductor's cpp_wrapper (%s: %s); it runs with the "
                                "Python wrapper, which holds the GIL", call.node.target, type(error).__name__, error)
                    counters["cqil"]["cpp_wrapper_fallbacks"] += 1
                self._store(env, call, value)
        return self

    def _compile_segment(self, call: _Call, inner: Callable, args: list, settings: dict[str, Any]) -> Any:
        """Compile one segment under ``settings`` and run it once; returns its outputs."""
        # A fresh tracing context: the segments are compiled as graphs of their own, on
        # their real inputs, and must not add symbols to the enclosing Dynamo frame's guards.
        # Its fake mode has a shape env of its own: without one, Inductor's FX graph cache
        # and AOTAutograd's cache bypass the segment, and every process compiles it afresh.
        # Inputs as fake tensors of static shape (module docstring): real ones would get symbolic sizes.
        fake_mode = torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
        context = torch._guards.TracingContext(fake_mode)
        with torch._guards.tracing(context), torch._inductor.config.patch(settings):
            examples = [fake_mode.from_tensor(a, static_shapes=True) if isinstance(a, torch.Tensor) else a
                        for a in args]
            call.fn = inner(self.modules[call.node.target], examples)
        with torch.no_grad():
            return call.fn(*args)

    def __call__(self, *args):
        env = dict(zip(self.placeholders, args))
        for run in self.runs:
            if isinstance(run, _Call):
                self._run_call(env, run)
            else:
                self._run_members(run, env)
        return torch.fx.graph.map_arg(self.output.args[0], env.__getitem__)

    def _run_call(self, env: dict, call: _Call) -> None:
        self._store(env, call, call.fn(*[env[a] for a in call.node.args]))

    def _run_members(self, steps: list[list[_Call]], env: dict) -> None:
        """Run consecutive member steps, each step's members at the same time; a member's exception
        is raised here once its step has finished, and no later step starts."""
        if self.device is not None and self.device.type == "cuda":
            for step in steps:
                self._launch_on_streams(step, env)
            return
        for threads, part in itertools.groupby(steps, key=lambda step: step[0].threads):
            stages = [[functools.partial(self._run_call, env, call) for call in step] for step in part]
            for stage in self._run_stages(stages, threads):
                for outcome in stage:
                    outcome.result()  # re-raises the first member's exception

    def _run_stages(self, stages: list[list[Callable[[], Any]]], threads: int) -> list[list]:
        """The stages, members of ``threads`` threads; an Outcome or Future per member that ran."""
        if threads > 1:
            return primary_threads(threads).run_stages(stages)
        if self.team is not None:
            return self.team.run_stages(stages, self.threads)
        outcomes = []
        for stage in stages:
            outcomes.append(_run_on_pool(stage))
            if any(f.exception() is not None for f in outcomes[-1]):
                break
        return outcomes

    def _launch_on_streams(self, step: list[_Call], env: dict) -> None:
        """Launch member k on stream k after the caller's pending work; the caller's stream waits for all."""
        if not self._cuda_streams:
            self._cuda_streams = [torch.cuda.Stream(self.device) for _ in range(self.width)]
        caller = torch.cuda.current_stream(self.device)
        launched = []
        try:
            for call, stream in zip(step, self._cuda_streams):
                stream.wait_stream(caller)
                launched.append(stream)
                with torch.cuda.stream(stream):
                    self._run_call(env, call)
        finally:
            for stream in launched:
                caller.wait_stream(stream)

    @staticmethod
    def _store(env: dict, call: _Call, value: Any) -> None:
        env[call.node] = value[0] if call.single else value
        for node, index in call.unpack:
            env[node] = value[index]


def _scratch_inputs(example_inputs: Sequence) -> list:
    """Inputs for the compile-time run: sizes as ints, tensors other than weights copied.

    The compile-time run executes the graph once, and Dynamo then calls the
    program on the same inputs: the in-place cache writes of a generation step
    (``index_copy_``, the length counter's ``add_``) must not happen twice.
    """
    # Dynamo passes sizes of dynamic dimensions as SymInts: run the segments on their hints.
    return [x.node.hint if isinstance(x, torch.SymInt)
            else x.clone() if isinstance(x, torch.Tensor) and not isinstance(x, torch.nn.Parameter)
            else x for x in example_inputs]


def _return_tuple(module: torch.fx.GraphModule) -> bool:
    """Make ``module`` return a tuple (AOTAutograd requires one); True if it returned one value."""
    output = next(n for n in reversed(module.graph.nodes) if n.op == "output")
    if isinstance(output.args[0], (tuple, list)):
        return False
    output.args = ((output.args[0],),)
    module.recompile()
    return True


def _run_on_pool(tasks: list[Callable[[], Any]]) -> list[concurrent.futures.Future]:
    """Task 0 on the calling thread (one intra-op thread for its length), the others on the pool."""
    modes = autograd_modes()  # thread-local: carry the caller's modes to the workers
    futures = [worker_pool(len(tasks) - 1).submit(run_in_modes, task, modes) for task in tasks[1:]]
    first = concurrent.futures.Future()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first.set_result(tasks[0]())
    except BaseException as error:  # noqa: BLE001 - re-raised by the caller, after the workers' tasks finish
        first.set_exception(error)
    finally:
        torch.set_num_threads(threads)
    concurrent.futures.wait(futures)
    return [first, *futures]


class CudaGraphProgram:
    """A :class:`ConcurrentProgram` on CUDA, captured into one CUDA graph and replayed.

    Inputs are *static* or *dynamic*.  The graph reads and writes a static
    input where it is, so a replay needs it at the address it was captured
    with; a dynamic input gets a buffer of its own, which each replay fills
    from the caller's tensor (``copy_``) and, when the graph has in-place ops,
    copies back into it afterwards, so that in-place updates still reach the
    caller.  Static are the inputs in ``pinned`` (parameters, and what Dynamo
    marks as a static address, e.g. through ``torch._dynamo.mark_static_address``)
    and every other input that kept its address from the warm-up call to the
    capture (a KV cache passed in again, say).  Outputs are cloned out of the
    graph's memory pool, except an output that is a static input, which is
    returned as that input.

    Call 1 runs the program as it is on the capture stream (the warm-up CUDA
    graphs need); call 2 captures and replays; later calls replay.  When a
    static input has moved, the call runs uncaptured and the next one captures
    again; an input that moved and is not pinned is dynamic from then on, so
    inputs that alternate between addresses cost at most one recapture each.
    A capture that fails is logged once and the program then runs without a
    graph; so does a graph whose inputs are not all CUDA tensors on one device.
    A replay first compares the static inputs' addresses (``data_ptr``; a
    quantized weight's by its plain components).
    """

    def __init__(self, program: ConcurrentProgram, pinned: Sequence[int], mutates_inputs: bool):
        self.program = program
        self.pinned = set(pinned)
        self.mutates_inputs = mutates_inputs
        self.graph: torch.cuda.CUDAGraph | None = None
        self.stream: torch.cuda.Stream | None = None
        self.disabled: str | None = None
        self._demoted: set[int] = set()
        self._previous: list[int] | None = None

    def __call__(self, *args):
        if self.graph is not None:  # the hot path: the static inputs are where they were captured
            moved = [i for i, a in zip(self.static, self._addresses) if _address(args[i]) != a]
            if not moved:
                return self._replay(args)
            self._demoted.update(i for i in moved if i not in self.pinned)
            self.graph = None
            log.debug("cqil: static inputs %s moved; capturing the CUDA graph again", moved)
        if self.disabled is None and not _capturable(args):
            self._disable("an input is not a CUDA tensor, or the inputs are on several devices")
        if self.disabled is not None:
            return self.program(*args)
        addresses = [_address(x) for x in args]
        if self._previous is None:
            self._previous = addresses
            return self._run_on_capture_stream(args)
        try:
            self._capture(args, addresses)
        except Exception as e:  # noqa: BLE001 - any capture failure falls back to running uncaptured
            self._disable(f"capture failed: {type(e).__name__}: {e}")
            return self.program(*args)
        return self._replay(args)

    def _disable(self, why: str) -> None:
        self.disabled, self.graph = why, None
        log.warning("cqil: CUDA graphs off for this graph (%s); running the concurrent program without them", why)

    def _run_on_capture_stream(self, args):
        if self.stream is None:
            self.stream = torch.cuda.Stream(args[0].device)
        caller = torch.cuda.current_stream(args[0].device)
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            out = self.program(*args)
        caller.wait_stream(self.stream)
        return out

    def _capture(self, args, addresses: list[int]) -> None:
        self.static = [i for i, a in enumerate(addresses)
                       if i in self.pinned or (i not in self._demoted and a == self._previous[i])]
        self._addresses = [addresses[i] for i in self.static]
        self._previous = None  # a moved input makes the next call warm up again
        static = set(self.static)
        self._dynamic = [i for i in range(len(args)) if i not in static]
        self.inputs = list(args)
        for i in self._dynamic:
            self.inputs[i] = args[i].clone()
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))  # the clones above
        graph = torch.cuda.CUDAGraph()
        # cuBLAS keeps one workspace per (handle, stream) outside any graph pool; a graph captured
        # with the workspace our warm-up made would keep its raw address, and whoever clears the
        # workspaces later (Inductor's CUDA graph trees do, around every recording; torch frees a
        # stream's workspaces when a graph captured on it is destroyed, and streams come from a
        # shared pool) leaves the replay writing freed memory (pytorch/pytorch#193402; the likely
        # cause of the illegal memory access in docs/notes/gpu-sweep.md's first run). Cleared before the
        # capture, the captured matmuls allocate their workspace in this graph's private pool,
        # which lives as long as the graph; cleared after, no eager matmul inherits it. Inductor's
        # own graphs do the same.
        from torch._inductor.cudagraph_trees import clear_cublas_manager

        with clear_cublas_manager(), torch.cuda.graph(graph, stream=self.stream):
            outputs = self.program(*self.inputs)
        by_address = {_address(args[i]): args[i] for i in self.static}
        self._leaves, self._spec = torch.utils._pytree.tree_flatten(outputs)
        self._aliases = [by_address.get(_address(x)) if isinstance(x, torch.Tensor) else None for x in self._leaves]
        self.graph = graph
        counters["cqil"]["cuda_graph_captures"] += 1
        log.debug("cqil: captured a CUDA graph (%d static, %d dynamic inputs)", len(self.static), len(self._dynamic))

    def _replay(self, args):
        for i in self._dynamic:
            self.inputs[i].copy_(args[i])
        self.graph.replay()
        if self.mutates_inputs:
            for i in self._dynamic:
                args[i].copy_(self.inputs[i])
        leaves = [alias if alias is not None else x.clone() if isinstance(x, torch.Tensor) else x
                  for x, alias in zip(self._leaves, self._aliases)]
        return torch.utils._pytree.tree_unflatten(leaves, self._spec)


def _address(x: torch.Tensor) -> int | tuple[int, ...]:
    """Where ``x``'s memory is: its data pointer, or for a tensor subclass (a quantized weight, whose own
    ``data_ptr`` is 0) the data pointers of its plain components."""
    if is_traceable_wrapper_subclass(x):
        return tuple(part.data_ptr() for _, part in plain_components(x))
    return x.data_ptr()


def _capturable(args: Sequence) -> bool:
    if not all(isinstance(x, torch.Tensor) for x in args):
        return False
    devices = {x.device for x in args}
    return len(devices) == 1 and next(iter(devices)).type == "cuda"


def static_inputs(gm: torch.fx.GraphModule, example_inputs: Sequence) -> list[int]:
    """Indices of the inputs whose memory stays put: parameters, and what Dynamo marks as a static address."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [i for i, (node, x) in enumerate(zip(placeholders, example_inputs))
            if isinstance(x, torch.nn.Parameter)
            or node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type")]
