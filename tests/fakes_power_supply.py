"""A fake Linux ``/sys/class/power_supply`` tree, laid out and filled as the kernel does.

The hardware boundary of the ``battery`` backend: the reader under test is the shipped code,
pointed at ``tree.root`` instead of ``/sys/class/power_supply``.

Sources, field by field:

* Documentation/ABI/testing/sysfs-class-power: ``type`` ("Battery", "UPS", "Mains", "USB",
  "Wireless"), ``status`` ("Unknown", "Charging", "Discharging", "Not charging", "Full"),
  ``present``, ``online`` (0 offline, 1 online fixed, 2 programmable), ``capacity`` (percent),
  ``current_now`` in microamps ("Negative values are used for discharging batteries, positive
  values for charging batteries"), ``voltage_now`` in microvolts, ``technology``, ``temp``
  (tenths of a degree Celsius), ``model_name``, ``manufacturer``.
* include/linux/power_supply.h: "All voltages, currents, charges, energies, time and
  temperatures in uV, uA, uAh, uWh, seconds and tenths of degree Celsius": ``energy_now`` and
  ``energy_full`` in uWh, ``power_now`` in uW, ``charge_counter`` in uAh.
* Documentation/power/power_supply_class.rst: CHARGE_COUNTER "the current charge counter (in
  uAh). This could easily be negative; there is no empty or full value".
* drivers/acpi/battery.c (a laptop's ACPI control-method battery ``BAT0``, PNP0C0A): a battery
  that reports in mW units gets ``power_now``/``energy_now``/``energy_full``/
  ``energy_full_design``; the present rate is the ACPI _BST value, unsigned (so ``power_now`` is
  positive while discharging); ``voltage_now``, ``cycle_count``, ``alarm``; the AC adapter
  (ACPI0003) is a separate supply ``AC`` of type Mains with ``online``. The embedded
  controller refreshes _BST every few seconds (``refresh``).
* An Android phone's fuel gauge: a supply named ``battery`` (type Battery, ``current_now`` uA,
  ``voltage_now`` uV, ``charge_counter`` uAh, ``charge_full``, ``current_avg``, ``health``,
  ``temp``), beside ``usb`` (type USB, ``online``), ``ac``/``wireless`` and, on Qualcomm parts,
  a ``bms`` node (battery management system, its own type) that is not the battery. The sign of
  ``current_now`` depends on the vendor: the ABI's negative-while-discharging, or positive.
  Some vendors write ``current_now`` in mA or ``voltage_now`` in mV (``current_unit``).

Values are written atomically (temporary file, then rename): a reader never sees half a number.
Files hold what the gauge last refreshed; ``refresh(dt)`` is one gauge update after ``dt`` seconds
of the battery's draw: the counters fall by what was drawn, the instantaneous readings hold.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FakePowerSupply", "Gauge"]


def _write(path: Path, value) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{value}\n")
    os.replace(tmp, path)


@dataclass
class Gauge:
    """What one battery does: its draw (watts out of it; negative when charging) and its voltage."""

    watts: float
    volts: float
    energy_uwh: float = 50_000_000.0  # 50 Wh
    charge_uah: float = 4_000_000.0  # 4000 mAh
    status: str = "Discharging"


class FakePowerSupply:
    """Builds ``base/sys`` and exposes ``root`` = ``base/sys/class/power_supply``."""

    def __init__(self, base: str | os.PathLike) -> None:
        self.sys = Path(base) / "sys"
        self.root = self.sys / "class" / "power_supply"
        self.root.mkdir(parents=True, exist_ok=True)
        self.gauges: dict[str, Gauge] = {}
        self.layout: dict[str, dict] = {}

    # ------------------------------------------------------------------ structure
    def _supply(self, device_path: str, name: str) -> Path:
        """``devices/<parent>/power_supply/<name>`` and the class link to it, as the kernel makes."""
        folder = self.sys / "devices" / device_path / "power_supply" / name
        folder.mkdir(parents=True)
        (folder / "power").mkdir()
        _write(folder / "uevent", f"POWER_SUPPLY_NAME={name}")
        os.symlink(os.path.relpath(self.root, folder), folder / "subsystem")
        os.symlink(os.path.relpath(folder, self.root), self.root / name)
        return folder

    def add_external(self, name: str, kind: str, online: bool, device_path: str | None = None) -> None:
        """A mains adapter, USB port or wireless charger: ``type`` and ``online``."""
        folder = self._supply(device_path or f"platform/{name}-supply", name)
        _write(folder / "type", kind)
        _write(folder / "online", int(online))

    def set_online(self, name: str, online: bool) -> None:
        _write(self.root / name / "online", int(online))

    def add_acpi_laptop(self, watts: float = 9.0, volts: float = 11.4, name: str = "BAT0",
                        ac_online: bool = False, power_now: bool = True, energy_step_uwh: int = 1) -> None:
        """An ACPI laptop battery in mW units (drivers/acpi/battery.c) and its AC adapter.

        ``power_now=False``: firmware whose _BST present rate is unknown (0xFFFFFFFF): the driver
        then leaves power_now out. ``energy_step_uwh``: the embedded controller's step (many
        report 10 mWh steps)."""
        folder = self._supply("LNXSYSTM:00/LNXSYBUS:00/PNP0C0A:00", name)
        for attr, value in (("type", "Battery"), ("present", 1), ("technology", "Li-ion"),
                            ("cycle_count", 212), ("alarm", 0), ("voltage_min_design", 11_400_000),
                            ("energy_full_design", 57_000_000), ("energy_full", 52_180_000),
                            ("model_name", "5B10W13930"), ("manufacturer", "SMP"),
                            ("serial_number", 1234), ("capacity_level", "Normal")):
            _write(folder / attr, value)
        self.gauges[name] = Gauge(watts, volts)
        self.layout[name] = {"folder": folder, "kind": "acpi", "power_now": power_now, "step": energy_step_uwh}
        if "AC" not in self.layout:
            self.add_external("AC", "Mains", ac_online, device_path="LNXSYSTM:00/LNXSYBUS:00/ACPI0003:00")
            self.layout["AC"] = {"kind": "external"}
        self._publish(name)

    def add_android_phone(self, watts: float = 9.0, volts: float = 3.85, sign: int = -1,
                          current_unit: str = "uA", voltage_unit: str = "uV", usb_online: bool = False) -> None:
        """An Android fuel gauge ``battery`` with ``usb``, ``ac``, ``wireless`` and ``bms`` beside it.

        ``sign``: -1 discharge reads negative (the ABI), +1 positive (many vendor gauges)."""
        folder = self._supply("platform/soc/c440000.qcom,spmi/spmi-0/spmi0-02/c440000.qcom,spmi:qcom,pmi8998@2:qpnp,fg",
                              "battery")
        for attr, value in (("type", "Battery"), ("present", 1), ("technology", "Li-ion"), ("health", "Good"),
                            ("charge_full", 4_000_000), ("charge_full_design", 4_100_000), ("temp", 291),
                            ("cycle_count", 88)):
            _write(folder / attr, value)
        self.gauges["battery"] = Gauge(watts, volts)
        self.layout["battery"] = {"folder": folder, "kind": "android", "sign": sign,
                                  "current_unit": current_unit, "voltage_unit": voltage_unit}
        self.add_external("usb", "USB", usb_online)
        self.add_external("ac", "Mains", False)
        self.add_external("wireless", "Wireless", False)
        bms = self._supply("platform/soc/qpnp,qg", "bms")  # not the battery: its own type
        _write(bms / "type", "BMS")
        _write(bms / "current_now", 0)
        for n in ("usb", "ac", "wireless"):
            self.layout[n] = {"kind": "external"}
        self._publish("battery")

    # ------------------------------------------------------------------ values
    def _publish(self, name: str) -> None:
        """Write what the gauge reports now."""
        g, lay = self.gauges[name], self.layout[name]
        folder: Path = lay["folder"]
        _write(folder / "status", g.status)
        if lay["kind"] == "acpi":
            step = lay["step"]
            _write(folder / "voltage_now", round(g.volts * 1e6))
            if lay["power_now"]:
                _write(folder / "power_now", round(abs(g.watts) * 1e6))  # _BST present rate: unsigned
            _write(folder / "energy_now", int(g.energy_uwh // step) * step)
            _write(folder / "capacity", round(100 * g.energy_uwh / 52_180_000))
        else:
            amps = g.watts / g.volts  # out of the battery
            current = lay["sign"] * amps * (1e6 if lay["current_unit"] == "uA" else 1e3)
            _write(folder / "current_now", round(current))
            _write(folder / "current_avg", round(current))
            _write(folder / "voltage_now", round(g.volts * (1e6 if lay["voltage_unit"] == "uV" else 1e3)))
            _write(folder / "charge_counter", round(g.charge_uah))
            _write(folder / "capacity", round(100 * g.charge_uah / 4_000_000))

    def refresh(self, name: str, dt: float) -> None:
        """One gauge update after ``dt`` seconds at the present draw: the counters fall by it."""
        g = self.gauges[name]
        g.energy_uwh -= g.watts * dt / 3.6e-3
        g.charge_uah -= g.watts / g.volts * dt / 3.6e-3
        self._publish(name)

    def set(self, name: str, **changes) -> None:
        """Change the draw, voltage or status (e.g. ``status="Charging"``, ``watts=-15``) and publish."""
        g = self.gauges[name]
        for key, value in changes.items():
            setattr(g, key, value)
        self._publish(name)
