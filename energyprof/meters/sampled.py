"""Sampled-power meters: a background sampler, trapezoid integration, loud failure.

A :class:`SampleSource` is the hardware boundary: it yields ``(t, watts)`` with ``t`` on the
meter's monotonic clock (``time.perf_counter``). :class:`SampledMeter` runs it in a background
thread and keeps the samples with their running trapezoid integral.

The energy of a window [a, b] is the integral of the piecewise-linear power through the samples:
whole trapezoids between the samples inside the window plus the linearly interpolated parts at
both edges. The window's end waits for the first sample at or after ``b`` (at most ``max_gap_s``
after the last sample), so both edges are interpolated, never extrapolated.

Loud failure, never a low number: a window fails with :class:`MeterFailure` when the source ended
or errored before a sample past the window's end arrived, when no sample came for ``max_gap_s``,
or when two consecutive samples around or inside the window are more than ``max_gap_s`` apart.
Shorter gaps (intervals over 2.5 times the median one) are bridged linearly and reported
(with a warning when they cover more than a tenth of the window).

Every Measurement carries, in ``details``: the samples inside the window, the achieved sample
rate (and the rate that was asked for), gaps, the source's counters over the window (bad lines,
read errors, clock jumps, dropped samples) and warnings, e.g. a sample rate far below the one
asked for.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
import warnings
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import numpy as np

from energyprof.errors import MeterFailure, MeterSpecError, MeterUnavailable
from energyprof.meters.base import BackgroundReader, DeviceCaller, Meter, MeterInfo
from energyprof.meters.spec import MeterSpec

__all__ = ["SampleSource", "PolledSource", "SampledOptions", "SampledMeter"]

log = logging.getLogger(__name__)

GAP_PERIODS = 2.5  # an interval longer than this many typical intervals is reported as a gap
GAP_WARN_FRACTION = 0.1  # gaps covering more than this share of a window get a warning
SLOW_RATE_FRACTION = 0.5  # achieved rate below this fraction of the asked rate gets a warning
_PRUNE_EVERY = 4096  # appends between two prunes of old samples
_KEEP_S = 10.0  # samples kept before the oldest open window (or now), at least 4 max_gap_s


class SampleSource(ABC):
    """Where samples come from (the hardware boundary of a sampled meter).

    ``samples()`` runs in the meter's sampler thread: it yields ``(t, watts)`` with ``t`` on the
    local monotonic clock, blocks until the next sample, releases the device when it finishes,
    and raises :class:`MeterFailure` (with the reason) when the source ends or breaks.
    ``close()`` is called from another thread and makes ``samples()`` finish soon.
    """

    description: str = "source"

    @abstractmethod
    def samples(self) -> Iterator[tuple[float, float]]: ...

    @abstractmethod
    def close(self) -> None: ...

    def counters(self) -> dict[str, int]:
        """Cumulative event counts (bad lines, read errors, clock jumps...); JSON-friendly."""
        return {}

    def in_flight(self) -> str | None:
        """The device call running now and for how long (None when unknown or idle); a silent
        meter's failure message names it."""
        return None

    def last_error(self) -> str | None:
        """The error of the failed reads since the last good one (None when unknown or none); a
        silent meter's failure message names it."""
        return None


