"""Interleaved timing of several callables, and the one set of statistics every benchmark reports.

    from cqil_fx.tools.timing import Summary, device_sync, time_interleaved

    timings = time_interleaved({"plain": lambda: plain(ids), "cqil": lambda: fast(ids)},
                               reps=15, warmup=2, sync=device_sync(ids.device))
    timings.summary("cqil")                       # Summary(median=..., p10=..., p90=..., n=15), in ms
    Summary.of(timings.ratios("cqil", "plain"))   # cqil / plain, repetition by repetition

**Order.** The warm-up rounds call every callable once each, in the order given.
Timed repetition ``i`` starts at the ``i``-th callable and goes round
(``a b c``, ``b c a``, ``c a b``, ...; with two callables ``a b``, ``b a``):
each callable holds each position equally often, so a slow drift of the
machine (clock speed, heat, a neighbour's job) hits all of them alike.

**Ratios** pair repetition ``i`` of one callable with repetition ``i`` of
another: the two calls ran next to each other and saw the same machine.

**Quantiles** (:func:`quantile`): linear interpolation between order
statistics (Hyndman and Fan's type 7; numpy's default, ``statistics.quantiles``
with ``method="inclusive"``).  For sorted values ``x[0] <= ... <= x[n-1]``
the ``q``-quantile lies at position ``h = (n - 1) q``:
``x[floor(h)] + (h - floor(h)) (x[floor(h) + 1] - x[floor(h)])``.  It never
lies below the fastest call or above the slowest, however few calls there are.
(``statistics.quantiles``' default ``"exclusive"`` method extrapolates: with 5
calls its p90 lies beyond the slowest whenever the two slowest differ.)  The
median is the 0.5-quantile.

The timer is injectable (``timer=``, seconds like ``time.perf_counter``), so
tests can drive the code with a fake clock.  Nothing here imports torch until
:func:`device_sync` is asked for a CUDA device.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ..errors import CQILConfigError


def quantile(values: Iterable[float], q: float) -> float:
    """The ``q``-quantile (``0 <= q <= 1``) of ``values``, interpolated between order statistics (type 7):
    always within ``[min(values), max(values)]``; one value is its own every quantile."""
    ordered = sorted(values)
    if not ordered:
        raise CQILConfigError("a quantile needs at least one value")
    if not 0.0 <= q <= 1.0:
        raise CQILConfigError(f"q must be between 0 and 1, got {q}")
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    value = ordered[low] + (position - low) * (ordered[high] - ordered[low])
    return min(max(value, ordered[low]), ordered[high])  # rounding must not step outside the two neighbours


def median(values: Iterable[float]) -> float:
    """The 0.5-quantile: the middle value, or the mean of the two middle ones."""
    return quantile(values, 0.5)


@dataclasses.dataclass(frozen=True)
class Summary:
    """Median, 10th and 90th percentiles (:func:`quantile`) and count of some timings or ratios."""

    median: float
    p10: float
    p90: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Summary:
        values = list(values)
        if not values:
            raise CQILConfigError("a summary needs at least one value")
        return cls(quantile(values, 0.5), quantile(values, 0.1), quantile(values, 0.9), len(values))

    def __str__(self) -> str:
        return f"{self.median:.3f} (p10-p90 {self.p10:.3f}-{self.p90:.3f}, n={self.n})"


def ratios(values: Sequence[float], baseline: Sequence[float]) -> tuple[float, ...]:
    """``values[i] / baseline[i]`` for each repetition ``i`` (the two calls were timed next to each other)."""
    if len(values) != len(baseline):
        raise CQILConfigError(f"ratios pair repetitions: got {len(values)} values against {len(baseline)} of the baseline")
    return tuple(v / b for v, b in zip(values, baseline))


def rotation(names: Sequence[str], rep: int) -> list[str]:
    """The order of timed repetition ``rep``: ``names`` started at the ``rep``-th and taken round."""
    if not names:
        return []
    start = rep % len(names)
    return [*names[start:], *names[:start]]


@dataclasses.dataclass
class Timings:
    """What :func:`time_interleaved` measured: per callable, the milliseconds and return values of its timed calls,
    in repetition order (a callable dropped after an error has fewer)."""

    ms: dict[str, list[float]]
    results: dict[str, list[Any]]

    def summary(self, name: str) -> Summary:
        return Summary.of(self.ms[name])

    def medians(self) -> dict[str, float]:
        """Median ms of every callable with at least one timed call."""
        return {name: median(ms) for name, ms in self.ms.items() if ms}

    def ratios(self, name: str, baseline: str) -> tuple[float, ...]:
        """``name``'s ms over ``baseline``'s, repetition by repetition."""
        return ratios(self.ms[name], self.ms[baseline])


def time_interleaved(calls: Mapping[str, Callable[[], Any]], reps: int, warmup: int = 1, *,
                     sync: Callable[[], None] | None = None, timer: Callable[[], float] = time.perf_counter,
                     before: Mapping[str, Callable[[], Any]] | None = None,
                     after: Mapping[str, Callable[[bool], Any]] | None = None,
                     on_error: Callable[[str, Exception], None] | None = None) -> Timings:
    """Call each of ``calls`` ``warmup`` times untimed, then ``reps`` times timed, interleaved (module docstring).

    Each call is timed from just before to just after it, with ``sync()`` (e.g. :func:`device_sync`)
    before starting and before stopping the clock, so asynchronous device work is inside the span.
    ``before[name]()`` runs just before ``name``'s clock starts and ``after[name](timed)`` just after it
    stops, outside the span (``timed`` is False in warm-up).  With ``on_error``, a call (or its sync)
    that raises is reported as ``on_error(name, error)`` and that callable is called no more; without,
    the error propagates.
    """
    if reps < 0 or warmup < 0:
        raise CQILConfigError(f"reps and warmup must be >= 0, got reps={reps}, warmup={warmup}")
    sync = sync or _no_sync
    before, after = before or {}, after or {}
    live = list(calls)
    timings = Timings({name: [] for name in calls}, {name: [] for name in calls})
    for round_ in range(warmup + reps):
        timed = round_ >= warmup
        for name in rotation(list(live), round_ - warmup) if timed else list(live):
            if name in before:
                before[name]()
            try:
                sync()
                start = timer()
                result = calls[name]()
                sync()
                stop = timer()
            except Exception as error:
                if on_error is None:
                    raise
                live.remove(name)
                on_error(name, error)
                continue
            if name in after:
                after[name](timed)
            if timed:
                timings.ms[name].append((stop - start) * 1e3)
                timings.results[name].append(result)
    return timings


def device_sync(device: Any = None) -> Callable[[], None]:
    """What waits for ``device``'s queued work: ``torch.cuda.synchronize`` for a CUDA device, else nothing."""
    kind = getattr(device, "type", None) or str(device or "cpu").split(":")[0]
    if kind != "cuda":
        return _no_sync
    import torch  # only here: the statistics above need no torch

    return lambda: torch.cuda.synchronize(device)


def _no_sync() -> None:
    pass
