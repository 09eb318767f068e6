"""RAPL energy counters read from the Linux powercap tree (``rapl``, ``rapl:root=/path``,
``rapl:domains=package-0+dram``).

The kernel's ``intel_rapl_msr`` driver (Intel, and AMD Zen with the same driver) publishes one
folder per RAPL zone under ``/sys/class/powercap``::

    intel-rapl:0      name=package-0   energy_uj  max_energy_range_uj
    intel-rapl:0:0    name=core        (inside package-0)
    intel-rapl:0:1    name=uncore      (inside package-0)
    intel-rapl:0:2    name=dram        (NOT inside package-0, although it sits in its folder)
    intel-rapl:1      name=psys        (whole platform, on some client parts)

Zones appear twice in a real tree: as flat symlinks in the class folder and nested inside their
parent's folder, and a bind mount can show the same files under yet another path. Each zone is
counted once, told apart by file identity (device and inode of its ``name`` attribute), not by path.

``energy_uj`` wraps at ``max_energy_range_uj``. A background reader (the common
:class:`~energyprof.meters.base.BackgroundReader`) reads every zone more often than the shortest
possible wrap time (range / ``max_power``), so windows of any length are unwrapped correctly; if
the reader is ever starved for longer than that (a suspended process), the affected windows raise
:class:`MeterFailure` naming the zones that may have wrapped unseen, instead of a wrong number.

The total never double counts: packages + dram, core/uncore are inside their package, psys only
when no package is selected (psys covers the whole platform). Device units (uJ) stay here;
everything public is joules and seconds.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from energyprof.errors import (
    MeterFailure,
    MeterPermissionError,
    MeterSpecError,
    MeterUnavailable,
)
from energyprof.meters.base import BackgroundReader, CounterMeter, MeterInfo, Probe, WrapTracker, periodic
from energyprof.meters.spec import MeterSpec, parse_spec

__all__ = [
    "DEFAULT_ROOT",
    "RaplZone",
    "RaplMeter",
    "discover_zones",
    "total_domains",
    "permission_fix",
    "open_from_spec",
    "probe",
]

log = logging.getLogger(__name__)

DEFAULT_ROOT = "/sys/class/powercap"
DEFAULT_MAX_POWER_W = 1000.0  # generous bound on one zone's power; sets the wrap-safe poll interval
MAX_POLL_S = 1.0  # poll at least this often even when wraps are hours apart (failure detection)
MIN_POLL_S = 0.001
NOMINAL_UPDATE_PERIOD_S = 0.001  # Intel SDM: RAPL energy status updates about every 1 ms
MIN_POWER_SPAN_S = 0.05  # recent reads must span this long before their mean power is trusted

_ZONE_RE = re.compile(r"^intel-rapl(?::\d+)+$")
_CONTROL_TYPE = "intel-rapl"
_MMIO_RE = re.compile(r"^intel-rapl-mmio(?::\d+)+$")
_NO_ZONES_HINT = (
    "typical inside a VM, a container or WSL, where the hypervisor hides the RAPL registers; on "
    "bare-metal Linux load the driver with 'sudo modprobe intel_rapl_msr'"
)


@dataclass(frozen=True)
class RaplZone:
    """One RAPL zone of the powercap tree."""

    zone_id: str  # folder name, e.g. "intel-rapl:0:2"
    name: str  # content of the name file: package-0, core, uncore, dram, psys
    domain: str  # unique domain name in measurements (the name, made unique if repeated)
    path: str  # real path of the zone folder
    max_energy_range_uj: int | None
    parent: str | None  # zone_id of the enclosing zone, if any

    @property
    def energy_path(self) -> str:
        return os.path.join(self.path, "energy_uj")

    @property
    def kind(self) -> str:
        """package, core, uncore, dram, psys (or the raw name for anything else)."""
        return "package" if self.name.startswith("package") else self.name

    def to_dict(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "zone": self.zone_id,
            "name": self.name,
            "path": self.path,
            "max_energy_range_uj": self.max_energy_range_uj,
            "parent": self.parent,
        }


# ------------------------------------------------------------------------------ discovery
def _zone_sort_key(zone_id: str) -> tuple[int, ...]:
    return tuple(int(p) for p in zone_id.split(":")[1:])


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("ascii", "replace").strip()


def _read_int_or_none(path: str) -> int | None:
    try:
        return int(_read_text(path))
    except (OSError, ValueError):
        return None


def _identity(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of what ``path`` leads to: the same file seen by two paths (a symlink, a
    bind mount) has one identity."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def discover_zones(root: str = DEFAULT_ROOT) -> list[RaplZone]:
    """Every RAPL zone under ``root``, each once, sorted by zone id.

    Walks the flat entries of the class folder and the nested subzone folders (only names like
    ``intel-rapl:N[:M...]``, so the ``subsystem``/``device`` links that point back up the tree are
    never followed). Raises :class:`MeterUnavailable` with the reason when there is none.
    """
    if not os.path.isdir(root):
        raise MeterUnavailable(f"no intel-rapl zones: {root} does not exist ({_NO_ZONES_HINT})")
    found: dict[tuple[int, int], tuple[str, str]] = {}  # zone identity -> (zone_id, folder as seen)
    mmio: list[str] = []
    queue: list[str] = [root]
    seen_dirs: set[tuple[int, int]] = set()
    while queue:
        folder = queue.pop()
        ident = _identity(folder)
        if ident is None or ident in seen_dirs:
            continue
        seen_dirs.add(ident)
        try:
            entries = sorted(os.listdir(folder))
        except OSError:
            continue
        for entry in entries:
            path = os.path.join(folder, entry)
            if _MMIO_RE.match(entry):
                mmio.append(entry)
                continue
            if folder == root and entry == _CONTROL_TYPE and os.path.isdir(path):
                queue.append(path)  # the control-type folder holds the nested layout
                continue
            if not _ZONE_RE.match(entry) or not os.path.isdir(path):
                continue
            # sysfs attributes keep their inode for the zone's lifetime, and a bind mount shows the
            # same inode: the zone's ``name`` attribute identifies it (its folder when it has none)
            zident = _identity(os.path.join(path, "name")) or _identity(path)
            if zident is not None and zident not in found:
                found[zident] = (entry, path)
            queue.append(path)

    zones_raw: list[tuple[str, str, str]] = []  # (zone_id, name, realpath)
    for zone_id, path in found.values():
        zreal = os.path.realpath(path)
        try:
            name = _read_text(os.path.join(path, "name"))
        except OSError:
            continue  # a zone without a readable name is not a RAPL domain we can label
        if not name or not os.path.exists(os.path.join(path, "energy_uj")):
            continue
        zones_raw.append((zone_id, name, zreal))
    if not zones_raw:
        extra = ""
        if mmio:
            extra = (f"; only {', '.join(sorted(set(mmio)))} (power-limit MMIO interface, no separate "
                     "energy counters) is present")
        raise MeterUnavailable(f"no intel-rapl zones: {root} has none{extra} ({_NO_ZONES_HINT})")

    zones_raw.sort(key=lambda z: _zone_sort_key(z[0]))
    ids = {z[0] for z in zones_raw}
    names_by_id = {z[0]: z[1] for z in zones_raw}
    counts = collections.Counter(z[1] for z in zones_raw)
    zones: list[RaplZone] = []
    used: set[str] = set()
    for zone_id, name, zreal in zones_raw:
        parent = zone_id.rsplit(":", 1)[0]
        parent = parent if parent in ids else None
        domain = name
        if counts[name] > 1:
            # e.g. two sockets each with a "dram" subzone: dram-0, dram-1 (number of the package)
            pname = names_by_id.get(parent or "", "")
            m = re.match(r"^package-(\d+)$", pname)
            domain = f"{name}-{m.group(1)}" if m else f"{name}@{zone_id}"
        if domain in used:
            domain = f"{name}@{zone_id}"
        used.add(domain)
        zones.append(
            RaplZone(
                zone_id=zone_id,
                name=name,
                domain=domain,
                path=zreal,
                max_energy_range_uj=_read_int_or_none(os.path.join(zreal, "max_energy_range_uj")),
                parent=parent,
            )
        )
    return zones


def total_domains(zones: Iterable[RaplZone]) -> list[str]:
    """Domains whose sum is the total energy without double counting.

    Packages and dram add up (dram is not part of the package). core, uncore and other subzones
    are inside their package and count only when that package is not selected. psys covers the
    whole platform: it counts only when no package is selected, and then alone.
    """
    zones = list(zones)
    by_id = {z.zone_id: z for z in zones}
    if any(z.kind == "package" for z in zones):
        return [z.domain for z in zones if z.kind == "dram" or z.kind == "package"
                or (z.kind not in ("psys",) and z.parent is not None and z.parent not in by_id)]
    psys = [z.domain for z in zones if z.kind == "psys"]
    if psys:
        return psys
    return [z.domain for z in zones]


def permission_fix(paths: Iterable[str]) -> str:
    """One line saying exactly how to make ``energy_uj`` readable."""
    paths = list(paths)
    files = " ".join(paths)
    return (
        f"cannot read {paths[0]}: permission denied. Since Linux 5.10 (CVE-2020-8694, PLATYPUS) RAPL "
        "energy counters are readable by root only. Fix it one of three ways: (1) run as root, "
        "e.g. 'sudo energyprof measure --meter rapl -- COMMAND'; (2) until the next reboot: "
        f"'sudo chmod a+r {files}'; (3) at every boot, a udev rule: "
        "echo 'ACTION==\"add\", SUBSYSTEM==\"powercap\", KERNEL==\"intel-rapl:*\", "
        "RUN+=\"/bin/chmod a+r /sys%p/energy_uj\"' | sudo tee /etc/udev/rules.d/70-energyprof-rapl.rules "
        "&& sudo udevadm trigger --subsystem-match=powercap --action=add. (2) and (3) reopen the "
        "PLATYPUS side channel to every local user; on a shared machine use a group instead "
        f"('sudo chgrp GROUP {files} && sudo chmod g+r {files}')"
    )


# ------------------------------------------------------------------------------ meter
class _ZoneState:
    """Unwrapping state of one zone; touched only under the meter's lock."""

    __slots__ = ("zone", "tracker", "last_t", "history", "safe_gap_s", "max_gap_s")

    def __init__(self, zone: RaplZone, max_power_w: float) -> None:
        self.zone = zone
        self.tracker = WrapTracker(zone.max_energy_range_uj or None)
        self.last_t: float | None = None
        self.history: collections.deque[tuple[float, float]] = collections.deque(maxlen=64)
        rng = zone.max_energy_range_uj
        # the counter cannot wrap twice between two reads closer than this, whatever the load
        self.safe_gap_s = (rng * 1e-6 / max_power_w) if rng else float("inf")
        self.max_gap_s = 0.0

    def recent_power_w(self) -> float | None:
        """Mean power over the recent reads, or None when they span too little time to tell."""
        if len(self.history) < 2:
            return None
        (t0, e0), (t1, e1) = self.history[0], self.history[-1]
        if t1 - t0 < MIN_POWER_SPAN_S:
            return None
        return (e1 - e0) * 1e-6 / (t1 - t0)


