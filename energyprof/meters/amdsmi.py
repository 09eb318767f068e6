"""AMD GPUs through AMD's ``amdsmi`` Python package (``amdsmi``, ``amdsmi:index=0``).

Install: ``pip install 'energyprof[amd]'``, or use the copy ROCm ships
(``/opt/rocm/share/amd_smi``, on ``PYTHONPATH``); it needs the amdgpu driver and ROCm's
``libamd_smi.so``. Calls used (ROCm's py-interface/README.md and amdsmi_interface.py):

* ``amdsmi_init(AmdSmiInitFlags.INIT_AMD_GPUS)``, ``amdsmi_get_processor_handles()``,
  ``amdsmi_shut_down()``;
* ``amdsmi_get_energy_count(handle)`` -> dict: ``energy_accumulator`` (ROCm 6.3 and later; the
  same value was called ``power`` up to ROCm 6.2, and is kept under that name "deprecating in
  6.4"), ``counter_resolution`` (uJ per count, e.g. 15.3) and ``timestamp`` (ns). Joules =
  accumulator x resolution x 1e-6. The accumulator is a ``uint64_t``: it wraps at 2**64 counts
  unless ``wrap_bits`` says the firmware's accumulator is narrower; a window over a wrap is exact
  (integer counts, unwrapped before scaling), and with ``wrap_bits`` < 64 a background reader
  reads the counter every second so that no wrap goes unseen. A step back by more than half the
  range is not a wrap but a reset (GPU reset, driver reload): the window fails;
* ``amdsmi_get_power_info(handle)`` -> dict with ``current_socket_power`` and
  ``average_socket_power`` in watts (integers; "N/A" where the GPU has none): the fallback where
  the energy counter is not supported (``AMDSMI_STATUS_NOT_SUPPORTED``), polled (``rate_hz``,
  default 20) and integrated by the sampling core;
* ``amdsmi_get_gpu_device_bdf``, ``amdsmi_get_gpu_asic_info`` (``market_name``) and, where it
  exists, ``amdsmi_get_gpu_kfd_info`` (``node_id``) to describe and order the GPUs.

Errors (``AmdSmiLibraryException`` with the ``amdsmi_status_t`` code of amd_smi/amdsmi.h) map to
energyprof's exceptions as NVML's do: not supported -> MeterNotSupported, no permission ->
MeterPermissionError, driver or library missing -> MeterUnavailable, anything while measuring ->
MeterFailure. Every call runs through one :class:`DeviceCaller` (``call_timeout``): a call that
never returns fails the window and the meter within that bound, naming the call.

GPU selection follows ROCm: ``index`` is the HIP ordinal (``cuda:N`` in a ROCm build of torch).
``ROCR_VISIBLE_DEVICES`` selects among the physical GPUs first, then ``HIP_VISIBLE_DEVICES`` (or,
when it is unset, ``CUDA_VISIBLE_DEVICES``, which HIP honours too) indexes what remains. Physical
order is the KFD node order where amdsmi reports it (``amdsmi_get_gpu_kfd_info``), else PCI
order; entries are integers (a UUID entry is refused with a clear message). Domains are
``gpu<ordinal>``; ``info.torch_device`` is ``cuda:<ordinal>``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from energyprof.errors import (
    EnergyprofError,
    MeterFailure,
    MeterNotSupported,
    MeterPermissionError,
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
    WrapTracker,
    periodic,
)
from energyprof.meters.sampled import PolledSource, SampledMeter, SampledOptions
from energyprof.meters.spec import MeterSpec, parse_spec

__all__ = ["AmdsmiCounterMeter", "AmdGpu", "amdsmi_error", "visible_physical_indices", "open_from_spec", "probe"]

log = logging.getLogger(__name__)

# amdsmi_status_t (amd_smi/amdsmi.h)
STATUS_NOT_SUPPORTED = 2
STATUS_FAIL_LOAD_MODULE = 4
STATUS_NO_PERM = 10
STATUS_INIT_ERROR = 18
STATUS_NOT_FOUND = 31
STATUS_NOT_INIT = 32
STATUS_DRIVER_NOT_LOADED = 34
DEFAULT_RATE_HZ = 20.0
WRAP_POLL_S = 1.0  # with a narrow accumulator: read at least this often


def _amdsmi():
    try:
        import amdsmi  # noqa: F401  (optional: pip install 'energyprof[amd]', or ROCm's share/amd_smi)
    except ImportError as exc:
        raise MeterUnavailable(
            f"the amdsmi Python package is not installed ({exc}); install it with "
            "\"pip install 'energyprof[amd]'\" or put ROCm's /opt/rocm/share/amd_smi on PYTHONPATH"
        ) from None
    except OSError as exc:  # the package imports, its libamd_smi.so does not load
        raise MeterUnavailable(f"amdsmi cannot load ROCm's libamd_smi.so ({exc}); install ROCm") from None
    return amdsmi


def _code(exc: BaseException) -> int | None:
    get = getattr(exc, "get_error_code", None)
    try:
        return int(get()) if get is not None else getattr(exc, "err_code", None)
    except Exception:
        return None


def _is_amdsmi_error(sm: Any, exc: BaseException) -> bool:
    base = getattr(sm, "AmdSmiException", None)
    return base is not None and isinstance(exc, base)


def amdsmi_error(exc: BaseException, doing: str, gpu: str | None = None, measuring: bool = False) -> EnergyprofError:
    """Map an amdsmi exception to energyprof's, with what to do about it."""
    code = _code(exc)
    on = f" on {gpu}" if gpu else ""
    tag = f"{str(exc).strip()} (amdsmi status {code})".replace("\n", " ").replace("\t", "")
    if measuring:
        return MeterFailure(f"the GPU stopped answering{on} while {doing}: {tag}; the window is void")
    if code == STATUS_NOT_SUPPORTED:
        return MeterNotSupported(f"{doing}{on} is not supported by this GPU or driver ({tag})")
    if code == STATUS_NO_PERM:
        return MeterPermissionError(
            f"amdsmi refused {doing}{on}: no permission ({tag}). This user needs read/write access to "
            "/dev/kfd and /dev/dri/renderD* (membership of the 'render' and 'video' groups); in a container "
            "pass --device /dev/kfd --device /dev/dri"
        )
    if code in (STATUS_DRIVER_NOT_LOADED, STATUS_FAIL_LOAD_MODULE, STATUS_INIT_ERROR, STATUS_NOT_INIT):
        return MeterUnavailable(
            f"amdsmi is unavailable while {doing}: {tag}. The amdgpu kernel driver is not loaded or ROCm is "
            "not installed ('sudo modprobe amdgpu'; 'amd-smi list' should list the GPUs)"
        )
    return MeterUnavailable(f"amdsmi failed while {doing}{on}: {tag}")


