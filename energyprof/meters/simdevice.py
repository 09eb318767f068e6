"""The simulated device's physics: the simulator's ground truth, kept apart from the cost model.

The simulator is the only end-to-end test until real hardware is lent, so its truth must not be
:mod:`energyprof.costmodel` with other numbers: then validating on it would measure the meter's
noise and nothing else. This module prices work from what it does (its
:class:`~energyprof.counts.WorkCounts`: traffic, working set, scattered lines and pages, FLOPs,
launches) with physics the cost model lacks. It never imports or calls the cost model (a test
checks this). Each effect is on by default and can be switched off with ``effects=`` in the meter
spec (:func:`parse_effects`); with every effect off the device is one the cost model can represent
exactly (two memory levels with a step, one cost per launch), which is how a test shows that the
effects, not the fit, make the model miss. See ``docs/simulator.md`` for each effect's rationale
and source.

Effects (names as ``effects=`` takes them):

``levels``        three memory levels or more, each with its own capacity and cost per byte; beyond
                  a level's capacity the share of traffic it still serves falls as
                  ``(capacity / working set) ** tail_exponent`` (between an LRU cliff and random
                  replacement). Off: the last cache level and DRAM only, with a step.
``pages``         scattered writes pay a page walk (``page_j``) per distinct 4 KiB page they touch
                  (``WorkCounts.pages_written``) on top of their whole 64-byte lines, for the share
                  of touches that miss the TLB (none while the working set fits its reach,
                  ``tlb_reach_bytes``; then ``1 - reach / working set``).
``prefetch``      a scattered line whose predecessor line is also written (the rest of a run,
                  ``lines_written - line_runs_written``) costs ``1 - prefetch_discount`` of an
                  isolated one (adjacent-line and stream prefetchers).
``drift``         thermal and DVFS drift: a temperature state T in [0, 1] rises towards 1 while the
                  device is busy and relaxes towards 0 at idle, with time constant ``tau_s`` (on
                  the meter's clock, virtual or real); dynamic energy scales by
                  ``1 + dynamic_rise * T`` and static power by ``1 + static_rise * T``.
``launch``        the energy of a launch depends on the kernel and its arguments: index
                  (scattering) kernels cost ``scatter_launch_factor`` times a plain one,
                  compute-bound ones ``compute_launch_factor`` times, and every launch grows by
                  ``grid_rise`` per octave of the bytes it moves beyond 64 KiB (a bigger grid
                  takes more blocks to schedule and drain). Off: ``launch_j`` per launch.
``interference``  another process on the device: bursts of foreign power arriving at
                  ``burst_rate_hz`` (Poisson), each of heavy-tailed power (Pareto, shape
                  ``burst_alpha``, from ``burst_power_w``, capped at ``burst_max_w``) and
                  log-normal duration (median ``burst_median_s``). The meter sees them; they are
                  not part of the truth of any kernel.
"""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from energyprof.counts import WorkCounts

__all__ = ["EFFECTS", "MemoryLevel", "DeviceModel", "ThermalState", "Interference", "parse_effects",
           "effects_text", "DEVICES"]

EFFECTS = ("levels", "pages", "prefetch", "drift", "launch", "interference")
LINE = 64  # bytes per cache line (the device's own constant; the cost model has its own)
GRID_BYTES = 64 * 1024  # a launch that moves this much or less schedules a minimal grid


