"""The meter abstraction: named measurement windows over a device's energy.

A meter exposes what its hardware can: a cumulative energy counter (NVML on Volta and newer, RAPL,
the INA228 accumulator) or power samples that are integrated (older NVML, INA219/226/260, USB
meters, line streams). Either way the user sees the same thing: ``begin(name)`` / ``end(name)``
(or ``with meter.window(name) as w``) returning a :class:`Measurement` in joules and seconds.

Windows may overlap: each open window keeps its own start snapshot. When a torch device is given,
the window synchronises it at both ends so that queued GPU work is inside the window.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

from energyprof.counts import WorkCounts
from energyprof.errors import EnergyprofError, MeterFailure, WindowError

__all__ = [
    "MeterInfo",
    "Measurement",
    "Meter",
    "CounterMeter",
    "Probe",
    "Window",
    "WrapTracker",
    "DeviceCaller",
    "BackgroundReader",
    "periodic",
    "synchronize",
    "torch_device_problem",
    "DEVICE_CALL_TIMEOUT_S",
    "JOIN_TIMEOUT_S",
]

log = logging.getLogger(__name__)

DEVICE_CALL_TIMEOUT_S = 5.0  # default bound on one device call (NVML, I2C, serial read) before it counts as hung
JOIN_TIMEOUT_S = 2.0  # how long closing a meter waits for its background reader thread


@dataclass(frozen=True)
class Probe:
    """Whether a backend is usable here, and why not."""

    backend: str
    available: bool
    reason: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "available": self.available,
            "reason": self.reason,
            "details": dict(self.details),
        }


@dataclass(frozen=True)
class MeterInfo:
    """What a meter is and how well it can see.

    backend: spec name (``nvml``, ``rapl``, ``sim``, ``ina219``, ...).
    scope: what the energy covers (``gpu``, ``package``, ``dram``, ``board``, ...).
    kind: ``counter`` (cumulative energy register) or ``sampled`` (integrated power samples).
    update_period_s: how often the reading changes (None when unknown).
    averaging_window_s: how much of each period the reading actually averages (None: all of it).
    resolution_j: smallest energy step of a reading (None when unknown).
    simulated: True for every number that did not come from a physical sensor.
    domains: names of the domains a Measurement reports.
    details: device name, driver, index, sysfs path... (JSON-friendly values only).
    torch_device: the torch device whose kernels the meter sees (``cuda:0`` for ``nvml:index=0``);
        None where the meter sees the host (CPU package, board, battery): kernels then run on ``cpu``.
    """

    backend: str
    scope: str
    kind: str
    update_period_s: float | None
    resolution_j: float | None
    simulated: bool
    domains: tuple[str, ...]
    averaging_window_s: float | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    torch_device: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["domains"] = list(self.domains)
        d["details"] = dict(self.details)
        return d


@dataclass(frozen=True)
class Measurement:
    """Energy of one window. ``energy_j`` is the total without double counting (e.g. RAPL core is
    inside package and is not added again); ``domains`` holds every domain's joules."""

    name: str
    seconds: float
    energy_j: float
    domains: Mapping[str, float]
    meter: MeterInfo
    started_at: float  # wall-clock (Unix) time of the window's start
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def watts(self) -> float:
        return self.energy_j / self.seconds if self.seconds > 0 else float("nan")

    @property
    def simulated(self) -> bool:
        return self.meter.simulated

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "energy_j": self.energy_j,
            "duration_s": self.seconds,
            "domains": dict(self.domains),
            "meter": self.meter.to_dict(),
            "started_at": self.started_at,
            "simulated": self.meter.simulated,
            "details": dict(self.details),
        }


def synchronize(device: Any) -> None:
    """Wait for queued work on a torch device (``"cuda:0"``, ``torch.device``); no-op for CPU/None."""
    if device is None:
        return
    import torch  # lazy: meters work without torch imported

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "mps" and hasattr(torch, "mps"):
        torch.mps.synchronize()
    elif dev.type == "xpu" and hasattr(torch, "xpu"):
        torch.xpu.synchronize(dev)