# ------------------------------------------------------------------------------ GPU selection
def _indices(var: str, value: str, count: int) -> list[int]:
    out: list[int] = []
    for raw in value.split(","):
        tok = raw.strip()
        if tok.startswith("GPU-") or (tok and not tok.lstrip("-").isdigit()):
            raise MeterSpecError(
                f"{var}={value!r} names a GPU by UUID or name ({tok!r}); the amdsmi meter maps integer "
                f"indices only: write the GPUs' indices in {var}"
            )
        if not tok:
            break
        idx = int(tok)
        if not 0 <= idx < count or idx in out:
            break  # as ROCm and CUDA do: the list ends at the first entry that names no GPU
        out.append(idx)
    return out


def visible_physical_indices(count: int, environ: Mapping[str, str] | None = None) -> list[int]:
    """Physical GPU indices in HIP ordinal order: ROCR_VISIBLE_DEVICES first, then
    HIP_VISIBLE_DEVICES (else CUDA_VISIBLE_DEVICES) over what remains."""
    env = os.environ if environ is None else environ
    order = list(range(count))
    rocr = env.get("ROCR_VISIBLE_DEVICES")
    if rocr is not None:
        order = [order[i] for i in _indices("ROCR_VISIBLE_DEVICES", rocr, len(order))]
    var = "HIP_VISIBLE_DEVICES" if env.get("HIP_VISIBLE_DEVICES") is not None else "CUDA_VISIBLE_DEVICES"
    hip = env.get(var)
    if hip is not None:
        order = [order[i] for i in _indices(var, hip, len(order))]
    return order


