"""NVML access for the ``nvml`` meter (:mod:`energyprof.meters.nvml`): pynvml calls and their
errors (each NVML code becomes energyprof's exception with the fix in the message), GPU selection
as CUDA numbers them (``CUDA_VISIBLE_DEVICES``, by ordinal or UUID), what each GPU supports, and
the power sensor's update period (measured by fast polling, or published per architecture).
"""

from __future__ import annotations

import logging
import os
import re
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from energyprof.errors import (
    EnergyprofError,
    MeterFailure,
    MeterNotSupported,
    MeterPermissionError,
    MeterUnavailable,
)

__all__ = ["GpuInfo", "discover_gpus", "infer_update_period", "nvml_error", "visible_nvml_indices"]

ARCH_NAMES = {
    2: "Kepler",
    3: "Maxwell",
    4: "Pascal",
    5: "Volta",
    6: "Turing",
    7: "Ampere",
    8: "Ada",
    9: "Hopper",
    10: "Blackwell",
}
ARCH_VOLTA = 5  # pynvml.NVML_DEVICE_ARCH_VOLTA

# Published sensor timing (update period, averaging window) in seconds: Yang, Adamek, Armour,
# "Part-time Power Measurements", SC'24, and its artifact. Used when the period is not measured,
# and always for the averaging window, which polling cannot see.
PUBLISHED_TIMING: dict[str, tuple[float, float]] = {
    "Pascal": (0.020, 0.010),
    "Volta": (0.020, 0.010),
    "Turing": (0.100, 0.100),
    "Ampere": (0.100, 0.025),
    "Hopper": (0.100, 0.025),
}
TIMING_SOURCE = "Yang et al., SC'24 (arXiv 2312.02741)"

log = logging.getLogger("energyprof.meters.nvml")  # the meter's logger

MIN_SAMPLE_S = 0.002
MAX_SAMPLE_S = 0.25
DEFAULT_SAMPLE_S = 0.02  # when the power update period could not be measured
PERIOD_PROBE_S = 1.2  # at most this long polling at open to measure the update period


# ------------------------------------------------------------------------------ pynvml access
def _pynvml():
    try:
        import pynvml
    except ImportError as exc:  # pragma: no cover - it is a dependency of energyprof
        raise MeterUnavailable(
            f"the NVML bindings are not installed ({exc}); install them with 'pip install nvidia-ml-py'"
        ) from None
    return pynvml


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _code(exc: BaseException) -> int | None:
    return getattr(exc, "value", None)


def _is_nvml_error(exc: BaseException) -> bool:
    try:
        return isinstance(exc, _pynvml().NVMLError)
    except MeterUnavailable:  # pragma: no cover
        return False


