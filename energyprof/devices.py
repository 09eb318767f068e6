"""Where the kernels run: the torch device follows the meter.

A meter sees the work of one device: NVML index N sees ``cuda:N``; a CPU package, board or battery
meter sees the host, where kernels run on ``cpu``. The meter says which in
:attr:`energyprof.meters.base.MeterInfo.torch_device` (None: the host). :func:`kernel_device` is the
one place that turns a meter's info and the user's ``--device`` into the device the kernels use;
``calibrate``, ``validate``, ``demo``, ``bench-kernel`` and ``calibrate --dry-run`` all call it.

Kernels on a device the meter does not see measure nothing of theirs (a GPU meter with CPU
kernels reads an idle GPU), so a ``--device`` that is not the meter's is refused unless the user
insists (``allow_mismatch``, ``--allow-device-mismatch`` on the command line). A simulated meter
prices the work counts of a kernel wherever it runs, so it takes any device.
"""

from __future__ import annotations

from typing import Any

import torch

from energyprof.errors import EnergyprofError

__all__ = ["DeviceError", "parse_device", "kernel_device", "describe", "MISMATCH_FLAG"]

MISMATCH_FLAG = "--allow-device-mismatch"


class DeviceError(EnergyprofError, ValueError):
    """A torch device that does not exist here, or one the meter does not see."""


def parse_device(text: str) -> torch.device:
    """``text`` as a torch device this process can use (``cpu``, ``cuda``, ``cuda:N``, ``mps``...),
    or a :class:`DeviceError` naming the problem and the fix."""
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise DeviceError(f"--device {text!r} is not a torch device; use cpu or cuda:N (N a GPU index)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {text!r}: this torch ({torch.__version__}) has no CUDA device; install a "
                              "CUDA build of torch, or measure with a meter of this host (rapl, a power meter)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"device {text!r}: torch sees {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        backend = getattr(torch.backends, dev.type, None)
        if backend is not None and hasattr(backend, "is_available") and not backend.is_available():
            raise DeviceError(f"device {text!r}: torch has no {dev.type} device here")
    return dev


def _same(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def kernel_device(info: Any, requested: str | None = None, allow_mismatch: bool = False) -> torch.device:
    """The device the kernels run on for a meter described by ``info`` (a ``MeterInfo``).

    Without ``requested``: the meter's device (``info.torch_device``, else ``cpu``). With it: that
    device, which must be the meter's unless the meter is simulated or ``allow_mismatch``.
    """
    meter_text = getattr(info, "torch_device", None) or "cpu"
    where = f"meter {info.backend} ({info.scope})"
    if requested is None:
        from energyprof.meters.base import torch_device_problem

        problem = torch_device_problem(info)  # a GPU this torch cannot drive: what to install
        if problem:
            raise DeviceError(problem)
        try:
            return parse_device(meter_text)
        except DeviceError as exc:
            raise DeviceError(f"{where} sees {meter_text}, where the kernels must run: {exc}") from None
    dev = parse_device(requested)
    if info.simulated or allow_mismatch:
        return dev
    meter_dev = torch.device(meter_text)
    if not _same(dev, meter_dev):
        raise DeviceError(
            f"--device {requested} runs the kernels where {where} does not look (it sees {meter_text}): it would "
            f"measure other work, not theirs; drop --device to follow the meter, or pass {MISMATCH_FLAG} to insist"
        )
    return dev


def describe(info: Any, dev: torch.device, requested: str | None) -> str:
    """One line for plans and logs: where the kernels run and why."""
    why = "the meter's device" if requested is None else "--device"
    return f"kernels on {dev} ({why}; meter {info.backend} sees {getattr(info, 'torch_device', None) or 'cpu'})"