@dataclass
class AmdGpu:
    domain: str
    hip_index: int
    physical_index: int
    handle: Any
    name: str
    bdf: str | None
    mode: str  # "counter" or "sampled"
    accumulator_key: str | None = None  # "energy_accumulator" (ROCm >= 6.3) or "power" (<= 6.2)
    resolution_uj: float | None = None
    power_key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"domain": self.domain, "hip_index": self.hip_index, "physical_index": self.physical_index,
                "name": self.name, "pci_bdf": self.bdf, "mode": self.mode,
                "accumulator_key": self.accumulator_key, "counter_resolution_uj": self.resolution_uj,
                "power_key": self.power_key}


class _Session:
    """amdsmi initialised, its calls bounded and mapped; ``close`` shuts it down."""

    def __init__(self, sm: Any, call_timeout_s: float) -> None:
        self.sm = sm
        self.caller = DeviceCaller("amdsmi", timeout_s=call_timeout_s)
        self.initialised = False
        flags = getattr(sm, "AmdSmiInitFlags", None)
        try:
            if flags is not None:
                self.call(sm.amdsmi_init, flags.INIT_AMD_GPUS, doing="initialising amdsmi")
            else:
                self.call(sm.amdsmi_init, doing="initialising amdsmi")
        except BaseException:
            self.caller.close()
            raise
        self.initialised = True

    def call(self, fn: Callable[..., Any], *args: Any, doing: str, gpu: str | None = None,
             measuring: bool = False) -> Any:
        def run() -> Any:
            try:
                return fn(*args)
            except Exception as exc:
                if _is_amdsmi_error(self.sm, exc):
                    raise amdsmi_error(exc, doing, gpu, measuring) from None
                raise
        return self.caller.call(run, what=f"{getattr(fn, '__name__', 'amdsmi call')}() ({doing})")

    def supported(self, fn: Callable[..., Any], *args: Any, doing: str, gpu: str) -> Any:
        """The call's value, or None when the GPU does not support it."""
        try:
            return self.call(fn, *args, doing=doing, gpu=gpu)
        except MeterNotSupported:
            return None

    def close(self) -> None:
        if self.initialised and self.caller.wedged is None:
            self.initialised = False
            try:
                self.call(self.sm.amdsmi_shut_down, doing="shutting amdsmi down")
            except Exception:
                pass  # shutting down a lost GPU's library must not hide the real error
        self.caller.close()


def _physical_order(s: _Session) -> tuple[list[Any], str]:
    handles = list(s.call(s.sm.amdsmi_get_processor_handles, doing="listing GPUs"))
    kfd = getattr(s.sm, "amdsmi_get_gpu_kfd_info", None)
    if kfd is not None:
        try:
            nodes = [s.call(kfd, h, doing="reading the KFD node")["node_id"] for h in handles]
            if all(isinstance(n, int) for n in nodes):
                ranked = sorted(range(len(handles)), key=lambda i: nodes[i])
                return [handles[i] for i in ranked], "KFD node order (amdsmi_get_gpu_kfd_info), the order HIP enumerates"
        except (EnergyprofError, KeyError, TypeError):
            pass
    try:
        bdfs = [str(s.call(s.sm.amdsmi_get_gpu_device_bdf, h, doing="reading the PCI address")) for h in handles]
        return [handles[i] for _, i in sorted(zip(bdfs, range(len(handles))))], "PCI order (no KFD node ids)"
    except EnergyprofError:
        return handles, "amdsmi's enumeration order"