def torch_device_problem(info: MeterInfo) -> str | None:
    """Why kernels cannot run on the torch device this meter sees (``info.torch_device``), in one
    line that says what to install; None when they can, or when the meter sees the host.

    calibrate and validate call it after opening their meter, so that a GPU meter whose GPU this
    torch cannot drive (no ROCm build for an AMD GPU, no XPU support for an Intel GPU) is refused
    before any measuring, instead of timing kernels that run elsewhere."""
    device = info.torch_device
    if device is None:
        return None
    import torch  # lazy: meters work without torch imported

    kind, _, number = device.partition(":")
    index = int(number or 0)
    sees = f"the {info.backend} meter sees {device}"
    gpu = info.details.get("gpu") if isinstance(info.details.get("gpu"), Mapping) else {}
    if kind == "cuda":
        amd = info.backend == "amdsmi" or gpu.get("driver") == "amdgpu"
        hip = getattr(torch.version, "hip", None)
        if amd and not hip:
            build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
            return (f"{sees}, an AMD GPU, but this torch {torch.__version__} is {build}, not a ROCm build: its "
                    "kernels cannot run on that GPU. Install torch for ROCm (pip install torch --index-url "
                    "https://download.pytorch.org/whl/rocm6.2, or the index for your ROCm), or use a meter that "
                    "sees the CPU (rapl, battery)")
        if not torch.cuda.is_available():
            return (f"{sees}, but torch.cuda.is_available() is False in this torch {torch.__version__}: the kernels "
                    "cannot run on that GPU. Install a torch build for it (ROCm for AMD, CUDA for NVIDIA) and check "
                    "the driver")
        if index >= torch.cuda.device_count():
            return f"{sees}, but torch sees only {torch.cuda.device_count()} GPU(s); check *_VISIBLE_DEVICES"
        return None
    if kind == "xpu":
        xpu = getattr(torch, "xpu", None)
        if xpu is None or not xpu.is_available():
            return (f"{sees}, an Intel GPU, but this torch {torch.__version__} has no usable XPU device "
                    "(torch.xpu.is_available() is False): the kernels cannot run on that GPU. Install torch's XPU "
                    "build (pip install torch --index-url https://download.pytorch.org/whl/xpu) and Intel's GPU "
                    "driver, or use a meter that sees the CPU (rapl, battery)")
        if index >= xpu.device_count():
            return f"{sees}, but torch sees only {xpu.device_count()} XPU device(s)"
        return None
    return None


class Window:
    """Handle returned by ``Meter.window``; ``measurement`` is set when the block exits."""

    def __init__(self, meter: "Meter", name: str, sync: Any) -> None:
        self.meter = meter
        self.name = name
        self.sync = sync
        self.measurement: Measurement | None = None

    def __enter__(self) -> "Window":
        self.meter.begin(self.name, sync=self.sync)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.meter.discard(self.name)
            return
        self.measurement = self.meter.end(self.name, sync=self.sync)


