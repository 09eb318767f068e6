"""A stand-in for the ``pynvml`` module (nvidia-ml-py) for end-to-end tests, copied into a temporary
folder as ``pynvml.py`` and put first on PYTHONPATH. It offers the functions energyprof calls with
pynvml's signatures, ``NVMLError`` carrying ``.value``, and pynvml's own error and architecture codes
(written into the copy from the installed pynvml, see ``write_fake_pynvml``). One GPU; its energy and
power reads stop returning ``FAKE_NVML_HANG_AFTER_S`` seconds after ``nvmlInit``, as a wedged
driver's do. ``FAKE_NVML_ARCH`` picks the architecture code (Volta+ has the energy counter)."""

import os
import threading
import time

# @CONSTANTS@


class NVMLError(Exception):
    def __init__(self, value):
        self.value = value

    def __str__(self):
        return f"NVML error code {self.value}"


class c_nvmlDevice_t:  # an opaque handle, as pynvml's ctypes pointer is
    pass


_ARCH = int(os.environ.get("FAKE_NVML_ARCH", "9"))
_HANG_AFTER = float(os.environ.get("FAKE_NVML_HANG_AFTER_S", "1"))
_t0 = None
_refs = 0
_handle = c_nvmlDevice_t()


def _maybe_hang():
    if _t0 is not None and time.monotonic() - _t0 > _HANG_AFTER:
        threading.Event().wait()  # never returns


def nvmlInit():
    global _t0, _refs
    _t0 = time.monotonic() if _t0 is None else _t0
    _refs += 1


def nvmlShutdown():
    global _refs
    if _refs <= 0:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)  # noqa: F821 - written into the copy
    _refs -= 1


def nvmlSystemGetDriverVersion():
    return "550.54.15"


def nvmlDeviceGetCount():
    return 1


def nvmlDeviceGetHandleByIndex(index):
    if index != 0:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)  # noqa: F821
    return _handle


def nvmlDeviceGetName(handle):
    return "NVIDIA H100 80GB HBM3" if _ARCH >= NVML_DEVICE_ARCH_VOLTA else "Tesla P100-PCIE-16GB"  # noqa: F821


def nvmlDeviceGetUUID(handle):
    return "GPU-0f0f0f0f-0000-0000-0000-000000000000"


def nvmlDeviceGetArchitecture(handle):
    return _ARCH


def nvmlDeviceGetTotalEnergyConsumption(handle):
    if _ARCH < NVML_DEVICE_ARCH_VOLTA:  # noqa: F821
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)  # noqa: F821
    _maybe_hang()
    return 10_000_000 + int(100_000 * (time.monotonic() - _t0))  # 100 W, in mJ since the driver loaded


def nvmlDeviceGetPowerUsage(handle):
    _maybe_hang()
    return 100_000  # mW
