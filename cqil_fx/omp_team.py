"""Run a group's members on the threads of the process's OpenMP team.

Why: on CPU, ATen and Inductor's C++ kernels run their parallel regions on
the OpenMP runtime's thread pool, and after each region the runtime's idle
threads spin for a while (libgomp: ``GOMP_SPINCOUNT``, 300,000 pauses by
default) before they sleep.  A member handed to an ordinary worker thread
right after a shared segment therefore has to wait until the scheduler takes
the other core from a spinning OpenMP thread: on this 2-core VM the later of
two ~2 ms members started 1.73 ms after the hand-off (median,
``benchmarks/handoff.py``).  Running the members *as* a parallel region of
that same runtime reuses the spinning threads: 0.17 ms, and a whole step took
2.06 ms instead of 3.50 ms (docs/performance.md).

How: the runtime's ``GOMP_parallel(fn, data, num_threads, flags)`` — the
entry point GCC emits for ``#pragma omp parallel``, exported under the same
name by libgomp, LLVM's libomp and Intel's libiomp5 — is called through
:mod:`ctypes` with one persistent callback.  ctypes releases the GIL for the
call and each thread of the team takes it back to enter the callback, which
claims members from a shared counter (so fewer threads than members, e.g. a
nested region, still runs every member) and records each result or
exception.  Inside the region ATen sees ``omp_in_parallel()`` and runs its
own ops on the calling thread: each member gets one intra-op thread.

Found by looking for the OpenMP runtime already mapped into the process
(Linux ``/proc/self/maps``), preferring the one shipped inside torch; where
there is none (macOS, Windows, a torch built without OpenMP), :func:`openmp_team`
returns None and the executor uses its thread pool.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import logging
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)

_RUNTIME = re.compile(r"/lib(gomp|iomp5|omp)[-.\w]*\.so[.\d]*$")
_BODY = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class Outcome:
    """What one task produced: ``value``, or the ``error`` it raised."""

    __slots__ = ("value", "error")

    def __init__(self):
        self.value: Any = None
        self.error: BaseException | None = None

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class OpenMPTeam:
    """Runs callables concurrently on an OpenMP runtime's threads, one per thread.

    ``run(tasks)`` opens one parallel region of ``len(tasks)`` threads, the
    caller being thread 0, and returns an :class:`Outcome` per task once all
    have finished.  The caller's grad and inference modes (thread-local in
    torch) are carried to the other threads.
    """

    def __init__(self, path: str):
        runtime = ctypes.CDLL(path)  # already mapped: dlopen returns the loaded library
        self.path = path
        self._parallel = runtime.GOMP_parallel
        self._parallel.argtypes = [_BODY, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        self._parallel.restype = None
        self._body = _BODY(self._enter)  # one callback for the life of the team (ctypes must keep it alive)
        self._batches: dict[int, tuple] = {}
        self._keys = itertools.count(1)

    def run(self, tasks: Sequence[Callable[[], Any]]) -> list[Outcome]:
        outcomes = [Outcome() for _ in tasks]
        key = next(self._keys)
        self._batches[key] = (tasks, outcomes, itertools.count(), autograd_modes())
        try:
            self._parallel(self._body, key, len(tasks), 0)
        finally:
            del self._batches[key]
        return outcomes

    def _enter(self, key: int) -> None:
        # Runs on every thread of the region, the GIL held; nothing may escape into ctypes.
        tasks, outcomes, claim, modes = self._batches[key]
        while (index := next(claim)) < len(tasks):
            try:
                outcomes[index].value = run_in_modes(tasks[index], modes)
            except BaseException as error:  # noqa: BLE001 - handed to the caller by Outcome.result
                outcomes[index].error = error


def autograd_modes() -> tuple[bool, bool]:
    """The calling thread's grad and inference modes (thread-local in torch), for :func:`run_in_modes`."""
    return torch.is_grad_enabled(), torch.is_inference_mode_enabled()


def run_in_modes(task: Callable[[], Any], modes: tuple[bool, bool]) -> Any:
    """``task()`` under the modes :func:`autograd_modes` took on another thread."""
    grad, inference = modes
    with torch.inference_mode(inference), torch.set_grad_enabled(grad):
        return task()


@functools.cache
def openmp_team() -> OpenMPTeam | None:
    """The process's :class:`OpenMPTeam`, or None (logged once) where no OpenMP runtime is found."""
    why = None
    if not torch.backends.openmp.is_available():
        why = "this torch is built without OpenMP"
    else:
        path = _loaded_runtime()
        if path is None:
            why = "no OpenMP runtime found among the process's mapped libraries"
        else:
            try:
                return OpenMPTeam(path)
            except (OSError, AttributeError) as error:
                why = f"{path} has no usable GOMP_parallel ({error})"
    log.info("cqil: concurrent members run on a thread pool: %s", why)
    return None


def _loaded_runtime() -> str | None:
    try:
        with open(f"/proc/{os.getpid()}/maps") as maps:
            paths = {line.split()[-1] for line in maps if _RUNTIME.search(line.rstrip())}
    except OSError:
        return None
    torch_dir = os.path.dirname(torch.__file__)
    return min(paths, key=lambda p: (not p.startswith(torch_dir), "gomp" not in p, p), default=None)