class Meter(ABC):
    """Base of every backend.

    Subclasses implement ``info``, ``_snapshot`` (state at a window edge) and ``_energy_between``
    (joules per domain between two snapshots), and may override ``_total`` when some domains are
    contained in others. ``clock``/``sleep`` are the meter's time base (the simulator can run on a
    virtual clock); the measurement protocol uses them rather than ``time`` directly.
    """

    def __init__(self, sync_device: Any = None) -> None:
        self.sync_device = sync_device
        self._windows: dict[str, tuple[Any, float, float]] = {}
        self._windows_lock = threading.Lock()
        self._closed = False
        # when the device was actually read (meter clock), set by a backend whose reads run on
        # another thread (DeviceCaller); an edge is stamped with it, else with its read's midpoint
        self._read_t: float | None = None

    # ----------------------------------------------------------------- to implement
    @property
    @abstractmethod
    def info(self) -> MeterInfo: ...

    @abstractmethod
    def _snapshot(self) -> Any:
        """State at a window edge (cumulative counters, or a timestamp for sampled meters)."""

    @abstractmethod
    def _energy_between(self, start: Any, end: Any) -> dict[str, float]:
        """Joules per domain between two snapshots."""

    def _total(self, domains: Mapping[str, float]) -> float:
        return float(sum(domains.values()))

    def _window_details(self, start: Any, end: Any) -> dict[str, Any]:
        """Extra facts about a window (sample rate, gaps...); empty by default."""
        return {}

    # ----------------------------------------------------------------- time base
    def clock(self) -> float:
        """Monotonic seconds in this meter's time base."""
        return time.perf_counter()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    def report_work(self, counts: WorkCounts, t_start: float, t_end: float) -> None:
        """Tell the meter what work ran in [t_start, t_end] (meter clock). Physical meters ignore
        it; the simulator prices it. Workload code calls this; it never changes a real reading."""

    # ----------------------------------------------------------------- windows
    def begin(self, name: str = "window", sync: Any = None) -> None:
        self._check_open()
        synchronize(sync if sync is not None else self.sync_device)
        with self._windows_lock:
            if name in self._windows:
                raise WindowError(
                    f"a window named {name!r} is already open on this meter; end it first or "
                    "give the new window another name (windows may overlap under different names)"
                )
            # reserve the name before the (possibly slow) snapshot
            self._windows[name] = (None, float("nan"), float("nan"))
        try:
            self._read_t = None
            t0 = self.clock()
            snap = self._snapshot()
            t1 = self._edge_time(t0, self.clock())
        except BaseException:
            with self._windows_lock:
                self._windows.pop(name, None)
            raise
        with self._windows_lock:
            # an edge's time is the midpoint of its read (a read may wait for a device-call thread)
            self._windows[name] = (snap, t1, time.time())
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s meter: window %r begun", self.info.backend, name)

    def end(self, name: str = "window", sync: Any = None) -> Measurement:
        """Close window ``name`` and measure it. Whatever happens (a failed read, a void window),
        the name is released: a failing ``end`` never leaves the window open."""
        self._check_open()
        with self._windows_lock:
            if name not in self._windows:
                open_names = ", ".join(sorted(self._windows)) or "none"
                raise WindowError(
                    f"no open window named {name!r} (open windows: {open_names}); call begin({name!r}) first"
                )
        try:
            synchronize(sync if sync is not None else self.sync_device)
            self._read_t = None
            t0 = self.clock()
            end_snap = self._snapshot()
            end_t = self._edge_time(t0, self.clock())
        except BaseException as exc:
            self.discard(name)
            log.info("%s meter: window %r failed at its end: %s", type(self).__name__, name, exc)
            raise
        with self._windows_lock:
            if name not in self._windows:  # ended by another thread meanwhile
                raise WindowError(f"window {name!r} was ended or discarded while this end() ran")
            start_snap, start_t, wall = self._windows.pop(name)
        domains = self._energy_between(start_snap, end_snap)
        energy_j = self._total(domains)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s meter: window %r ended: %.6g J in %.6g s", self.info.backend, name, energy_j,
                      max(0.0, end_t - start_t))
        return Measurement(
            name=name,
            seconds=max(0.0, end_t - start_t),
            energy_j=energy_j,
            domains=dict(domains),
            meter=self.info,
            started_at=wall,
            details=self._window_details(start_snap, end_snap),
        )

    def _edge_time(self, t0: float, t1: float) -> float:
        """The time of an edge whose read ran between t0 and t1: when the device was read, if the
        backend knows it (``_read_t``), else the midpoint."""
        read_t = self._read_t
        if read_t is not None and t0 <= read_t <= t1:
            return read_t
        return (t0 + t1) / 2

    def discard(self, name: str) -> None:
        """Forget an open window without measuring it (used when the measured code raised)."""
        with self._windows_lock:
            self._windows.pop(name, None)

    def window(self, name: str = "window", sync: Any = None) -> Window:
        """``with meter.window("step", sync="cuda:0") as w: ...`` then ``w.measurement``."""
        return Window(self, name, sync)

    @property
    def open_windows(self) -> tuple[str, ...]:
        with self._windows_lock:
            return tuple(self._windows)

    # ----------------------------------------------------------------- life cycle
    def close(self) -> None:
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise WindowError("this meter is closed; open a new one with energyprof.meters.open_meter(spec)")

    def __enter__(self) -> "Meter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        i = self.info
        sim = ", simulated" if i.simulated else ""
        return f"<{type(self).__name__} backend={i.backend} scope={i.scope}{sim}>"


class CounterMeter(Meter):
    """A meter backed by cumulative energy counters. Subclasses implement ``read_counters`` returning
    joules per domain since an arbitrary origin, already corrected for wrap-around."""

    @abstractmethod
    def read_counters(self) -> dict[str, float]: ...

    def _snapshot(self) -> dict[str, float]:
        return self.read_counters()

    def _energy_between(self, start: dict[str, float], end: dict[str, float]) -> dict[str, float]:
        return {k: end[k] - start[k] for k in end if k in start}


class WrapTracker:
    """Unwraps a counter that wraps at ``wrap`` (same unit as the raw values).

    Feed every raw reading to ``update``; it returns the cumulative value since the first reading.
    Correct as long as readings are taken at least once per wrap period (a backend that cannot
    guarantee that from window edges alone polls in the background).
    """

    def __init__(self, wrap: float | None) -> None:
        if wrap is not None and wrap <= 0:
            raise ValueError(f"wrap must be > 0, got {wrap}")
        self.wrap = wrap
        self._last: float | None = None
        self._total = 0.0
        self.wraps = 0
        self._lock = threading.Lock()

    def update(self, raw: float) -> float:
        with self._lock:
            if self._last is None:
                self._last = raw
                return 0.0
            delta = raw - self._last
            if delta < 0:
                if self.wrap is None:
                    raise ValueError(
                        f"counter went backwards ({self._last} -> {raw}) and no wrap range is known"
                    )
                delta += self.wrap
                self.wraps += 1
            self._last = raw
            self._total += delta
            return self._total

    @property
    def total(self) -> float:
        with self._lock:
            return self._total



# ------------------------------------------------------------------------------ the reliability core
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
