"""cqil_fx.graph.omp_team: tasks as one parallel region of the process's OpenMP runtime."""

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from cqil_fx.graph import executor
from cqil_fx.graph.omp_team import openmp_team


@pytest.fixture
def team():
    team = openmp_team()
    if team is None:
        pytest.skip("no OpenMP runtime in this process")
    return team


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


@pytest.mark.parametrize("runner", ["openmp-team", "thread-pool"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "grad"])
def test_the_callers_autograd_modes_reach_every_thread(team, mode, runner):
    """On the team and on the executor's fallback pool alike."""
    run = team.run if runner == "openmp-team" else executor._run_on_pool
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