def parse_effects(text: str | None) -> frozenset[str]:
    """The effects an ``effects=`` value switches on.

    ``all`` (the default) or ``none``; names joined by ``+`` (only these: ``levels+pages``); or
    ``-`` before names to switch them off from all (``-drift-interference``); or both, read left to
    right (``none+drift``, ``all-launch``). Unknown names raise ``ValueError`` naming the known ones."""
    if text is None or text.strip() in ("", "all"):
        return frozenset(EFFECTS)
    text = text.strip().lower()
    tokens = re.findall(r"([+-]?)([a-z]+)", text)
    if "".join(s + n for s, n in tokens) != text:
        raise ValueError(f"effects={text!r}: expected names joined by + or - (e.g. none, all, "
                         f"-drift-interference, levels+pages); effects: {', '.join(EFFECTS)}")
    on: set[str] = set(EFFECTS) if tokens[0][0] == "-" else set()
    for i, (sign, name) in enumerate(tokens):
        if name in ("all", "none"):
            if i:
                raise ValueError(f"effects={text!r}: {name!r} may only come first")
            on = set(EFFECTS) if name == "all" else set()
            continue
        if name not in EFFECTS:
            raise ValueError(f"effects={text!r}: unknown effect {name!r}; effects: {', '.join(EFFECTS)} "
                             "(or all, none)")
        if sign == "-":
            on.discard(name)
        else:
            on.add(name)
    return frozenset(on)


def effects_text(effects: frozenset[str]) -> str:
    """The canonical ``effects=`` value of a set of effects."""
    if set(effects) == set(EFFECTS):
        return "all"
    if not effects:
        return "none"
    return "+".join(e for e in EFFECTS if e in effects)


@dataclass(frozen=True)
class MemoryLevel:
    """One level of the memory hierarchy: its capacity (``None``: main memory, unbounded), joules per
    byte read and written there, and its bandwidth (for the time model)."""

    name: str
    capacity_bytes: int | None
    read_j_per_byte: float
    write_j_per_byte: float
    bytes_per_s: float


