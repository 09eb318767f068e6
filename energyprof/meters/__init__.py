"""Meters: NVML, amdsmi, RAPL (powercap), hwmon, batteries, external power-meter adapters, and a simulator.

``open_meter("rapl")``, ``open_meter("nvml:index=0")``, ``open_meter("sim:preset=h100,seed=1")``,
``open_meter("auto")``. ``probe_all()`` tells, for every backend, whether it is usable here and why
not. Backend modules are imported lazily, so a missing vendor library only affects its backend.

Every backend module provides ``open_from_spec(spec) -> Meter`` and ``probe(spec) -> Probe``.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from energyprof.errors import MeterSpecError, MeterUnavailable
from energyprof.meters.base import (
    CounterMeter,
    Measurement,
    Meter,
    MeterInfo,
    Probe,
    Window,
    WrapTracker,
    synchronize,
)
from energyprof.meters.spec import MeterSpec, format_spec, parse_spec

__all__ = [
    "BACKENDS",
    "AUTO_ORDER",
    "CounterMeter",
    "Measurement",
    "Meter",
    "MeterInfo",
    "MeterSpec",
    "Probe",
    "Window",
    "WrapTracker",
    "auto_choice",
    "format_spec",
    "open_meter",
    "parse_spec",
    "probe_all",
    "probe_backend",
    "synchronize",
]

log = logging.getLogger(__name__)

# backend name -> module that implements it
BACKENDS: dict[str, str] = {
    "nvml": "energyprof.meters.nvml",
    "rapl": "energyprof.meters.rapl",
    "pyrapl": "energyprof.meters.pyrapl_backend",
    "sim": "energyprof.meters.sim",
    "ina219": "energyprof.meters.ina2xx",
    "ina226": "energyprof.meters.ina2xx",
    "ina260": "energyprof.meters.ina2xx",
    "ina228": "energyprof.meters.ina2xx",
    "um24c": "energyprof.meters.umxx",
    "um25c": "energyprof.meters.umxx",
    "um34c": "energyprof.meters.umxx",
    "stream": "energyprof.meters.stream",
    "pmic": "energyprof.meters.pmic",
    "hwmon": "energyprof.meters.hwmon",
    "battery": "energyprof.meters.battery",
    "amdsmi": "energyprof.meters.amdsmi",
}

# real on-device meters that ``auto`` tries, best first (adapters need wiring parameters): the
# GPU meters (NVIDIA through NVML, AMD through amdsmi, then a GPU's own hwmon node: amdgpu, Intel
# xe/i915), the CPU package (RAPL), and last the whole device's battery (laptops, phones), whose
# readings are slow and cover everything the device powers
AUTO_ORDER: tuple[str, ...] = ("nvml", "amdsmi", "hwmon:gpu=any", "rapl", "battery")


def _module(backend: str):
    if backend not in BACKENDS:
        known = ", ".join(sorted(BACKENDS) + ["auto"])
        raise MeterSpecError(f"unknown meter backend {backend!r}; known backends: {known}")
    try:
        return importlib.import_module(BACKENDS[backend])
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("energyprof"):
            raise MeterUnavailable(
                f"backend {backend!r} is not part of this energyprof build ({exc.name} missing)"
            ) from exc
        raise


def probe_backend(spec: str | MeterSpec) -> Probe:
    s = parse_spec(spec) if isinstance(spec, str) else spec
    try:
        mod = _module(s.backend)
    except MeterUnavailable as exc:
        return Probe(s.backend, False, str(exc))
    try:
        return mod.probe(s)
    except MeterSpecError:
        raise
    except Exception as exc:  # a probe must never crash `detect`
        return Probe(s.backend, False, f"probe failed: {type(exc).__name__}: {exc}")


def probe_all() -> list[Probe]:
    """Probe every backend with default parameters (each one exactly once)."""
    return [probe_backend(parse_spec(name)) for name in BACKENDS]


def auto_choice(probes: list[Probe] | None = None) -> str | None:
    """The spec ``auto`` would open here (the first usable entry of :data:`AUTO_ORDER`), reusing
    ``probes`` (from :func:`probe_all`) for plain backend names."""
    known = {p.backend: p for p in probes or []}
    for name in AUTO_ORDER:
        spec = parse_spec(name)
        probe = known.get(spec.backend) if not spec.params else None
        if (probe or probe_backend(spec)).available:
            return name
    return None


def open_meter(spec: str | MeterSpec, **kwargs: Any) -> Meter:
    """Open a meter from a spec string. ``auto`` opens the best real meter available, or raises
    :class:`MeterUnavailable` with every backend's reason."""
    s = parse_spec(spec) if isinstance(spec, str) else spec
    if s.backend == "auto":
        if s.params:
            raise MeterSpecError(f"meter spec {s.text!r}: 'auto' takes no parameters")
        reasons = []
        for name in AUTO_ORDER:
            probe = probe_backend(parse_spec(name))
            if probe.available:
                return open_meter(name, **kwargs)
            reasons.append(f"{name}: {probe.reason}")
        raise MeterUnavailable(
            "no real energy meter is available here: " + "; ".join(reasons)
            + ". Use an external meter (e.g. 'ina219:bus=1', 'um25c:port=/dev/rfcomm0', "
            "'stream:tcp=HOST:PORT') or the simulator ('sim', labelled simulated)."
        )
    mod = _module(s.backend)
    meter = mod.open_from_spec(s, **kwargs)
    i = meter.info
    log.info("opened meter %r: backend %s, scope %s, kind %s, update period %s s, resolution %s J%s",
             s.text, i.backend, i.scope, i.kind, i.update_period_s, i.resolution_j,
             " (SIMULATED)" if i.simulated else "")
    return meter
