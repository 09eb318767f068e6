"""NVIDIA GPUs through NVML (``nvml``, ``nvml:index=0``, ``nvml:index=0+1``).

Volta and newer GPUs have a cumulative energy counter (``nvmlDeviceGetTotalEnergyConsumption``, mJ
since the driver loaded): windows are differences of it. Older GPUs only report power
(``nvmlDeviceGetPowerUsage``, mW): a background sampler reads it about twice per sensor update
(the update period is measured by fast polling when the meter opens) and integrates it with the
trapezoid rule. Either way the public numbers are joules and seconds.

GPU selection follows CUDA: ``index`` is the CUDA ordinal the measured process sees (``cuda:N``).
When ``CUDA_VISIBLE_DEVICES`` is set, ordinals are mapped to NVML's indices through the variable's
entries (integers, or ``GPU-...`` UUIDs matched against ``nvmlDeviceGetUUID``), so
``CUDA_VISIBLE_DEVICES=2 energyprof measure --meter nvml -- ...`` measures physical GPU 2 and calls
it ``gpu0``, as the program does. Domains are named ``gpu<ordinal>``.

NVML error codes become energyprof's exceptions with the fix in the message: no library ->
MeterUnavailable (install the NVIDIA driver), NotSupported -> MeterNotSupported, NoPermission ->
MeterPermissionError, GPU lost or NVML failing during a measurement -> MeterFailure.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable, Mapping

from energyprof.errors import (
    EnergyprofError,
    MeterFailure,
    MeterSpecError,
    MeterUnavailable,
)
from energyprof.meters.base import (
    DEVICE_CALL_TIMEOUT_S,
    BackgroundReader,
    CounterMeter,
    DeviceCaller,
    MeterInfo,
    Probe,
    periodic,
)
from energyprof.meters.spec import MeterSpec, parse_spec

__all__ = [
    "NvmlMeter",
    "GpuInfo",
    "nvml_error",
    "visible_nvml_indices",
    "infer_update_period",
    "open_from_spec",
    "probe",
]

from energyprof.meters.nvml_gpus import (
    DEFAULT_SAMPLE_S,
    MAX_SAMPLE_S,
    MIN_SAMPLE_S,
    PUBLISHED_TIMING,
    TIMING_SOURCE,
    _call,
    _pynvml,
    _text,
    discover_gpus,
    GpuInfo,
    infer_update_period,
    nvml_error,
    visible_nvml_indices,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ meter
class _Integrator:
    """Trapezoid integral of one GPU's power samples (state touched under the meter's lock)."""

    __slots__ = ("last_t", "last_w", "energy_j", "samples", "max_gap_s")

    def __init__(self) -> None:
        self.last_t: float | None = None
        self.last_w = 0.0
        self.energy_j = 0.0
        self.samples = 0
        self.max_gap_s = 0.0

    def add(self, t: float, watts: float) -> float:
        """Add a sample; one not after the last (a read that finished late) is not integrated."""
        if self.last_t is not None and t <= self.last_t:
            return self.energy_j
        if self.last_t is not None:
            dt = t - self.last_t
            self.max_gap_s = max(self.max_gap_s, dt)
            self.energy_j += 0.5 * (self.last_w + watts) * dt
        self.last_t, self.last_w = t, watts
        self.samples += 1
        return self.energy_j


class NvmlMeter(CounterMeter):
    """Energy of one or more NVIDIA GPUs.

    ``indices``: CUDA ordinals to measure (default: every GPU this process can see).
    ``mode``: ``auto`` (counter on Volta+, else sampled), ``counter`` or ``sampled``.
    ``period``: ``auto`` (measure the update period by polling when opening), ``table`` (published
    figures), or seconds. ``nvml``: the pynvml function table (tests pass a fake one).
    ``call_timeout_s``: bound on any one NVML call; a call that does not return in time (a wedged
    driver) fails the window and the meter with :class:`MeterFailure` naming the call.

    Every NVML call runs through one :class:`DeviceCaller`; the power path's sampler is the common
    :class:`BackgroundReader`, and no lock is held while a device call runs.
    """

    def __init__(
        self,
        indices: list[int] | None = None,
        mode: str = "auto",
        period: str | float = "auto",
        sync_device: Any = None,
        nvml: Any = None,
        environ: Mapping[str, str] | None = None,
        call_timeout_s: float = DEVICE_CALL_TIMEOUT_S,
    ) -> None:
        super().__init__(sync_device=sync_device)
        if mode not in ("auto", "counter", "sampled"):
            raise MeterSpecError(f"nvml: mode={mode!r}; use auto, counter or sampled")
        if not (call_timeout_s > 0 and call_timeout_s < float("inf")):
            raise MeterSpecError(f"nvml: call_timeout must be a positive number of seconds, got {call_timeout_s}")
        self._env = os.environ if environ is None else environ
        self._nv = nvml if nvml is not None else _pynvml()
        nv = self._nv
        self._caller = DeviceCaller("NVML", timeout_s=call_timeout_s)
        self._lock = threading.Lock()  # integrator and counter state; never held across a device call
        self._reader: BackgroundReader | None = None
        self._initialised = False
        self._dev(nv.nvmlInit, doing="initialising NVML")
        self._initialised = True
        try:
            self.gpus = self._caller.call(discover_gpus, nv, indices, mode, environ, what="NVML device discovery")
            self.driver_version = self._driver_version()
            self._counter_origin: dict[str, int] = {}
            self._counter_last: dict[str, int] = {}
            self._integrators = {g.domain: _Integrator() for g in self.gpus if g.mode == "sampled"}
            self._set_periods(period)
            self.sample_interval_s = self._sample_interval()
            self.max_gap_s = max(1.0, 5 * self.sample_interval_s) if self.sample_interval_s else None
            self.read_counters()  # first reading: origin of the counters, first power sample
            self._info = self._make_info()
            if self._integrators:
                sampled = [g for g in self.gpus if g.mode == "sampled"]
                interval = self.sample_interval_s or DEFAULT_SAMPLE_S
                self._reader = BackgroundReader(
                    "NVML power sampler",
                    lambda stop: periodic(lambda: self._read_power(sampled), interval, stop, self.clock),
                    self._on_power,
                    clock=self.clock,
                    gap_limit_s=self.max_gap_s or float("inf"),
                    name="energyprof-nvml-sampler",
                    in_flight=self._caller.in_flight,
                ).start()
            log.info("nvml: %s", "; ".join(f"{g.domain} {g.name} ({g.arch}) {g.mode}, update period "
                                            f"{g.update_period_s} s ({g.period_source})" for g in self.gpus))
        except BaseException:
            self._shutdown()
            raise

    def _dev(self, fn: Callable[..., Any], *args: Any, doing: str, gpu: str | None = None,
             measuring: bool = False) -> Any:
        """One NVML call, bounded by the call timeout and mapped to energyprof's errors."""
        name = getattr(fn, "__name__", "NVML call")
        on = f" on {gpu}" if gpu else ""
        try:
            return self._caller.call(lambda: _call(fn, *args, doing=doing, gpu=gpu, measuring=measuring),
                                     what=f"{name}() ({doing}{on})")
        except MeterFailure:
            raise
        except MeterUnavailable as exc:
            if measuring:
                raise MeterFailure(str(exc)) from None
            raise

    # ------------------------------------------------------------------ opening helpers
    def _driver_version(self) -> str | None:
        try:
            return _text(self._dev(self._nv.nvmlSystemGetDriverVersion, doing="reading the driver version"))
        except MeterFailure:
            raise
        except Exception:
            return None

    def _set_periods(self, period: str | float) -> None:
        if isinstance(period, str) and period not in ("auto", "table"):
            try:
                period = float(period)
            except ValueError:
                raise MeterSpecError(f"nvml: period={period!r}; use auto, table or a number of seconds") from None
        if not isinstance(period, str):
            if not (period > 0 and period < float("inf")):
                raise MeterSpecError(f"nvml: period must be > 0 s, got {period}")
            for g in self.gpus:
                g.update_period_s, g.period_source = float(period), "given in the meter spec"
            return
        measured: dict[str, float | None] = {}
        if period == "auto":
            nv = self._nv
            readers: dict[str, Callable[[], float]] = {}
            for g in self.gpus:
                fn = nv.nvmlDeviceGetTotalEnergyConsumption if g.mode == "counter" else nv.nvmlDeviceGetPowerUsage
                readers[g.domain] = (lambda fn=fn, g=g: self._dev(
                    fn, g.handle, doing="measuring the update period", gpu=g.domain))
            measured = infer_update_period(readers)
        for g in self.gpus:
            value = measured.get(g.domain)
            if value is not None:
                g.update_period_s, g.period_source = value, "measured by polling when the meter opened"
            elif g.arch in PUBLISHED_TIMING:
                g.update_period_s, g.period_source = PUBLISHED_TIMING[g.arch][0], TIMING_SOURCE
            else:
                g.update_period_s, g.period_source = None, "unknown (not measured, no published figure)"

    def _sample_interval(self) -> float | None:
        periods = [g.update_period_s for g in self.gpus if g.mode == "sampled"]
        if not periods:
            return None
        known = [p for p in periods if p]
        if len(known) < len(periods):
            return DEFAULT_SAMPLE_S if not known else min(DEFAULT_SAMPLE_S, min(known) / 2)
        return min(MAX_SAMPLE_S, max(MIN_SAMPLE_S, min(known) / 2))

    # ------------------------------------------------------------------ reading
    def _read_counter(self, g: GpuInfo) -> float:
        mj = int(self._dev(self._nv.nvmlDeviceGetTotalEnergyConsumption, g.handle,
                           doing="reading the energy counter", gpu=g.domain, measuring=True))
        with self._lock:
            last = self._counter_last.get(g.domain)
            if last is not None and mj < last:
                raise MeterFailure(
                    f"the energy counter of {g.domain} went backwards ({last} -> {mj} mJ): the driver was "
                    "reloaded or the GPU reset during the measurement; the window is void"
                )
            self._counter_last[g.domain] = mj
            origin = self._counter_origin.setdefault(g.domain, mj)
        return (mj - origin) * 1e-3

    def _read_power(self, gpus: list[GpuInfo]) -> list[tuple[str, float, float]]:
        """(domain, t, watts) per GPU, ``t`` the midpoint of its read (no lock held)."""
        out = []
        for g in gpus:
            t0 = self.clock()
            mw = self._dev(self._nv.nvmlDeviceGetPowerUsage, g.handle, doing="reading power", gpu=g.domain,
                           measuring=True)
            out.append((g.domain, (t0 + self.clock()) / 2, mw * 1e-3))
        return out

    def _on_power(self, item: tuple[float, list[tuple[str, float, float]]]) -> None:
        with self._lock:
            for domain, t, watts in item[1]:
                self._integrators[domain].add(t, watts)

    def _check_reader(self) -> None:
        if self._reader is not None:
            self._reader.check(self.clock(), self.max_gap_s)

    def read_counters(self) -> dict[str, float]:
        """Joules per GPU since the meter opened (counter, or integrated power)."""
        self._check_reader()
        out: dict[str, float] = {}
        sampled = [g for g in self.gpus if g.mode == "sampled"]
        spans = []
        for g in self.gpus:
            if g.mode == "counter":
                out[g.domain] = self._read_counter(g)
                if self._caller.last_span is not None:
                    spans.append(sum(self._caller.last_span) / 2)
        if spans and not sampled:  # the window edge is when the counters were read
            self._read_t = sum(spans) / len(spans)
        for domain, t, watts in self._read_power(sampled) if sampled else ():
            with self._lock:
                out[domain] = self._integrators[domain].add(t, watts)
        return {g.domain: out[g.domain] for g in self.gpus}

    # ------------------------------------------------------------------ windows
    def _snapshot(self) -> dict[str, Any]:
        energy = self.read_counters()
        with self._lock:
            samples = {d: i.samples for d, i in self._integrators.items()}
        return {"t": self.clock(), "energy": energy, "samples": samples}

    def _energy_between(self, start: dict[str, Any], end: dict[str, Any]) -> dict[str, float]:
        if self._reader is not None:
            self._reader.check()
            gap = self._reader.longest_gap(start["t"], end["t"])
            if gap > 0:
                raise MeterFailure(
                    f"the NVML power sampler got no reading for {gap:.2f} s in or around the window (limit "
                    f"{self.max_gap_s:g} s); the energy over that stretch is unknown and the window is void"
                )
        # 0 J (window inside one sensor update) is reported as read, with details.counter_moved
        # false; the measurement protocol raises NoEnergyObserved for such measurement windows.
        return {d: end["energy"][d] - start["energy"][d] for d in end["energy"]}

    def _window_details(self, start: dict[str, Any], end: dict[str, Any]) -> dict[str, Any]:
        details: dict[str, Any] = {
            "counter_moved": any(end["energy"][d] != start["energy"][d] for d in end["energy"]),
            "modes": {g.domain: g.mode for g in self.gpus},
        }
        if self._integrators:
            with self._lock:
                max_gap = max(i.max_gap_s for i in self._integrators.values())
            details["power_samples"] = {d: end["samples"][d] - start["samples"][d] for d in end["samples"]}
            details["sample_interval_s"] = self.sample_interval_s
            details["max_sample_gap_s_since_open"] = max_gap
        return details

    # ------------------------------------------------------------------ description
    def _make_info(self) -> MeterInfo:
        kinds = {g.mode for g in self.gpus}
        periods = [g.update_period_s for g in self.gpus]
        windows = [g.averaging_window_s for g in self.gpus]
        return MeterInfo(
            backend="nvml",
            scope="gpu",
            kind="counter" if kinds == {"counter"} else "sampled",
            update_period_s=max(periods) if all(p is not None for p in periods) else None,
            resolution_j=1e-3 if kinds == {"counter"} else None,
            simulated=False,
            domains=tuple(g.domain for g in self.gpus),
            averaging_window_s=min(windows) if all(w is not None for w in windows) else None,
            # the kernels run on the first selected GPU (its CUDA ordinal, as this process sees it)
            torch_device=f"cuda:{self.gpus[0].cuda_index}",
            details={
                "driver_version": self.driver_version,
                "cuda_visible_devices": self._env.get("CUDA_VISIBLE_DEVICES"),
                "gpus": [g.to_dict() for g in self.gpus],
                "sample_interval_s": self.sample_interval_s,
                "averaging_window_source": TIMING_SOURCE,
            },
        )

    @property
    def info(self) -> MeterInfo:
        return self._info

    # ------------------------------------------------------------------ life cycle
    def _shutdown(self) -> None:
        if getattr(self, "_reader", None) is not None:
            self._reader.stop()
        if getattr(self, "_initialised", False):
            self._initialised = False
            if self._caller.wedged is None:  # a wedged driver would hang nvmlShutdown too
                try:
                    self._dev(self._nv.nvmlShutdown, doing="shutting NVML down")
                except Exception:
                    pass  # shutting down a lost GPU's library must not hide the real error
        self._caller.close()

    def close(self) -> None:
        if not self._closed:
            self._shutdown()
        super().close()