@dataclass(frozen=True)
class DeviceModel:
    """A simulated device's physics (see the module docstring for each effect)."""

    name: str
    static_power_w: float
    levels: tuple[MemoryLevel, ...]
    j_per_flop: float
    flops_per_s: float
    launch_j: float
    launch_s: float
    tail_exponent: float = 2.0
    page_j: float = 0.0
    tlb_reach_bytes: int = 0
    prefetch_discount: float = 0.0
    scatter_launch_factor: float = 1.0
    compute_launch_factor: float = 1.0
    grid_rise: float = 0.0
    tau_s: float = 60.0
    dynamic_rise: float = 0.0
    static_rise: float = 0.0
    burst_rate_hz: float = 0.0
    burst_power_w: float = 0.0
    burst_alpha: float = 1.5
    burst_max_w: float = 0.0
    burst_median_s: float = 0.1
    effects: frozenset[str] = field(default=frozenset(EFFECTS))

    def __post_init__(self) -> None:
        if len(self.levels) < 3 or self.levels[-1].capacity_bytes is not None:
            raise ValueError(f"device {self.name}: needs three memory levels or more, the last unbounded")
        caps = [lv.capacity_bytes for lv in self.levels[:-1]]
        if any(c is None or c <= 0 for c in caps) or caps != sorted(caps):
            raise ValueError(f"device {self.name}: cache capacities must be > 0 and increasing")
        unknown = set(self.effects) - set(EFFECTS)
        if unknown:
            raise ValueError(f"device {self.name}: unknown effects {', '.join(sorted(unknown))}")

    def with_effects(self, effects: frozenset[str]) -> "DeviceModel":
        return replace(self, effects=frozenset(effects))

    def on(self, effect: str) -> bool:
        return effect in self.effects

    # ------------------------------------------------------------------ memory
    def level_shares(self, working_set_bytes: float) -> np.ndarray:
        """Share of a working set's traffic each level serves (sums to 1)."""
        n = len(self.levels)
        shares = np.zeros(n)
        ws = float(working_set_bytes)
        if not self.on("levels"):  # the last cache level and main memory, with a step
            shares[-1 if ws > self.levels[-2].capacity_bytes else -2] = 1.0
            return shares
        if ws <= 0:
            shares[0] = 1.0
            return shares
        served = 0.0  # cumulative share served by the levels so far
        for i, level in enumerate(self.levels):
            if level.capacity_bytes is None:
                hit = 1.0
            elif ws <= level.capacity_bytes:
                hit = 1.0
            else:
                hit = (level.capacity_bytes / ws) ** self.tail_exponent
            hit = max(hit, served)
            shares[i] = hit - served
            served = hit
        return shares

    def tlb_miss_share(self, working_set_bytes: float) -> float:
        """Share of page touches that miss the TLB: none while the working set fits its reach,
        then ``1 - reach / working set``."""
        ws = float(working_set_bytes)
        return 0.0 if ws <= self.tlb_reach_bytes else 1.0 - self.tlb_reach_bytes / ws

    # ------------------------------------------------------------------ energy
    def launch_joules(self, counts: WorkCounts) -> float:
        """Energy of the call's launches: kernel- and argument-dependent with ``launch``."""
        if counts.launches == 0:
            return 0.0
        if not self.on("launch"):
            return counts.launches * self.launch_j
        traffic = counts.bytes_read + counts.bytes_written
        per_launch = traffic / counts.launches
        if counts.lines_written > 0:
            kind = self.scatter_launch_factor
        elif counts.flops > 2 * traffic:
            kind = self.compute_launch_factor
        else:
            kind = 1.0
        grid = 1.0 + self.grid_rise * math.log2(1.0 + per_launch / GRID_BYTES)
        return counts.launches * self.launch_j * kind * grid

    def price(self, counts: WorkCounts, temperature: float = 0.0) -> float:
        """Dynamic joules (above idle) of the work ``counts`` describes, at ``temperature`` (0 cold,
        1 hot; only with ``drift``)."""
        shares = self.level_shares(counts.working_set_bytes)
        read_j = float(shares @ np.array([lv.read_j_per_byte for lv in self.levels]))
        write_j = float(shares @ np.array([lv.write_j_per_byte for lv in self.levels]))
        contiguous = counts.bytes_written - counts.scattered_bytes_written
        lines = float(counts.lines_written)
        if self.on("prefetch") and counts.line_runs_written > 0:
            neighbours = max(0, counts.lines_written - counts.line_runs_written)
            lines = counts.line_runs_written + neighbours * (1.0 - self.prefetch_discount)
        joules = counts.bytes_read * read_j + (contiguous + LINE * lines) * write_j
        if self.on("pages"):
            joules += counts.pages_written * self.page_j * self.tlb_miss_share(counts.working_set_bytes)
        joules += counts.flops * self.j_per_flop + self.launch_joules(counts)
        if self.on("drift"):
            joules *= 1.0 + self.dynamic_rise * temperature
        return joules

    def static_power(self, temperature: float = 0.0) -> float:
        """Idle power at ``temperature`` (leakage rises with it; only with ``drift``)."""
        if self.on("drift"):
            return self.static_power_w * (1.0 + self.static_rise * temperature)
        return self.static_power_w

    def seconds(self, counts: WorkCounts) -> float:
        """How long the device takes for ``counts`` (the time model of the virtual clock)."""
        shares = self.level_shares(counts.working_set_bytes)
        per_byte_s = float(shares @ np.array([1.0 / lv.bytes_per_s for lv in self.levels]))
        traffic = counts.bytes_read + counts.bytes_written
        return counts.launches * self.launch_s + traffic * per_byte_s + counts.flops / self.flops_per_s

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["effects"] = effects_text(self.effects)
        return d


