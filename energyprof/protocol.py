"""The measurement protocol: joules per kernel call from meters that are slow, coarse or partial.

A cumulative counter such as NVML on A100/H100 changes only every ~100 ms, and each change adds the
power averaged over only ~25 ms of the period (Yang et al., SC'24). One window around a 10 ms
kernel therefore reads zero or several times the truth. The protocol, for a set-up workload and a
meter, adapting to what the meter declares (``MeterInfo``: kind, update period, averaging window):

1. optional cool-down, then an **idle baseline** of ``idle_windows`` windows in the same session;
2. **warm-up**: the kernel runs for ``warmup_s``, which also times one call;
3. ``trials`` **kernel windows**, each at least ``min_window_s``, ``min_periods`` update periods and
   ``min_calls`` calls long, with the kernel running back to back (in batches, synchronised with
   the device) from one averaging window before the window opens until it closes;
4. each trial starts after a **random delay** of up to one update period (a shifted phase, so that
   the trials' edge errors are independent), and when one period is not negligible against a
   window (more than ``max_edge_error``), windows are **aligned to counter updates**: they open
   right after the counter is seen to move and close after a fixed number of further moves
   (``ceil(window / period)``; never "the first move after the window is long enough", which would
   pick windows by their edge lags), so that a window holds whole update periods, all of them
   sampled while the kernel ran;
5. result: joules per call above the idle baseline, with a ``confidence`` interval, the number of
   calls and windows, and every window as a row of a pandas DataFrame (``result.table``) carrying
   the meter's backend and the ``simulated`` flag.

The interval (docs/protocol.md) combines the error sources the protocol has: the trials' scatter
(noise, phase), the edges (each edge stands for a counter reading up to ``edge_s`` away: one
update period, or one step when aligned; variance (P * edge_s)^2 / 6 per window, plus the
reading's resolution), used as a floor under the trials' scatter because under a fixed phase
relation a few trials can all draw the same edge error, and the idle baseline's own uncertainty
(same floor). Student t with Welch-Satterthwaite degrees of freedom; a variance taken from the
model counts as known (no t widening).

After each timed batch the protocol tells the meter what ran (``meter.report_work``): a no-op on
physical meters, the ground truth of the simulator. A workload that reports its own work
(``reports_work``, the simulator's stand-in kernel) is not reported again. All timing uses the
meter's clock and sleep, so the protocol runs unchanged on the simulator's virtual clock.

A window in which the counter never moves raises :class:`~energyprof.errors.NoEnergyObserved`;
it is never reported as zero joules.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd

from energyprof.counts import WorkCounts
from energyprof.errors import EnergyprofError, MeterFailure, NoEnergyObserved
from energyprof.meters.base import Meter, MeterInfo, synchronize

__all__ = ["MeasurementProtocol", "ProtocolResult", "ProtocolError", "IdleBaseline"]

log = logging.getLogger(__name__)

_WINDOW = "energyprof.protocol"
_POLLS = ("energyprof.protocol.poll-a", "energyprof.protocol.poll-b")


class ProtocolError(EnergyprofError):
    """The protocol cannot time this workload on this meter (e.g. the meter's clock does not advance
    while the workload runs: a virtual-clock simulator only sees stand-in kernels)."""


@dataclass(frozen=True)
class ProtocolResult:
    """Joules per kernel call, measured by :class:`MeasurementProtocol`.

    ``joules_per_call`` is the energy above the idle baseline; ``total_joules_per_call`` adds the
    idle power's share of a call's time. ``table`` has one row per window (idle and kernel)."""

    workload: dict[str, Any]
    joules_per_call: float
    ci_low_j: float
    ci_high_j: float
    confidence: float
    total_joules_per_call: float
    seconds_per_call: float
    idle_power_w: float
    calls: int
    windows: int
    idle_windows: int
    aligned: bool
    counts: WorkCounts
    meter: MeterInfo
    table: pd.DataFrame = field(repr=False, compare=False)

    @property
    def simulated(self) -> bool:
        return self.meter.simulated

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("counts", "meter", "table")}
        d.update(counts=self.counts.to_dict(), meter=self.meter.to_dict(), simulated=self.simulated)
        d["table"] = json.loads(self.table.to_json(orient="records"))
        return d

    def summary(self) -> str:
        w = self.workload
        label = " -- SIMULATED, not a physical measurement" if self.simulated else ""
        what = ", ".join(f"{k}={v}" for k, v in w.items() if k != "workload")
        pct = round(100 * self.confidence)
        return (
            f"{w['workload']}{f' ({what})' if what else ''}\n"
            f"  {self.joules_per_call:.6g} J per call above idle "
            f"({pct} % CI {self.ci_low_j:.6g} .. {self.ci_high_j:.6g} J)\n"
            f"  {self.total_joules_per_call:.6g} J per call including idle power, "
            f"{self.seconds_per_call:.6g} s per call\n"
            f"  {self.calls} calls in {self.windows} kernel windows, {self.idle_windows} idle windows "
            f"(idle {self.idle_power_w:.4g} W), windows aligned to counter updates: "
            f"{'yes' if self.aligned else 'no'}\n"
            f"  meter: {self.meter.backend}, scope {self.meter.scope}{label}"
        )


@dataclass(frozen=True)
class IdleBaseline:
    """Idle power measured by the protocol's idle windows, with its standard error."""

    power_w: float
    se_w: float
    windows: int
    measured_at: float  # meter clock
    dof: float = math.inf  # degrees of freedom of se_w (inf: from the meter's declared error model)