# ------------------------------------------------------------------------------ registry hooks
def _params(spec: MeterSpec) -> dict[str, Any]:
    raw = spec.get_list("index")
    indices = None
    if raw is not None:
        try:
            indices = [int(x) for x in raw]
        except ValueError:
            raise MeterSpecError(
                f"meter spec {spec.text!r}: index={spec.params['index']!r} is not a GPU index or a list "
                "written with '+' (index=0 or index=0+1)"
            ) from None
        if any(i < 0 for i in indices):
            raise MeterSpecError(f"meter spec {spec.text!r}: GPU indices are >= 0")
    mode = spec.get_str("mode", "auto")
    period = spec.get_str("period", "auto")
    call_timeout = spec.get_float("call_timeout", DEVICE_CALL_TIMEOUT_S)
    spec.check_unused()
    return {"indices": indices, "mode": mode, "period": period, "call_timeout_s": call_timeout}


def open_from_spec(spec: MeterSpec, **kwargs: Any) -> NvmlMeter:
    """``nvml[:index=N[+M...]][,mode=auto|counter|sampled][,period=auto|table|SECONDS][,call_timeout=SECONDS]``."""
    return NvmlMeter(**_params(spec), **kwargs)


def probe(spec: MeterSpec | None = None, nvml: Any = None, environ: Mapping[str, str] | None = None) -> Any:

    params = _params(spec if spec is not None else parse_spec("nvml"))
    try:
        nv = nvml if nvml is not None else _pynvml()
        _call(nv.nvmlInit, doing="initialising NVML")
    except EnergyprofError as exc:
        return Probe("nvml", False, str(exc))
    try:
        gpus = DeviceCaller("NVML", timeout_s=params["call_timeout_s"]).call(
            discover_gpus, nv, params["indices"], params["mode"] or "auto", environ, what="NVML device discovery")
        try:
            driver = _text(nv.nvmlSystemGetDriverVersion())
        except Exception:
            driver = None
    except EnergyprofError as exc:
        return Probe("nvml", False, str(exc))
    finally:
        try:
            nv.nvmlShutdown()
        except Exception:
            pass
    desc = "; ".join(
        f"{g.domain}: {g.name} ({g.arch}, {'energy counter' if g.mode == 'counter' else 'integrated power'})"
        for g in gpus
    )
    return Probe(
        "nvml",
        True,
        f"{len(gpus)} GPU(s), driver {driver or 'unknown'}: {desc}",
        {"driver_version": driver, "gpus": [g.to_dict() for g in gpus]},
    )
