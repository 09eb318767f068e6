"""Power sensors that a Linux kernel driver already reads, through hwmon (``hwmon``).

``hwmon`` (the board's total-input rail, or the only power channel there is),
``hwmon:name=ina3221,channel=VDD_IN``, ``hwmon:name=ina219``, ``hwmon:root=DIR,...``. Keys:
``root`` (default ``/sys/class/hwmon``; tests pass a tree written in a temporary folder, as
``rapl:root=DIR`` does), ``name`` (the chip's ``name`` file: ``ina3221``, ``ina219``,
``ina226``, ``ina260``, ``ina238``, ``amdgpu``, ``xe``, ``i915``...), ``device`` (``hwmonN``, or
the device the hwmon node belongs to, e.g. the I2C client ``1-0041``, when several chips share a
name), ``gpu`` (a GPU's node: ``any``, its PCI address, its DRM card ``card1`` or its torch device
``cuda:0``/``xpu:0``), ``channel`` (a
label from a ``*_label`` file, or a channel number; ``A+B`` sums disjoint rails), ``rate_hz``
(default 50) and the sampled-meter keys ``max_gap_s``, ``startup_s``, ``scope``.

The kernel's hwmon ABI (Documentation/hwmon/sysfs-interface.rst): ``/sys/class/hwmon/hwmonN`` is
a link to the hwmon device under its parent device; its folder holds ``name`` and the attribute
files (drivers of the old style put them in ``hwmonN/device/`` instead; both are read). Units:
``power*_input`` microwatts, ``energy*_input`` microjoules (a counter), ``in*_input`` millivolts,
``curr*_input`` milliamps. A channel is read, in this order of preference, as

* an energy counter (``energyN_input``): a :class:`CounterMeter`, read at the window edges;
* a power reading (``powerN_input``, or ``powerN_average`` where a driver has only that): polled
  and integrated by the sampling core (:class:`SampledMeter`);
* bus voltage times current (``inN_input`` x ``currN_input``) for chips that report no power,
  where the pair is one rail (a label names it, or the chip's layout is known): the INA3221 (Documentation/hwmon/ina3221.rst: ``in[123]_input`` bus voltage in mV,
  ``curr[123]_input`` current in mA, ``in[123]_label`` the rail names, ``in[456]_input`` the
  shunt voltages, ``in7``/``curr4`` the sums), the driver NVIDIA Jetson boards use from JetPack 5.

GPU nodes (``amdgpu``, Intel ``xe`` and ``i915``) have scope ``gpu``: the meter says which GPU
(PCI address, DRM card) in ``details["gpu"]`` and sets ``info.torch_device`` to the device whose
kernels it sees (``cuda:N`` under ROCm, ``xpu:N`` for Intel; see :func:`gpu_identity`); ``xe``'s
default channel is the card (``energy1``, label ``card``), not its package.

A sensor file that disappears while the meter runs (ENOENT or ENODEV: the driver was unbound or
the device removed) fails the window at once with the file named; other read errors (an I2C
error surfacing as EIO) are retried by the sampling core until ``max_gap_s``.

Jetson: the INA3221 channels are nested, not disjoint. ``VDD_IN`` (Orin NX / Orin Nano, Xavier NX,
TX2) or ``POM_5V_IN`` (Nano) is the module's whole input; the other rails are parts of it, so they
are never summed with it. Without ``channel`` the meter takes that total-input rail. Boards with
no total-input rail on the monitor (AGX Xavier, AGX Orin) need ``channel=``: the error lists the
labels. See docs/power-meters.md.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass, replace
from typing import Any, Iterator

from energyprof.errors import MeterFailure, MeterPermissionError, MeterSpecError, MeterUnavailable
from energyprof.meters.base import CounterMeter, MeterInfo, WrapTracker
from energyprof.meters.sampled import PolledSource, SampledMeter, SampledOptions
from energyprof.meters.spec import MeterSpec

__all__ = ["HwmonChannel", "HwmonCounterMeter", "discover", "open_from_spec", "probe", "TOTAL_INPUT_LABELS"]

DEFAULT_ROOT = "/sys/class/hwmon"
DEFAULT_RATE_HZ = 50.0
# labels of the rail that carries a whole Jetson module (what tegrastats and jtop report as the
# total): VDD_IN on Orin NX / Orin Nano / Xavier NX / TX2, POM_5V_IN on the Nano
TOTAL_INPUT_LABELS = ("VDD_IN", "POM_5V_IN")
# chips whose inN/currN pairs are bus voltage and current of one rail (the others are shunt
# voltages and sums): the INA3221's channels 1-3
_VI_CHANNELS = {"ina3221": range(1, 4)}
_GONE = (errno.ENOENT, errno.ENODEV, errno.ENXIO)
# GPU drivers with hwmon power or energy channels, and the torch device type whose kernels they see
# (Documentation/gpu/amdgpu/thermal.rst; Documentation/ABI/testing/sysfs-driver-intel-i915-hwmon and
# sysfs-driver-intel-xe-hwmon): amdgpu power1_input / power1_average (uW); i915 energy1_input (uJ,
# discrete GPUs only); xe energy1_input (card) and energy2_input (pkg), labelled "card" / "pkg"
GPU_DRIVERS = {"amdgpu": "cuda", "xe": "xpu", "i915": "xpu"}
_PCI_VENDOR = {"amdgpu": "0x1002", "xe": "0x8086", "i915": "0x8086"}
_GPU_PREFERRED = ("card",)  # xe: the whole card rather than its package
_ATTR = re.compile(r"^(power|energy|curr|in)(\d+)_(input|average|label)$")


class SensorGone(Exception):
    """A sensor file vanished (driver unbound, device removed): not worth retrying."""


@dataclass(frozen=True)
class HwmonChannel:
    """One power channel of one hwmon chip."""

    hwmon: str  # hwmonN
    device: str  # what the hwmon node belongs to (the I2C client ``1-0040``, a PCI address...)
    chip: str  # the ``name`` file
    index: int
    label: str | None
    kind: str  # "energy" | "power" | "volts_amps"
    files: tuple[str, ...]  # full paths: energy or power file, or (in, curr)

    @property
    def title(self) -> str:
        return self.label or f"{'power' if self.kind == 'volts_amps' else self.kind}{self.index}"

    def to_dict(self) -> dict[str, Any]:
        return {"hwmon": self.hwmon, "device": self.device, "chip": self.chip, "index": self.index,
                "label": self.label, "kind": self.kind, "files": list(self.files)}


def gpu_identity(root: str, hwmon: str, chip: str) -> dict[str, Any] | None:
    """Which GPU a hwmon node belongs to: PCI address, DRM card, and the torch device whose kernels
    it sees (``cuda:N`` under ROCm for amdgpu, ``xpu:N`` for Intel), or None for other chips.

    N counts the DRM cards of the same PCI vendor in PCI order (the class folder ``drm`` beside
    ``hwmon``; an integrated GPU without a hwmon node counts too); for amdgpu the ROCm visibility
    variables (ROCR_/HIP_/CUDA_VISIBLE_DEVICES) then map it to the HIP ordinal, or to None when
    they hide it. Level Zero's ZE_AFFINITY_MASK is not applied."""
    kind = GPU_DRIVERS.get(chip.lower())
    if kind is None:
        return None
    device = os.path.realpath(os.path.join(root, hwmon, "device"))
    pci = os.path.basename(device)
    cards = sorted((d for d in (os.listdir(os.path.join(device, "drm")) if os.path.isdir(os.path.join(device, "drm"))
                                else []) if re.fullmatch(r"card\d+", d)), key=_natural)
    vendor = _PCI_VENDOR[chip.lower()]
    peers: set[str] = set()
    drm = os.path.join(os.path.dirname(root), "drm")
    if os.path.isdir(drm):
        for card in os.listdir(drm):
            if not re.fullmatch(r"card\d+", card):
                continue
            dev = os.path.realpath(os.path.join(drm, card, "device"))
            try:
                if _read_text(os.path.join(dev, "vendor")).lower() == vendor:
                    peers.add(os.path.basename(dev))
            except OSError:
                continue
    basis = "DRM cards of this vendor in PCI order"
    if pci not in peers:  # no drm class folder: the GPU hwmon nodes of this vendor
        peers = {pci}
        for node in os.listdir(root):
            try:
                if _read_text(os.path.join(root, node, "name")).lower() in [c for c, v in _PCI_VENDOR.items() if v == vendor]:
                    peers.add(os.path.basename(os.path.realpath(os.path.join(root, node, "device"))))
            except OSError:
                continue
        basis = "GPU hwmon nodes of this vendor in PCI order"
    physical = sorted(peers).index(pci)
    index: int | None = physical
    if kind == "cuda":
        from energyprof.meters.amdsmi import visible_physical_indices

        try:
            order = visible_physical_indices(len(peers))
        except MeterSpecError as exc:
            order, basis = [], f"{basis}; {exc}"
        index = order.index(physical) if physical in order else None
        basis += "; ROCR_/HIP_/CUDA_VISIBLE_DEVICES applied"
    return {"driver": chip, "pci": pci, "card": cards[0] if cards else None,
            "torch_device": f"{kind}:{index}" if index is not None else None,
            "torch_device_basis": basis if index is not None else f"{basis}: hidden from this process"}


