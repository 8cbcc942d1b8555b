"""cqil_fx.graph.omp_team: tasks as one parallel region of the process's OpenMP runtime."""

import ctypes
import functools
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from cqil_fx.graph import executor
from cqil_fx.graph.omp_team import PrimaryThreads, openmp_team


@pytest.fixture
def team():
    team = openmp_team()
    if team is None:
        pytest.skip("no OpenMP runtime in this process")
    return team


@pytest.fixture
def four_threads():
    """``torch.set_num_threads(4)`` for the test (a count, not cores: it works on fewer cores too)."""
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield 4
    torch.set_num_threads(before)


def openmp_region(team) -> dict:
    """What a parallel region opened here, on the calling thread, gets: what ATen's ``at::parallel_for`` opens
    (``#pragma omp parallel`` without a thread count, through the runtime's ``GOMP_parallel``)."""
    runtime = ctypes.CDLL(team.path)
    seen = []
    body = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _: seen.append(threading.get_native_id()))
    runtime.GOMP_parallel.argtypes = [type(body), ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    nested = bool(runtime.omp_in_parallel())
    runtime.GOMP_parallel(body, None, 0, 0)  # 0 threads: the calling thread's count (omp_get_max_threads)
    return dict(threads=len(seen), ids=frozenset(seen), in_parallel=nested, torch_threads=torch.get_num_threads())


def test_tasks_run_at_the_same_time_and_results_keep_their_order(team):
    barrier = threading.Barrier(3, timeout=30)  # passes only if all three tasks run at once

    def task(k):
        def run():
            barrier.wait()
            return k, threading.get_ident()
        return run

    outcomes = team.run([task(k) for k in range(3)])
    values = [o.result() for o in outcomes]
    assert [k for k, _ in values] == [0, 1, 2]
    assert len({ident for _, ident in values}) == 3
    assert threading.get_ident() in {ident for _, ident in values}  # the caller is thread 0


def test_errors_stay_with_their_task_and_the_team_stays_usable(team):
    def fail():
        raise KeyError("member 1")

    first, second = team.run([lambda: 1, fail])
    assert first.result() == 1
    with pytest.raises(KeyError, match="member 1"):
        second.result()
    assert [o.result() for o in team.run([lambda: 2, lambda: 3])] == [2, 3]


def test_a_nested_region_of_one_thread_still_runs_every_task(team):
    """Inside a parallel region, a nested one gets one thread: it claims all tasks in turn."""
    def outer():
        inner = team.run([lambda k=k: (k, threading.get_ident()) for k in range(3)])
        return [o.result() for o in inner], threading.get_ident()

    for outcome in team.run([outer, outer]):
        inner, ident = outcome.result()
        assert inner == [(0, ident), (1, ident), (2, ident)]


@pytest.mark.parametrize("runner", ["openmp-team", "primary-threads", "thread-pool"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "grad"])
def test_the_callers_autograd_modes_reach_every_thread(team, mode, runner):
    """On the team, on members of several threads, and on the executor's fallback pool alike."""
    run = {"openmp-team": team.run, "primary-threads": lambda tasks: PrimaryThreads(2).run_stages([tasks])[0],
           "thread-pool": executor._run_on_pool}[runner]
    barrier = threading.Barrier(2, timeout=30)

    def modes():
        barrier.wait()
        return torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
               "grad": torch.enable_grad}[mode]
    with context():
        expected = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        outcomes = run([modes, modes])
    assert [o.result() for o in outcomes] == [expected, expected]
    assert torch.is_grad_enabled()  # and the caller's own mode is back after the region


def test_stages_run_one_after_the_other_each_at_the_same_time(team):
    barrier = threading.Barrier(2, timeout=30)  # each stage's two tasks must run at once
    done = []

    def task(stage, k):
        def run():
            assert len(done) == 2 * stage  # every task of the stages before has finished
            barrier.wait()
            done.append((stage, k))
            return stage, k, threading.get_ident()
        return run

    outcomes = team.run_stages([[task(s, 0), task(s, 1)] for s in range(3)])
    values = [[o.result() for o in stage] for stage in outcomes]
    assert [[(s, k) for s, k, _ in stage] for stage in values] == [[(s, 0), (s, 1)] for s in range(3)]
    assert all(len({ident for *_, ident in stage}) == 2 for stage in values)


def test_no_tasks_no_region(team):
    assert team.run([]) == [] and team.run_stages([]) == [] and team.run_stages([[], []]) == [[], []]


