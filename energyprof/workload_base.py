"""The base of the workloads (:mod:`energyprof.workloads`): a kernel on one device with the exact
counts of one call (:class:`Workload`), a kernel over a flat tensor with random operands
(:class:`TensorWorkload`), and the dtypes and devices they accept."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from energyprof.counts import WorkCounts

__all__ = ["DTYPES", "TensorWorkload", "Workload", "itemsize_of"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"workloads update floating-point tensors, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {dev} is not available here (torch.cuda.is_available() is False)")
    return dev


def _nbytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()



def itemsize_of(dtype: str | torch.dtype) -> int:
    """Bytes per element of a floating-point dtype given by name (``float32``) or as a torch dtype."""
    if isinstance(dtype, str) and dtype not in DTYPES and dtype == "float64":
        return 8
    if isinstance(dtype, torch.dtype) and dtype == torch.float64:
        return 8
    return _nbytes(_dtype(dtype))


class Workload(ABC):
    """One kernel on one device, with the exact counts of one call.

    ``reports_work`` is False for real kernels: whoever times them (the measurement protocol)
    reports their counts to the meter. A stand-in that reports its own work sets it True, so that
    its work is never reported twice.
    """

    name: ClassVar[str]
    reports_work: ClassVar[bool] = False

    device_: torch.device
    counts_: WorkCounts
    tensors_: dict[str, torch.Tensor]

    @abstractmethod
    def setup(self, device: str | torch.device = "cpu") -> "Workload":
        """Allocate random operands on ``device``; sets ``device_``, ``tensors_``, ``counts_``."""

    @abstractmethod
    def __call__(self) -> None:
        """Run one kernel (asynchronously on accelerators; the caller synchronises)."""

    def describe(self) -> dict[str, Any]:
        """JSON-friendly parameters of this workload (for tables and reports)."""
        return {"workload": self.name}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.describe().items() if k != "workload")
        return f"{type(self).__name__}({params})"


class TensorWorkload(Workload):
    """A kernel over a flat tensor of ``size`` elements of ``dtype``, with random operands."""

    sparse: ClassVar[bool] = False  # True: takes a density (or explicit positions)

    def __init__(self, size: int, dtype: str | torch.dtype = "float32", seed: int = 0) -> None:
        if int(size) < 1:
            raise ValueError(f"size must be >= 1 element, got {size}")
        self.size = int(size)
        self.dtype = dtype
        self.seed = int(seed)

    def setup(self, device: str | torch.device = "cpu") -> "TensorWorkload":
        self.device_ = _device(device)
        self.dtype_ = _dtype(self.dtype)
        self._gen = torch.Generator(device=self.device_).manual_seed(self.seed)
        self.tensors_ = self._allocate()
        c = self._counts(_nbytes(self.dtype_))
        ws = sum(t.numel() * t.element_size() for t in self.tensors_.values())
        self.counts_ = WorkCounts(
            elements=c["elements"], bytes_read=c["bytes_read"], bytes_written=c["bytes_written"],
            flops=c.get("flops", 0), working_set_bytes=ws, launches=c["launches"],
            scattered_bytes_written=c.get("scattered_bytes_written", 0), lines_written=c.get("lines_written", 0),
            pages_written=c.get("pages_written", 0), line_runs_written=c.get("line_runs_written", 0),
        )
        del self._gen
        return self

    def _randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self._gen, device=self.device_, dtype=self.dtype_)

    @abstractmethod
    def _allocate(self) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def _counts(self, s: int) -> dict[str, int]:
        """elements, bytes_read, bytes_written, flops, launches (and for scattered writes
        scattered_bytes_written, lines_written) of one call; ``s`` is the element size."""

    def describe(self) -> dict[str, Any]:
        dtype = self.dtype_ if hasattr(self, "dtype_") else _dtype(self.dtype)
        d = {"workload": self.name, "size": self.size, "dtype": str(dtype).removeprefix("torch.")}
        if hasattr(self, "device_"):
            d["device"] = str(self.device_)
        return d