def _read_text(path: str) -> str:
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read().strip()


def _natural(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def _chip_folder(node: str) -> str | None:
    """The folder holding ``name`` and the attributes: the hwmon node, or (old-style drivers) its device."""
    for folder in (node, os.path.join(node, "device")):
        if os.path.isfile(os.path.join(folder, "name")):
            return folder
    return None


def discover(root: str = DEFAULT_ROOT) -> tuple[list[HwmonChannel], list[dict[str, Any]]]:
    """Every power channel under ``root`` and, for ``detect``, every chip (power or not)."""
    if not os.path.isdir(root):
        raise MeterUnavailable(f"no hwmon sensors: {root} does not exist (no hwmon drivers, or not Linux)")
    channels: list[HwmonChannel] = []
    chips: list[dict[str, Any]] = []
    for node_name in sorted(os.listdir(root), key=_natural):
        node = os.path.join(root, node_name)
        folder = _chip_folder(node)
        if folder is None:
            continue
        try:
            chip = _read_text(os.path.join(folder, "name"))
            files = os.listdir(folder)
        except OSError:
            continue
        device_link = os.path.join(node, "device")
        device = os.path.basename(os.path.realpath(device_link)) if os.path.exists(device_link) else node_name
        attrs: dict[tuple[str, int], dict[str, str]] = {}
        for f in files:
            m = _ATTR.match(f)
            if m:
                attrs.setdefault((m[1], int(m[2])), {})[m[3]] = os.path.join(folder, f)

        def label(kind: str, i: int) -> str | None:
            path = attrs.get((kind, i), {}).get("label")
            try:
                return _read_text(path) if path else None
            except OSError:
                return None

        found: list[HwmonChannel] = []
        taken: set[int] = set()
        for (kind, i), a in sorted(attrs.items(), key=lambda kv: kv[0][1]):
            if kind == "energy" and "input" in a:
                found.append(HwmonChannel(node_name, device, chip, i, label("energy", i) or label("power", i),
                                          "energy", (a["input"],)))
                taken.add(i)
        for (kind, i), a in sorted(attrs.items(), key=lambda kv: kv[0][1]):
            if kind == "power" and i not in taken and ("input" in a or "average" in a):
                found.append(HwmonChannel(node_name, device, chip, i, label("power", i),
                                          "power", (a.get("input") or a["average"],)))
                taken.add(i)
        pairs = _VI_CHANNELS.get(chip.lower())
        for (kind, i), a in sorted(attrs.items(), key=lambda kv: kv[0][1]):
            if kind != "in" or i in taken or "input" not in a or "input" not in attrs.get(("curr", i), {}):
                continue
            lab = label("in", i) or label("curr", i)
            if (pairs is not None and i in pairs) or (pairs is None and lab):
                found.append(HwmonChannel(node_name, device, chip, i, lab, "volts_amps",
                                          (a["input"], attrs[("curr", i)]["input"])))
        found.sort(key=lambda c: c.index)
        channels.extend(found)
        chips.append({"hwmon": node_name, "device": device, "chip": chip,
                      "channels": [c.title for c in found]})
    return channels, chips


# --------------------------------------------------------------------------- reading
def _read_number(path: str) -> int:
    try:
        text = _read_text(path)
    except OSError as exc:
        if exc.errno in _GONE:
            raise SensorGone(
                f"sensor file {path} is gone ({os.strerror(exc.errno)}): the driver was unbound or the "
                "device removed; the energy after that is unknown"
            ) from exc
        if exc.errno == errno.ENODATA:
            raise SensorGone(f"sensor file {path} has no data (ENODATA): the channel is disabled") from exc
        if isinstance(exc, PermissionError):
            raise MeterPermissionError(f"cannot read {path}: {exc}; run as a user who may read it") from exc
        raise  # EIO and friends: the sampling core retries until max_gap_s
    try:
        return int(text)
    except ValueError:
        raise MeterFailure(f"sensor file {path} holds {text[:40]!r}, not an integer") from None


def channel_watts(channel: HwmonChannel) -> float:
    """The channel's power now: microwatts, or millivolts x milliamps."""
    if channel.kind == "volts_amps":
        return _read_number(channel.files[0]) * _read_number(channel.files[1]) * 1e-6
    return _read_number(channel.files[0]) * 1e-6


class _HwmonSource(PolledSource):
    """Polls the channels; a vanished sensor ends sampling at once (no retries) with the file named."""

    def samples(self) -> Iterator[tuple[float, float]]:
        try:
            yield from super().samples()
        except SensorGone as exc:
            raise MeterFailure(str(exc)) from exc


class HwmonCounterMeter(CounterMeter):
    """``energy*_input`` counters (microjoules), read at the window edges."""

    def __init__(self, channels: list[HwmonChannel], info: MeterInfo, sync_device: Any = None) -> None:
        super().__init__(sync_device=sync_device)
        self.channels = channels
        self._info = info
        self._trackers = {c.title: WrapTracker(None) for c in channels}
        self.read_counters()

    @property
    def info(self) -> MeterInfo:
        return self._info

    def read_counters(self) -> dict[str, float]:
        out = {}
        for c in self.channels:
            try:
                raw = _read_number(c.files[0])
            except (SensorGone, OSError) as exc:
                raise MeterFailure(str(exc) if isinstance(exc, SensorGone) else f"reading {c.files[0]} failed: {exc}") from exc
            try:
                out[c.title] = self._trackers[c.title].update(raw) * 1e-6
            except ValueError:
                raise MeterFailure(
                    f"energy counter {c.files[0]} went backwards (driver reloaded or counter reset); "
                    "the energy of this window is unknown"
                ) from None
        return out


# --------------------------------------------------------------------------- selection
def _describe(channels: list[HwmonChannel]) -> str:
    by_chip: dict[tuple[str, str, str], list[str]] = {}
    for c in channels:
        by_chip.setdefault((c.chip, c.hwmon, c.device), []).append(c.title)
    return "; ".join(f"{chip} {hw} ({dev}): {', '.join(titles)}" for (chip, hw, dev), titles in by_chip.items())


def _select(channels: list[HwmonChannel], spec: MeterSpec, root: str) -> tuple[list[HwmonChannel], bool]:
    """The channels the spec names, and whether they are the board's total input."""
    name = spec.get_str("name")
    device = spec.get_str("device")
    wanted = spec.get_list("channel")
    gpu = spec.get_str("gpu")
    pool = channels
    if gpu:
        pool = _gpu_pool(channels, gpu, root)
    if name:
        pool = [c for c in pool if c.chip.lower() == name.lower()]
        if not pool:
            raise MeterUnavailable(
                f"hwmon: no power sensor named {name!r} under {root}; found: {_describe(channels) or 'none'}"
            )
    if device:
        pool = [c for c in pool if device in (c.hwmon, c.device)]
        if not pool:
            raise MeterUnavailable(f"hwmon: no device {device!r} among {_describe(channels)}")
    if wanted:
        picked = []
        for w in wanted:
            hits = [c for c in pool if (c.label or "").lower() == w.lower()] or [
                c for c in pool if w.lower() in (str(c.index), f"{c.kind}{c.index}", c.title.lower())]
            if not hits:
                raise MeterUnavailable(f"hwmon: no channel {w!r}; found: {_describe(pool)}")
            if len({(c.hwmon, c.index) for c in hits}) > 1:
                raise MeterSpecError(
                    f"hwmon: channel {w!r} is on several chips ({_describe(hits)}); add device=hwmonN or name=CHIP"
                )
            picked.append(hits[0])
        total = len(picked) == 1 and (picked[0].label or "").upper() in TOTAL_INPUT_LABELS
        return picked, total
    totals = [c for c in pool if (c.label or "").upper() in TOTAL_INPUT_LABELS]
    if len(totals) == 1:
        return totals, True
    if pool and len({c.hwmon for c in pool}) == 1 and pool[0].chip.lower() in GPU_DRIVERS:
        # one GPU's node: its whole card (xe "card", not "pkg"), else its first channel
        preferred = [c for c in pool if (c.label or "").lower() in _GPU_PREFERRED] or pool[:1]
        return preferred, True
    if len(pool) == 1:
        return pool, True
    if not pool:
        raise MeterUnavailable(f"hwmon: no power sensors under {root}")
    raise MeterSpecError(
        f"hwmon: {len(pool)} power channels and none is a total-input rail "
        f"({' or '.join(TOTAL_INPUT_LABELS)}): {_describe(pool)}. Name one with channel=LABEL (and "
        "name=CHIP or device=hwmonN); on Jetson the rails are nested parts of the input, so add "
        "rails with channel=A+B only when they are disjoint"
    )


def _gpu_pool(channels: list[HwmonChannel], gpu: str, root: str) -> list[HwmonChannel]:
    """The channels of the GPU named by ``gpu``: ``any`` (the first GPU, by torch device), a PCI
    address, a DRM card (``card1``) or a torch device (``cuda:0``, ``xpu:0``)."""
    nodes: dict[str, dict[str, Any]] = {}
    for c in channels:
        if c.hwmon not in nodes:
            ident = gpu_identity(root, c.hwmon, c.chip)
            if ident is not None:
                nodes[c.hwmon] = ident
    if not nodes:
        raise MeterUnavailable(f"hwmon: no GPU power sensor ({', '.join(GPU_DRIVERS)}) under {root}")
    if gpu == "any":
        ranked = sorted(nodes, key=lambda n: (nodes[n]["torch_device"] is None, nodes[n]["torch_device"] or "",
                                              nodes[n]["pci"]))
        hit = ranked[0]
    else:
        hits = [n for n, i in nodes.items() if gpu in (i["pci"], i["card"], i["torch_device"], n)]
        if not hits:
            listing = "; ".join(f"{i['driver']} {n} ({i['pci']}, {i['card']}, {i['torch_device']})" for n, i in nodes.items())
            raise MeterUnavailable(f"hwmon: no GPU {gpu!r}; GPU sensors: {listing}")
        hit = hits[0]
    return [c for c in channels if c.hwmon == hit]


def _as_power(channel: HwmonChannel) -> HwmonChannel:
    """An energy channel used beside power channels: its power file, when the driver has one."""
    if channel.kind != "energy":
        return channel
    folder = os.path.dirname(channel.files[0])
    for name in (f"power{channel.index}_input", f"power{channel.index}_average"):
        if os.path.isfile(os.path.join(folder, name)):
            return replace(channel, kind="power", files=(os.path.join(folder, name),))
    raise MeterSpecError(
        f"hwmon: {channel.title} of {channel.chip} has only an energy counter, which cannot be added to "
        "power readings; measure it on its own"
    )


def _params(spec: MeterSpec) -> str:
    return spec.get_str("root", DEFAULT_ROOT) or DEFAULT_ROOT


def open_from_spec(spec: MeterSpec, **kwargs: Any):
    root = _params(spec)
    options = SampledOptions.from_spec(spec, default_rate_hz=DEFAULT_RATE_HZ)
    channels, _ = discover(root)
    picked, total = _select(channels, spec, root)
    spec.check_unused()
    gpus = {c.hwmon: gpu_identity(root, c.hwmon, c.chip) for c in picked}
    gpu = next(iter(gpus.values())) if len(gpus) == 1 else None
    if any(gpus.values()) and gpu is None:
        raise MeterSpecError("hwmon: these channels belong to several devices, one at least a GPU; measure one GPU "
                             "at a time (gpu=PCI address, card or torch device)")
    scope = spec.params.get("scope") or ("gpu" if gpu else "board" if total else "+".join(c.title for c in picked))
    details: dict[str, Any] = {
        "root": root,
        "channels": [c.to_dict() for c in picked],
        "total_input": total,
    }
    torch_device = None
    if gpu:
        details["gpu"] = gpu
        torch_device = gpu["torch_device"]
        if gpu["driver"] == "amdgpu":
            details["note"] = ("amdgpu's power1 is the power the SMU reports for the whole package (on an APU "
                               "it includes the CPU cores)")
    if any(c.chip.lower() == "ina3221" for c in picked):
        details["note"] = ("INA3221 rails: the module's input (VDD_IN / POM_5V_IN) leaves out the carrier "
                           "board's own draw and its regulator losses upstream of the module")
    interval = os.path.join(os.path.dirname(picked[0].files[0]), "update_interval")
    try:
        details["sensor_update_interval_s"] = _read_number(interval) / 1000.0
    except (OSError, SensorGone, MeterFailure):
        pass
    if all(c.kind == "energy" for c in picked):
        info = MeterInfo(backend="hwmon", scope=scope, kind="counter", update_period_s=None,
                         resolution_j=1e-6, simulated=False, domains=tuple(c.title for c in picked),
                         details=details, torch_device=torch_device)
        try:
            return HwmonCounterMeter(picked, info, **kwargs)
        except MeterFailure as exc:
            raise MeterUnavailable(str(exc)) from exc
    picked = [_as_power(c) for c in picked]
    period_s = options.period_s
    for c in picked:  # one reading now: permissions, disabled channels and garbage show at opening
        try:
            channel_watts(c)
        except SensorGone as exc:
            raise MeterUnavailable(str(exc)) from exc
        except OSError as exc:
            raise MeterUnavailable(f"cannot read {', '.join(c.files)}: {exc}") from exc
    info = MeterInfo(backend="hwmon", scope=scope, kind="sampled", update_period_s=period_s,
                     resolution_j=None, simulated=False, domains=(scope,), details=details,
                     torch_device=torch_device)
    source = _HwmonSource(
        f"hwmon {_describe(picked)}", lambda: sum(channel_watts(c) for c in picked), period_s,
        give_up_s=options.max_gap_for(period_s),
    )
    return SampledMeter(source, info, options, **kwargs)


def probe(spec: MeterSpec) -> Any:
    from energyprof.meters import Probe

    root = _params(spec)
    try:
        channels, chips = discover(root)
    except MeterUnavailable as exc:
        return Probe("hwmon", False, str(exc), {"root": root})
    others = sorted({c["chip"] for c in chips if not c["channels"]})
    details: dict[str, Any] = {"root": root, "channels": [c.to_dict() for c in channels], "chips": chips}
    if not channels:
        seen = f" (hwmon chips without power channels: {', '.join(others)})" if others else ""
        return Probe("hwmon", False, f"no hwmon power sensors under {root}{seen}", details)
    if spec.params.get("gpu"):  # e.g. 'hwmon:gpu=any' in --meter auto: usable only where a GPU node is
        try:
            picked, _ = _select(channels, MeterSpec("hwmon", dict(spec.params)), root)
        except (MeterSpecError, MeterUnavailable) as exc:
            return Probe("hwmon", False, str(exc), details)
        ident = gpu_identity(root, picked[0].hwmon, picked[0].chip) or {}
        return Probe("hwmon", True, f"GPU {picked[0].chip} {picked[0].hwmon} ({ident.get('pci')}, {ident.get('card')}, "
                     f"{ident.get('torch_device') or 'hidden from torch'}): {'+'.join(c.title for c in picked)}", details)
    readings = []
    for c in channels:
        try:
            value = f"{channel_watts(c):.3g} W" if c.kind != "energy" else f"{_read_number(c.files[0]) * 1e-6:.6g} J"
        except (OSError, SensorGone, MeterFailure) as exc:
            value = f"unreadable: {exc}"
        readings.append(value)
    details["readings"] = readings
    idents = {c.hwmon: gpu_identity(root, c.hwmon, c.chip) for c in channels}
    details["gpus"] = {n: i for n, i in idents.items() if i}

    def where(c: HwmonChannel) -> str:
        i = idents[c.hwmon]
        if i is None:
            return c.device
        return f"GPU {i['pci']}, {i['card'] or 'no DRM card'}, {i['torch_device'] or 'hidden from torch'}"

    listing = "; ".join(
        f"{c.chip} {c.hwmon} ({where(c)}) {c.title} [{c.kind}, {r}]" for c, r in zip(channels, readings)
    )
    try:
        picked, _ = _select(channels, MeterSpec("hwmon", {k: v for k, v in spec.params.items()}), root)
        default = f"; default: {picked[0].chip} {'+'.join(c.title for c in picked)}"
    except (MeterSpecError, MeterUnavailable):
        default = "; give name=CHIP,channel=LABEL to pick one"
    extra = f"; other hwmon chips: {', '.join(others)}" if others else ""
    return Probe("hwmon", True, f"{len(channels)} power channel(s) under {root}: {listing}{default}{extra}", details)
