"""A device on battery, through Linux's ``power_supply`` class (``battery``, ``battery:name=BAT0``).

Laptops (ACPI ``BAT0``, ``BAT1``) and Android phones (the fuel gauge's ``battery`` node) publish
their battery under ``/sys/class/power_supply/<name>/`` (Documentation/ABI/testing/sysfs-class-power,
Documentation/power/power_supply_class.rst). What the meter can read, in the kernel's units:

* ``power_now`` (uW): ACPI batteries that report in mW units (drivers/acpi/battery.c);
* ``current_now`` (uA) x ``voltage_now`` (uV): every fuel gauge; ACPI batteries in mA units;
* ``energy_now`` (uWh): the remaining energy, a counter that falls while the battery discharges;
  the embedded controller refreshes it only every few seconds, in coarse steps;
* ``charge_counter`` (uAh, Android gauges): the remaining charge, a counter; times the voltage it
  gives joules.

``source=auto`` (the default) takes the first of ``power`` (power_now), ``current``
(current_now x voltage_now), ``energy`` (energy_now), ``charge_counter`` that the battery has and
that reads a non-zero value: instantaneous readings are polled (``rate_hz``, default 10) and
integrated by the sampling core, which resolves a window to a poll interval, while the two
counters move in steps of several joules every few seconds. ``source=energy`` or
``source=charge_counter`` reads a counter at the window edges (a :class:`CounterMeter`); its slow
refresh is declared as the meter's ``update_period_s`` (``period=SECONDS``, default 5 s), so that
the measurement protocol makes windows long against it and aligns them to the counter's moves.
The chosen source is in ``info.details["battery_source"]`` and in every measurement's details.

Quirks, explicit and never guessed silently:

* Sign. The ABI says that ``current_now`` (and the ``power_now`` some drivers add) is negative
  while the battery discharges; ACPI reports the discharge rate as a positive number, and so do
  many vendor fuel gauges. ``current_sign=auto`` (the default) reads the sign from the first
  reading while the status says ``Discharging`` and records it (``details["discharge_sign"]``);
  ``current_sign=negative|positive`` states it. A reading of the other sign during a window is
  current flowing *into* the battery and counts negative.
* Units. ``current_now`` is uA and ``voltage_now`` uV by the ABI; some vendors write mA or mV.
  A value that cannot be in the ABI's unit (a battery voltage under 1 V in uV; a discharge under
  5 mW) is refused with the key that states the unit (``current_unit=mA``, ``voltage_unit=mV``).
* Charging. A battery whose status is ``Charging``, ``Full`` or ``Not charging``, or beside a
  mains, USB or wireless supply that is online, does not carry the device's power: the meter
  refuses to open (and a window fails) with "the battery is charging: unplug the charger to
  measure". ``Unknown`` counts as discharging only while no external supply is online.

Over adb (``adb=SERIAL``, ``adb_path=adb``): the files of an Android phone are read from this
host with ``adb -s SERIAL exec-out``, one round trip per poll; the phone must be on its battery,
so connect over Wi-Fi (wireless debugging), not a USB cable, which would charge it.

Keys: ``root`` (default ``/sys/class/power_supply``; tests pass a tree written in a temporary
folder), ``adb``, ``adb_path``, ``name`` (a supply, or several joined with ``+``; default every system battery),
``source``, ``current_sign``, ``current_unit``, ``voltage_unit``, ``period`` and the sampled-meter
keys ``rate_hz``, ``max_gap_s``, ``startup_s``. Scope ``battery``: everything the device draws
from its battery (screen, radios, SoC), not one chip.
"""

from __future__ import annotations

import errno
import os
import statistics
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from energyprof.errors import (
    EnergyprofError,
    MeterFailure,
    MeterPermissionError,
    MeterSpecError,
    MeterUnavailable,
)
from energyprof.meters.base import CounterMeter, MeterInfo, Probe
from energyprof.meters.sampled import PolledSource, SampledMeter, SampledOptions
from energyprof.meters.spec import MeterSpec
from energyprof.meters.supply_files import LOCAL, AdbFiles, Files

