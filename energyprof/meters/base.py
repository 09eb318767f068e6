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
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from energyprof.counts import WorkCounts
from energyprof.errors import WindowError
from energyprof.meters.reliability import (  # the meters' reliability core, re-exported
    DEVICE_CALL_TIMEOUT_S,
    JOIN_TIMEOUT_S,
    BackgroundReader,
    DeviceCaller,
    periodic,
)

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