def test_a_stage_with_an_error_is_the_last_to_run(team):
    ran = []

    def fail():
        raise KeyError("stage 1")

    outcomes = team.run_stages([[lambda: ran.append(0), lambda: 0], [lambda: 1, fail], [lambda: ran.append(2)] * 2])
    assert len(outcomes) == 2 and ran == [0]
    with pytest.raises(KeyError, match="stage 1"):
        outcomes[1][1].result()
    assert [[o.result() for o in stage] for stage in team.run_stages([[lambda: 3] * 2] * 2)] == [[3, 3], [3, 3]]


def test_an_interrupt_at_a_barrier_leaves_no_thread_waiting():
    """Ctrl-C while the caller waits at the barrier after stage 0: the region ends (it would hang if the
    caller left the other thread waiting at the next barrier), the interrupt reaches the caller (raised,
    or as the error of the task it surfaced in), and the team stays usable."""
    script = textwrap.dedent("""
        import os, signal, threading, time
        from cqil_fx.graph.omp_team import openmp_team

        signal.signal(signal.SIGINT, signal.default_int_handler)  # ignored where the tests run in the background
        team = openmp_team()
        together = threading.Barrier(2, timeout=30)
        def first():  # one on each thread: the caller's returns at once, the other's is slow
            together.wait()
            if threading.current_thread() is not threading.main_thread():
                time.sleep(0.5)
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
        try:
            outcomes = team.run_stages([[first, first], [lambda: 1] * 2, [lambda: 2] * 2])
            errors = [type(o.error).__name__ for stage in outcomes for o in stage if o.error is not None]
            print("interrupted" if errors == ["KeyboardInterrupt"] else f"not interrupted: {errors}")
        except KeyboardInterrupt:
            print("interrupted")
        print([[o.result() for o in stage] for stage in team.run_stages([[lambda: 3] * 2] * 2)])
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["interrupted", "[[3, 3], [3, 3]]"]


def test_a_region_wider_than_its_tasks_keeps_the_callers_threads(team, four_threads):
    """Members between shared segments of four threads: a region of four threads for two tasks. The threads
    without a task only wait, and the runtime keeps the caller's pool (libgomp ends the threads a smaller
    region leaves out and creates new ones for the next larger region)."""
    everyone = threading.Barrier(4, timeout=30)

    def one_each():
        everyone.wait()  # four tasks on four distinct threads
        return threading.get_native_id()

    def region_size():
        return ctypes.CDLL(team.path).omp_get_num_threads(), threading.get_native_id()

    before = {o.result() for o in team.run([one_each] * 4)}
    outcomes = team.run_stages([[region_size, region_size]] * 2, threads=4)
    after = {o.result() for o in team.run([one_each] * 4)}
    assert [[o.result()[0] for o in stage] for stage in outcomes] == [[4, 4], [4, 4]]
    assert len(before) == 4 and after == before


@pytest.mark.parametrize("failing_stage", [0, 1])
def test_primary_threads_run_stages_each_task_on_its_thread_with_regions_of_its_count(team, four_threads,
                                                                                   failing_stage):
    """Two tasks of two threads each: each task runs on its own thread, outside any parallel region, and the
    regions it opens have two threads, the same two every time; the caller's count and the process default
    that a new thread takes stay four. A stage with an error is the last to run."""
    primary = PrimaryThreads(2)
    together = threading.Barrier(2, timeout=30)

    def member():
        together.wait()
        return threading.get_native_id(), openmp_region(team), openmp_region(team)

    def fail():
        raise KeyError("member 1")

    stages = [[member, member], [member, member], [member, member]]
    ran = [[o.result() for o in stage] for stage in primary.run_stages(stages)]
    assert len(ran) == 3
    for stage in ran:
        assert len({ident for ident, *_ in stage}) == 2
        for ident, first, second in stage:
            assert first == second  # the same threads: a pool kept for this thread
            assert first["threads"] == 2 and ident in first["ids"] and not first["in_parallel"]
            assert first["torch_threads"] == 2
    assert [ident for ident, *_ in ran[0]] == [ident for ident, *_ in ran[2]]  # task i on thread i
    assert torch.get_num_threads() == 4
    new_thread = []
    thread = threading.Thread(target=lambda: new_thread.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert new_thread == [4]

    alone = functools.partial(openmp_region, team)
    stages = [[alone, alone]] * 3
    stages[failing_stage] = [alone, fail]
    outcomes = primary.run_stages(stages)
    assert len(outcomes) == failing_stage + 1
    with pytest.raises(KeyError, match="member 1"):
        outcomes[-1][1].result()
    assert outcomes[-1][0].result()["threads"] == 2  # the other task of the stage ran to its end