__all__ = ["BatteryCharging", "QuirkUnresolved", "Battery", "list_supplies", "open_from_spec", "probe", "CHARGING_MESSAGE"]

DEFAULT_ROOT = "/sys/class/power_supply"
DEFAULT_RATE_HZ = 10.0
DEFAULT_PERIOD_S = 5.0  # assumed refresh of a battery's readings when not given or seen
CHARGING_MESSAGE = "the battery is charging: unplug the charger to measure"
SOURCES = ("power", "current", "energy", "charge_counter")
NOT_DISCHARGING = ("Charging", "Full", "Not charging")
EXTERNAL_TYPES = ("Mains", "USB", "Wireless", "UPS")
UWH_TO_J = 3.6e-3  # 1 uWh = 3.6 mJ
UAH_TO_C = 3.6e-3  # 1 uAh = 3.6 mC
MIN_VOLTS, MAX_VOLTS = 1.0, 60.0  # a battery pack's voltage (phones 3.4-4.5 V, laptops 7-20 V)
MIN_DISCHARGE_W = 0.05  # a running device draws more than this (a phone asleep: 5-20 mA)
_GONE = (errno.ENOENT, errno.ENODEV, errno.ENXIO)
_UNIT = {"uA": 1e-6, "mA": 1e-3, "uV": 1e-6, "mV": 1e-3}


class BatteryCharging(MeterUnavailable):
    """The battery charges, is full or sits beside an online charger: it does not carry the load."""


class QuirkUnresolved(MeterUnavailable):
    """A sign or unit the meter cannot read from the battery itself: the user states it."""


class _Charging(EnergyprofError):
    """Raised by a poll that finds the battery charging (not an I/O error: never retried)."""


# --------------------------------------------------------------------------- files


def _read(path: str, fs: Files = LOCAL) -> str:
    return fs.read(path)


def _read_int(path: str, fs: Files = LOCAL) -> int:
    try:
        text = _read(path, fs)
    except PermissionError as exc:
        raise MeterPermissionError(
            f"cannot read {path}: {exc}. On Android an app (Termux) is often denied the battery files by "
            "SELinux: read them over 'adb shell' or as root (see docs/power-meters.md)"
        ) from exc
    except OSError as exc:
        if exc.errno in _GONE:
            raise MeterFailure(f"{path} is gone ({os.strerror(exc.errno)}): the battery was removed "
                               "or its driver unbound") from exc
        raise
    try:
        return int(text)
    except ValueError:
        raise MeterFailure(f"{path} holds {text[:40]!r}, not an integer") from None


def _read_opt(path: str, fs: Files = LOCAL) -> str | None:
    try:
        return _read(path, fs)
    except OSError:
        return None


_READINGS = ("power_now", "current_now", "voltage_now", "energy_now", "charge_counter")
_ATTRS = ("type", "scope", "status", "online", "model_name") + _READINGS


def list_supplies(root: str = DEFAULT_ROOT, fs: Files = LOCAL) -> list[dict[str, Any]]:
    """Every supply under ``root``: name, type, scope, status, online, and which readings it has."""
    if not fs.isdir(root):
        raise MeterUnavailable(f"no power supplies: {root} does not exist on {fs.description} (not Linux, or "
                               "no power_supply class)")
    names = sorted(fs.listdir(root))
    fs.prefetch([os.path.join(root, n, a) for n in names for a in _ATTRS])
    out = []
    for name in names:
        folder = os.path.join(root, name)
        values: dict[str, str | None] = {}
        denied = []
        for attr in _ATTRS:
            try:
                values[attr] = fs.read(os.path.join(folder, attr))
            except PermissionError:
                values[attr] = None
                denied.append(attr)
            except OSError:
                values[attr] = None
        if values["type"] is None:
            continue
        out.append({
            "name": name,
            "path": folder,
            "type": values["type"],
            "scope": values["scope"],
            "status": values["status"],
            "online": values["online"],
            "model": values["model_name"],
            "readings": [f for f in _READINGS if values[f] is not None],
            "denied": denied,
        })
    return out