class ThermalState:
    """The device's temperature state T in [0, 1] on the meter's clock: while busy it approaches 1,
    at idle it relaxes to 0, both exponentially with time constant ``tau_s`` (a first-order thermal
    RC model). Busy intervals are told in time order (:meth:`busy`); :meth:`at` reads T at any
    time, past ones included."""

    def __init__(self, tau_s: float) -> None:
        if tau_s <= 0:
            raise ValueError(f"tau_s must be > 0, got {tau_s}")
        self.tau_s = float(tau_s)
        self._t: float | None = None  # time up to which the state is known
        self._temp = 0.0
        # (t_start, t_end, T at t_start, busy) of every interval since the start, in time order
        self._log: list[tuple[float, float, float, bool]] = []
        self._ends: list[float] = []
        self._last: tuple[float, float, float] | None = None  # (t0, t1, mean T) of the last busy interval

    def _relax(self, temp: float, dt: float, busy: bool) -> float:
        target = 1.0 if busy else 0.0
        return target + (temp - target) * math.exp(-dt / self.tau_s)

    def _append(self, t0: float, t1: float, busy: bool) -> None:
        self._log.append((t0, t1, self._temp, busy))
        self._ends.append(t1)
        self._temp = self._relax(self._temp, t1 - t0, busy)
        self._t = t1

    def busy(self, t0: float, t1: float) -> float:
        """The device was busy over [t0, t1]: advance the state; returns the mean T over it."""
        if self._last is not None and self._last[0] == t0 and self._last[1] == t1:
            return self._last[2]  # another part of the same batch (a replay reports each tensor)
        if self._t is None:
            self._t = t0
        if t0 > self._t:
            self._append(self._t, t0, False)
        start = max(t0, self._t)
        dt = t1 - start
        if dt <= 0:
            return self.at(t1)
        temp0 = self._temp
        # mean of 1 - (1 - T0) exp(-s / tau) over s in [0, dt]
        mean = 1.0 - (1.0 - temp0) * self.tau_s / dt * (1.0 - math.exp(-dt / self.tau_s))
        self._append(start, t1, True)
        self._last = (t0, t1, mean)
        return mean

    def at(self, t: float) -> float:
        """T at time ``t``."""
        if self._t is None:
            return 0.0
        if t >= self._t:
            return self._relax(self._temp, t - self._t, False)
        i = bisect.bisect_left(self._ends, t)
        if i >= len(self._log):
            return self._temp
        t0, _, temp0, busy = self._log[i]
        return self._relax(temp0, max(0.0, t - t0), busy) if t >= t0 else temp0


class Interference:
    """Bursts of foreign power on the device (another process), deterministic under the seed:
    Poisson arrivals, Pareto powers, log-normal durations (see :class:`DeviceModel`)."""

    BLOCK_S = 60.0

    def __init__(self, device: DeviceModel, seed: int, origin: float = 0.0) -> None:
        self.device = device
        self.seed = int(seed)
        self.origin = float(origin)
        self._blocks: dict[int, list[tuple[float, float, float]]] = {}

    def _block(self, b: int) -> list[tuple[float, float, float]]:
        if b not in self._blocks:
            d = self.device
            rng = np.random.default_rng([self.seed, b + 2**20, 0xB0057])
            n = int(rng.poisson(d.burst_rate_hz * self.BLOCK_S))
            starts = np.sort(rng.uniform(b * self.BLOCK_S, (b + 1) * self.BLOCK_S, n))
            powers = np.minimum(d.burst_power_w * (1.0 + rng.pareto(d.burst_alpha, n)), d.burst_max_w)
            durations = np.minimum(d.burst_median_s * np.exp(rng.normal(0.0, 1.0, n)), 20 * d.burst_median_s)
            self._blocks[b] = [(float(s), float(s + u), float(p)) for s, u, p in zip(starts, durations, powers)]
        return self._blocks[b]

    def bursts(self, a: float, b: float) -> list[tuple[float, float, float]]:
        """The bursts (t_start, t_end, watts) overlapping [a, b] (meter clock)."""
        if not self.device.on("interference") or self.device.burst_rate_hz <= 0 or b <= a:
            return []
        lo, hi = a - self.origin, b - self.origin
        out = []
        first = math.floor((lo - 20 * self.device.burst_median_s) / self.BLOCK_S)
        for blk in range(first, math.floor(hi / self.BLOCK_S) + 1):
            for s, e, p in self._block(blk):
                if e > lo and s < hi:
                    out.append((s + self.origin, e + self.origin, p))
        return out

    def joules(self, a: float, b: float) -> float:
        """Foreign joules in [a, b]."""
        return sum(p * (min(e, b) - max(s, a)) for s, e, p in self.bursts(a, b))


