"""Run a group's members at the same time on CPU threads of the process's OpenMP runtime.

A member gets ``k`` threads, decided when its segment is compiled (Inductor
bakes the count into its C++ kernels; ``cqil_fx.graph.executor.member_threads``):
one thread each runs on :class:`OpenMPTeam`, more than one on
:class:`PrimaryThreads`.

One thread per member (:class:`OpenMPTeam`).  Why: on CPU, ATen and
Inductor's C++ kernels run their parallel regions on the OpenMP runtime's
thread pool, and after each region the runtime's idle threads spin for a
while (libgomp: ``GOMP_SPINCOUNT``) before they sleep.  A member handed to an
ordinary worker thread right after a shared segment therefore has to wait
until the scheduler takes the other core from a spinning OpenMP thread.
Running the members *as* a parallel region of that same runtime reuses the
spinning threads (measured in docs/notes/performance.md with
``docs/notes/studies/handoff.py``).

How: the runtime's ``GOMP_parallel(fn, data, num_threads, flags)`` — the
entry point GCC emits for ``#pragma omp parallel``, exported under the same
name by libgomp, LLVM's libomp and Intel's libiomp5 — is called through
:mod:`ctypes` with one persistent callback.  ctypes releases the GIL for the
call and each thread of the team takes it back to enter the callback, which
claims members from a shared counter (so fewer threads than members, e.g. a
nested region, still runs every member, and threads beyond the members claim
none) and records each result or exception.  Inside the region ATen sees
``omp_in_parallel()`` and runs its own ops on the calling thread: each member
gets one intra-op thread.  The region is opened with as many threads as the
caller's regions have (``threads``), not only as many as there are members:
libgomp ends the pool threads that a smaller region leaves out and creates
them again at the next larger one, so a region of P threads between shared
segments of T > P threads would recreate T - P threads at every step.

Consecutive steps (consecutive groups, or the two phases of a bypassed group)
run as *stages* of one region (:meth:`OpenMPTeam.run_stages`): the threads
meet at the runtime's own barrier (``GOMP_barrier``, spinning first) between
stages instead of leaving the region and entering the next one (cheaper per
step: ``docs/notes/studies/handoff.py``, docs/notes/performance.md).  A thread that leaves the region
before the others would leave them waiting at a barrier for good, so each
thread's part is written so that whatever is raised on it, even an interrupt
(``KeyboardInterrupt`` arrives on the main thread, which is thread 0, when a
ctypes call returns), it still meets the others at the next barrier, where
they all see that the region failed and stop.

More than one thread per member (:class:`PrimaryThreads`): member i runs on
persistent thread i, which is an *initial* thread of the OpenMP runtime (no
enclosing parallel region) whose own thread count is ``k``.  Each such thread
is the primary thread of its own teams: the parallel regions it opens (an
Inductor kernel's ``#pragma omp parallel num_threads(k)``, ATen's
``at::parallel_for``, MKL's and oneDNN's) get ``k`` threads from a pool that
libgomp keeps for that thread, the same ``k - 1`` threads every time.  The
calling thread only hands out the members and waits, so its own pool keeps
the size the shared segments use.  Trade-offs:

* against nested regions (the members as a region of P threads of the
  caller's team, each opening inner regions of ``k`` threads, with nesting
  enabled process-wide through ``omp_set_max_active_levels``): libgomp reuses
  idle threads only for regions that are not nested, so every inner region —
  every Inductor kernel — would create and end ``k - 1`` threads (the libgomp
  torch ships, from GCC 8, also ignores max-active-levels unless
  ``omp_set_nested(1)`` is set too); and inside any active region ATen sees
  ``omp_in_parallel()`` and runs its ops serially, MKL's GEMMs included;
* against one team split into sub-teams (one region of all threads, P groups
  of ``k``): an Inductor kernel opens its own region and cannot use threads
  of an enclosing one, so its sub-team's threads would sit idle;
* what it costs: the hand-off wakes P sleeping Python threads (a futex each)
  instead of reusing the caller's spinning ones, once per step; and while
  the members start, the caller's ``T - 1`` pool threads may still be
  spinning from the shared segment before, more runnable threads than cores
  for that moment.  With more threads than cores in the process libgomp
  shortens every team's spinning (its "throttled" spin count).

Found by looking for the OpenMP runtime already mapped into the process
(Linux ``/proc/self/maps``), preferring the one shipped inside torch; where
there is none (macOS, Windows, a torch built without OpenMP), :func:`openmp_team`
returns None and the executor uses its thread pool, one thread per member.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import itertools
import logging
import os
import re
import threading
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

    ``run(tasks)`` opens one parallel region of ``len(tasks)`` threads (or
    ``threads``, if more), the caller being thread 0, and returns an
    :class:`Outcome` per task once all have finished; ``run_stages`` runs
    several such batches one after the other in one region.  The caller's
    grad and inference modes (thread-local in torch) are carried to the other
    threads.
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

    def run(self, tasks: Sequence[Callable[[], Any]], threads: int = 0) -> list[Outcome]:
        return self.run_stages([tasks], threads)[0]

    def run_stages(self, stages: Sequence[Sequence[Callable[[], Any]]], threads: int = 0) -> list[list[Outcome]]:
        """Run each stage's tasks at the same time, stage after stage, in one parallel region.

        The region has ``threads`` threads, or as many as the longest stage has
        tasks if that is more; threads without a task wait at the stage's
        barrier.  Pass the thread count of the caller's other regions, so that
        libgomp keeps the caller's pool as it is (see the module docstring).

        Returns the outcomes of the stages that ran: all of them, or those up to
        the first stage in which a task raised (no later stage starts).  An
        exception raised on a thread outside any task (an interrupt) is raised
        here, once every thread has left the region.
        """
        if self._barrier is None and len(stages) > 1:
            ran = []
            for stage in stages:
                ran.append(self.run(stage, threads))
                if any(o.error is not None for o in ran[-1]):
                    break
            return ran
        if not any(stages):  # no region: GOMP_parallel would read 0 threads as "the default number"
            return [[] for _ in stages]
        threads = max(threads, *map(len, stages))
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


class PrimaryThreads:
    """Runs callables concurrently, task i on persistent thread i, each thread's OpenMP regions ``threads`` wide.

    Every thread here is an initial thread of the OpenMP runtime with its own
    thread count (``torch.set_num_threads(threads)`` on that thread: the
    runtime's per-thread ``omp_set_num_threads`` and MKL's thread-local count),
    so the regions its tasks open get ``threads`` threads from a pool of its
    own (see the module docstring).  ``run_stages`` runs the stages one after
    the other, each stage's tasks at the same time, and returns a
    :class:`concurrent.futures.Future` per task that ran; the caller's grad and
    inference modes are carried to the threads.  Use :func:`primary_threads`:
    one object per thread count in a process.
    """

    def __init__(self, threads: int):
        if threads < 1:
            raise ValueError(f"a member needs at least one thread, got threads={threads}")
        self.threads = threads
        self._workers: list[concurrent.futures.ThreadPoolExecutor] = []
        self._lock = threading.Lock()

    def run_stages(self, stages: Sequence[Sequence[Callable[[], Any]]]) -> list[list[concurrent.futures.Future]]:
        """Like :meth:`OpenMPTeam.run_stages`: up to and including the first stage in which a task raised."""
        self._grow(max(map(len, stages), default=0))
        modes = autograd_modes()
        ran = []
        for stage in stages:
            ran.append([worker.submit(run_in_modes, task, modes) for worker, task in zip(self._workers, stage)])
            concurrent.futures.wait(ran[-1])
            if any(f.exception() is not None for f in ran[-1]):
                break
        return ran

    def _grow(self, size: int) -> None:
        """Start threads until there are ``size``; each sets its thread count when it starts."""
        with self._lock:
            if len(self._workers) >= size:
                return
            default = torch.get_num_threads()
            new = [concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"cqil-member{i}-{self.threads}t",
                                                         initializer=self._start)
                   for i in range(len(self._workers), size)]
            concurrent.futures.wait([worker.submit(int) for worker in new])  # each has run _start
            # torch.set_num_threads also sets the process-wide default that a thread copies when torch
            # first initialises it: put back the caller's, which the new threads set to ``self.threads``.
            torch.set_num_threads(default)
            self._workers += new

    def _start(self) -> None:
        torch.get_num_threads()  # torch's lazy per-thread initialisation first: later it would reset the count
        torch.set_num_threads(self.threads)


@functools.cache
def primary_threads(threads: int) -> PrimaryThreads:
    """The process's :class:`PrimaryThreads` of ``threads`` threads per region."""
    return PrimaryThreads(threads)


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

