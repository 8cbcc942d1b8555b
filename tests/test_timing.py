"""cqil_fx.tools.timing on synthetic inputs and a fake clock: no test here depends on how busy the machine is."""

from __future__ import annotations

import dataclasses
import random
import statistics

import pytest

from cqil_fx.tools.timing import Summary, device_sync, median, quantile, ratios, rotation, time_interleaved


def test_quantiles_never_leave_the_samples():
    rng = random.Random(0)
    for n in range(1, 30):
        for _ in range(20):
            values = [rng.choice((1e-3, 1.0, 1e6)) * rng.random() for _ in range(n)]
            for q in (0.0, 0.1, 0.25, 0.5, 0.9, 0.99, 1.0):
                assert min(values) <= quantile(values, q) <= max(values)
    # the "exclusive" method of statistics.quantiles reports a p90 past the slowest of 5 calls
    five = [10.0, 11.0, 12.0, 13.0, 30.0]
    assert statistics.quantiles(five, n=10)[-1] > max(five)
    assert quantile(five, 0.9) == pytest.approx(23.2) and quantile(five, 0.1) == pytest.approx(10.4)
    assert quantile([0.1] * 7, 0.3) == 0.1  # no rounding outside equal neighbours


def test_quantiles_interpolate_between_order_statistics():
    assert quantile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5  # unsorted input
    assert quantile(range(1, 102), 0.1) == 11.0 and quantile(range(1, 102), 0.9) == 91.0
    assert quantile([0.5, 0.5, 0.6, 0.8], 0.9) == pytest.approx(0.74)  # position 2.7: 0.6 + 0.7 * 0.2
    assert quantile([3.0], 0.9) == 3.0
    rng = random.Random(1)
    for n in range(2, 25):
        values = [rng.random() for _ in range(n)]
        deciles = statistics.quantiles(values, n=10, method="inclusive")
        assert (quantile(values, 0.1), quantile(values, 0.9)) == pytest.approx((deciles[0], deciles[-1]))
        assert median(values) == pytest.approx(statistics.median(values))
    with pytest.raises(ValueError, match="at least one value"):
        quantile([], 0.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        quantile([1.0], 1.5)


def test_summary_of_values():
    assert dataclasses.astuple(Summary.of([5.0, 1.0, 3.0])) == pytest.approx((3.0, 1.4, 4.6, 3))
    assert Summary.of([2.0]) == Summary(2.0, 2.0, 2.0, 1)
    assert str(Summary.of([1.0, 2.0])) == "1.500 (p10-p90 1.100-1.900, n=2)"
    with pytest.raises(ValueError, match="at least one value"):
        Summary.of([])


def test_warm_up_in_order_then_each_repetition_rotated():
    calls = []
    timings = time_interleaved({n: (lambda n=n: calls.append(n)) for n in "abc"}, reps=4, warmup=2)
    assert calls == list("abc" "abc") + list("abc" "bca" "cab" "abc")
    assert {n: len(ms) for n, ms in timings.ms.items()} == {"a": 4, "b": 4, "c": 4}
    assert rotation(["x", "y"], 0) == ["x", "y"] and rotation(["x", "y"], 1) == ["y", "x"]
    assert rotation([], 3) == []
    with pytest.raises(ValueError, match="reps"):
        time_interleaved({"a": lambda: None}, reps=-1)


def test_milliseconds_results_and_ratios_pair_repetition_i_with_i(fake_clock):
    durations = {"base": iter([10.0, 40.0, 20.0]), "new": iter([5.0, 30.0, 10.0])}  # ms, repetition by repetition

    def call(name):
        def run():
            ms = next(durations[name])
            fake_clock.sleeper(ms)()
            return f"{name} {ms:g}"
        return run

    timings = time_interleaved({"base": call("base"), "new": call("new")}, reps=3, warmup=0, timer=fake_clock)
    assert timings.ms == {"base": pytest.approx([10.0, 40.0, 20.0]), "new": pytest.approx([5.0, 30.0, 10.0])}
    assert timings.results["new"] == ["new 5", "new 30", "new 10"]
    assert timings.ratios("new", "base") == pytest.approx((0.5, 0.75, 0.5))
    assert timings.medians() == pytest.approx({"base": 20.0, "new": 10.0})
    # pairing is what shows the lead: each call of "new" took at most 3/4 of the "base" next to it
    assert Summary.of(timings.ratios("new", "base")).p90 <= max(timings.ratios("new", "base"))
    assert timings.summary("base") == Summary.of(timings.ms["base"]) and timings.summary("base").n == 3
    with pytest.raises(ValueError, match="pair repetitions"):
        ratios([1.0, 2.0], [1.0])


def test_sync_is_inside_the_span_and_hooks_outside(fake_clock):
    events = []

    def sync():
        events.append("sync")
        fake_clock.now += 1e-3  # 1 ms of device work still queued

    timings = time_interleaved(
        {"a": fake_clock.sleeper(4)}, reps=2, warmup=1, sync=sync, timer=fake_clock,
        before={"a": lambda: (events.append("before"), fake_clock.sleeper(100)())},
        after={"a": lambda timed: (events.append(f"after {timed}"), fake_clock.sleeper(100)())})
    assert timings.ms["a"] == pytest.approx([5.0, 5.0])  # the call and the sync before stopping the clock
    assert events == ["before", "sync", "sync", "after False"] + ["before", "sync", "sync", "after True"] * 2


def test_a_failing_callable_is_dropped_with_on_error_and_raises_without():
    count = {"bad": 0}

    def bad():
        count["bad"] += 1
        if count["bad"] == 2:
            raise RuntimeError("boom")

    errors = []
    timings = time_interleaved({"good": lambda: None, "bad": bad}, reps=3, warmup=1,
                               on_error=lambda name, error: errors.append((name, str(error))))
    assert errors == [("bad", "boom")] and count["bad"] == 2
    assert len(timings.ms["good"]) == 3 and timings.ms["bad"] == []
    assert timings.medians().keys() == {"good"}
    count["bad"] = 0
    with pytest.raises(RuntimeError, match="boom"):
        time_interleaved({"bad": bad}, reps=3, warmup=0)


def test_device_sync_waits_only_for_cuda():
    import torch

    assert device_sync("cpu")() is None and device_sync(None)() is None
    assert device_sync(torch.device("cpu"))() is None
    if torch.cuda.is_available():
        device_sync("cuda:0")()