def _power_key(info: Mapping[str, Any]) -> str | None:
    for key in ("current_socket_power", "average_socket_power"):
        value = info.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value != 0xFFFF:
            return key
    return None


def discover(s: _Session, indices: list[int] | None, mode: str, environ: Mapping[str, str] | None) -> tuple[list[AmdGpu], str]:
    env = os.environ if environ is None else environ
    handles, order_basis = _physical_order(s)
    if not handles:
        raise MeterUnavailable("amdsmi works but sees no AMD GPU on this machine")
    order = visible_physical_indices(len(handles), env)
    shown = {k: env[k] for k in ("ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES") if k in env}
    if not order:
        raise MeterUnavailable(f"{shown} hides every GPU from this process (amdsmi sees {len(handles)}); unset it "
                               "or name a GPU")
    gpus = []
    for hip_i in (range(len(order)) if indices is None else indices):
        if not 0 <= hip_i < len(order):
            raise MeterUnavailable(f"no GPU with index {hip_i}: this process sees {len(order)} AMD GPU(s)"
                                   f"{f' ({shown})' if shown else ''}, indices 0..{len(order) - 1}")
        phys = order[hip_i]
        h = handles[phys]
        gpu = f"gpu{hip_i}"
        try:
            name = str(s.call(s.sm.amdsmi_get_gpu_asic_info, h, doing="reading the GPU name", gpu=gpu)
                       .get("market_name", "AMD GPU"))
        except MeterNotSupported:
            name = "AMD GPU"
        try:
            bdf = str(s.call(s.sm.amdsmi_get_gpu_device_bdf, h, doing="reading the PCI address", gpu=gpu))
        except MeterNotSupported:
            bdf = None
        g = AmdGpu(gpu, hip_i, phys, h, name, bdf, mode="counter")
        label = f"{gpu} ({name})"
        energy = None if mode == "sampled" else s.supported(
            s.sm.amdsmi_get_energy_count, h, doing="reading the energy counter", gpu=label)
        if energy is not None:
            g.accumulator_key = "energy_accumulator" if "energy_accumulator" in energy else "power"
            g.resolution_uj = float(energy["counter_resolution"])
            if not g.resolution_uj > 0:
                energy = None
        if energy is None:
            if mode == "counter":
                raise MeterNotSupported(f"{label} has no energy counter (amdsmi_get_energy_count is not "
                                        "supported); use 'amdsmi:mode=sampled' to integrate its power readings")
            power = s.supported(s.sm.amdsmi_get_power_info, h, doing="reading power", gpu=label)
            g.power_key = _power_key(power) if power is not None else None
            if g.power_key is None:
                raise MeterNotSupported(f"{label} offers neither an energy counter nor power readings through "
                                        "amdsmi; measure it with an external meter")
            g.mode = "sampled"
        gpus.append(g)
    if len({g.mode for g in gpus}) > 1:
        raise MeterNotSupported("these GPUs mix an energy counter and power readings only; measure them "
                                f"one at a time ({', '.join(f'{g.domain}: {g.mode}' for g in gpus)})")
    return gpus, order_basis


# ------------------------------------------------------------------------------ meters
def _details(s: _Session, gpus: list[AmdGpu], order_basis: str, environ: Mapping[str, str] | None) -> dict[str, Any]:
    env = os.environ if environ is None else environ
    return {"gpus": [g.to_dict() for g in gpus], "order": order_basis,
            "visible_devices": {k: env[k] for k in ("ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES",
                                                    "CUDA_VISIBLE_DEVICES") if k in env}}