# ---------------------------------------------------------------------------- the presets' devices
# Plausible orders of magnitude, not measurements of any product (REFERENCE.md: Horowitz, ISSCC 2014,
# 45 nm: DRAM traffic costs two to three orders of magnitude more than arithmetic; HBM ~ tens of
# pJ/byte, DDR ~ hundreds). Capacities follow the vendors' public figures cited in docs/simulator.md.
DEVICES: dict[str, DeviceModel] = {
    d.name: d
    for d in (
        DeviceModel(
            name="h100",
            static_power_w=70.0,
            # H100 SXM5: 50 MB L2 in two partitions; an SM reaches its near partition more cheaply
            # than the far one (A100/H100 whitepapers); HBM3 beyond.
            levels=(
                MemoryLevel("l2-near", 25 * 2**20, 3e-12, 5e-12, 10e12),
                MemoryLevel("l2-far", 50 * 2**20, 6e-12, 8e-12, 6e12),
                MemoryLevel("hbm", None, 30e-12, 40e-12, 2.5e12),
            ),
            j_per_flop=2e-12,
            flops_per_s=3e13,
            launch_j=2e-4,
            launch_s=4e-6,
            tail_exponent=2.0,
            page_j=1e-9,
            tlb_reach_bytes=64 * 2**20,
            prefetch_discount=0.1,
            scatter_launch_factor=1.2,
            compute_launch_factor=1.1,
            grid_rise=0.05,
            tau_s=40.0,
            dynamic_rise=0.06,
            static_rise=0.01,
            burst_rate_hz=1 / 40,
            burst_power_w=2.0,
            burst_alpha=1.5,
            burst_max_w=60.0,
            burst_median_s=0.2,
        ),
        DeviceModel(
            name="desktop-cpu",
            static_power_w=15.0,
            # 8 cores x 1 MiB private L2, 32 MiB shared L3, DDR5 (a Zen 4 desktop part's sizes)
            levels=(
                MemoryLevel("l2", 8 * 2**20, 8e-12, 12e-12, 3e11),
                MemoryLevel("l3", 32 * 2**20, 12e-12, 18e-12, 1e11),
                MemoryLevel("dram", None, 100e-12, 150e-12, 2e10),
            ),
            j_per_flop=20e-12,
            flops_per_s=2e11,
            launch_j=3e-5,
            launch_s=3e-6,
            tail_exponent=1.5,
            page_j=2e-9,
            tlb_reach_bytes=8 * 2**20,
            prefetch_discount=0.15,
            scatter_launch_factor=1.2,
            compute_launch_factor=1.1,
            grid_rise=0.05,
            tau_s=20.0,
            dynamic_rise=0.08,
            static_rise=0.02,
            burst_rate_hz=1 / 20,
            burst_power_w=0.5,
            burst_alpha=1.5,
            burst_max_w=20.0,
            burst_median_s=0.1,
        ),
        DeviceModel(
            name="rpi4",
            static_power_w=2.7,
            # BCM2711: 4 x Cortex-A72 with 32 KiB L1D each, 1 MiB shared L2, LPDDR4
            levels=(
                MemoryLevel("l1", 128 * 2**10, 10e-12, 15e-12, 2e10),
                MemoryLevel("l2", 1 * 2**20, 20e-12, 30e-12, 1e10),
                MemoryLevel("dram", None, 300e-12, 400e-12, 3e9),
            ),
            j_per_flop=60e-12,
            flops_per_s=5e9,
            launch_j=1e-5,
            launch_s=10e-6,
            tail_exponent=2.0,
            page_j=4e-9,
            tlb_reach_bytes=4 * 2**20,
            prefetch_discount=0.12,
            scatter_launch_factor=1.2,
            compute_launch_factor=1.1,
            grid_rise=0.05,
            tau_s=60.0,
            dynamic_rise=0.05,
            static_rise=0.005,
            burst_rate_hz=1 / 30,
            burst_power_w=0.02,
            burst_alpha=1.5,
            burst_max_w=0.8,
            burst_median_s=0.2,
        ),
    )
}