class PolledSource(SampleSource):
    """Polls ``read_watts()`` every ``period_s`` (no catch-up bursts when a read is late).

    A sample is stamped with the midpoint of its read. A read that raises ``OSError`` (I2C,
    serial) or :class:`MeterFailure` (a corrupt record, an overflow flag) is counted and retried;
    when no read has succeeded for ``give_up_s`` the source fails with the last error.
    Each read runs through a :class:`DeviceCaller` bounded by ``give_up_s``: a read that never
    returns (a wedged I2C bus or serial link) fails the source, naming the read, within that bound.
    ``release()`` is called when polling stops (close the bus or port there).
    """

    def __init__(
        self,
        description: str,
        read_watts: Callable[[], float],
        period_s: float,
        give_up_s: float,
        release: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if period_s <= 0:
            raise ValueError(f"period_s must be > 0, got {period_s}")
        self.description = description
        self._read = read_watts
        self._period = period_s
        self._give_up = give_up_s
        self._release = release
        self._clock = clock
        self._stop = threading.Event()
        self._read_errors = 0
        self._last_error: BaseException | None = None  # of the reads since the last good one
        self._caller = DeviceCaller(description, timeout_s=give_up_s)

    def in_flight(self) -> str | None:
        return self._caller.in_flight()

    def last_error(self) -> str | None:
        error = self._last_error
        return None if error is None else f"{type(error).__name__}: {error}"

    def samples(self) -> Iterator[tuple[float, float]]:
        try:
            last_good = next_t = self._clock()
            while not self._stop.is_set():
                t0 = self._clock()
                try:
                    watts = self._caller.call(self._read, what="the power read")
                except (OSError, MeterFailure) as exc:
                    if self._caller.wedged is not None:
                        raise
                    self._read_errors += 1
                    self._last_error = exc
                    if self._clock() - last_good > self._give_up:
                        raise MeterFailure(
                            f"no good reading for {self._clock() - last_good:.1f} s; last error: {exc}"
                        ) from exc
                else:
                    last_good = t1 = self._clock()
                    self._last_error = None
                    yield (t0 + t1) / 2, watts
                next_t += self._period
                now = self._clock()
                next_t = max(next_t, now)
                self._stop.wait(next_t - now)
        finally:
            if self._release is not None and self._caller.wedged is None:
                self._release()
            self._caller.close()

    def close(self) -> None:
        self._stop.set()

    def counters(self) -> dict[str, int]:
        return {"read_errors": self._read_errors}


@dataclass(frozen=True)
class SampledOptions:
    """Spec keys every sampled meter understands.

    rate_hz: the sample rate asked for (polled meters poll at it; streams are checked against it).
    max_gap_s: longest tolerated silence; None picks max(1 s, 5 sample periods).
    startup_s: how long opening waits for the first two samples.
    scope: what the meter's energy covers (the domain name), ``board`` by default.
    """

    rate_hz: float | None
    max_gap_s: float | None
    startup_s: float
    scope: str

    @classmethod
    def from_spec(
        cls, spec: MeterSpec, default_rate_hz: float | None, default_scope: str = "board"
    ) -> "SampledOptions":
        opts = cls(
            rate_hz=spec.get_float("rate_hz", default_rate_hz),
            max_gap_s=spec.get_float("max_gap_s"),
            startup_s=spec.get_float("startup_s", 10.0),
            scope=spec.get_str("scope", default_scope),
        )
        for key in ("rate_hz", "max_gap_s", "startup_s"):
            value = getattr(opts, key)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise MeterSpecError(f"meter spec {spec.text!r}: {key} must be a positive number, got {value}")
        if not opts.scope:
            raise MeterSpecError(f"meter spec {spec.text!r}: scope must not be empty (e.g. scope=board)")
        return opts

    @property
    def period_s(self) -> float | None:
        return 1.0 / self.rate_hz if self.rate_hz else None

    def max_gap_for(self, period_s: float | None) -> float:
        """The longest tolerated silence: ``max_gap_s`` when given, else max(1 s, 5 sample periods)."""
        if self.max_gap_s is not None:
            return self.max_gap_s
        return max(1.0, 5 * period_s) if period_s else 1.0


class _SampleLog:
    """Samples in time order with the running trapezoid integral (not thread-safe: the meter locks)."""

    def __init__(self, capacity: int = 4096) -> None:
        self._t = np.empty(capacity)
        self._w = np.empty(capacity)
        self._e = np.empty(capacity)  # joules from the first kept sample's origin
        self.n = 0

    @property
    def first_t(self) -> float:
        return float(self._t[0]) if self.n else math.inf

    @property
    def last_t(self) -> float:
        return float(self._t[self.n - 1]) if self.n else -math.inf

    def append(self, t: float, watts: float) -> bool:
        """Add a sample; False (and nothing stored) when it is not after the last one."""
        n = self.n
        if n and t <= self._t[n - 1]:
            return False
        if n == len(self._t):
            for name in ("_t", "_w", "_e"):
                old = getattr(self, name)
                new = np.empty(2 * len(old))
                new[:n] = old
                setattr(self, name, new)
        self._e[n] = 0.0 if n == 0 else self._e[n - 1] + (t - self._t[n - 1]) * (watts + self._w[n - 1]) / 2
        self._t[n] = t
        self._w[n] = watts
        self.n = n + 1
        return True

    def drop_before(self, t: float) -> None:
        """Forget samples before ``t``, keeping the last one at or before it (for interpolation)."""
        i = int(np.searchsorted(self._t[: self.n], t, side="right")) - 1
        if i > 0:
            keep = self.n - i
            for arr in (self._t, self._w, self._e):
                arr[:keep] = arr[i : self.n]
            self.n = keep

    def energy_at(self, x: float) -> float:
        """Running integral at time ``x`` (first_t <= x <= last_t), linear power in between."""
        t, w = self._t, self._w
        i = int(np.searchsorted(t[: self.n], x, side="right")) - 1
        if i >= self.n - 1:
            return float(self._e[self.n - 1])
        dx = x - t[i]
        wx = w[i] + (w[i + 1] - w[i]) * dx / (t[i + 1] - t[i])
        return float(self._e[i] + dx * (w[i] + wx) / 2)

    def times_around(self, a: float, b: float) -> np.ndarray:
        """Sample times from the last one at or before ``a`` to the first one at or after ``b``."""
        times = self._t[: self.n]
        i0 = max(0, int(np.searchsorted(times, a, side="right")) - 1)
        i1 = int(np.searchsorted(times, b, side="left"))
        return times[i0 : i1 + 1].copy()

    def recent_intervals(self, count: int = 64) -> np.ndarray:
        return np.diff(self._t[max(0, self.n - count - 1) : self.n])


@dataclass(eq=False)
class _Edge:
    """A window edge: its time on the meter clock and the source's counters then."""

    t: float
    counters: dict[str, int]
    details: dict[str, Any] = field(default_factory=dict)


class SampledMeter(Meter):
    """A meter that integrates power samples from a :class:`SampleSource` (see the module doc).

    ``info`` is the meter's description; its ``update_period_s`` may be None, in which case the
    median interval of the recent samples is reported. ``resolution_w`` (power step of one
    reading) gives ``resolution_j`` = resolution_w x update period.
    """

    def __init__(
        self,
        source: SampleSource,
        info: MeterInfo,
        options: SampledOptions,
        resolution_w: float | None = None,
        sync_device: Any = None,
    ) -> None:
        super().__init__(sync_device=sync_device)
        self._source = source
        self._base_info = info
        self._options = options
        self._resolution_w = resolution_w
        self._cond = threading.Condition()
        self._log = _SampleLog()
        self._stopped: str | None = None  # why the sampler stopped; None while it runs
        self._dropped = 0
        self._appends = 0
        self._edges: weakref.WeakSet[_Edge] = weakref.WeakSet()  # edges still referenced pin their samples
        self._reader = BackgroundReader(
            source.description,
            lambda stop: source.samples(),
            self._on_sample,
            clock=self.clock,
            on_stop=source.close,
            on_end=self._on_reader_end,
            name=f"energyprof-{info.backend}-sampler",
        ).start()
        try:
            self._await_startup()
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- sampler thread
    def _on_sample(self, sample: tuple[float, float]) -> None:
        """One sample from the source (runs on the reader thread of the common core)."""
        t, watts = sample
        with self._cond:
            if not (math.isfinite(watts) and self._log.append(t, watts)):
                self._dropped += 1
                return
            self._appends += 1
            if self._appends % _PRUNE_EVERY == 0:
                self._prune()
            self._cond.notify_all()

    def _on_reader_end(self, reason: str | None) -> None:
        with self._cond:
            self._stopped = "meter closed" if (self._closed or reason is None) else reason
            self._cond.notify_all()

    def _silence_cause(self) -> str:
        """What the source knows about its silence: a read still in flight, or the error of its
        reads since the last good one (it may not have given up yet when the window's end does)."""
        causes = [c for c in (self._source.in_flight(), self._source.last_error()) if c]
        return f" ({'; '.join(causes)})" if causes else ""

    def _prune(self) -> None:
        keep_s = max(_KEEP_S, 4 * self.max_gap_s)
        pinned = [edge.t for edge in list(self._edges)]
        self._log.drop_before(min(pinned + [self._log.last_t]) - keep_s)

    # ----------------------------------------------------------------- configuration
    @property
    def max_gap_s(self) -> float:
        if self._options.max_gap_s is not None:
            return self._options.max_gap_s
        period = self._base_info.update_period_s or self._options.period_s or self._typical_interval()
        return self._options.max_gap_for(period)

    def _typical_interval(self) -> float | None:
        """Median interval of the recent samples (call with the lock held)."""
        intervals = self._log.recent_intervals()
        return float(statistics.median(intervals)) if len(intervals) else None

    @property
    def info(self) -> MeterInfo:
        with self._cond:
            period = self._base_info.update_period_s or self._typical_interval()
            details = dict(self._base_info.details)
            details.update(
                source=self._source.description,
                requested_rate_hz=self._options.rate_hz,
                max_gap_s=self.max_gap_s,
                power_resolution_w=self._resolution_w,
            )
        resolution = self._resolution_w * period if self._resolution_w and period else self._base_info.resolution_j
        return replace(self._base_info, update_period_s=period, resolution_j=resolution, details=details)

    # ----------------------------------------------------------------- windows
    def _await_startup(self) -> None:
        deadline = self.clock() + self._options.startup_s
        with self._cond:
            while self._log.n < 2 and self._stopped is None:
                remaining = deadline - self.clock()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._log.n >= 2:
                return
            why = self._stopped or f"fewer than 2 samples within startup_s={self._options.startup_s:g} s"
            counts = {k: v for k, v in self._source.counters().items() if v}
            extra = f" (counters: {counts})" if counts else ""
        raise MeterUnavailable(
            f"no power samples from {self._source.description}: {why}{extra}. Check that the meter is "
            "connected and sending, or give it longer with startup_s=SECONDS"
        )

    def _check_alive(self, now: float) -> None:
        """Raise unless the sampler runs and its last sample is recent (call with the lock held)."""
        if self._stopped is not None:
            raise MeterFailure(f"power samples stopped: {self._stopped}")
        silent = now - self._log.last_t
        if silent > self.max_gap_s:
            raise MeterFailure(
                f"no power sample from {self._source.description} for {silent:.2f} s "
                f"(max_gap_s={self.max_gap_s:g}); the meter stopped sending{self._silence_cause()}"
            )

    def begin(self, name: str = "window", sync: Any = None) -> None:
        self._check_open()
        with self._cond:
            self._check_alive(self.clock())
        super().begin(name, sync)

    def _snapshot(self) -> _Edge:
        edge = _Edge(self.clock(), self._source.counters())
        self._read_t = edge.t  # the window's seconds span exactly the integrated interval
        with self._cond:
            edge.counters["dropped_samples"] = self._dropped
            self._edges.add(edge)
        return edge

    def _energy_between(self, start: _Edge, end: _Edge) -> dict[str, float]:
        with self._cond:
            self._await_sample_after(end.t)
            if self._log.first_t > start.t:
                raise MeterFailure(
                    f"the samples at the window's start ({start.t:.3f}) are no longer kept; "
                    "the window began before the meter's first sample"
                )
            times = self._log.times_around(start.t, end.t)
            intervals = np.diff(times)
            longest = float(intervals.max()) if len(intervals) else 0.0
            if longest > self.max_gap_s:
                raise MeterFailure(
                    f"samples from {self._source.description} stopped for {longest:.2f} s in or around "
                    f"the window (max_gap_s={self.max_gap_s:g}); the energy over that stretch is unknown"
                )
            joules = self._log.energy_at(end.t) - self._log.energy_at(start.t)
            end.details = self._describe(start, end, times, intervals)
        for text in end.details.get("warnings", ()):
            warnings.warn(f"{self._base_info.backend} meter: {text}", RuntimeWarning, stacklevel=3)
        return {self._base_info.scope: joules}

    def _await_sample_after(self, t_end: float) -> None:
        while self._log.last_t < t_end:
            if self._stopped is not None:
                raise MeterFailure(
                    f"power samples stopped {t_end - self._log.last_t:.2f} s before the window's end: "
                    f"{self._stopped}"
                )
            remaining = self._log.last_t + self.max_gap_s - self.clock()
            if remaining <= 0:
                raise MeterFailure(
                    f"no power sample from {self._source.description} for {self.max_gap_s:g} s "
                    f"(max_gap_s) at the window's end; the meter stopped sending{self._silence_cause()}"
                )
            self._cond.wait(remaining)

    def _describe(self, start: _Edge, end: _Edge, times: np.ndarray, intervals: np.ndarray) -> dict[str, Any]:
        seconds = end.t - start.t
        inside = int(np.count_nonzero((times >= start.t) & (times <= end.t)))
        typical = self._typical_interval()
        gaps = intervals[intervals > GAP_PERIODS * typical] if typical else intervals[:0]
        details: dict[str, Any] = {
            "samples": inside,
            "sample_rate_hz": inside / seconds if seconds > 0 else None,
            "requested_rate_hz": self._options.rate_hz,
            "gaps": int(len(gaps)),
            "longest_interval_s": float(intervals.max()) if len(intervals) else None,
        }
        counters = self._source.counters()
        counters["dropped_samples"] = self._dropped
        for key, value in counters.items():
            details[key] = value - start.counters.get(key, 0)
        problems = []
        asked = self._options.rate_hz
        if asked and seconds * asked >= 5 and inside < SLOW_RATE_FRACTION * asked * seconds:
            problems.append(
                f"achieved {inside / seconds:.3g} samples/s, far below the {asked:g} asked for: "
                "the meter, its link or this host cannot keep up; short events may be missed"
            )
        if len(gaps) and gaps.sum() > GAP_WARN_FRACTION * seconds:
            problems.append(
                f"{len(gaps)} gap(s) in the samples, {float(gaps.sum()):.3g} s in all (longest "
                f"{float(gaps.max()):.3g} s), were bridged linearly"
            )
        if problems:
            details["warnings"] = problems
        return details

    def _window_details(self, start: _Edge, end: _Edge) -> dict[str, Any]:
        return dict(end.details)

    # ----------------------------------------------------------------- life cycle
    def close(self) -> None:
        if self._closed:
            return
        super().close()
        self._reader.stop()