class MeasurementProtocol:
    """Measure a set-up workload's joules per call on a meter (see the module docstring).

    Parameters are stored as given (scikit-learn style); ``measure(workload, meter)`` runs it.
    ``random_state`` seeds the phase shifts (an int makes a virtual-clock run reproducible).
    """

    def __init__(
        self,
        min_window_s: float = 1.0,
        min_periods: int = 10,
        min_calls: int = 32,
        trials: int = 4,
        idle_windows: int | None = None,
        warmup_s: float = 0.25,
        cooldown_s: float = 0.0,
        max_edge_error: float = 0.01,
        edge_timeout_periods: float = 10.0,
        confidence: float = 0.95,
        random_state: int | None = None,
    ) -> None:
        self.min_window_s = min_window_s
        self.min_periods = min_periods
        self.min_calls = min_calls
        self.trials = trials
        self.idle_windows = idle_windows
        self.warmup_s = warmup_s
        self.cooldown_s = cooldown_s
        self.max_edge_error = max_edge_error
        self.edge_timeout_periods = edge_timeout_periods
        self.confidence = confidence
        self.random_state = random_state

    def measure(self, workload: Any, meter: Meter, idle: "IdleBaseline | None" = None) -> ProtocolResult:
        """Measure ``workload``; ``idle`` reuses a baseline measured earlier in the same session
        (:meth:`measure_idle`) instead of measuring one for this workload."""
        self._validate()
        if not hasattr(workload, "counts_"):
            raise ProtocolError(f"{workload!r} is not set up; call workload.setup(device) first")
        return _Session(self, workload, meter, idle).run()

    def measure_idle(self, meter: Meter) -> "IdleBaseline":
        """The idle baseline alone (its windows as :meth:`measure` takes them), to share across the
        measurements of a session: a calibration re-measures it every few minutes."""
        self._validate()
        session = _Session(self, None, meter)
        session.idle_windows()
        t = pd.DataFrame(session.rows)
        power, se, dof = _idle_stats(t, meter.info.resolution_j or 0.0)
        return IdleBaseline(power_w=power, se_w=se, windows=len(t), measured_at=float(t.t_end.max()), dof=dof)

    def _validate(self) -> None:
        if self.trials < 2 or (self.idle_windows is not None and self.idle_windows < 2):
            raise ValueError("trials and idle_windows must be >= 2 (a confidence interval needs two)")
        if self.min_window_s <= 0 or self.min_periods < 1 or self.min_calls < 1:
            raise ValueError("min_window_s must be > 0, min_periods and min_calls >= 1")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.warmup_s < 0 or self.cooldown_s < 0 or self.max_edge_error <= 0 or self.edge_timeout_periods <= 1:
            raise ValueError("warmup_s and cooldown_s must be >= 0, max_edge_error > 0, edge_timeout_periods > 1")


def _idle_stats(idle: pd.DataFrame, resolution_j: float) -> tuple[float, float, float]:
    """Idle power, its standard error and degrees of freedom from idle windows: the windows'
    scatter, or the meter's declared edge and resolution error where that is larger (then known,
    not estimated: infinite degrees of freedom)."""
    power = float(idle.power_w.mean())
    edge_var_j2 = ((idle.power_w * idle.edge_s) ** 2 + resolution_j**2) / 6.0
    s2 = float(idle.power_w.var(ddof=1))
    m2 = float((edge_var_j2 / idle.seconds**2).mean())
    return power, math.sqrt(max(s2, m2) / len(idle)), (len(idle) - 1 if s2 >= m2 else math.inf)