class AmdsmiCounterMeter(CounterMeter):
    """Energy accumulators of one or more AMD GPUs (joules since the meter opened)."""

    def __init__(self, session: _Session, gpus: list[AmdGpu], details: dict[str, Any], wrap_bits: int,
                 sync_device: Any = None) -> None:
        super().__init__(sync_device=sync_device)
        self._s = session
        self.gpus = gpus
        self.wrap_bits = wrap_bits
        # integer wrap and counts: exact near 2**64, where a float steps by 4096
        self._trackers = {g.domain: WrapTracker(2 ** wrap_bits) for g in gpus}
        self._last_raw: dict[str, int] = {}
        resolution = max(g.resolution_uj or 0.0 for g in gpus) * 1e-6
        self._info = MeterInfo(
            backend="amdsmi", scope="gpu", kind="counter", update_period_s=None, resolution_j=resolution,
            simulated=False, domains=tuple(g.domain for g in gpus), details={**details, "wrap_bits": wrap_bits},
            torch_device=f"cuda:{gpus[0].hip_index}" if len(gpus) == 1 else None,
        )
        self._reader: BackgroundReader | None = None
        try:
            self.read_counters()
            if wrap_bits < 64:  # a narrow accumulator: read it often enough that no wrap goes unseen
                self._reader = BackgroundReader(
                    "amdsmi wrap poller", lambda stop: periodic(self.read_counters, WRAP_POLL_S, stop, self.clock),
                    lambda item: None, clock=self.clock, name="energyprof-amdsmi-poller",
                    in_flight=self._s.caller.in_flight,
                ).start()
        except BaseException:
            self.close()
            raise

    @property
    def info(self) -> MeterInfo:
        return self._info

    def read_counters(self) -> dict[str, float]:
        if self._reader is not None:
            self._reader.check(self.clock(), max_silence_s=10 * WRAP_POLL_S + self._s.caller.timeout_s)
        out = {}
        for g in self.gpus:
            energy = self._s.call(self._s.sm.amdsmi_get_energy_count, g.handle, doing="reading the energy counter",
                                  gpu=g.domain, measuring=True)
            raw = int(energy[g.accumulator_key])
            with self._windows_lock:
                last = self._last_raw.get(g.domain)
                # a wrap moves a little past the top; a reset jumps back by most of the range
                if last is not None and raw < last and raw + 2 ** self.wrap_bits - last > 2 ** (self.wrap_bits - 1):
                    raise MeterFailure(
                        f"the energy counter of {g.domain} went backwards ({last} -> {raw} counts): the GPU was reset "
                        "or the driver reloaded during the measurement; the window is void"
                    )
                self._last_raw[g.domain] = raw
                counts = int(self._trackers[g.domain].update(raw))
            out[g.domain] = counts * g.resolution_uj * 1e-6
        return out

    def close(self) -> None:
        if not self._closed:
            if self._reader is not None:
                self._reader.stop()
            self._s.close()
        super().close()


class _AmdSampledMeter(SampledMeter):
    def __init__(self, session: _Session, *args: Any, **kwargs: Any) -> None:
        self._s = session
        super().__init__(*args, **kwargs)

    def close(self) -> None:
        if not self._closed:
            super().close()
            self._s.close()


# ------------------------------------------------------------------------------ registry hooks
def _params(spec: MeterSpec) -> dict[str, Any]:
    raw = spec.get_list("index")
    indices = None
    if raw is not None:
        try:
            indices = [int(x) for x in raw]
        except ValueError:
            raise MeterSpecError(f"meter spec {spec.text!r}: index={spec.params['index']!r} is not a GPU index "
                                 "or a list written with '+' (index=0 or index=0+1)") from None
        if any(i < 0 for i in indices):
            raise MeterSpecError(f"meter spec {spec.text!r}: GPU indices are >= 0")
    mode = spec.get_str("mode", "auto")
    if mode not in ("auto", "counter", "sampled"):
        raise MeterSpecError(f"meter spec {spec.text!r}: mode={mode!r}; use auto, counter or sampled")
    wrap_bits = spec.get_int("wrap_bits", 64)
    if not 8 <= wrap_bits <= 64:
        raise MeterSpecError(f"meter spec {spec.text!r}: wrap_bits must be between 8 and 64, got {wrap_bits}")
    timeout = spec.get_float("call_timeout", DEVICE_CALL_TIMEOUT_S)
    if not (timeout > 0 and timeout < float("inf")):
        raise MeterSpecError(f"meter spec {spec.text!r}: call_timeout must be a positive number of seconds")
    return {"indices": indices, "mode": mode, "wrap_bits": wrap_bits, "call_timeout_s": timeout}


