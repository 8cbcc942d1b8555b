"""cqil_fx.omp_team: tasks as one parallel region of the process's OpenMP runtime."""

import threading

import pytest
import torch

from cqil_fx import executor
from cqil_fx.omp_team import openmp_team


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
