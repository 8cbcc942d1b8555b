"""Latency regression assertions for your own test suite.

    from cqil_fx.tools.testing import assert_latency_reduction

    def test_cqil_is_faster(model, ids):
        original = torch.compile(model)
        fast = torch.compile(model, backend=make_backend(start=12, end=28, mode="concurrent"))
        assert_latency_reduction(original, fast, ids, use_cache=False, min_reduction=0.15)

Both callables are timed interleaved (baseline, candidate, candidate,
baseline, ... so slow drifts of the machine hit both alike) after warm-up
calls, and the medians compared: ``reduction = 1 - median(candidate) /
median(baseline)``.  On a noisy machine one comparison can fall short by
chance, so by default a failing comparison is measured once more and the
assertion fails only if both fall short.  Pick ``min_reduction`` well below
what a quiet run measures (docs/notes/performance.md has our numbers).  The timing and
its statistics are :mod:`cqil_fx.tools.timing`'s (``timer=`` takes a fake clock
for tests of this code).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch

from ..errors import CQILConfigError, LatencyRegressionError
from .timing import device_sync, median, quantile, ratios, time_interleaved


@dataclasses.dataclass(frozen=True)
class LatencyComparison:
    """Per-call milliseconds of a baseline and a candidate, measured interleaved."""

    baseline_ms: tuple[float, ...]
    candidate_ms: tuple[float, ...]

    @property
    def baseline_median(self) -> float:
        return median(self.baseline_ms)

    @property
    def candidate_median(self) -> float:
        return median(self.candidate_ms)

    @property
    def reduction(self) -> float:
        """``1 - candidate / baseline`` of the medians: 0.25 means 25 % less time."""
        return 1 - self.candidate_median / self.baseline_median

    @property
    def ratios(self) -> tuple[float, ...]:
        """``candidate / baseline`` of each repetition (the two calls timed next to each other)."""
        return ratios(self.candidate_ms, self.baseline_ms)

    def __str__(self) -> str:
        low, high = p10_p90(self.ratios)
        return (f"baseline {self.baseline_median:.2f} ms, candidate {self.candidate_median:.2f} ms "
                f"(median of {len(self.baseline_ms)}), reduction {self.reduction:+.1%} "
                f"(per-call ratio p10-p90 {low:.3f}-{high:.3f})")


def p10_p90(values) -> tuple[float, float]:
    """The 10th and 90th percentiles of ``values`` (:func:`cqil_fx.tools.timing.quantile`: interpolated
    between the samples, never beyond them); one value: itself."""
    values = list(values)
    if not values:
        raise CQILConfigError("p10_p90 needs at least one value")
    return quantile(values, 0.1), quantile(values, 0.9)


def compare_latency(baseline: Callable[..., Any], candidate: Callable[..., Any], *args: Any, reps: int = 15,
                    warmup: int = 2, sync: Callable[[], None] | None = None,
                    timer: Callable[[], float] = time.perf_counter, **kwargs: Any) -> LatencyComparison:
    """Time ``baseline(*args, **kwargs)`` and ``candidate(...)`` interleaved; see the module docstring.

    ``sync`` defaults to ``torch.cuda.synchronize`` where CUDA is available; ``timer`` (seconds) to
    ``time.perf_counter``.
    """
    if reps < 1 or warmup < 0:
        raise CQILConfigError(f"reps must be >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    sync = sync or device_sync("cuda" if torch.cuda.is_available() else "cpu")
    calls = {"baseline": lambda: baseline(*args, **kwargs), "candidate": lambda: candidate(*args, **kwargs)}
    with torch.no_grad():
        timings = time_interleaved(calls, reps, warmup, sync=sync, timer=timer)
    return LatencyComparison(tuple(timings.ms["baseline"]), tuple(timings.ms["candidate"]))


def assert_latency_reduction(baseline: Callable[..., Any], candidate: Callable[..., Any], *args: Any,
                             min_reduction: float, reps: int = 15, warmup: int = 2, attempts: int = 2,
                             sync: Callable[[], None] | None = None, timer: Callable[[], float] = time.perf_counter,
                             **kwargs: Any) -> LatencyComparison:
    """Fail unless ``candidate`` takes at least ``min_reduction`` less time than ``baseline``.

    Measures up to ``attempts`` times and passes on the first comparison that
    meets the bar; the AssertionError lists every attempt.  Returns the passing
    :class:`LatencyComparison`.  ``sync`` and ``timer`` are :func:`compare_latency`'s.
    """
    if attempts < 1:
        raise CQILConfigError(f"attempts must be >= 1, got {attempts}")
    seen = []
    for _ in range(attempts):
        comparison = compare_latency(baseline, candidate, *args, reps=reps, warmup=warmup, sync=sync, timer=timer,
                                     **kwargs)
        if comparison.reduction >= min_reduction:
            return comparison
        seen.append(comparison)
        warmup = 0  # already warm
    raise LatencyRegressionError(
        f"latency reduction below {min_reduction:.1%} in {attempts} attempt(s): " + "; ".join(map(str, seen)))
