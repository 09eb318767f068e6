"""A fake Linux powercap tree whose RAPL counters advance (and wrap) in real time.

This is the hardware boundary for the RAPL backend: the reader under test is the shipped code,
pointed at ``tree.root`` instead of ``/sys/class/powercap``. The layout copies sysfs: zone folders
live under ``devices/virtual/powercap/intel-rapl/`` (subzones nested in their package), the class
folder holds flat symlinks to every zone plus the ``intel-rapl`` control type, and each zone has a
``subsystem`` link back to the class folder (a loop a careless walker would follow).

A background thread integrates each zone's power and rewrites ``energy_uj`` atomically every
``tick_s``, modulo ``max_energy_range_uj``, optionally quantised to a hardware energy unit.

Usage::

    with FakePowercap(tmp_path, [FakeZone("intel-rapl:0", "package-0", 20.0, 50_000_000)]) as tree:
        meter = open_meter(f"rapl:root={tree.root}")
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FakeZone", "FakePowercap", "laptop_zones", "server_zones", "wrap_range_uj"]


@dataclass
class FakeZone:
    zone_id: str  # "intel-rapl:0" or "intel-rapl:0:1" (the parent is the id minus its last ":N")
    name: str  # package-0, core, uncore, dram, psys
    power_w: float
    max_energy_range_uj: int = 262_143_328_850
    start_uj: float = 0.0  # the counter's value when the tree starts


def wrap_range_uj(power_w: float, wrap_every_s: float) -> int:
    """The range that makes a counter rising at ``power_w`` wrap every ``wrap_every_s``."""
    return int(round(power_w * wrap_every_s * 1e6))


def laptop_zones(package_w: float = 20.0, wrap_every_s: float = 2.5) -> list[FakeZone]:
    """One package (with core and uncore inside it) and a psys zone, all wrapping quickly.
    Only package-0 belongs in the total."""
    rng = wrap_range_uj(package_w, wrap_every_s)
    return [
        FakeZone("intel-rapl:0", "package-0", package_w, rng, start_uj=rng * 0.9),
        FakeZone("intel-rapl:0:0", "core", 12.0, rng, start_uj=rng * 0.5),
        FakeZone("intel-rapl:0:1", "uncore", 2.0, rng),
        FakeZone("intel-rapl:1", "psys", 30.0, rng, start_uj=rng * 0.2),
    ]


def server_zones(rng: int = 262_143_328_850) -> list[FakeZone]:
    """Two sockets, each with core and dram subzones (dram is NOT inside the package)."""
    return [
        FakeZone("intel-rapl:0", "package-0", 100.0, rng),
        FakeZone("intel-rapl:0:0", "core", 60.0, rng),
        FakeZone("intel-rapl:0:1", "dram", 10.0, rng),
        FakeZone("intel-rapl:1", "package-1", 80.0, rng),
        FakeZone("intel-rapl:1:0", "core", 50.0, rng),
        FakeZone("intel-rapl:1:1", "dram", 8.0, rng),
    ]


class FakePowercap:
    """Writes the tree under ``base`` and, once started, advances its counters."""

    def __init__(
        self,
        base: str | os.PathLike,
        zones: list[FakeZone],
        tick_s: float = 0.002,
        energy_unit_uj: float | None = None,
    ) -> None:
        self.base = Path(base)
        self.zones = {z.zone_id: z for z in zones}
        self.tick_s = tick_s
        self.energy_unit_uj = energy_unit_uj
        self.root = self.base / "class" / "powercap"
        self._devices = self.base / "devices" / "virtual" / "powercap" / "intel-rapl"
        self._energy_uj = {z.zone_id: float(z.start_uj) for z in zones}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_t: float | None = None
        self.frozen = False
        self.mode = 0o444  # energy_uj's mode (0o400 as on Linux >= 5.10: make_root_only)
        self._build()

    # ----------------------------------------------------------------- layout
    def zone_dir(self, zone_id: str) -> Path:
        parts = zone_id.split(":")
        path = self._devices
        for i in range(2, len(parts) + 1):
            path = path / ":".join(parts[:i])
        return path

    def _build(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._devices.mkdir(parents=True, exist_ok=True)
        (self._devices / "enabled").write_text("1\n")
        os.symlink(os.path.relpath(self._devices, self.root), self.root / "intel-rapl")
        for z in sorted(self.zones.values(), key=lambda z: len(z.zone_id)):
            d = self.zone_dir(z.zone_id)
            d.mkdir(parents=True)
            (d / "name").write_text(z.name + "\n")
            (d / "max_energy_range_uj").write_text(f"{z.max_energy_range_uj}\n")
            (d / "enabled").write_text("1\n")
            (d / "constraint_0_name").write_text("long_term\n")
            os.symlink(os.path.relpath(self.root, d), d / "subsystem")  # loop back up the tree
            os.symlink(os.path.relpath(d, self.root), self.root / z.zone_id)  # flat class entry
            self._write(z.zone_id)

    def energy_path(self, zone_id: str) -> Path:
        return self.zone_dir(zone_id) / "energy_uj"

    def _raw(self, zone_id: str) -> int:
        z = self.zones[zone_id]
        e = self._energy_uj[zone_id]
        if self.energy_unit_uj:
            e = math.floor(e / self.energy_unit_uj) * self.energy_unit_uj
        return int(e) % z.max_energy_range_uj

    def _write(self, zone_id: str) -> None:
        path = self.energy_path(zone_id)
        tmp = path.with_name(".energy_uj.tmp")
        tmp.write_text(f"{self._raw(zone_id)}\n")
        os.chmod(tmp, self.mode)
        os.replace(tmp, path)  # readers never see a half-written value

    # ----------------------------------------------------------------- time
    def _advance(self) -> None:
        now = time.perf_counter()
        with self._lock:
            if self._last_t is not None and not self.frozen:
                dt = now - self._last_t
                for zid, z in self.zones.items():
                    self._energy_uj[zid] += z.power_w * dt * 1e6
                    if self.energy_path(zid).exists():
                        self._write(zid)
            self._last_t = now

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            self._advance()

    def start(self) -> "FakePowercap":
        self._last_t = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="fake-powercap", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def __enter__(self) -> "FakePowercap":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- scenario controls
    def energy_j(self, zone_id: str) -> float:
        """Ground truth: the zone's energy since the tree was built (never wrapped), joules."""
        with self._lock:
            return (self._energy_uj[zone_id] - self.zones[zone_id].start_uj) * 1e-6

    def set_power(self, zone_id: str, watts: float) -> None:
        self._advance()
        with self._lock:
            self.zones[zone_id].power_w = watts

    def remove_counter(self, zone_id: str) -> None:
        """The driver went away: energy_uj disappears (reads raise FileNotFoundError)."""
        with self._lock:
            self.energy_path(zone_id).unlink()

    def make_root_only(self, mode: int = 0o400) -> list[Path]:
        """energy_uj readable by its owner only, as since Linux 5.10 (CVE-2020-8694). A test that
        runs as root must read it under another effective uid to see the refusal."""
        self.mode = mode
        paths = [self.energy_path(z) for z in self.zones]
        for p in paths:
            os.chmod(p, mode)
        return paths