def nvml_error(exc: BaseException, doing: str, gpu: str | None = None, measuring: bool = False) -> EnergyprofError:
    """Map a ``pynvml.NVMLError`` to energyprof's exception, with what to do about it.

    ``measuring``: the error came while windows may be open; the meter then counts as failed
    (MeterFailure) whatever the code, since a window over it would be wrong.
    """
    nv = _pynvml()
    code = _code(exc)
    on = f" on {gpu}" if gpu else ""
    tag = f"{exc} (NVML error {code})"
    if code == nv.NVML_ERROR_GPU_IS_LOST:
        return MeterFailure(
            f"GPU lost{on} while {doing}: {tag}. It fell off the bus or hit a fatal error; any open "
            "window is void. Check 'nvidia-smi' and the kernel log for Xid errors; the GPU needs a "
            "reset or the machine a reboot"
        )
    if measuring:
        if code == nv.NVML_ERROR_UNINITIALIZED:
            return MeterFailure(
                f"NVML was shut down while {doing}{on}: {tag}. Some other code called nvmlShutdown "
                "more often than nvmlInit; the window is void - open the meter again"
            )
        return MeterFailure(f"the GPU stopped answering{on} while {doing}: {tag}; the window is void")
    if code == nv.NVML_ERROR_LIBRARY_NOT_FOUND:
        return MeterUnavailable(
            f"NVML is unavailable: the library libnvidia-ml.so.1 was not found ({tag}). No NVIDIA "
            "driver is installed here (a machine without an NVIDIA GPU, or a container started "
            "without the NVIDIA Container Toolkit). Install the NVIDIA driver, which ships "
            "libnvidia-ml; in Docker run with '--gpus all'"
        )
    if code == nv.NVML_ERROR_DRIVER_NOT_LOADED:
        return MeterUnavailable(
            f"NVML is unavailable: the NVIDIA kernel driver is not loaded ({tag}). 'nvidia-smi' should "
            "list the GPUs; load the driver ('sudo modprobe nvidia') or reinstall it"
        )
    if code == nv.NVML_ERROR_LIB_RM_VERSION_MISMATCH:
        return MeterUnavailable(
            f"NVML is unavailable: libnvidia-ml and the loaded kernel driver differ in version ({tag}), "
            "usually after a driver upgrade without a reboot; reboot (or reload the nvidia modules)"
        )
    if code == nv.NVML_ERROR_NO_PERMISSION:
        return MeterPermissionError(
            f"NVML refused {doing}{on}: no permission ({tag}). This user needs read/write access to "
            "/dev/nvidiactl and /dev/nvidia* (e.g. membership of the group that owns them, often "
            "'video'); in a container start it with '--gpus all'; or run as root"
        )
    if code == nv.NVML_ERROR_NOT_SUPPORTED:
        return MeterNotSupported(f"{doing}{on} is not supported by this GPU or driver ({tag})")
    if code == nv.NVML_ERROR_UNINITIALIZED:
        return MeterUnavailable(f"NVML is not initialised while {doing}{on} ({tag}); open the meter again")
    return MeterUnavailable(f"NVML failed while {doing}{on}: {tag}")


def _call(fn: Callable[..., Any], *args: Any, doing: str, gpu: str | None = None, measuring: bool = False) -> Any:
    try:
        return fn(*args)
    except Exception as exc:
        if _is_nvml_error(exc):
            raise nvml_error(exc, doing, gpu, measuring) from None
        raise


# ------------------------------------------------------------------------------ GPU selection
def visible_nvml_indices(nv: Any, count: int, environ: Mapping[str, str] | None = None) -> list[int]:
    """NVML indices in CUDA ordinal order, following ``CUDA_VISIBLE_DEVICES`` like CUDA does.

    Integer entries are taken as NVML (PCI-order) indices; ``GPU-...`` entries are (prefixes of)
    UUIDs. As in CUDA, the list ends at the first entry that names no GPU; an empty value hides
    every GPU. MIG instances have no energy counter of their own and are refused.
    """
    env = os.environ if environ is None else environ
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is None:
        return list(range(count))
    uuids: list[str] | None = None
    out: list[int] = []
    for raw in cvd.split(","):
        tok = raw.strip()
        if re.fullmatch(r"-?\d+", tok):
            idx = int(tok)
            if not 0 <= idx < count or idx in out:
                break
            out.append(idx)
        elif tok.startswith("MIG-"):
            raise MeterNotSupported(
                f"CUDA_VISIBLE_DEVICES names a MIG instance ({tok}); NVML has no energy counter per MIG "
                "instance, only per physical GPU. Measure the whole GPU: run energyprof with "
                "CUDA_VISIBLE_DEVICES set to the parent GPU's index or UUID"
            )
        elif tok.startswith("GPU-"):
            if uuids is None:
                uuids = [
                    _text(_call(nv.nvmlDeviceGetUUID, _call(nv.nvmlDeviceGetHandleByIndex, i, doing="opening a GPU"),
                                doing="reading GPU UUIDs"))
                    for i in range(count)
                ]
            matches = [i for i, u in enumerate(uuids) if u.startswith(tok)]
            if len(matches) != 1 or matches[0] in out:
                break
            out.append(matches[0])
        else:
            break
    return out


