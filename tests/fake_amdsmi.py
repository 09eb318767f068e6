"""A stand-in for AMD's ``amdsmi`` Python package (the hardware boundary of the ``amdsmi`` backend).

It follows the package's documented API and return shapes, call by call (ROCm/amdsmi,
py-interface/README.md and py-interface/amdsmi_interface.py; status codes from
include/amd_smi/amdsmi.h; exceptions from py-interface/amdsmi_exception.py):

* ``amdsmi_init(flag=AmdSmiInitFlags.INIT_AMD_GPUS)``: a flag that is not an
  ``AmdSmiInitFlags`` raises ``AmdSmiParameterException``; ``amdsmi_shut_down()``.
* ``amdsmi_get_processor_handles()``: a list of opaque ``amdsmi_processor_handle`` objects; every
  per-GPU call checks that its argument is one (``AmdSmiParameterException`` otherwise).
* ``amdsmi_get_energy_count(h)``: ``{'power': acc, 'energy_accumulator': acc,
  'counter_resolution': float, 'timestamp': ns}`` from ROCm 6.3 on (commit 95ca2b8, "Changed
  `power` parameter in `amdsmi_get_energy_count()` to `energy_accumulator`"; ``power`` kept,
  "deprecating in 6.4"); up to ROCm 6.2 only ``power``, ``counter_resolution``, ``timestamp``
  (``rocm=(6, 2)``). The accumulator is a ``uint64_t``; ``counter_resolution`` a C ``float`` in
  uJ (15.3 uJ on MI200/MI300: "Energy accumulated with a 15.3 uJ resolution"), so it reads back
  as ``ctypes.c_float(15.3).value``; energy = accumulator x resolution uJ; timestamp in ns.
* ``amdsmi_get_power_info(h)``: ``current_socket_power``, ``average_socket_power`` (W,
  ``uint32_t``), ``gfx_voltage``, ``soc_voltage``, ``mem_voltage`` (mV), ``power_limit``; a field
  equal to 0xFFFF becomes the string ``"N/A"``.
* ``amdsmi_get_gpu_device_bdf(h)``: ``"0000:03:00.0"``; ``amdsmi_get_gpu_asic_info(h)``: a dict
  with ``market_name``, ``vendor_id``, ``device_id``...; ``amdsmi_get_gpu_kfd_info(h)``:
  ``{'kfd_id', 'node_id', 'current_partition_id'}``.
* Errors: ``AmdSmiLibraryException(err_code)`` (``get_error_code()``, ``err_code``, text
  ``"Error code:\\n\\t{code} | {info}"``), a subclass of ``AmdSmiException``. An unsupported query
  raises it with ``AMDSMI_STATUS_NOT_SUPPORTED`` (2).
"""

from __future__ import annotations

import ctypes
import enum
import threading
import time
from types import ModuleType

AMDSMI_STATUS_NOT_SUPPORTED = 2
AMDSMI_STATUS_NO_PERM = 10
AMDSMI_STATUS_NOT_INIT = 32
AMDSMI_STATUS_DRIVER_NOT_LOADED = 34
_INFO = {2: "AMDSMI_STATUS_NOT_SUPPORTED - Feature not supported", 10: "AMDSMI_STATUS_NO_PERM - Permission Denied",
         32: "AMDSMI_STATUS_NOT_INIT - Device not initialized", 34: "AMDSMI_STATUS_DRIVER_NOT_LOADED - Driver not loaded",
         12: "AMDSMI_STATUS_IO - I/O Error"}
NA = 0xFFFF


class AmdSmiException(Exception):
    pass


class AmdSmiLibraryException(AmdSmiException):
    def __init__(self, err_code):
        err_code = abs(err_code)
        super().__init__(err_code)
        self.err_code = err_code
        self.err_info = _INFO.get(err_code, "AMDSMI_STATUS_UNKNOWN_ERROR - An unknown error occurred")

    def __str__(self):
        return f"Error code:\n\t{self.err_code} | {self.err_info}"

    def get_error_info(self):
        return self.err_info

    def get_error_code(self):
        return self.err_code


class AmdSmiParameterException(AmdSmiException):
    def __init__(self, received, expected):
        super().__init__(f"Invalid parameter:\nActual type: {type(received)}\nExpected type: {expected}")


class AmdSmiInitFlags(enum.IntFlag):
    INIT_ALL_PROCESSORS = 0xFFFFFFFF
    INIT_AMD_CPUS = 1 << 0
    INIT_AMD_GPUS = 1 << 1
    INIT_NON_AMD_CPUS = 1 << 2
    INIT_NON_AMD_GPUS = 1 << 3


class amdsmi_processor_handle:  # noqa: N801  (the wrapper's ctypes pointer type)
    def __init__(self, gpu):
        self._gpu = gpu