def _system_batteries(supplies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # scope "Device" marks a peripheral's battery (a wireless mouse): not what the host runs on
    return [s for s in supplies if s["type"] == "Battery" and (s["scope"] or "System") != "Device"]


def _online_chargers(external: list[dict[str, Any]], fs: Files = LOCAL) -> list[str]:
    names = []
    for s in external:
        online = _read_opt(os.path.join(s["path"], "online"), fs)
        if online is not None and online.strip() not in ("", "0"):
            names.append(s["name"])
    return names


# --------------------------------------------------------------------------- one battery
@dataclass
class Battery:
    """One battery node and how it is read (its quirks made explicit)."""

    name: str
    path: str
    source: str
    discharge_sign: int = 0  # +1: discharge reads positive (ACPI, many gauges); -1: negative (the ABI)
    current_unit: str = "uA"
    voltage_unit: str = "uV"
    sign_basis: str = ""
    notes: list[str] = field(default_factory=list)
    fs: Files = field(default=LOCAL, repr=False)

    def file(self, attr: str) -> str:
        return os.path.join(self.path, attr)

    def files(self) -> list[str]:
        """Every file one reading of this battery takes (for a one-round-trip prefetch)."""
        names = {"power": ["power_now"], "current": ["current_now", "voltage_now"], "energy": ["energy_now"],
                 "charge_counter": ["charge_counter", "voltage_now"]}[self.source]
        return [self.file(n) for n in ["status", *names]]

    def status(self) -> str:
        return _read_opt(self.file("status"), self.fs) or "Unknown"

    def volts(self) -> float:
        return _read_int(self.file("voltage_now"), self.fs) * _UNIT[self.voltage_unit]

    def raw_watts(self) -> float:
        """The instantaneous reading in watts, with the device's sign."""
        if self.source == "power":
            return _read_int(self.file("power_now"), self.fs) * 1e-6
        return _read_int(self.file("current_now"), self.fs) * _UNIT[self.current_unit] * self.volts()

    def watts(self) -> float:
        """Power out of the battery (negative when charge flows in)."""
        return self.discharge_sign * self.raw_watts()

    def remaining_j(self) -> float:
        """The counter sources: energy left in the battery (joules, falls as it discharges).
        ``charge_counter`` is turned into joules at the present voltage; a window takes its
        difference at the mean of its edges' voltages (see BatteryCounterMeter)."""
        if self.source == "energy":
            return _read_int(self.file("energy_now"), self.fs) * UWH_TO_J
        return _read_int(self.file("charge_counter"), self.fs) * UAH_TO_C

    def to_dict(self) -> dict[str, Any]:
        reading = {"power": "power_now (uW)", "current": f"current_now ({self.current_unit}) x voltage_now "
                   f"({self.voltage_unit})", "energy": "energy_now (uWh, a counter)",
                   "charge_counter": f"charge_counter (uAh, a counter) x voltage_now ({self.voltage_unit})"}
        d: dict[str, Any] = {"name": self.name, "path": self.path, "source": self.source,
                             "reading": reading[self.source]}
        if self.source in ("power", "current"):
            d["discharge_sign"] = "positive" if self.discharge_sign > 0 else "negative"
            d["sign_basis"] = self.sign_basis
        if self.notes:
            d["notes"] = list(self.notes)
        return d


# --------------------------------------------------------------------------- charging
def _check_discharging(batteries: list[Battery], external: list[dict[str, Any]]) -> dict[str, str]:
    """Statuses of the batteries; raise BatteryCharging when any does not carry the load."""
    statuses = {b.name: b.status() for b in batteries}
    online = _online_chargers(external, batteries[0].fs if batteries else LOCAL)
    bad = {n: s for n, s in statuses.items() if s in NOT_DISCHARGING}
    if bad or online:
        parts = [f"{n} reports status {s!r}" for n, s in bad.items()]
        if online:
            parts.append(f"external supply online: {', '.join(online)}")
        raise BatteryCharging(f"{CHARGING_MESSAGE} ({'; '.join(parts)})")
    return statuses


# --------------------------------------------------------------------------- opening
@dataclass(frozen=True)
class _Options:
    root: str
    names: list[str] | None
    source: str
    current_sign: str
    current_unit: str
    voltage_unit: str
    period_s: float | None
    fs: Files = LOCAL


def _options(spec: MeterSpec) -> _Options:
    opts = _Options(
        root=spec.get_str("root", DEFAULT_ROOT) or DEFAULT_ROOT,
        names=spec.get_list("name"),
        source=spec.get_str("source", "auto") or "auto",
        current_sign=spec.get_str("current_sign", "auto") or "auto",
        current_unit=spec.get_str("current_unit", "uA") or "uA",
        voltage_unit=spec.get_str("voltage_unit", "uV") or "uV",
        period_s=spec.get_float("period"),
    )
    serial = spec.get_str("adb")
    adb_path = spec.get_str("adb_path", "adb") or "adb"
    if serial:
        opts = replace(opts, fs=AdbFiles(serial, adb_path))
    checks = (("source", opts.source, ("auto",) + SOURCES), ("current_sign", opts.current_sign,
              ("auto", "negative", "positive")), ("current_unit", opts.current_unit, ("uA", "mA")),
              ("voltage_unit", opts.voltage_unit, ("uV", "mV")))
    for key, value, allowed in checks:
        if value not in allowed:
            raise MeterSpecError(f"meter spec {spec.text!r}: {key}={value!r}; use one of {', '.join(allowed)}")
    if opts.period_s is not None and not (opts.period_s > 0 and opts.period_s < float("inf")):
        raise MeterSpecError(f"meter spec {spec.text!r}: period must be a positive number of seconds")
    return opts


def _pick_batteries(opts: _Options) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    supplies = list_supplies(opts.root, opts.fs)
    external = [s for s in supplies if s["type"] in EXTERNAL_TYPES]
    if opts.names:
        by_name = {s["name"]: s for s in supplies}
        picked = []
        for n in opts.names:
            if n not in by_name:
                found = ", ".join(f"{s['name']} ({s['type']})" for s in supplies) or "none"
                raise MeterUnavailable(f"battery: no power supply named {n!r} under {opts.root}; found: {found}")
            if by_name[n]["type"] != "Battery":
                raise MeterSpecError(f"battery: {n} is a {by_name[n]['type']} supply, not a battery")
            picked.append(by_name[n])
        return picked, external
    picked = _system_batteries(supplies)
    if not picked:
        found = ", ".join(f"{s['name']} ({s['type']})" for s in supplies) or "none"
        raise MeterUnavailable(f"battery: no system battery under {opts.root} (supplies: {found}); a desktop "
                               "or a server has none")
    return picked, external


def _check_volts(b: Battery) -> float:
    raw = _read_int(b.file("voltage_now"), b.fs)
    volts = raw * _UNIT[b.voltage_unit]
    if not MIN_VOLTS <= abs(volts) <= MAX_VOLTS:
        hint = (" (this gauge seems to write millivolts: give voltage_unit=mV)"
                if b.voltage_unit == "uV" and MIN_VOLTS <= abs(raw) * 1e-3 <= MAX_VOLTS else "")
        raise (QuirkUnresolved if hint else MeterUnavailable)(
            f"battery {b.name}: voltage_now reads {raw}, {volts:.6g} V in {b.voltage_unit}, not a battery's "
            f"voltage{hint}"
        )
    return volts


def _setup(s: dict[str, Any], source: str, opts: _Options, status: str) -> Battery:
    """A Battery reading ``source``; raises MeterUnavailable (with the fix) when it cannot."""
    b = Battery(s["name"], s["path"], source, current_unit=opts.current_unit, voltage_unit=opts.voltage_unit,
                fs=opts.fs)
    needs = {"power": ["power_now"], "current": ["current_now", "voltage_now"], "energy": ["energy_now"],
             "charge_counter": ["charge_counter", "voltage_now"]}[source]
    denied = [f for f in needs if f in s.get("denied", ())]
    if denied:
        raise MeterPermissionError(
            f"battery {b.name}: cannot read {', '.join(b.file(f) for f in denied)} on {b.fs.description}: "
            "permission denied. On Android an app (Termux) is often denied the battery files by SELinux: "
            "read them over adb (battery:adb=SERIAL) or as root"
        )
    missing = [f for f in needs if f not in s["readings"]]
    if missing:
        raise MeterUnavailable(f"battery {b.name} has no {', '.join(missing)} (it has: "
                               f"{', '.join(s['readings']) or 'no readings'})")
    if "voltage_now" in needs:
        _check_volts(b)
    if source in ("energy", "charge_counter"):
        _read_int(b.file(needs[0]), b.fs)
        return b
    raw = b.raw_watts()
    if raw == 0:
        raise MeterUnavailable(f"battery {b.name}: {needs[0]} reads 0 while the battery discharges (the "
                               "firmware does not report it)")
    if opts.current_sign != "auto":
        b.discharge_sign = -1 if opts.current_sign == "negative" else 1
        b.sign_basis = f"given: current_sign={opts.current_sign}"
    elif status == "Discharging":
        b.discharge_sign = -1 if raw < 0 else 1
        b.sign_basis = (f"read from the first reading ({raw:+.4g} W) while the status said Discharging: "
                        + ("negative, as the kernel ABI says" if raw < 0 else
                           "positive, the convention of ACPI and of many vendor fuel gauges"))
    else:
        raise QuirkUnresolved(
            f"battery {b.name}: its status is {status!r}, so the sign of {needs[0]} cannot be read from it; "
            "give current_sign=negative (the kernel ABI) or current_sign=positive (ACPI, many gauges)"
        )
    watts = b.watts()
    if watts < 0:
        raise BatteryCharging(f"{CHARGING_MESSAGE} ({b.name}: {needs[0]} says charge flows in, "
                              f"{watts:+.4g} W with discharge_sign {b.discharge_sign:+d})")
    if watts < MIN_DISCHARGE_W:
        hint = (" (this gauge seems to write milliamps: give current_unit=mA)"
                if source == "current" and b.current_unit == "uA" and watts * 1000 >= MIN_DISCHARGE_W else "")
        raise (QuirkUnresolved if hint else MeterUnavailable)(
            f"battery {b.name}: {needs[0]} gives {watts * 1e3:.3g} mW, less than a running device draws{hint}"
        )
    return b


def _open_batteries(opts: _Options) -> tuple[list[Battery], list[dict[str, Any]], dict[str, str]]:
    picked, external = _pick_batteries(opts)
    probe_batteries = [Battery(s["name"], s["path"], "power", fs=opts.fs) for s in picked]
    statuses = _check_discharging(probe_batteries, external)
    for name, status in statuses.items():
        if status not in ("Discharging", "Unknown"):
            raise MeterUnavailable(f"battery {name}: unknown status {status!r} (the ABI's values: Unknown, "
                                   "Charging, Discharging, Not charging, Full)")
    batteries = []
    for s in picked:
        status = statuses[s["name"]]
        if opts.source != "auto":
            batteries.append(_setup(s, opts.source, opts, status))
            continue
        skipped = []
        for source in SOURCES:
            try:
                b = _setup(s, source, opts, status)
            except (BatteryCharging, QuirkUnresolved, MeterPermissionError):  # never fall through these silently
                raise
            except MeterUnavailable as exc:
                skipped.append(f"{source}: {exc}")
                continue
            b.notes.extend(f"not used: {why}" for why in skipped)
            batteries.append(b)
            break
        else:
            raise MeterUnavailable(f"battery {s['name']}: no usable reading ({'; '.join(skipped)})")
    if len({b.source in ("energy", "charge_counter") for b in batteries}) > 1:
        raise MeterSpecError("battery: these batteries offer different kinds of reading (a counter and a "
                             "power reading); give source= so that all are read alike, or name one")
    return batteries, external, statuses


def _poll_files(batteries: list[Battery], external: list[dict[str, Any]]) -> list[str]:
    return [f for b in batteries for f in b.files()] + [os.path.join(s["path"], "online") for s in external]


class _BatterySource(PolledSource):
    """Polls the batteries' power; a battery found charging ends sampling at once."""

    def __init__(self, batteries: list[Battery], external: list[dict[str, Any]], period_s: float,
                 give_up_s: float) -> None:
        self.batteries = batteries
        self.external = external
        self._changes: list[float] = []  # when a battery's reading last changed (refresh period)
        self._last: tuple[float, ...] | None = None
        self._lock = threading.Lock()
        super().__init__(f"battery {'+'.join(b.name for b in batteries)}", self._read_watts, period_s,
                         give_up_s=give_up_s)

    def _read_watts(self) -> float:
        self.batteries[0].fs.prefetch(_poll_files(self.batteries, self.external))
        try:
            _check_discharging(self.batteries, self.external)
        except BatteryCharging as exc:
            raise _Charging(str(exc)) from None
        values = tuple(b.watts() for b in self.batteries)
        with self._lock:
            if self._last is not None and values != self._last:
                self._changes.append(time.perf_counter())
                del self._changes[:-64]
            self._last = values
        return sum(values)

    def refresh_period(self) -> float | None:
        """Median time between changes of the reading (None before three changes were seen)."""
        with self._lock:
            gaps = [b - a for a, b in zip(self._changes, self._changes[1:])]
        return statistics.median(gaps) if len(gaps) >= 2 else None


class BatterySampledMeter(SampledMeter):
    """Integrated power of the batteries; ``update_period_s`` is the readings' refresh period
    (given, else seen, else assumed), which the measurement protocol sizes its windows by."""

    def __init__(self, source: _BatterySource, info: MeterInfo, options: SampledOptions,
                 period_s: float | None, sync_device: Any = None) -> None:
        self._battery_source = source
        self._period_given = period_s
        super().__init__(source, info, options, sync_device=sync_device)

    @property
    def info(self) -> MeterInfo:
        base = super().info
        seen = self._battery_source.refresh_period()
        if self._period_given is not None:
            period, basis = self._period_given, "given: period="
        elif seen is not None:
            period, basis = max(seen, self._options.period_s or 0.0), "seen: median time between changes of the reading"
        else:
            period, basis = DEFAULT_PERIOD_S, "assumed (no change seen yet); give period=SECONDS"
        details = dict(base.details)
        details["refresh_period_basis"] = basis
        return replace(base, update_period_s=period, details=details)

    def _window_details(self, start: Any, end: Any) -> dict[str, Any]:
        details = super()._window_details(start, end)
        details["battery_source"] = self._base_info.details["battery_source"]
        return details


class BatteryCounterMeter(CounterMeter):
    """``energy_now`` or ``charge_counter`` read at the window edges (joules drawn since opening)."""

    def __init__(self, batteries: list[Battery], external: list[dict[str, Any]], info: MeterInfo,
                 sync_device: Any = None) -> None:
        super().__init__(sync_device=sync_device)
        self.batteries = batteries
        self.external = external
        self._info = info
        self._origin: dict[str, float] = {}
        self._last: dict[str, float] = {}
        self.read_counters()

    @property
    def info(self) -> MeterInfo:
        return self._info

    def _window_details(self, start: Any, end: Any) -> dict[str, Any]:
        return {"battery_source": self._info.details["battery_source"],
                "counter_moved": any(end["drawn"][k] != start["drawn"][k] for k in end["drawn"])}

    def _snapshot(self) -> dict[str, Any]:
        drawn = self.read_counters()
        volts = {b.name: b.volts() for b in self.batteries if b.source == "charge_counter"}
        return {"drawn": drawn, "volts": volts}

    def _energy_between(self, start: dict[str, Any], end: dict[str, Any]) -> dict[str, float]:
        out = {}
        for b in self.batteries:
            delta = end["drawn"][b.name] - start["drawn"][b.name]
            if b.source == "charge_counter":  # coulombs x the mean of the edges' voltages
                delta *= (start["volts"][b.name] + end["volts"][b.name]) / 2
            out[b.name] = delta
        return out

    def read_counters(self) -> dict[str, float]:
        self.batteries[0].fs.prefetch(_poll_files(self.batteries, self.external))
        try:
            _check_discharging(self.batteries, self.external)
        except BatteryCharging as exc:
            raise MeterFailure(str(exc)) from None
        out = {}
        for b in self.batteries:
            try:
                remaining = b.remaining_j()
            except OSError as exc:
                raise MeterFailure(f"reading battery {b.name} failed: {exc}") from exc
            origin = self._origin.setdefault(b.name, remaining)
            drawn = origin - remaining
            if drawn < self._last.get(b.name, drawn):
                raise MeterFailure(
                    f"{CHARGING_MESSAGE} ({b.name}: its {b.source} counter rose, charge flowed in; the window "
                    "is void)"
                )
            self._last[b.name] = drawn
            out[b.name] = drawn
        return out


def open_from_spec(spec: MeterSpec, **kwargs: Any):
    opts = _options(spec)
    sampled = SampledOptions.from_spec(spec, default_rate_hz=DEFAULT_RATE_HZ, default_scope="battery")
    spec.check_unused()
    batteries, external, statuses = _open_batteries(opts)
    details: dict[str, Any] = {
        "root": opts.root,
        "read_on": opts.fs.description,
        "batteries": [b.to_dict() for b in batteries],
        "battery_source": "+".join(sorted({b.source for b in batteries})),
        "status_at_open": statuses,
        "external_supplies": [s["name"] for s in external],
        "scope_note": "everything the device draws from its battery (screen, radios, SoC)",
    }
    if batteries[0].source in ("energy", "charge_counter"):
        period = opts.period_s or DEFAULT_PERIOD_S
        details["refresh_period_basis"] = "given: period=" if opts.period_s else (
            "assumed; give period=SECONDS (the embedded controller's refresh)")
        resolution = UWH_TO_J if batteries[0].source == "energy" else None
        info = MeterInfo(backend="battery", scope="battery", kind="counter", update_period_s=period,
                         resolution_j=resolution, simulated=False, domains=tuple(b.name for b in batteries),
                         details=details, torch_device=None)
        if isinstance(opts.fs, AdbFiles):
            opts.fs.measuring = True
        return BatteryCounterMeter(batteries, external, info, **kwargs)
    poll_s = sampled.period_s or 1.0 / DEFAULT_RATE_HZ
    if sampled.max_gap_s is None:  # the gap limit is about polls, not about the gauge's refresh
        sampled = replace(sampled, max_gap_s=sampled.max_gap_for(poll_s))
    info = MeterInfo(backend="battery", scope=sampled.scope, kind="sampled", update_period_s=opts.period_s,
                     resolution_j=None, simulated=False, domains=(sampled.scope,), details=details,
                     torch_device=None)
    source = _BatterySource(batteries, external, poll_s, give_up_s=sampled.max_gap_s)
    if isinstance(opts.fs, AdbFiles):
        opts.fs.measuring = True
    return BatterySampledMeter(source, info, sampled, opts.period_s, **kwargs)


def probe(spec: MeterSpec) -> Probe:
    try:
        opts = _options(spec)
        supplies = list_supplies(opts.root, opts.fs)
    except (MeterUnavailable, MeterSpecError) as exc:
        return Probe("battery", False, str(exc))

    def describe(s: dict[str, Any]) -> str:
        if s["type"] == "Battery":
            return f"{s['name']} (Battery, {s['status'] or 'no status'}; {', '.join(s['readings']) or 'no readings'})"
        if s["type"] in EXTERNAL_TYPES:
            return f"{s['name']} ({s['type']}, {'online' if (s['online'] or '0') != '0' else 'offline'})"
        return f"{s['name']} ({s['type']})"

    listing = "; ".join(describe(s) for s in supplies) or "no supplies"
    details: dict[str, Any] = {"root": opts.root, "supplies": supplies}
    if not _system_batteries(supplies):
        return Probe("battery", False, f"no system battery under {opts.root} ({listing})", details)
    try:
        batteries, _, _ = _open_batteries(opts)
    except EnergyprofError as exc:
        return Probe("battery", False, f"{exc}; supplies: {listing}", details)
    chosen = ", ".join(f"{b.name}: {b.to_dict()['reading']}" for b in batteries)
    return Probe("battery", True, f"{listing}; reads {chosen}", details)