@dataclass
class GpuInfo:
    """One selected GPU (``handle`` is NVML's; everything else is JSON-friendly)."""

    domain: str
    cuda_index: int
    nvml_index: int
    handle: Any
    name: str
    uuid: str
    arch: str
    pci_bus_id: str | None
    mode: str  # "counter" or "sampled"
    update_period_s: float | None = None
    period_source: str = "unknown"
    averaging_window_s: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "cuda_index": self.cuda_index,
            "nvml_index": self.nvml_index,
            "name": self.name,
            "uuid": self.uuid,
            "architecture": self.arch,
            "pci_bus_id": self.pci_bus_id,
            "mode": self.mode,
            "update_period_s": self.update_period_s,
            "update_period_source": self.period_source,
            "averaging_window_s": self.averaging_window_s,
            "notes": list(self.notes),
        }


def _arch_of(nv: Any, handle: Any, gpu: str) -> str:
    fn = getattr(nv, "nvmlDeviceGetArchitecture", None)
    if fn is None:
        return "unknown"
    try:
        return ARCH_NAMES.get(int(fn(handle)), "unknown")
    except Exception as exc:
        if _is_nvml_error(exc) and _code(exc) in (_pynvml().NVML_ERROR_NOT_SUPPORTED,
                                                   _pynvml().NVML_ERROR_FUNCTION_NOT_FOUND):
            return "unknown"
        if _is_nvml_error(exc):
            raise nvml_error(exc, "reading the GPU architecture", gpu) from None
        raise


def _supported(fn: Callable[[], Any], doing: str, gpu: str) -> bool:
    """True if the call works, False on NotSupported; other NVML errors are raised mapped."""
    try:
        fn()
        return True
    except Exception as exc:
        if _is_nvml_error(exc) and _code(exc) == _pynvml().NVML_ERROR_NOT_SUPPORTED:
            return False
        if _is_nvml_error(exc):
            raise nvml_error(exc, doing, gpu) from None
        raise