class RaplMeter(CounterMeter):
    """Cumulative RAPL counters, unwrapped by a background poller.

    ``root``: the powercap class folder (default ``/sys/class/powercap``; tests pass a fake tree).
    ``domains``: names to measure (default: all zones found). ``max_power_w``: upper bound on any
    zone's power, which sets the poll interval (range / max_power / 4). ``poll_s``: override it.
    """

    def __init__(
        self,
        root: str = DEFAULT_ROOT,
        domains: Iterable[str] | None = None,
        max_power_w: float = DEFAULT_MAX_POWER_W,
        poll_s: float | None = None,
        sync_device: Any = None,
    ) -> None:
        super().__init__(sync_device=sync_device)
        if max_power_w <= 0:
            raise MeterSpecError(f"rapl: max_power must be > 0 W, got {max_power_w}")
        if poll_s is not None and poll_s <= 0:
            raise MeterSpecError(f"rapl: poll must be > 0 s, got {poll_s}")
        self.root = root
        all_zones = discover_zones(root)
        zones = _select(all_zones, domains, root)
        self.zones = zones
        self.max_power_w = float(max_power_w)
        self._lock = threading.Lock()
        self._states = [_ZoneState(z, self.max_power_w) for z in zones]
        self._unsafe_gaps: list[tuple[str, float]] = []  # (domain, gap seconds)
        self._polls = 0
        self._reader: BackgroundReader | None = None
        self._total_of = total_domains(zones)

        # first read: proves the counters are readable (root-only since Linux 5.10)
        try:
            self._poll()
        except PermissionError:
            raise MeterPermissionError(permission_fix([z.energy_path for z in zones])) from None
        except (OSError, ValueError) as exc:
            raise MeterUnavailable(f"cannot read RAPL counters under {root}: {exc}") from None

        safe = min(s.safe_gap_s for s in self._states)
        auto_poll = min(MAX_POLL_S, max(MIN_POLL_S, safe / 4))
        if safe / 4 < MIN_POLL_S:
            warnings.warn(
                f"rapl: a counter may wrap within {safe * 1e3:.2g} ms at {self.max_power_w:g} W; "
                f"polling every {MIN_POLL_S * 1e3:g} ms cannot guarantee every wrap is seen "
                "(windows with a too-long gap raise MeterFailure)",
                stacklevel=2,
            )
        self.poll_s = float(poll_s) if poll_s is not None else auto_poll
        # Gather MIN_POWER_SPAN_S of history before the first window: with it, a late poll on a busy
        # machine is told apart from a possible unseen wrap (_gap_plausible); without it, a single
        # scheduling delay just after opening would void the first windows.
        first_t = self._states[0].last_t or 0.0
        while self.clock() - first_t < MIN_POWER_SPAN_S and self.poll_s < MIN_POWER_SPAN_S:
            self.sleep(self.poll_s)
            try:
                self._poll()
            except (OSError, ValueError) as exc:
                raise MeterUnavailable(f"cannot read RAPL counters under {root}: {exc}") from None
        self._info = self._make_info()
        self._reader = BackgroundReader(
            f"RAPL wrap poller under {root}",
            lambda stop: periodic(self._poll, self.poll_s, stop, self.clock),
            lambda item: None,  # _poll did the work
            clock=self.clock,
            name="energyprof-rapl-poller",
        ).start()
        log.info("rapl: zones %s under %s, total of %s, polling every %.3g s",
                 ", ".join(f"{z.domain} ({z.zone_id})" for z in zones), root, "+".join(self._total_of), self.poll_s)

    # ------------------------------------------------------------------ reading
    def _poll(self) -> dict[str, float]:
        """Read every zone once (under the lock, so reads and unwrapping stay in order)."""
        with self._lock:
            totals: dict[str, float] = {}
            for st in self._states:
                raw = int(_read_text(st.zone.energy_path))
                t = self.clock()
                if st.last_t is not None:
                    gap = t - st.last_t
                    st.max_gap_s = max(st.max_gap_s, gap)
                    if gap > st.safe_gap_s and not self._gap_plausible(st, gap):
                        self._unsafe_gaps.append((st.zone.domain, gap))
                total_uj = st.tracker.update(raw)
                st.last_t = t
                st.history.append((t, total_uj))
                totals[st.zone.domain] = total_uj * 1e-6
            self._polls += 1
            return totals

    @staticmethod
    def _gap_plausible(st: _ZoneState, gap: float) -> bool:
        """A gap longer than the worst-case wrap time is still unambiguous when the power seen
        just before it, with a 4x margin, could not have filled the counter's range."""
        p = st.recent_power_w()
        rng = st.zone.max_energy_range_uj
        return p is not None and rng is not None and 4.0 * max(p, 0.0) * gap < rng * 1e-6

    def _check_reader(self) -> None:
        if self._reader is not None and self._reader.failure is not None:
            raise self._failure(self._reader.failure)

    def read_counters(self) -> dict[str, float]:
        """Joules per domain since the meter opened, unwrapped."""
        self._check_reader()
        try:
            return self._poll()
        except PermissionError as exc:
            raise MeterFailure(
                f"RAPL counter became unreadable during the measurement: {exc}. "
                + permission_fix([z.energy_path for z in self.zones])
            ) from None
        except (OSError, ValueError) as exc:
            raise self._failure(exc) from None

    def _failure(self, exc: BaseException) -> MeterFailure:
        return MeterFailure(
            f"RAPL counters under {self.root} stopped answering ({type(exc).__name__}: {exc}); "
            "the driver may have been unloaded (check 'lsmod | grep intel_rapl') - the window is void"
        )

    # ------------------------------------------------------------------ windows
    def _snapshot(self) -> dict[str, Any]:
        totals = self.read_counters()
        with self._lock:
            return {
                "t": self.clock(),
                "totals": totals,
                "unsafe": len(self._unsafe_gaps),
                "wraps": {st.zone.domain: st.tracker.wraps for st in self._states},
                "polls": self._polls,
            }

    def _energy_between(self, start: dict[str, Any], end: dict[str, Any]) -> dict[str, float]:
        self._check_reader()
        if end["unsafe"] > start["unsafe"]:
            with self._lock:
                gaps = self._unsafe_gaps[start["unsafe"]:end["unsafe"]]
            raise MeterFailure(self._starved_message(gaps, start, end))
        # A window in which no counter moved reads 0 J with details.counter_moved false; the
        # measurement protocol turns such windows into NoEnergyObserved (and uses short ones to
        # find counter edges), so the meter itself reports what the counters say.
        return {k: end["totals"][k] - start["totals"][k] for k in end["totals"]}

    def _starved_message(self, gaps: list[tuple[str, float]], start: dict[str, Any], end: dict[str, Any]) -> str:
        """Name the zones whose counter may have wrapped unseen: those seen wrapping in this
        window first, then by how much of their range they could have filled in their gap."""
        worst: dict[str, float] = {}
        for domain, gap in gaps:
            worst[domain] = max(worst.get(domain, 0.0), gap)
        by_domain = {st.zone.domain: st for st in self._states}

        def risk(domain: str) -> tuple[int, float]:
            st = by_domain[domain]
            wrapped = end["wraps"][domain] - start["wraps"][domain]
            watts = st.recent_power_w()
            rng = (st.zone.max_energy_range_uj or 0) * 1e-6
            filled = (watts if watts is not None else self.max_power_w) * worst[domain] / rng if rng else 0.0
            return (1 if wrapped else 0, filled)

        ordered = sorted(worst, key=risk, reverse=True)
        names = ", ".join(
            f"{d} ({by_domain[d].zone.zone_id}, wraps every {by_domain[d].safe_gap_s:.3g} s at "
            f"{self.max_power_w:g} W, unread for {worst[d]:.3g} s)" for d in ordered
        )
        return (
            f"RAPL reader was starved during this window: {names}; the counter may have wrapped more "
            "than once unseen, so the window is void (was the process suspended or the machine "
            "overloaded?)"
        )

    def _total(self, domains: Mapping[str, float]) -> float:
        return float(sum(domains[d] for d in self._total_of if d in domains))

    def _window_details(self, start: dict[str, Any], end: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            max_gap = max((st.max_gap_s for st in self._states), default=0.0)
        return {
            "counter_moved": any(end["totals"][k] != start["totals"][k] for k in end["totals"]),
            "wraps": {d: end["wraps"][d] - start["wraps"][d] for d in end["wraps"]},
            "polls": end["polls"] - start["polls"],
            "poll_interval_s": self.poll_s,
            "max_read_gap_s_since_open": max_gap,
            "total_of": list(self._total_of),
        }

    # ------------------------------------------------------------------ description
    def _make_info(self) -> MeterInfo:
        kinds: list[str] = []
        for z in self.zones:
            if z.domain in self._total_of and z.kind not in kinds:
                kinds.append(z.kind)
        return MeterInfo(
            backend="rapl",
            scope="+".join(kinds) or "package",
            kind="counter",
            update_period_s=NOMINAL_UPDATE_PERIOD_S,
            resolution_j=1e-6,
            simulated=False,
            domains=tuple(z.domain for z in self.zones),
            averaging_window_s=None,
            details={
                "root": self.root,
                "zones": [z.to_dict() for z in self.zones],
                "total_of": list(self._total_of),
                "poll_interval_s": self.poll_s,
                "max_power_w": self.max_power_w,
                "update_period_source": "nominal (Intel SDM: about 1 ms); not measured",
                "resolution_note": "energy_uj is in microjoules; the hardware unit is coarser "
                "(typically 15.3 uJ on Intel, 61 uJ for Sapphire Rapids DRAM)",
            },
        )

    @property
    def info(self) -> MeterInfo:
        return self._info

    @property
    def wraps(self) -> dict[str, int]:
        with self._lock:
            return {st.zone.domain: st.tracker.wraps for st in self._states}

    def close(self) -> None:
        if not self._closed and self._reader is not None:
            self._reader.stop()
        super().close()

    def __del__(self) -> None:  # never leave a poller behind
        reader = getattr(self, "_reader", None)
        if reader is not None:
            reader.stop_event.set()


def _select(zones: list[RaplZone], domains: Iterable[str] | None, root: str) -> list[RaplZone]:
    if domains is None:
        return zones
    wanted = list(domains)
    if not wanted:
        raise MeterSpecError("rapl: domains= is empty; name at least one, e.g. domains=package-0")
    by_domain = {z.domain: z for z in zones}
    unknown = [d for d in wanted if d not in by_domain]
    if unknown:
        have = ", ".join(z.domain for z in zones)
        raise MeterSpecError(
            f"rapl: no domain {', '.join(map(repr, unknown))} under {root}; available: {have} "
            "(write several with '+', e.g. domains=package-0+dram)"
        )
    seen: set[str] = set()
    return [by_domain[d] for d in wanted if not (d in seen or seen.add(d))]


# ------------------------------------------------------------------------------ registry hooks
def _params(spec: MeterSpec) -> dict[str, Any]:
    root = spec.get_str("root", DEFAULT_ROOT) or DEFAULT_ROOT
    domains = spec.get_list("domains")
    max_power = spec.get_float("max_power", DEFAULT_MAX_POWER_W)
    poll = spec.get_float("poll")
    spec.check_unused()
    return {"root": root, "domains": domains, "max_power_w": max_power, "poll_s": poll}


def open_from_spec(spec: MeterSpec, **kwargs: Any) -> RaplMeter:
    """``rapl[:root=DIR][,domains=A+B][,max_power=W][,poll=S]``."""
    return RaplMeter(**_params(spec), **kwargs)


def probe(spec: MeterSpec | None = None) -> Any:

    spec = spec if spec is not None else parse_spec("rapl")
    params = _params(spec)
    root = params["root"]
    try:
        zones = _select(discover_zones(root), params["domains"], root)
    except MeterUnavailable as exc:
        return Probe("rapl", False, str(exc), {"root": root})
    details = {"root": root, "zones": [z.to_dict() for z in zones], "total_of": total_domains(zones)}
    unreadable = []
    for z in zones:
        try:
            int(_read_text(z.energy_path))
        except PermissionError:
            unreadable.append(z.energy_path)
        except (OSError, ValueError) as exc:
            return Probe("rapl", False, f"cannot read {z.energy_path}: {exc}", details)
    if unreadable:
        return Probe("rapl", False, permission_fix(unreadable), details)
    names = ", ".join(z.domain for z in zones)
    return Probe(
        "rapl",
        True,
        f"{len(zones)} RAPL zone(s) under {root}: {names} (total = {' + '.join(details['total_of'])})",
        details,
    )
