"""Run a group's members on the threads of the process's OpenMP team.

Why: on CPU, ATen and Inductor's C++ kernels run their parallel regions on
the OpenMP runtime's thread pool, and after each region the runtime's idle
threads spin for a while (libgomp: ``GOMP_SPINCOUNT``) before they sleep.  A
member handed to an ordinary worker thread right after a shared segment
therefore has to wait until the scheduler takes the other core from a
spinning OpenMP thread.  Running the members *as* a parallel region of that
same runtime reuses the spinning threads (measured in docs/performance.md
with ``benchmarks/handoff.py``).

How: the runtime's ``GOMP_parallel(fn, data, num_threads, flags)`` — the
entry point GCC emits for ``#pragma omp parallel``, exported under the same
name by libgomp, LLVM's libomp and Intel's libiomp5 — is called through
:mod:`ctypes` with one persistent callback.  ctypes releases the GIL for the
call and each thread of the team takes it back to enter the callback, which
claims members from a shared counter (so fewer threads than members, e.g. a
nested region, still runs every member) and records each result or
exception.  Inside the region ATen sees ``omp_in_parallel()`` and runs its
own ops on the calling thread: each member gets one intra-op thread.

Consecutive steps (consecutive groups, or the two phases of a bypassed group)
run as *stages* of one region (:meth:`OpenMPTeam.run_stages`): the threads
meet at the runtime's own barrier (``GOMP_barrier``, spinning first) between
stages instead of leaving the region and entering the next one (cheaper per
step: ``benchmarks/handoff.py``, docs/performance.md).  A thread that leaves the region
before the others would leave them waiting at a barrier for good, so each
thread's part is written so that whatever is raised on it, even an interrupt
(``KeyboardInterrupt`` arrives on the main thread, which is thread 0, when a
ctypes call returns), it still meets the others at the next barrier, where
they all see that the region failed and stop.

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


class _Region:
    """One call of :meth:`OpenMPTeam.run_stages`: what its threads share."""

    __slots__ = ("stages", "outcomes", "claims", "modes", "failed", "interrupt")

    def __init__(self, stages: Sequence[Sequence[Callable[[], Any]]]):
        self.stages = stages
        self.outcomes = [[Outcome() for _ in stage] for stage in stages]
        self.claims = [itertools.count() for _ in stages]
        self.modes = autograd_modes()
        # failed[s]: a task of stage s raised, or a thread was interrupted in it.  Written only
        # before the barrier that ends stage s, read only after it: every thread reads the same.
        self.failed = [False] * len(stages)
        self.interrupt: BaseException | None = None  # raised on a thread outside any task


class OpenMPTeam:
    """Runs callables concurrently on an OpenMP runtime's threads, one per thread.

    ``run(tasks)`` opens one parallel region of ``len(tasks)`` threads, the
    caller being thread 0, and returns an :class:`Outcome` per task once all
    have finished; ``run_stages`` runs several such batches one after the
    other in one region.  The caller's grad and inference modes (thread-local
    in torch) are carried to the other threads.
    """

    def __init__(self, path: str):
        runtime = ctypes.CDLL(path)  # already mapped: dlopen returns the loaded library
        self.path = path
        self._parallel = runtime.GOMP_parallel
        self._parallel.argtypes = [_BODY, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        self._parallel.restype = None
        self._barrier = getattr(runtime, "GOMP_barrier", None)  # None: one region per stage
        if self._barrier is not None:
            self._barrier.argtypes, self._barrier.restype = [], None
        self._body = _BODY(self._enter)  # one callback for the life of the team (ctypes must keep it alive)
        self._regions: dict[int, _Region] = {}
        self._keys = itertools.count(1)

    def run(self, tasks: Sequence[Callable[[], Any]]) -> list[Outcome]:
        return self.run_stages([tasks])[0]

    def run_stages(self, stages: Sequence[Sequence[Callable[[], Any]]]) -> list[list[Outcome]]:
        """Run each stage's tasks at the same time, stage after stage, in one parallel region.

        Returns the outcomes of the stages that ran: all of them, or those up to
        the first stage in which a task raised (no later stage starts).  An
        exception raised on a thread outside any task (an interrupt) is raised
        here, once every thread has left the region.
        """
        if self._barrier is None and len(stages) > 1:
            ran = []
            for stage in stages:
                ran.append(self.run(stage))
                if any(o.error is not None for o in ran[-1]):
                    break
            return ran
        threads = max(map(len, stages), default=0)
        if threads == 0:  # GOMP_parallel would read 0 threads as "the default number"
            return [[] for _ in stages]
        key = next(self._keys)
        region = self._regions[key] = _Region(stages)
        try:
            self._parallel(self._body, key, threads, 0)
        finally:
            del self._regions[key]
        if region.interrupt is not None:
            raise region.interrupt
        return region.outcomes[:region.failed.index(True) + 1] if any(region.failed) else region.outcomes

    def _enter(self, key: int) -> None:
        # Runs on every thread of the region, the GIL held.  Nothing may escape into ctypes, and
        # every thread must enter the same barriers as the others.  ``passed`` counts the barriers
        # this thread has entered.  CPython raises a pending interrupt where it checks for one: on
        # entering a function, on a loop's jump back, after a call returns; so never between
        # ``passed += 1`` and entering the barrier, nor between reading ``failed`` and ``leaving``.
        region = self._regions[key]
        last = len(region.stages) - 1
        passed, leaving = 0, False
        try:
            with torch.inference_mode(region.modes[1]), torch.set_grad_enabled(region.modes[0]):
                for stage in range(last + 1):
                    self._claim(region, stage)
                    if stage == last:
                        leaving = True
                        return
                    passed += 1
                    self._barrier()
                    if region.failed[stage]:
                        leaving = True
                        return
        except BaseException as error:  # noqa: BLE001 - an interrupt outside the tasks; raised by run_stages
            region.interrupt = region.interrupt or error
            if not leaving:  # in stage ``passed``: fail it, and meet the others at its barrier
                region.failed[passed] = True
                if passed < last:
                    self._barrier()

    @staticmethod
    def _claim(region: _Region, stage: int) -> None:
        tasks, outcomes, claim = region.stages[stage], region.outcomes[stage], region.claims[stage]
        while (index := next(claim)) < len(tasks):
            try:
                outcomes[index].value = tasks[index]()
            except BaseException as error:  # noqa: BLE001 - handed to the caller by Outcome.result
                outcomes[index].error = error
                region.failed[stage] = True


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