def discover_gpus(
    nv: Any, indices: list[int] | None = None, mode: str = "auto", environ: Mapping[str, str] | None = None
) -> list[GpuInfo]:
    """The selected GPUs and how each one is measured (NVML must be initialised)."""
    env = os.environ if environ is None else environ
    count = int(_call(nv.nvmlDeviceGetCount, doing="counting GPUs"))
    if count == 0:
        raise MeterUnavailable("NVML works but sees no GPU on this machine")
    order = visible_nvml_indices(nv, count, env)
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if not order:
        raise MeterUnavailable(
            f"CUDA_VISIBLE_DEVICES={cvd!r} hides every GPU from this process (NVML sees {count}); "
            "unset it or name a GPU, e.g. CUDA_VISIBLE_DEVICES=0"
        )
    wanted = list(range(len(order))) if indices is None else list(indices)
    gpus: list[GpuInfo] = []
    for cuda_i in wanted:
        if not 0 <= cuda_i < len(order):
            seen = f" (CUDA_VISIBLE_DEVICES={cvd!r})" if cvd is not None else ""
            raise MeterUnavailable(
                f"no GPU with index {cuda_i}: this process sees {len(order)} GPU(s){seen}, indices "
                f"0..{len(order) - 1}"
            )
        ni = order[cuda_i]
        gpu = f"gpu{cuda_i}"
        handle = _call(nv.nvmlDeviceGetHandleByIndex, ni, doing=f"opening NVML device {ni}", gpu=gpu)
        name = _text(_call(nv.nvmlDeviceGetName, handle, doing="reading the GPU name", gpu=gpu))
        uuid = _text(_call(nv.nvmlDeviceGetUUID, handle, doing="reading the GPU UUID", gpu=gpu))
        pci = None
        if hasattr(nv, "nvmlDeviceGetPciInfo"):
            try:
                pci = _text(nv.nvmlDeviceGetPciInfo(handle).busId)
            except Exception:
                pci = None
        arch = _arch_of(nv, handle, gpu)
        label = f"{gpu} ({name}, {arch})"
        pre_volta = arch in ("Kepler", "Maxwell", "Pascal")

        def has_counter() -> bool:
            return _supported(lambda: nv.nvmlDeviceGetTotalEnergyConsumption(handle),
                              "reading the energy counter", label)

        def has_power() -> bool:
            return _supported(lambda: nv.nvmlDeviceGetPowerUsage(handle), "reading power", label)

        notes: list[str] = []
        if mode == "counter":
            if pre_volta or not has_counter():
                raise MeterNotSupported(
                    f"{label} has no energy counter (nvmlDeviceGetTotalEnergyConsumption needs Volta or "
                    "newer); use 'nvml:mode=sampled' to integrate its power readings instead"
                )
            chosen = "counter"
        elif mode == "sampled":
            if not has_power():
                raise MeterNotSupported(f"{label} reports no power (nvmlDeviceGetPowerUsage is not supported)")
            chosen = "sampled"
        elif not pre_volta and has_counter():
            chosen = "counter"
        elif has_power():
            chosen = "sampled"
            notes.append("no energy counter (pre-Volta or not supported): integrating polled power"
                         if pre_volta else "energy counter not supported: integrating polled power")
        else:
            raise MeterNotSupported(
                f"{label} offers neither an energy counter nor power readings through NVML; measure it "
                "with an external meter"
            )
        info = GpuInfo(gpu, cuda_i, ni, handle, name, uuid, arch, pci, chosen, notes=notes)
        if arch in PUBLISHED_TIMING:
            info.averaging_window_s = PUBLISHED_TIMING[arch][1]
        gpus.append(info)

    if env.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID" and count > 1 and (cvd is None or re.match(r"^\s*\d", cvd)):
        names = {_text(_call(nv.nvmlDeviceGetName, _call(nv.nvmlDeviceGetHandleByIndex, i, doing="opening a GPU"),
                             doing="reading GPU names")) for i in range(count)}
        if len(names) > 1:
            warnings.warn(
                "this machine mixes GPU models and CUDA_DEVICE_ORDER is not PCI_BUS_ID: CUDA then numbers "
                "GPUs fastest first while NVML uses PCI order, so 'index' may name another GPU than "
                "cuda:N. Set CUDA_DEVICE_ORDER=PCI_BUS_ID (or name GPUs by UUID in CUDA_VISIBLE_DEVICES)",
                stacklevel=3,
            )
    return gpus


# ------------------------------------------------------------------------------ update period
def infer_update_period(
    readers: Mapping[str, Callable[[], float]],
    clock: Callable[[], float] = time.perf_counter,
    max_s: float = PERIOD_PROBE_S,
    min_changes: int = 6,
    pause_s: float = 0.0005,
) -> dict[str, float | None]:
    """Poll each reader fast and return the median time between changes of its value (None when
    fewer than three changes were seen within ``max_s``)."""
    last = {k: r() for k, r in readers.items()}
    changes: dict[str, list[float]] = {k: [] for k in readers}
    t_end = clock() + max_s
    while clock() < t_end and any(len(c) < min_changes for c in changes.values()):
        for k, read in readers.items():
            if len(changes[k]) >= min_changes:
                continue
            v = read()
            t = clock()
            if v != last[k]:
                changes[k].append(t)
                last[k] = v
        time.sleep(pause_s)
    out: dict[str, float | None] = {}
    for k, ts in changes.items():
        gaps = [b - a for a, b in zip(ts, ts[1:])]
        out[k] = statistics.median(gaps) if len(gaps) >= 2 else None
    return out
