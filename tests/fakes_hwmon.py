"""A fake Linux sysfs hwmon tree, laid out as the kernel lays it out.

This is the hardware boundary for the ``hwmon`` backend: the reader under test is the shipped
code, pointed at ``tree.root`` (the fake ``/sys/class/hwmon``) instead of the real one.

Layout (Documentation/hwmon/sysfs-interface.rst, drivers/hwmon/hwmon.c): each hwmon device lives
under its parent device, ``sys/devices/.../<parent>/hwmon/hwmonN/``, and the class folder
``sys/class/hwmon/`` holds one link per device, ``hwmonN -> ../../devices/.../hwmon/hwmonN``.
Inside ``hwmonN``: ``name``, the attribute files, ``device`` (a link to the parent device),
``subsystem`` (a link back to the class folder: a loop for careless walkers), ``uevent`` and a
``power/`` folder. An I2C parent device (``1-0040``) has its own ``name`` file holding the I2C
client name. Drivers of the old style keep ``name`` and the attributes in the parent device's
folder instead (``legacy=True``).

Attribute contents follow the drivers:

* ``ina3221`` (drivers/hwmon/ina3221.c, Documentation/hwmon/ina3221.rst): ``in[123]_input`` bus
  voltage in mV (register LSB 8 mV), ``curr[123]_input`` mA = round(shunt voltage (40 uV LSB) /
  shunt resistance), ``in[456]_input`` shunt voltage in uV, ``in7_input``/``in7_label`` the sum
  of shunt voltages ("sum of shunt voltages"), ``curr4_input`` the sum of currents (only when the
  shunts are equal), ``in[123]_label`` only for channels whose device tree gives a label,
  ``in[123]_enable``, ``shunt[123]_resistor`` (uOhm), ``curr[123]_crit/_max`` and alarms,
  ``samples``, ``update_interval`` (ms);
* ``ina2xx`` (Documentation/hwmon/ina2xx.rst): ``in0_input`` shunt voltage (mV), ``in1_input``
  bus voltage (mV), ``curr1_input`` (mA), ``power1_input`` (uW), ``shunt_resistor`` (uOhm);
* energy counters (``energy1_input``, uJ) as chips that accumulate energy expose them;
* GPU nodes under their PCI device (``add_gpu``), which also gets ``vendor``, ``device``,
  ``class`` and a ``drm/cardN`` folder linked from ``sys/class/drm/cardN`` (drivers/gpu/drm/drm_sysfs.c):

  - ``amdgpu`` (Documentation/gpu/amdgpu/thermal.rst): ``power1_average`` "average power used by
    the SoC in microWatts" (older ASICs) or ``power1_input`` "instantaneous power used by the SoC
    in microWatts" (newer), ``power1_label`` (``PPT``), ``power1_cap``/``_cap_max``/``_cap_min``,
    ``temp1_input``/``temp1_label`` (``edge``), ``in0_input``/``in0_label`` (``vddgfx``, mV);
    PCI vendor 0x1002;
  - ``i915`` (Documentation/ABI/testing/sysfs-driver-intel-i915-hwmon, discrete GPUs only):
    ``energy1_input`` "Energy consumption of the GPU in uJ", ``power1_max``,
    ``power1_rated_max``, ``power1_max_interval``, ``in0_input`` (GPU voltage, mV), no labels;
  - ``xe`` (Documentation/ABI/testing/sysfs-driver-intel-xe-hwmon, drivers/gpu/drm/xe/xe_hwmon.c):
    ``energy1_input`` "Card energy input of device in microjoules", ``energy2_input`` "Package
    energy", labels ``card`` and ``pkg`` on the energy and power channels, ``power1_max``,
    ``power1_rated_max``, ``power2_max``, ``in1_input`` (package voltage, mV); vendor 0x8086.

Values are written atomically (write a temporary file, then rename), as a reader must never see
half a number. Files are static between writes, so a tree whose rails are not touched has
exactly constant power.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Rail", "FakeHwmon", "jetson_orin_nx_rails", "jetson_agx_orin_rails"]


@dataclass
class Rail:
    """One INA3221 channel: its label (None: no label in the device tree) and operating point."""

    label: str | None
    volts: float
    amps: float
    shunt_uohm: int = 5000
    enabled: bool = True


def jetson_orin_nx_rails(vdd_in_w: float = 7.2) -> list[Rail]:
    """Orin NX / Orin Nano: one INA3221 at 0x40 on I2C bus 1 with VDD_IN (the module's input),
    VDD_CPU_GPU_CV and VDD_SOC (parts of VDD_IN). 5 V rails; VDD_IN draws ``vdd_in_w``."""
    return [
        Rail("VDD_IN", 5.0, vdd_in_w / 5.0),
        Rail("VDD_CPU_GPU_CV", 5.0, 0.56),
        Rail("VDD_SOC", 5.0, 0.408),
    ]


def jetson_agx_orin_rails() -> tuple[list[Rail], list[Rail]]:
    """AGX Orin: two INA3221s (0x40, 0x41); no total-input rail among them."""
    return (
        [Rail("VDD_GPU_SOC", 5.0, 1.2), Rail("VDD_CPU_CV", 5.0, 0.6), Rail("VIN_SYS_5V0", 5.0, 0.5)],
        [Rail("NC", 5.0, 0.0), Rail("VDDQ_VDD2_1V8AO", 5.0, 0.2), Rail("NC", 5.0, 0.0)],
    )


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class _Node:
    index: int
    device_dir: Path  # the parent device's folder
    folder: Path  # where name and the attributes are
    node_dir: Path  # .../hwmon/hwmonN
    rails: list[Rail] = field(default_factory=list)


class FakeHwmon:
    """Builds ``base/sys`` and exposes ``root`` = ``base/sys/class/hwmon``."""

    def __init__(self, base: str | os.PathLike) -> None:
        self.sys = Path(base) / "sys"
        self.root = self.sys / "class" / "hwmon"
        self.root.mkdir(parents=True, exist_ok=True)
        self.nodes: dict[int, _Node] = {}

    # ------------------------------------------------------------------ structure
    def _add_node(self, device_path: str, legacy: bool = False, i2c_name: str | None = None) -> _Node:
        index = len(self.nodes)
        device_dir = self.sys / "devices" / device_path
        device_dir.mkdir(parents=True, exist_ok=True)
        if i2c_name is not None:
            _atomic_write(device_dir / "name", i2c_name + "\n")  # the I2C client's own name file
            _atomic_write(device_dir / "modalias", f"of:N{i2c_name}T(null)Cti,{i2c_name}\n")
        node_dir = device_dir / "hwmon" / f"hwmon{index}"
        node_dir.mkdir(parents=True)
        (node_dir / "power").mkdir()
        _atomic_write(node_dir / "uevent", "")
        os.symlink(os.path.relpath(device_dir, node_dir), node_dir / "device")
        os.symlink(os.path.relpath(self.root, node_dir), node_dir / "subsystem")
        os.symlink(os.path.relpath(node_dir, self.root), self.root / f"hwmon{index}")
        node = _Node(index, device_dir, device_dir if legacy else node_dir, node_dir)
        self.nodes[index] = node
        return node

    def _attr(self, node: _Node, name: str, value) -> None:
        _atomic_write(node.folder / name, f"{value}\n")

    def add_thermal(self, name: str = "cpu_thermal", millidegrees: int = 45000) -> int:
        """A hwmon chip with no power channel (a thermal zone), as every board has."""
        node = self._add_node(f"virtual/thermal/thermal_zone{len(self.nodes)}")
        self._attr(node, "name", name)
        self._attr(node, "temp1_input", millidegrees)
        return node.index

    def add_ina3221(self, rails: list[Rail], bus: int = 1, address: int = 0x40,
                    update_interval_ms: int = 5) -> int:
        """An INA3221 on I2C bus ``bus`` (Jetson: bus 1 behind the c240000.i2c controller)."""
        node = self._add_node(f"platform/bus@0/c240000.i2c/i2c-{bus}/{bus}-{address:04x}", i2c_name="ina3221")
        node.rails = rails
        self._attr(node, "name", "ina3221")
        self._attr(node, "samples", 512)
        self._attr(node, "update_interval", update_interval_ms)
        for ch, rail in enumerate(rails, start=1):
            if rail.label is not None:
                self._attr(node, f"in{ch}_label", rail.label)
            self._attr(node, f"in{ch}_enable", int(rail.enabled))
            self._attr(node, f"shunt{ch}_resistor", rail.shunt_uohm)
            for suffix, value in (("crit", 32760), ("max", 32760), ("crit_alarm", 0), ("max_alarm", 0)):
                self._attr(node, f"curr{ch}_{suffix}", value)
        self._attr(node, "in7_label", "sum of shunt voltages")
        for ch in range(1, len(rails) + 1):
            self.set_rail(node.index, ch)
        return node.index

    def add_ina2xx(self, chip: str = "ina219", volts: float = 5.1, amps: float = 0.8, bus: int = 1,
                   address: int = 0x40, shunt_uohm: int = 100000, legacy: bool = False) -> int:
        """An INA219/INA226/INA260 bound to the kernel's ina2xx driver (a Raspberry Pi with the
        i2c-sensor overlay): in0 shunt mV, in1 bus mV, curr1 mA, power1 uW."""
        node = self._add_node(f"platform/soc/fe804000.i2c/i2c-{bus}/{bus}-{address:04x}",
                              legacy=legacy, i2c_name=chip)
        self._attr(node, "name", chip)
        self._attr(node, "shunt_resistor", shunt_uohm)
        self.set_ina2xx(node.index, volts, amps)
        return node.index

    def add_energy_chip(self, name: str = "ina238", microjoules: int = 0, label: str | None = None) -> int:
        """A chip that accumulates energy (energy1_input, uJ) and also reports power1_input."""
        node = self._add_node(f"platform/soc/fe804000.i2c/i2c-1/1-{0x44 + len(self.nodes):04x}", i2c_name=name)
        self._attr(node, "name", name)
        if label:
            self._attr(node, "energy1_label", label)
        self.set_energy(node.index, microjoules, power_uw=0)
        return node.index

    def add_drm_card(self, pci: str, vendor: str, card: int) -> Path:
        """A PCI display device and its DRM card (an integrated GPU has no hwmon node)."""
        device_dir = self.sys / "devices" / "pci0000:00" / "0000:00:01.0" / pci
        (device_dir / "drm" / f"card{card}").mkdir(parents=True, exist_ok=True)
        _atomic_write(device_dir / "vendor", vendor + "\n")
        _atomic_write(device_dir / "class", "0x030000\n")
        card_dir = device_dir / "drm" / f"card{card}"
        if not (card_dir / "device").exists():
            os.symlink(os.path.relpath(device_dir, card_dir), card_dir / "device")
        drm = self.sys / "class" / "drm"
        drm.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(card_dir, drm), drm / f"card{card}")
        return device_dir

    def add_gpu(self, driver: str, pci: str, card: int, watts: float = 150.0, microjoules: int = 0,
                amd_power: str = "power1_input") -> int:
        """A GPU's hwmon node as ``amdgpu``, ``i915`` or ``xe`` lays it out (see the module doc)."""
        vendor = "0x1002" if driver == "amdgpu" else "0x8086"
        device_dir = self.add_drm_card(pci, vendor, card)
        _atomic_write(device_dir / "device", ("0x744c" if driver == "amdgpu" else "0x56a0") + "\n")
        node = self._add_node(os.path.relpath(device_dir, self.sys / "devices"))
        self._attr(node, "name", driver)
        node.rails = [Rail(driver, 0.0, 0.0)]
        node.amd_power = amd_power  # type: ignore[attr-defined]
        if driver == "amdgpu":
            for attr, value in (("power1_label", "PPT"), ("power1_cap", 300_000_000), ("power1_cap_max", 339_000_000),
                                ("power1_cap_min", 0), ("temp1_input", 41000), ("temp1_label", "edge"),
                                ("in0_input", 806), ("in0_label", "vddgfx")):
                self._attr(node, attr, value)
            self.set_gpu_power(node.index, watts)
        elif driver == "i915":
            for attr, value in (("power1_max", 190_000_000), ("power1_rated_max", 190_000_000),
                                ("power1_max_interval", 28000), ("in0_input", 720)):
                self._attr(node, attr, value)
            self.set_gpu_energy(node.index, microjoules)
        else:  # xe
            for attr, value in (("energy1_label", "card"), ("energy2_label", "pkg"), ("power1_label", "card"),
                                ("power2_label", "pkg"), ("power1_max", 225_000_000), ("power1_rated_max", 225_000_000),
                                ("power2_max", 180_000_000), ("in1_input", 750), ("in1_label", "pkg")):
                self._attr(node, attr, value)
            self.set_gpu_energy(node.index, microjoules, package_uj=microjoules // 2)
        return node.index

    def set_gpu_power(self, index: int, watts: float) -> None:
        node = self.nodes[index]
        self._attr(node, node.amd_power, round(watts * 1e6))  # type: ignore[attr-defined]

    def set_gpu_energy(self, index: int, microjoules: int, package_uj: int | None = None) -> None:
        node = self.nodes[index]
        self._attr(node, "energy1_input", int(microjoules))
        if package_uj is not None:
            self._attr(node, "energy2_input", int(package_uj))

    # ------------------------------------------------------------------ values
    def set_rail(self, index: int, ch: int, volts: float | None = None, amps: float | None = None) -> None:
        """Write one INA3221 channel as the driver reports it, and the sums."""
        node = self.nodes[index]
        rail = node.rails[ch - 1]
        if volts is not None:
            rail.volts = volts
        if amps is not None:
            rail.amps = amps
        shunt_code = round(rail.amps * rail.shunt_uohm / 40.0)  # shunt voltage register, 40 uV LSB
        shunt_uv = shunt_code * 40
        bus_mv = int(rail.volts * 1000 / 8) * 8  # bus voltage register, 8 mV LSB
        if rail.enabled:
            self._attr(node, f"curr{ch}_input", round(shunt_uv * 1000 / rail.shunt_uohm))  # nV / uOhm = mA
            self._attr(node, f"in{ch}_input", bus_mv)
            self._attr(node, f"in{ch + 3}_input", shunt_uv)
        enabled = [r for r in node.rails if r.enabled]
        total_uv = sum(round(r.amps * r.shunt_uohm / 40.0) * 40 for r in enabled)
        self._attr(node, "in7_input", total_uv)
        if len({r.shunt_uohm for r in node.rails}) == 1:
            self._attr(node, "curr4_input", round(total_uv * 1000 / node.rails[0].shunt_uohm))

    def rail_watts(self, index: int, ch: int) -> float:
        """The power the driver's files say: mV x mA."""
        folder = self.nodes[index].folder
        return int((folder / f"in{ch}_input").read_text()) * int((folder / f"curr{ch}_input").read_text()) * 1e-6

    def set_ina2xx(self, index: int, volts: float, amps: float) -> None:
        node = self.nodes[index]
        shunt_uohm = int((node.folder / "shunt_resistor").read_text())
        current_ma = round(amps * 1000)
        bus_mv = round(volts * 1000)
        self._attr(node, "in0_input", round(amps * shunt_uohm / 1000))  # mV
        self._attr(node, "in1_input", bus_mv)
        self._attr(node, "curr1_input", current_ma)
        self._attr(node, "power1_input", current_ma * bus_mv)  # mA x mV = uW

    def set_energy(self, index: int, microjoules: int, power_uw: int) -> None:
        node = self.nodes[index]
        self._attr(node, "energy1_input", int(microjoules))
        self._attr(node, "power1_input", int(power_uw))

    def unbind(self, index: int) -> None:
        """What unbinding the driver does: the hwmon device, its class link and files vanish."""
        node = self.nodes[index]
        os.unlink(self.root / f"hwmon{index}")
        shutil.rmtree(node.node_dir)
        if node.folder == node.device_dir:  # legacy layout: the attributes go with the driver
            for f in node.device_dir.iterdir():
                if f.is_file():
                    f.unlink()
