"""The meters' reliability core: device calls bounded in time (:class:`DeviceCaller`), and
background readers of power samples whose failures and silences are noticed
(:class:`BackgroundReader`, :func:`periodic`). Every meter reaches hardware through these, so that
a hung driver call or a dead sensor is one clear failure, never a hung tool. Re-exported by
:mod:`energyprof.meters.base`.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from typing import Any, Callable, Iterable, Iterator

from energyprof.errors import EnergyprofError, MeterFailure

__all__ = ["DEVICE_CALL_TIMEOUT_S", "JOIN_TIMEOUT_S", "BackgroundReader", "DeviceCaller", "periodic"]

log = logging.getLogger("energyprof.meters.base")  # the meters' logger, as before the split

DEVICE_CALL_TIMEOUT_S = 5.0  # default bound on one device call (NVML, I2C, serial read) before it counts as hung
JOIN_TIMEOUT_S = 2.0  # how long closing a meter waits for its background reader thread


class DeviceCaller:
    """Runs blocking device calls (an NVML read, an I2C transfer, a serial read) on one worker thread
    and waits at most ``timeout_s`` for each: a call that never returns fails with
    :class:`MeterFailure` naming the call, instead of hanging the tool.

    The hung call keeps its (daemon) worker thread; the device counts as wedged from then on and
    every later call fails at once with the same message. Calls are serialised (one at a time),
    which is what device libraries expect; no lock of the caller is held while one runs.
    """

    def __init__(self, description: str, timeout_s: float = DEVICE_CALL_TIMEOUT_S) -> None:
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s}")
        self.description = description
        self.timeout_s = float(timeout_s)
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()  # one call in flight at a time
        self._wedged: str | None = None
        self._in_flight: tuple[str, float] | None = None
        self._thread: threading.Thread | None = None
        self.last_span: tuple[float, float] | None = None  # perf_counter at the start and end of the last call

    @property
    def wedged(self) -> str | None:
        """Why the device counts as wedged (the message of the hung call), or None."""
        return self._wedged

    def in_flight(self) -> str | None:
        """The call running now and for how long, e.g. for a message about a silent meter."""
        current = self._in_flight
        if current is None:
            return None
        what, since = current
        return f"{what} has been running for {time.monotonic() - since:.1f} s"

    def _worker(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args, box, done = job
            t0 = time.perf_counter()
            try:
                box.append((True, fn(*args)))
            except BaseException as exc:  # handed to the caller, never lost
                box.append((False, exc))
            self.last_span = (t0, time.perf_counter())
            done.set()

    def call(self, fn: Callable[..., Any], *args: Any, what: str) -> Any:
        """``fn(*args)`` within ``timeout_s``; its exception is raised as is."""
        if self._wedged is not None:
            raise MeterFailure(self._wedged)
        deadline = time.monotonic() + self.timeout_s
        if not self._lock.acquire(timeout=self.timeout_s):
            raise MeterFailure(self._wedged or (
                f"{self.description}: waited {self.timeout_s:g} s for another device call to finish "
                f"({self.in_flight() or 'unknown call'}); the driver is not answering"))
        try:
            if self._wedged is not None:
                raise MeterFailure(self._wedged)
            if self._thread is None:
                self._thread = threading.Thread(target=self._worker, name=f"energyprof-call-{self.description}",
                                                daemon=True)
                self._thread.start()
            box: list[tuple[bool, Any]] = []
            done = threading.Event()
            self._in_flight = (what, time.monotonic())
            self._jobs.put((fn, args, box, done))
            if not done.wait(max(0.0, deadline - time.monotonic())):
                self._wedged = (
                    f"{self.description}: {what} did not return within {self.timeout_s:g} s (the driver "
                    "or the device is wedged); every window over it is void. Check the device (e.g. "
                    "'nvidia-smi', the kernel log, the cable) and open the meter again"
                )
                log.info("%s", self._wedged)
                raise MeterFailure(self._wedged)
            self._in_flight = None
        finally:
            self._lock.release()
        ok, value = box[0]
        if ok:
            return value
        raise value

    def close(self) -> None:
        """Let the worker thread end (a hung one is left behind; it is a daemon)."""
        if self._thread is not None and self._wedged is None:
            self._jobs.put(None)
            self._thread.join(timeout=JOIN_TIMEOUT_S)


def periodic(read: Callable[[], Any], period_s: float, stop: threading.Event,
             clock: Callable[[], float] = time.perf_counter) -> Iterator[tuple[float, Any]]:
    """Yield ``(t, read())`` every ``period_s`` until ``stop`` is set, ``t`` the midpoint of the read
    on ``clock``. A late read shifts the schedule (no catch-up bursts). ``read`` raising ends it."""
    if period_s <= 0:
        raise ValueError(f"period_s must be > 0, got {period_s}")
    next_t = clock()
    while not stop.is_set():
        t0 = clock()
        value = read()
        t1 = clock()
        yield (t0 + t1) / 2, value
        next_t = max(next_t + period_s, clock())
        stop.wait(max(0.0, next_t - clock()))


class BackgroundReader:
    """The one background-reader core that every meter with a thread uses (sampled power meters,
    NVML's power path, RAPL's wrap poller), with one failure policy:

    * ``readings()`` is iterated on a daemon thread; each item goes to ``on_reading(item)`` and
      marks the time of the last good reading (``clock``);
    * the first exception ends the reader; it is kept as :class:`MeterFailure` naming the meter
      (``failure``); ``stop()`` ending it is not a failure;
    * ``check(now, max_silence_s)`` raises that failure, or a MeterFailure when no reading came for
      longer than ``max_silence_s`` (a source that stopped answering, e.g. a hung device call);
    * stretches without a reading longer than ``gap_limit_s`` are remembered, so that
      ``longest_gap(t0, t1)`` tells whether a window [t0, t1] lies over one;
    * ``stop()`` sets the stop event, calls ``on_stop`` (close the port), and joins for at most
      :data:`JOIN_TIMEOUT_S` (a thread stuck in a device call is left behind as a daemon).
    """

    def __init__(
        self,
        description: str,
        readings: Callable[[threading.Event], Iterable[Any]],
        on_reading: Callable[[Any], None],
        clock: Callable[[], float] = time.perf_counter,
        gap_limit_s: float = math.inf,
        on_stop: Callable[[], None] | None = None,
        on_end: Callable[[str | None], None] | None = None,
        name: str = "energyprof-reader",
        in_flight: Callable[[], str | None] | None = None,
    ) -> None:
        self.description = description
        self._readings = readings
        self._on_reading = on_reading
        self._clock = clock
        self.gap_limit_s = gap_limit_s
        self._on_stop = on_stop
        self._on_end = on_end
        self._in_flight = in_flight
        self.stop_event = threading.Event()
        self.failure: MeterFailure | None = None
        self.started_t = clock()
        self.last_ok_t: float | None = None
        self.readings = 0
        self._gaps: list[tuple[float, float]] = []  # (from, to) stretches over gap_limit_s
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "BackgroundReader":
        self._thread.start()
        log.debug("%s: background reader started", self.description)
        return self

    def _run(self) -> None:
        reason: str | None = None
        try:
            for item in self._readings(self.stop_event):
                self._on_reading(item)
                now = self._clock()
                with self._lock:
                    last = self.last_ok_t if self.last_ok_t is not None else self.started_t
                    if now - last > self.gap_limit_s:
                        self._gaps.append((last, now))
                    self.last_ok_t = now
                    self.readings += 1
            if not self.stop_event.is_set():
                reason = f"{self.description} stopped without saying why"
        except MeterFailure as exc:
            reason = f"{self.description}: {exc}"
        except EnergyprofError as exc:
            reason = f"{self.description}: {exc}"
        except Exception as exc:  # any other error ends reading; it is reported, never swallowed
            reason = f"{self.description} failed: {type(exc).__name__}: {exc}"
        if reason is not None and not self.stop_event.is_set():
            self.failure = MeterFailure(reason)
            log.info("background reader stopped: %s", reason)
        else:
            reason = None
            log.debug("%s: background reader stopped", self.description)
        if self._on_end is not None:
            self._on_end(reason)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def check(self, now: float | None = None, max_silence_s: float | None = None) -> None:
        """Raise the reader's failure, or a MeterFailure when it has been silent too long."""
        if self.failure is not None:
            raise self.failure
        if max_silence_s is None:
            return
        now = self._clock() if now is None else now
        with self._lock:
            last = self.last_ok_t if self.last_ok_t is not None else self.started_t
        if now - last > max_silence_s:
            pending = self._in_flight() if self._in_flight is not None else None
            raise MeterFailure(
                f"no reading from {self.description} for {now - last:.2f} s (limit {max_silence_s:g} s); "
                "the meter stopped answering and the window is void" + (f" ({pending})" if pending else "")
            )

    def longest_gap(self, t0: float, t1: float) -> float:
        """Longest stretch without a reading that overlaps [t0, t1], counting the silence since
        the last reading when it reaches into the window (0 when none is over ``gap_limit_s``)."""
        with self._lock:
            spans = [b - a for a, b in self._gaps if b > t0 and a < t1]
            last = self.last_ok_t if self.last_ok_t is not None else self.started_t
        if last < t1:
            spans.append(t1 - last)
        longest = max(spans, default=0.0)
        return longest if longest > self.gap_limit_s else 0.0

    def stop(self) -> None:
        self.stop_event.set()
        if self._on_stop is not None:
            try:
                self._on_stop()
            except Exception as exc:  # closing a broken device must not hide the real error
                log.debug("%s: closing failed: %s", self.description, exc)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=JOIN_TIMEOUT_S)
            if self._thread.is_alive():
                log.warning("%s: reader thread still blocked after %g s; left behind (daemon)",
                            self.description, JOIN_TIMEOUT_S)
