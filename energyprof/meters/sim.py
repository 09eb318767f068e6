"""A simulated device and meter with known ground truth (``sim``, ``sim:preset=h100,seed=1``).

It exists for CI, demos and for testing the measurement protocol and the calibration against a
truth that a physical meter never gives. Everything it reports carries ``simulated=True``.

The device: static power plus the dynamic energy of work that energyprof's own workloads report as
counts, priced by a device model of its own (:mod:`energyprof.meters.simdevice`: three memory
levels or more, page walks and prefetched lines, thermal drift, kernel-dependent launches,
interference bursts; each switchable with ``effects=``, e.g. ``sim:preset=h100,effects=none`` or
``effects=-drift-interference``). It never calls the cost model. The counter reproduces real flaws:

* it updates only every ``update_period_s`` (at a seeded phase);
* each update adds the mean power over only the last ``averaging_window_s`` of the period, times the
  period (NVML on A100/H100: ~100 ms period, ~25 ms window; Yang et al., SC'24);
* readings are quantised to ``resolution_j`` and wrap at ``wrap_j``;
* each update's power carries zero-mean Gaussian noise (``noise_w``), deterministic under the seed.

The reader side unwraps the counter like a background poller would, with :class:`WrapTracker`.
Time is real (``clock=real``, default) or virtual (``clock=virtual``): on a virtual clock
``sleep`` and ``run_kernel`` advance time instantly, which lets benchmarks simulate hours quickly.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from energyprof.counts import WorkCounts
from energyprof.errors import MeterSpecError
from energyprof.meters.base import CounterMeter, MeterInfo, Probe, WrapTracker
from energyprof.meters.simdevice import DEVICES, DeviceModel, Interference, ThermalState, effects_text, parse_effects
from energyprof.meters.spec import MeterSpec

__all__ = ["SimPreset", "PRESETS", "SimMeter", "SimulatedExecution", "open_from_spec", "probe"]


@dataclass(frozen=True)
class SimPreset:
    """A simulated device (its physics, :class:`~energyprof.meters.simdevice.DeviceModel`: the
    ground truth, never the cost model) and the flaws of its counter."""

    name: str
    description: str
    scope: str
    device: DeviceModel
    update_period_s: float
    averaging_window_s: float
    resolution_j: float
    wrap_j: float | None
    noise_w: float

    def __post_init__(self) -> None:
        if not 0 < self.averaging_window_s <= self.update_period_s:
            raise ValueError(
                f"preset {self.name}: averaging_window_s must be in (0, update_period_s]"
            )

    @property
    def static_power_w(self) -> float:
        """Idle power of the cold device."""
        return self.device.static_power_w

    @property
    def effects(self) -> frozenset[str]:
        return self.device.effects

    def price(self, counts: WorkCounts, temperature: float = 0.0) -> float:
        """Dynamic joules of the work described by ``counts`` (the simulator's ground truth)."""
        return self.device.price(counts, temperature)

    def seconds(self, counts: WorkCounts) -> float:
        """How long the simulated device takes for ``counts`` (its time model)."""
        return self.device.seconds(counts)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["device"] = self.device.to_dict()
        return d


PRESETS: dict[str, SimPreset] = {
    p.name: p
    for p in (
        SimPreset(
            name="h100",
            description="H100-like GPU: NVML-style counter, 100 ms period averaging 25 ms, 1 mJ steps",
            scope="gpu",
            device=DEVICES["h100"],
            update_period_s=0.100,
            averaging_window_s=0.025,
            resolution_j=1e-3,
            wrap_j=None,
            noise_w=1.0,
        ),
        SimPreset(
            name="desktop-cpu",
            description="desktop CPU package: RAPL-style counter, 1 ms updates, 15.3 uJ steps, wraps at 262 kJ",
            scope="package",
            device=DEVICES["desktop-cpu"],
            update_period_s=0.001,
            averaging_window_s=0.001,
            resolution_j=15.3e-6,
            wrap_j=262143.328850,
            noise_w=0.3,
        ),
        SimPreset(
            name="rpi4",
            description="Raspberry-Pi-4-like board on an INA219-style supply meter, 10 ms samples",
            scope="board",
            device=DEVICES["rpi4"],
            update_period_s=0.010,
            averaging_window_s=0.010,
            resolution_j=1e-4,
            wrap_j=None,
            noise_w=0.05,
        ),
    )
}


class SimulatedExecution:
    """A set-up workload run on the simulated device's time (virtual clock).

    Each call advances the meter's virtual clock by the preset's time model for the workload's
    counts; the measurement protocol then reports the batch's counts as usual, so the energy is the
    simulator's truth for the counts of the real kernel. The real torch kernel runs on the first call
    and then once every ``real_every`` calls: its counts (exact, from its real operands) are what is
    priced, while this machine's wall time never enters a number. SIMULATED, like every number of
    the simulator.
    """

    reports_work = False

    def __init__(self, meter: "SimMeter", workload: Any, real_every: int = 65536) -> None:
        self.meter = meter
        self.workload = workload
        self.real_every = max(1, int(real_every))
        self.name = getattr(workload, "name", type(workload).__name__)
        self.device_ = workload.device_
        self.counts_ = workload.counts_
        self.count_parts_ = getattr(workload, "count_parts_", None)
        self.seconds_per_call = sum(meter.preset.seconds(c) for c in self.count_parts_ or (workload.counts_,))
        self.real_calls = 0
        self._calls = 0
        self._clock = meter._virtual

    @property
    def tensors_(self) -> Any:
        return self.workload.tensors_

    def __call__(self) -> None:
        if self._calls % self.real_every == 0:
            self.workload()
            self.real_calls += 1
        self._calls += 1
        self._clock.now += self.seconds_per_call  # the measuring thread owns the virtual clock

    def describe(self) -> dict[str, Any]:
        return {**self.workload.describe(), "clock": "simulated device time"}

    def __repr__(self) -> str:
        return f"SimulatedExecution({self.workload!r})"


def _energy_in(segments: list[tuple[float, float, float]], a: float, b: float) -> float:
    """Joules of uniformly spread segments (t0, t1, joules), sorted by t1, that fall in (a, b]."""
    total = 0.0
    for t0, t1, j in segments[bisect.bisect_right(segments, a, key=lambda s: s[1]) :]:
        if t0 >= b:
            continue
        if t1 == t0:  # an instantaneous burst counts where it happens
            total += j if a < t0 <= b else 0.0
            continue
        overlap = min(t1, b) - max(t0, a)
        if overlap > 0:
            total += j * overlap / (t1 - t0)
    return total


class _VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SimMeter(CounterMeter):
    """A simulated counter meter. ``report_work`` tells it what ran; reads reproduce the flaws."""

    def __init__(
        self,
        preset: SimPreset | str = "h100",
        seed: int = 0,
        clock: str = "real",
        sync_device: Any = None,
        effects: str | frozenset[str] | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__(sync_device=sync_device)
        if isinstance(preset, str):
            if preset not in PRESETS:
                raise MeterSpecError(
                    f"unknown sim preset {preset!r}; presets: {', '.join(sorted(PRESETS))}"
                )
            preset = PRESETS[preset]
        if "static_power_w" in overrides:
            preset = replace(preset, device=replace(preset.device, static_power_w=overrides.pop("static_power_w")))
        if overrides:
            preset = replace(preset, **overrides)
        if effects is not None:
            try:
                chosen = parse_effects(effects) if isinstance(effects, str) else frozenset(effects)
                preset = replace(preset, device=preset.device.with_effects(chosen))
            except ValueError as exc:
                raise MeterSpecError(str(exc)) from None
        if clock not in ("real", "virtual"):
            raise MeterSpecError(f"sim clock must be 'real' or 'virtual', got {clock!r}")
        self.preset = preset
        self.seed = int(seed)
        self.clock_kind = clock
        self._virtual = _VirtualClock() if clock == "virtual" else None
        self._lock = threading.RLock()
        self._origin = self.clock()
        rng = np.random.default_rng([self.seed, 0x5EED])
        self._phase = float(rng.uniform(0.0, preset.update_period_s))
        self._next_update = 0  # index k of the next counter update not yet applied
        self._raw_j = 0.0  # the device's internal (unquantised, unwrapped) counter
        self._carry_j = 0.0  # work reported after its time had been processed: credited late
        # dynamic work segments (t0, t1, joules), sorted by t1 for pruning
        self._segments: list[tuple[float, float, float]] = []
        # every segment ever reported, unpruned: the ground truth for true_energy_j
        self._history: list[tuple[float, float, float]] = []
        self._reported_dynamic_j = 0.0
        self.device = preset.device
        self.thermal = ThermalState(preset.device.tau_s)
        self.interference = Interference(preset.device, self.seed, origin=self._origin)
        self._tracker = WrapTracker(preset.wrap_j)
        self._tracker.update(self._raw_reading())
        self._info = MeterInfo(
            backend="sim",
            scope=preset.scope,
            kind="counter",
            update_period_s=preset.update_period_s,
            averaging_window_s=preset.averaging_window_s,
            resolution_j=preset.resolution_j,
            simulated=True,
            domains=(preset.scope,),
            details={"preset": preset.name, "seed": self.seed, "clock": clock,
                     "effects": effects_text(preset.device.effects)},
        )

    # ----------------------------------------------------------------- time base
    def clock(self) -> float:
        if getattr(self, "_virtual", None) is not None:
            return self._virtual()
        return time.perf_counter()

    def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        if self._virtual is not None:
            with self._lock:
                self._virtual.now += seconds
        else:
            time.sleep(seconds)

    # ----------------------------------------------------------------- work
    def report_work(self, counts: WorkCounts, t_start: float, t_end: float) -> None:
        """Price ``counts`` with the device model at the device's temperature over [t_start, t_end]
        (the device was busy then) and spend it there."""
        with self._lock:
            temperature = self.thermal.busy(t_start, t_end) if self.device.on("drift") else 0.0
            self.report_joules(self.device.price(counts, temperature), t_start, t_end)

    def report_joules(self, joules: float, t_start: float, t_end: float) -> None:
        """Dynamic energy spent uniformly over [t_start, t_end] (meter clock)."""
        if t_end < t_start:
            raise ValueError(f"t_end ({t_end}) is before t_start ({t_start})")
        if joules < 0 or not math.isfinite(joules):
            raise ValueError(f"joules must be finite and >= 0, got {joules}")
        with self._lock:
            self._reported_dynamic_j += joules
            if joules > 0:
                bisect.insort(self._history, (t_start, t_end, joules), key=lambda s: s[1])
            processed_until = self._update_time(self._next_update - 1)
            if t_start < processed_until:
                # Part of this work lies in updates already applied: credit it at the next update
                # so that no energy is lost (a real counter would have seen it in time).
                span = t_end - t_start
                late = joules if span == 0 else joules * (min(t_end, processed_until) - t_start) / span
                self._carry_j += late
                joules -= late
                t_start = processed_until
            if joules > 0:
                seg = (t_start, t_end, joules)
                bisect.insort(self._segments, seg, key=lambda s: s[1])

    def run_kernel(self, counts: WorkCounts, duration_s: float) -> tuple[float, float]:
        """Stand-in for a kernel of ``duration_s`` doing ``counts``: on a virtual clock time advances
        instantly; on a real clock it sleeps. Returns (t_start, t_end) in the meter clock."""
        if duration_s < 0:
            raise ValueError("duration_s must be >= 0")
        t0 = self.clock()
        self.sleep(duration_s)
        t1 = t0 + duration_s if self._virtual is not None else self.clock()
        self.report_work(counts, t0, t1)
        return t0, t1

    def temperature(self) -> float:
        """The device's temperature state now (0 cold .. 1 hot; 0 without the drift effect)."""
        with self._lock:
            return self.thermal.at(self.clock()) if self.device.on("drift") else 0.0

    def price(self, counts: WorkCounts) -> float:
        """The truth of ``counts``: dynamic joules at the device's current temperature."""
        return self.device.price(counts, self.temperature())

    def price_workload(self, workload: Any) -> float:
        """The truth of one call of a set-up workload at the device's current temperature (each
        tensor of a replay priced on its own)."""
        parts = getattr(workload, "count_parts_", None) or (workload.counts_,)
        temperature = self.temperature()
        return sum(self.device.price(c, temperature) for c in parts)

    def simulate(self, workload: Any, real_every: int = 65536) -> Any:
        """``workload`` as the protocol should run it on this meter: on the virtual clock, on the
        simulated device's time (:class:`SimulatedExecution`); on the real clock, unchanged."""
        if self._virtual is None or getattr(workload, "reports_work", False):
            return workload
        return SimulatedExecution(self, workload, real_every=real_every)

    # ----------------------------------------------------------------- ground truth
    def true_energy_j(self, t_start: float, t_end: float) -> float:
        """Exact joules of this device in [t_start, t_end]: static power (at its temperature) plus
        reported dynamic work; no noise, no interference (foreign power, :meth:`foreign_energy_j`)."""
        with self._lock:
            dynamic = _energy_in(self._history, t_start, t_end)
            return self._static_j(t_start, t_end) + dynamic

    def foreign_energy_j(self, t_start: float, t_end: float) -> float:
        """Joules of the interference bursts in [t_start, t_end] (another process's, not ours)."""
        return self.interference.joules(t_start, t_end)

    def _static_j(self, a: float, b: float) -> float:
        if b <= a:
            return 0.0
        if not self.device.on("drift") or self.device.static_rise == 0:
            return self.device.static_power_w * (b - a)
        ts = np.linspace(a, b, 33)
        powers = [self.device.static_power(self.thermal.at(float(t))) for t in ts]
        return float(np.trapezoid(powers, ts))

    @property
    def reported_dynamic_j(self) -> float:
        return self._reported_dynamic_j

    # ----------------------------------------------------------------- counter model
    def _update_time(self, k: int) -> float:
        return self._origin + self._phase + k * self.preset.update_period_s

    def _noise_w(self, k: int) -> float:
        if self.preset.noise_w == 0:
            return 0.0
        return float(np.random.default_rng([self.seed, k + 1]).normal(0.0, self.preset.noise_w))

    def _advance_to(self, now: float) -> None:
        p = self.preset
        while self._update_time(self._next_update) <= now:
            k = self._next_update
            t = self._update_time(k)
            a = t - p.averaging_window_s
            dyn_w = (_energy_in(self._segments, a, t) + self.interference.joules(a, t)) / p.averaging_window_s
            static_w = self.device.static_power(self.thermal.at(t)) if self.device.on("drift") else p.static_power_w
            power = max(0.0, static_w + dyn_w + self._noise_w(k))
            self._raw_j += power * p.update_period_s + self._carry_j
            self._carry_j = 0.0
            self._next_update = k + 1
            # the reader polls at every update, so it never misses a wrap
            self._tracker.update(self._raw_reading())
        horizon = self._update_time(self._next_update - 1) - p.averaging_window_s
        cut = bisect.bisect_left(self._segments, horizon, key=lambda s: s[1])
        if cut:
            del self._segments[:cut]

    def _raw_reading(self) -> float:
        """What the device register shows: quantised, and wrapped when the preset wraps."""
        p = self.preset
        q = math.floor(self._raw_j / p.resolution_j) * p.resolution_j
        return math.fmod(q, p.wrap_j) if p.wrap_j else q

    def read_counters(self) -> dict[str, float]:
        with self._lock:
            self._advance_to(self.clock())
            return {self.preset.scope: self._tracker.total}

    @property
    def wraps(self) -> int:
        return self._tracker.wraps

    @property
    def info(self) -> MeterInfo:
        return self._info


def open_from_spec(spec: MeterSpec, **kwargs: Any) -> SimMeter:
    preset = spec.get_str("preset", "h100")
    seed = spec.get_int("seed", 0)
    clock = spec.get_str("clock", "real")
    effects = spec.get_str("effects")
    overrides: dict[str, Any] = {}
    for key in ("static_power_w", "update_period_s", "averaging_window_s", "resolution_j", "wrap_j", "noise_w"):
        value = spec.get_float(key)
        if value is not None:
            overrides[key] = value
    spec.check_unused()
    return SimMeter(preset=preset, seed=seed, clock=clock, effects=effects, **overrides, **kwargs)


def probe(spec: MeterSpec | None = None) -> Any:

    return Probe(
        "sim",
        True,
        "simulated meter (always available; every number it gives is labelled simulated)",
        {"presets": sorted(PRESETS)},
    )
