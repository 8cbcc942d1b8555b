"""Concurrent execution inside one process (``mode="concurrent"``).

The rewritten graph is cut into segments (:func:`passes.segments.split_segments`);
every segment is compiled by the inner compiler, and :class:`ConcurrentProgram`
runs them: shared segments on the calling thread with all cores, the members
of a group at the same time, one per worker thread, each with one intra-op
thread, their deltas then summed in memory by the next shared segment.

Threads: the worker pool is persistent (created once per process, no thread
per call) and each worker sets ``torch.set_num_threads(1)`` when it starts,
which with PyTorch's OpenMP build limits only that thread's ATen ops.
Inductor bakes its OpenMP thread count into the C++ kernels it generates,
so member segments are compiled under ``torch._inductor.config.cpp.threads = 1``
and shared segments with the default (all cores).

On CUDA each member runs on its own stream, ordered against the caller's
stream with events.  An exception in a member reaches the caller after all
members of the step have finished; the pool stays usable.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import operator
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

from passes.segments import Segment, SplitGraph

log = logging.getLogger(__name__)

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
        for step in self.steps:
            for call in step:
                args = [env[a] for a in call.node.args]
                module = self.modules[call.node.target]
                call.single = _return_tuple(module)
                threads = {} if call.segment.shared else {"cpp.threads": 1}
                # A fresh tracing context: the segments are compiled as graphs of their own, on
                # their real inputs, and must not add symbols to the enclosing Dynamo frame's guards.
                with torch._guards.tracing(None), torch._inductor.config.patch(threads):
                    call.fn = inner(module, list(args))
                with torch.no_grad():
                    self._store(env, call, call.fn(*args))
        return self

    def __call__(self, *args):
        env = dict(zip(self.placeholders, args))
        for step in self.steps:
            if len(step) == 1 and step[0].segment.shared:
                call = step[0]
                self._store(env, call, call.fn(*[env[a] for a in call.node.args]))
            else:
                self._run_concurrently(step, env)
        return torch.fx.graph.map_arg(self.output.args[0], env.__getitem__)

    def _run_concurrently(self, step: list[_Call], env: dict) -> None:
        pool = worker_pool(self.width)
        inputs = [[env[a] for a in call.node.args] for call in step]
        device = next((x.device for xs in inputs for x in xs if isinstance(x, torch.Tensor)), None)
        grad = torch.is_grad_enabled()  # thread-local: carry the caller's mode to the workers
        if device is not None and device.type == "cuda":
            caller = torch.cuda.current_stream(device)
            futures = [pool.submit(_on_stream, call.fn, xs, caller, grad) for call, xs in zip(step, inputs)]
        else:
            futures = [pool.submit(_with_grad_mode, call.fn, xs, grad) for call, xs in zip(step, inputs)]
        concurrent.futures.wait(futures)
        for call, future in zip(step, futures):
            self._store(env, call, future.result())  # re-raises a member's exception here

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


_STREAMS = threading.local()


def _with_grad_mode(fn: Callable, args: list, grad: bool):
    with torch.set_grad_enabled(grad):
        return fn(*args)


def _on_stream(fn: Callable, args: list, caller: torch.cuda.Stream, grad: bool):
    """Run ``fn`` on this worker's own CUDA stream, after the caller's pending work, and
    make the caller's stream wait for it."""
    stream = getattr(_STREAMS, "stream", None)
    if stream is None or stream.device != caller.device:
        stream = _STREAMS.stream = torch.cuda.Stream(caller.device)
    stream.wait_stream(caller)
    with torch.cuda.stream(stream):
        out = _with_grad_mode(fn, args, grad)
    caller.wait_stream(stream)
    return out