def open_from_spec(spec: MeterSpec, amdsmi: Any = None, environ: Mapping[str, str] | None = None, **kwargs: Any):
    """``amdsmi[:index=N[+M]][,mode=auto|counter|sampled][,wrap_bits=64][,call_timeout=S][,rate_hz=20]``."""
    params = _params(spec)
    options = SampledOptions.from_spec(spec, default_rate_hz=DEFAULT_RATE_HZ, default_scope="gpu")
    spec.check_unused()
    session = _Session(amdsmi if amdsmi is not None else _amdsmi(), params["call_timeout_s"])
    try:
        gpus, basis = discover(session, params["indices"], params["mode"], environ)
        details = _details(session, gpus, basis, environ)
        if gpus[0].mode == "counter":
            return AmdsmiCounterMeter(session, gpus, details, params["wrap_bits"], **kwargs)
    except BaseException:
        session.close()
        raise
    return _open_sampled(session, gpus, details, options, **kwargs)


def _open_sampled(session: _Session, gpus: list[AmdGpu], details: dict[str, Any], options: SampledOptions,
                  **kwargs: Any) -> SampledMeter:
    period_s = options.period_s or 1.0 / DEFAULT_RATE_HZ

    def read_watts() -> float:
        total = 0.0
        for g in gpus:
            try:
                info = session.sm.amdsmi_get_power_info(g.handle)
            except Exception as exc:
                if _is_amdsmi_error(session.sm, exc):  # retried by the polling core until max_gap_s
                    raise amdsmi_error(exc, "reading power", g.domain, measuring=True) from None
                raise
            value = info.get(g.power_key)
            if not isinstance(value, (int, float)):
                raise MeterFailure(f"{g.domain}: {g.power_key} reads {value!r}, not a number of watts")
            total += float(value)
        return total

    info = MeterInfo(backend="amdsmi", scope=options.scope, kind="sampled", update_period_s=period_s,
                     resolution_j=None, simulated=False, domains=(options.scope,),
                     details={**details, "power_unit": "W (integer)"},
                     torch_device=f"cuda:{gpus[0].hip_index}" if len(gpus) == 1 else None)
    source = PolledSource(f"amdsmi power of {', '.join(g.domain for g in gpus)}", read_watts, period_s,
                          give_up_s=options.max_gap_for(period_s))
    try:
        return _AmdSampledMeter(session, source, info, options, resolution_w=1.0, **kwargs)
    except BaseException:
        session.close()
        raise


def probe(spec: MeterSpec | None = None, amdsmi: Any = None, environ: Mapping[str, str] | None = None) -> Probe:
    spec = spec if spec is not None else parse_spec("amdsmi")
    try:
        params = _params(spec)
        session = _Session(amdsmi if amdsmi is not None else _amdsmi(), params["call_timeout_s"])
    except EnergyprofError as exc:
        return Probe("amdsmi", False, str(exc))
    try:
        gpus, basis = discover(session, params["indices"], params["mode"], environ)
    except EnergyprofError as exc:
        return Probe("amdsmi", False, str(exc))
    finally:
        session.close()
    desc = "; ".join(f"{g.domain} = cuda:{g.hip_index}: {g.name} ({g.bdf or 'no PCI address'}, "
                     f"{'energy counter' if g.mode == 'counter' else 'integrated power'})" for g in gpus)
    return Probe("amdsmi", True, f"{len(gpus)} AMD GPU(s): {desc}", {"gpus": [g.to_dict() for g in gpus],
                                                                       "order": basis})
