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
what a quiet run measures (docs/performance.md has our numbers).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class LatencyComparison:
    """Per-call milliseconds of a baseline and a candidate, measured interleaved."""

    baseline_ms: tuple[float, ...]
    candidate_ms: tuple[float, ...]

    @property
    def baseline_median(self) -> float:
        return statistics.median(self.baseline_ms)

    @property
    def candidate_median(self) -> float:
        return statistics.median(self.candidate_ms)

    @property
    def reduction(self) -> float:
        """``1 - candidate / baseline`` of the medians: 0.25 means 25 % less time."""
        return 1 - self.candidate_median / self.baseline_median

    @property
    def ratios(self) -> tuple[float, ...]:
        """``candidate / baseline`` of each repetition (the two calls timed next to each other)."""
        return tuple(c / b for c, b in zip(self.candidate_ms, self.baseline_ms))

    def __str__(self) -> str:
        low, high = p10_p90(self.ratios)
        return (f"baseline {self.baseline_median:.2f} ms, candidate {self.candidate_median:.2f} ms "
                f"(median of {len(self.baseline_ms)}), reduction {self.reduction:+.1%} "
                f"(per-call ratio p10-p90 {low:.3f}-{high:.3f})")


def p10_p90(values) -> tuple[float, float]:
    """The 10th and 90th percentiles of ``values``, interpolated between the samples, never beyond them
    (``statistics.quantiles(method="inclusive")``: with the few repetitions a benchmark takes, the
    default method would report a p90 above the slowest call); one value: itself."""
    values = list(values)
    if not values:
        raise ValueError("p10_p90 needs at least one value")
    if len(values) == 1:
        return values[0], values[0]
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return deciles[0], deciles[-1]


def compare_latency(baseline: Callable[..., Any], candidate: Callable[..., Any], *args: Any, reps: int = 15,
                    warmup: int = 2, sync: Callable[[], None] | None = None, **kwargs: Any) -> LatencyComparison:
    """Time ``baseline(*args, **kwargs)`` and ``candidate(...)`` interleaved; see the module docstring."""
    if reps < 1 or warmup < 0:
        raise ValueError(f"reps must be >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    sync = sync or (torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None))
    times: dict[int, list[float]] = {0: [], 1: []}
    fns = (baseline, candidate)
    with torch.no_grad():
        for _ in range(warmup):
            baseline(*args, **kwargs)
            candidate(*args, **kwargs)
        for i in range(reps):
            for which in ((0, 1) if i % 2 == 0 else (1, 0)):
                sync()
                t = time.perf_counter()
                fns[which](*args, **kwargs)
                sync()
                times[which].append((time.perf_counter() - t) * 1e3)
    return LatencyComparison(tuple(times[0]), tuple(times[1]))


def assert_latency_reduction(baseline: Callable[..., Any], candidate: Callable[..., Any], *args: Any,
                             min_reduction: float, reps: int = 15, warmup: int = 2, attempts: int = 2,
                             **kwargs: Any) -> LatencyComparison:
    """Fail unless ``candidate`` takes at least ``min_reduction`` less time than ``baseline``.

    Measures up to ``attempts`` times and passes on the first comparison that
    meets the bar; the AssertionError lists every attempt.  Returns the passing
    :class:`LatencyComparison`.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    seen = []
    for _ in range(attempts):
        comparison = compare_latency(baseline, candidate, *args, reps=reps, warmup=warmup, **kwargs)
        if comparison.reduction >= min_reduction:
            return comparison
        seen.append(comparison)
        warmup = 0  # already warm
    raise AssertionError(
        f"latency reduction below {min_reduction:.1%} in {attempts} attempt(s): " + "; ".join(map(str, seen)))