class FakeAmdGpu:
    """One GPU. Its accumulator either follows ``watts`` in real time (updated every
    ``period_s``, as the SMU's 1 ms metrics do) or, with ``counts`` set, holds what a test wrote."""

    def __init__(self, name="AMD Instinct MI250X", bdf="0000:03:00.0", node_id=2, watts=300.0,
                 resolution_uj=15.3, counts=None, energy=True, current_socket_power=None,
                 average_socket_power=None, period_s=0.001):
        self.name, self.bdf, self.node_id = name, bdf, node_id
        self.watts, self.period_s, self.energy = watts, period_s, energy
        self.resolution = ctypes.c_float(resolution_uj).value  # a C float, as the wrapper returns it
        self.counts = counts
        self.offset = 7_000_000_000  # counts since the driver loaded, before the test
        self.t0 = time.perf_counter()
        self.current_socket_power = NA if current_socket_power is None else current_socket_power
        self.average_socket_power = round(watts) if average_socket_power is None else average_socket_power

    def accumulator(self) -> int:
        if self.counts is not None:
            return int(self.counts) % 2**64  # uint64_t
        now = time.perf_counter()
        last = (now - self.t0) // self.period_s * self.period_s
        return (self.offset + int(self.watts * last * 1e6 / self.resolution)) % 2**64

    def truth_j(self, a: float, b: float) -> float:
        return self.watts * (b - a)


def make_module(gpus, rocm=(6, 3), init_error=None, has_kfd=True) -> ModuleType:
    """An ``amdsmi`` module over ``gpus``. ``mod.fail[name]`` (or ``(name, gpu_index)``) makes a
    call raise that status code; ``mod.hang`` holds names of calls that block (a wedged driver)."""
    mod = ModuleType("amdsmi")
    state = {"init": 0}
    mod.fail, mod.hang, mod.calls = {}, set(), {}
    mod.unblock = threading.Event()
    mod.AmdSmiException, mod.AmdSmiLibraryException = AmdSmiException, AmdSmiLibraryException
    mod.AmdSmiParameterException, mod.AmdSmiInitFlags = AmdSmiParameterException, AmdSmiInitFlags
    handles = [amdsmi_processor_handle(g) for g in gpus]

    def enter(name, handle=None):
        mod.calls[name] = mod.calls.get(name, 0) + 1
        if name in mod.hang:
            mod.unblock.wait()
        if handle is not None and not isinstance(handle, amdsmi_processor_handle):
            raise AmdSmiParameterException(handle, amdsmi_processor_handle)
        if name != "amdsmi_init" and state["init"] <= 0:
            raise AmdSmiLibraryException(AMDSMI_STATUS_NOT_INIT)
        code = mod.fail.get(name)
        if code is None and handle is not None:
            code = mod.fail.get((name, gpus.index(handle._gpu)))
        if code is not None:
            raise AmdSmiLibraryException(code)
        return handle._gpu if handle is not None else None

    def amdsmi_init(flag=AmdSmiInitFlags.INIT_AMD_GPUS):
        if not isinstance(flag, AmdSmiInitFlags):
            raise AmdSmiParameterException(flag, AmdSmiInitFlags)
        enter("amdsmi_init")
        if init_error is not None:
            raise AmdSmiLibraryException(init_error)
        state["init"] += 1

    def amdsmi_shut_down():
        enter("amdsmi_shut_down")
        state["init"] -= 1

    def amdsmi_get_processor_handles():
        enter("amdsmi_get_processor_handles")
        return list(handles)

    def amdsmi_get_energy_count(h):
        g = enter("amdsmi_get_energy_count", h)
        if not g.energy:
            raise AmdSmiLibraryException(AMDSMI_STATUS_NOT_SUPPORTED)
        acc = g.accumulator()
        out = {"power": acc}
        if rocm >= (6, 3):
            out["energy_accumulator"] = acc
        out.update(counter_resolution=g.resolution, timestamp=time.monotonic_ns())
        return out

    def amdsmi_get_power_info(h):
        g = enter("amdsmi_get_power_info", h)
        info = {"current_socket_power": g.current_socket_power, "average_socket_power": g.average_socket_power,
                "gfx_voltage": 800, "soc_voltage": 850, "mem_voltage": 1200, "power_limit": 560}
        return {k: ("N/A" if v == NA else v) for k, v in info.items()}

    def amdsmi_get_gpu_device_bdf(h):
        return enter("amdsmi_get_gpu_device_bdf", h).bdf

    def amdsmi_get_gpu_asic_info(h):
        g = enter("amdsmi_get_gpu_asic_info", h)
        return {"market_name": g.name, "vendor_id": "0x1002", "vendor_name": "Advanced Micro Devices Inc. [AMD/ATI]",
                "subvendor_id": "0x1002", "device_id": "0x740c", "rev_id": "0x01", "asic_serial": "0x0123456789ABCDEF",
                "oam_id": 0, "num_compute_units": 220, "target_graphics_version": "gfx90a"}

    def amdsmi_get_gpu_kfd_info(h):
        g = enter("amdsmi_get_gpu_kfd_info", h)
        return {"kfd_id": 1000 + g.node_id, "node_id": g.node_id, "current_partition_id": 0}

    for fn in (amdsmi_init, amdsmi_shut_down, amdsmi_get_processor_handles, amdsmi_get_energy_count,
               amdsmi_get_power_info, amdsmi_get_gpu_device_bdf, amdsmi_get_gpu_asic_info):
        setattr(mod, fn.__name__, fn)
    if has_kfd:
        mod.amdsmi_get_gpu_kfd_info = amdsmi_get_gpu_kfd_info
    mod.state = state
    return mod