class _Session:
    """State of one ``measure`` call."""

    def __init__(self, protocol: MeasurementProtocol, workload: Any, meter: Meter,
                 idle: IdleBaseline | None = None) -> None:
        self.p = protocol
        self.idle = idle
        self.name = getattr(workload, "name", None) or "idle baseline"
        self.workload = workload
        self.meter = meter
        self.info = meter.info
        self.period = self.info.update_period_s
        self.preroll_s = self.info.averaging_window_s or self.period or 0.0
        self.rng = np.random.default_rng(protocol.random_state)
        self.rows: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ steps
    def _batch(self, calls: int) -> tuple[float, float]:
        """Run ``calls`` kernel calls back to back; report them to the meter."""
        t0 = self.meter.clock()
        for _ in range(calls):
            self.workload()
        synchronize(self.workload.device_)
        t1 = self.meter.clock()
        if not self.workload.reports_work:
            # a replay of several tensors reports each tensor's work: each has its own working set
            for part in getattr(self.workload, "count_parts_", None) or (self.workload.counts_,):
                self.meter.report_work(part.scaled(calls), t0, t1)
        return t0, t1

    def _start_polling(self) -> None:
        self._poll = 0
        self.meter.begin(_POLLS[0])

    def _moved(self) -> bool:
        """Has the counter moved since the last poll? Two overlapping windows take turns: the next
        one opens before the current one closes, so no movement can fall between two polls."""
        current, self._poll = _POLLS[self._poll], 1 - self._poll
        self.meter.begin(_POLLS[self._poll])
        return self.meter.end(current).energy_j != 0

    def _aligned(self, window_s: float) -> bool:
        return bool(self.info.kind == "counter" and self.period and self.period / window_s > self.p.max_edge_error)

    def _window_s(self, seconds_per_call: float = 0.0) -> float:
        return max(self.p.min_window_s, self.p.min_periods * (self.period or 0.0), self.p.min_calls * seconds_per_call)

    # ------------------------------------------------------------------ one window
    def _window(self, role: str, trial: int, step: Callable[[], int], window_s: float, aligned: bool, min_calls: int) -> None:
        """Run ``step`` (returns the calls it ran) until the window is long enough; record a row."""
        meter, clock = self.meter, self.meter.clock
        timeout = self.p.edge_timeout_periods * (self.period or 0.0)
        sync = getattr(self.workload, "device_", None)
        try:
            start = clock()
            while clock() - start < self.preroll_s:
                step()
            if aligned:  # open the window right after the counter moves
                self._start_polling()
                waited = clock()
                while True:
                    step()
                    now = clock()  # before the poll: its reading is at least this recent
                    if self._moved():
                        break
                    if now - waited > timeout:
                        self._never_moved(role, now - waited)
            meter.begin(_WINDOW, sync=sync)
            t0 = last_edge = clock()
            calls = updates = steps = 0
            # An aligned window stops after a fixed number of counter updates, never on the clock:
            # stopping at "the first update after window_s" would pick windows by their edge lags
            # (a late last update makes the window one period longer), a bias the trials cannot see.
            needed_updates = max(1, math.ceil(window_s / self.period - 1e-9)) if aligned else 0
            while True:
                calls += step()
                steps += 1
                now = clock()
                if not aligned:
                    if now - t0 >= window_s and calls >= min_calls:
                        break
                elif self._moved():
                    updates, last_edge = updates + 1, clock()  # after the poll: no stall can hide in between
                    if updates >= needed_updates and calls >= min_calls:
                        break
                elif now - last_edge > timeout:
                    self._never_moved(role, now - last_edge)
            m = meter.end(_WINDOW, sync=sync)
        finally:
            for name in (_WINDOW, *_POLLS):
                meter.discard(name)
        if m.energy_j == 0:
            self._never_moved(role, m.seconds)
        self.rows.append({
            "role": role, "trial": trial, "aligned": aligned, "calls": calls, "seconds": m.seconds,
            "energy_j": m.energy_j, "power_w": m.energy_j / m.seconds if m.seconds > 0 else math.nan,
            "counter_updates": updates if aligned else None, "t_start": t0, "t_end": t0 + m.seconds,
            "started_at": m.started_at, "edge_s": self._edge_s(aligned, m.seconds, steps),
        })

    def _edge_s(self, aligned: bool, seconds: float, steps: int) -> float:
        """How far each edge of a window may lie from the counter reading that stands for it: an
        aligned window's edge lags its counter update by up to one step (the poll follows a step);
        an unaligned one reads the last update, up to one update period old. Sampled meters
        interpolate their edges (0)."""
        if self.info.kind != "counter" or not self.period:
            return 0.0
        return seconds / max(steps, 1) if aligned else float(self.period)

    def _never_moved(self, role: str, seconds: float) -> None:
        i = self.info
        period = f"an update every {i.update_period_s:g} s" if i.update_period_s else "no update period"
        raise NoEnergyObserved(
            f"the {i.backend} meter's counter did not move in {seconds:.3g} s of a {role} window (it declares "
            f"{period}, resolution {i.resolution_j} J): the window is too short for this meter, or the meter "
            "does not observe this device. Lengthen the windows (min_window_s, --min-window-s) or check the "
            "meter's scope; this is never reported as zero joules."
        )

    # ------------------------------------------------------------------ the protocol
    def _warm_up(self) -> float:
        """Run the kernel for ``warmup_s`` in doubling batches; return seconds per call (the median
        over the batches long enough to time, so that one hiccup does not decide it)."""
        target = min(0.01, self.period / 20) if self.period else 0.01
        calls, start, per_call = 1, self.meter.clock(), []
        while True:
            t0, t1 = self._batch(calls)
            if t1 - t0 <= 0 and calls >= 64:
                raise ProtocolError(
                    f"the meter's clock did not advance while {calls} calls of {self.workload!r} ran: a "
                    "virtual-clock simulator ('clock=virtual') only sees stand-in kernels; measure real "
                    "kernels with a real clock (e.g. 'sim:preset=h100' or a physical meter)"
                )
            if t1 - t0 < target:
                calls *= 2
                continue
            per_call.append((t1 - t0) / calls)
            if t1 - start >= self.p.warmup_s:
                return float(np.median(per_call))

    def idle_windows(self) -> None:
        p, meter = self.p, self.meter
        idle_s = self._window_s()
        idle_aligned = self._aligned(idle_s)
        idle_step_s = self.period / 50 if idle_aligned else idle_s / 20

        def idle() -> int:
            meter.sleep(idle_step_s)
            return 0

        n_idle = p.idle_windows or p.trials
        log.info("protocol: %s on %s: %d idle windows of %.3g s (aligned to counter updates: %s)",
                 self.name, self.info.backend, n_idle, idle_s, idle_aligned)
        for i in range(n_idle):
            self._guarded("idle", i, n_idle, idle, idle_s, idle_aligned, 0)

    def run(self) -> ProtocolResult:
        p, meter = self.p, self.meter
        meter.sleep(p.cooldown_s)
        if self.idle is None:
            self.idle_windows()
        seconds_per_call = self._warm_up()
        window_s = self._window_s(seconds_per_call)
        short = bool(self.period) and seconds_per_call < self.period
        aligned = short and self._aligned(window_s)
        step_s = self.period / 20 if aligned else window_s / 50
        batch = max(1, math.floor(step_s / seconds_per_call))

        def kernel() -> int:
            self._batch(batch)
            return batch

        log.info("protocol: %s: %.3g s per call, %d kernel windows of >= %.3g s in batches of %d calls "
                 "(aligned to counter updates: %s)", self.name, seconds_per_call, p.trials,
                 window_s, batch, aligned)
        for trial in range(p.trials):
            if self.period:  # a random start phase against the counter's updates: independent edge errors
                meter.sleep(float(self.rng.uniform(0.0, self.period)))
            self._guarded("kernel", trial, p.trials, kernel, window_s, aligned, p.min_calls)
        result = self._result(aligned)
        log.info("protocol: %s: %.6g J per call above idle (%g %% CI %.6g .. %.6g), idle %.4g W%s",
                 self.name, result.joules_per_call, 100 * p.confidence, result.ci_low_j,
                 result.ci_high_j, result.idle_power_w, " [SIMULATED]" if result.simulated else "")
        return result

    def _guarded(self, role: str, index: int, count: int, *args: Any) -> None:
        """One window; a meter failing in it is re-raised naming the workload and the window, with
        the windows finished so far attached (``MeterFailure.finished``, a DataFrame)."""
        try:
            self._window(role, index, *args)
        except MeterFailure as exc:
            where = f"{role} window {index + 1} of {count}"
            finished = self._finished_table()
            log.info("protocol: %s failed in its %s after %d finished windows: %s",
                     self.name, where, len(finished), exc)
            raise MeterFailure(
                f"the {self.info.backend} meter failed while measuring {self.name!r} in its "
                f"{where} ({len(finished)} windows finished before it are kept in this error's "
                f"'finished' table): {exc}",
                workload=self.name, window=where, finished=finished,
            ) from exc
        row = self.rows[-1]
        log.debug("protocol: %s %s window %d: %.4g J in %.4g s, %d calls", self.name, role,
                  index + 1, row["energy_j"], row["seconds"], row["calls"])

    def _finished_table(self) -> pd.DataFrame:
        """The windows measured so far, labelled as in ``ProtocolResult.table``."""
        t = pd.DataFrame(self.rows)
        i = self.info
        t["workload"] = self.name
        t["backend"], t["scope"], t["simulated"] = i.backend, i.scope, i.simulated
        t.index.name = "window"
        return t

    def _result(self, aligned: bool) -> ProtocolResult:
        from scipy import stats

        t = pd.DataFrame(self.rows)
        idle, kern = t[t.role == "idle"], t[t.role == "kernel"]
        if self.idle is not None:  # a baseline shared by the session's measurements
            idle_w, se_idle_w, dof_idle = self.idle.power_w, self.idle.se_w, self.idle.dof
        else:
            idle_w, se_idle_w, dof_idle = _idle_stats(idle, self.info.resolution_j or 0.0)
        t["total_joules_per_call"] = (t.energy_j / t.calls).where(t.role == "kernel")
        t["joules_per_call"] = ((t.energy_j - idle_w * t.seconds) / t.calls).where(t.role == "kernel")
        per_trial = t.joules_per_call[t.role == "kernel"]
        seconds_per_call = float((kern.seconds / kern.calls).mean())  # so total = above idle + idle share
        # Each window's own error, from what the meter declares: each edge stands for a counter
        # reading up to edge_s away (uniform lag, independent edges under a random phase: variance
        # (P * edge_s)^2 / 6) and each reading is quantised to resolution_j (res^2 / 6). Under a fixed
        # phase relation these errors take only two values, which a few trials can all draw alike,
        # so the trials' scatter is used only where it is larger than this model says.
        res = self.info.resolution_j or 0.0
        edge_var_j2 = ((t.power_w * t.edge_s) ** 2 + res**2) / 6.0
        # A variance taken from the model is known, not estimated: it adds no Student-t widening
        # (infinite degrees of freedom in the Welch-Satterthwaite sum below).
        s2_trials = float(per_trial.var(ddof=1))
        m2_trials = float((edge_var_j2[t.role == "kernel"] / kern.calls**2).mean())
        dof_trials = len(kern) - 1 if s2_trials >= m2_trials else math.inf
        var_trials = max(s2_trials, m2_trials) / len(kern)
        var_idle = (se_idle_w * seconds_per_call) ** 2
        se = math.sqrt(var_trials + var_idle)
        if se > 0:  # Welch-Satterthwaite degrees of freedom
            denominator = var_trials**2 / dof_trials + var_idle**2 / dof_idle
            dof = se**4 / denominator if denominator > 0 else math.inf
            half = float(stats.t.ppf(0.5 + self.p.confidence / 2, dof)) * se
        else:
            half = 0.0
        mean = float(per_trial.mean())
        i = self.info
        t["workload"] = self.name
        t["backend"], t["scope"], t["simulated"] = i.backend, i.scope, i.simulated
        t.index.name = "window"
        return ProtocolResult(
            workload=self.workload.describe(),
            joules_per_call=mean,
            ci_low_j=mean - half,
            ci_high_j=mean + half,
            confidence=self.p.confidence,
            total_joules_per_call=float(t.total_joules_per_call.mean()),
            seconds_per_call=seconds_per_call,
            idle_power_w=idle_w,
            calls=int(kern.calls.sum()),
            windows=len(kern),
            idle_windows=self.idle.windows if self.idle is not None else len(idle),
            aligned=aligned,
            counts=self.workload.counts_,
            meter=i,
            table=t,
        )
