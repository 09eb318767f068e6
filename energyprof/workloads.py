"""Post-backprop update workloads: real torch kernels that declare exactly what they do.

A federated client, after backpropagation, turns gradients into an update, keeps some entries and
sends them. The kernels here reproduce those steps on any torch device (``cpu``, ``cuda:N``):

memory-write updates (the cost of keeping entries)
    ``scatter``  write k kept entries at scattered positions of a tensor of n elements
    ``runs``     write k kept entries as contiguous runs of ``run_length`` elements
    ``pack``     pack k entries into a send buffer: values, and positions as int32
    ``residual`` dense error-feedback residual update: accumulate the update, clear the k sent entries
    ``update``   the masked update phase of one tensor (:class:`UpdatePhase`): what keeping
                 k > 0 entries adds to a client's round; the calibration and the validation measure it
    ``compensation`` error feedback's dense ``residual += update`` (:class:`Compensation`), paid every
                 round on every tensor whatever the mask keeps
compute updates (adjustable arithmetic intensity)
    ``sgd``, ``momentum``, ``adam`` (Adam-like), and ``fma``: ``fmas`` fused multiply-adds per
    element, as a (n / fmas, fmas) x (fmas, fmas) product (energy-roofline style intensity sweep)
layer replay
    :mod:`energyprof.replays`: one memory-write kernel per parameter tensor of a ``torch.nn.Module``
    with the positions kept by a given mask, and a model's whole round.

Every workload follows the same life cycle: construct (parameters only), ``setup(device)``
(allocates random operands: power depends on data, so never zeros) and then each call runs one
kernel. ``counts_`` is the exact :class:`~energyprof.counts.WorkCounts` of one call, in the logical
model used throughout energyprof: every operand element an op reads counts once in ``bytes_read``,
every element it writes once in ``bytes_written`` (an in-place op reads and writes its target), a
fused multiply-add is two FLOPs, and ``working_set_bytes`` is the size of all operands.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any, Sequence

import torch

from energyprof.counts import WorkCounts
from energyprof.workload_base import (  # the workloads' base (energyprof.workload_base), named here too
    DTYPES,
    TensorWorkload,
    Workload,
    _device,
    _dtype,
    itemsize_of,
)

__all__ = [
    "DTYPES",
    "SIZES",
    "DENSITIES",
    "WORKLOADS",
    "Workload",
    "Scatter",
    "Runs",
    "Pack",
    "Residual",
    "UpdatePhase",
    "Compensation",
    "CompensationGroup",
    "itemsize_of",
    "scatter_layout",
    "PAGE_BYTES",
    "Sgd",
    "Momentum",
    "Adam",
    "Fma",
    "make_workload",
]

_INDEX = torch.int64  # positions as torch's indexing ops take them
_SEND_INDEX = torch.int32  # positions as they travel in a send buffer

# Element counts from cache-resident to DRAM/HBM-sized: 16 KiB .. 1 GiB of float32.
SIZES: tuple[int, ...] = tuple(4**p for p in range(6, 15))
# Fractions of entries kept, 0.1 % .. 100 %.
DENSITIES: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)

PAGE_BYTES = 4096  # the base page size of x86-64, Arm64 (4 KiB granule) and CUDA's UVM


def scatter_layout(positions: torch.Tensor, itemsize: int) -> dict[str, int]:
    """Where scattered writes at flat ``positions`` (of ``itemsize``-byte entries) land: the distinct
    64-byte lines (``lines_written``, :func:`energyprof.costmodel.lines_touched`), the distinct 4 KiB
    pages they lie in (``pages_written``) and the maximal runs of consecutive lines
    (``line_runs_written``; a line whose predecessor is also written is the rest of a run)."""
    if positions.numel() == 0:
        return {"lines_written": 0, "pages_written": 0, "line_runs_written": 0}
    line_ids = torch.unique(positions.reshape(-1).to(_INDEX) * int(itemsize) // 64)
    pages = int(torch.unique(line_ids // (PAGE_BYTES // 64)).numel())
    runs = 1 + int((line_ids[1:] != line_ids[:-1] + 1).sum())
    return {"lines_written": int(line_ids.numel()), "pages_written": pages, "line_runs_written": runs}


# ---------------------------------------------------------------------------- memory-write updates
class _Kept(TensorWorkload):
    """A kernel over k kept positions of n: drawn at random from ``density`` (at least one), or
    given as ``positions`` (flat, e.g. from a mask; sorted and unique)."""

    sparse = True

    def __init__(
        self,
        size: int,
        density: float = 0.01,
        dtype: str | torch.dtype = "float32",
        seed: int = 0,
        positions: torch.Tensor | None = None,
    ) -> None:
        super().__init__(size, dtype, seed)
        if not 0 < float(density) <= 1:
            raise ValueError(f"density must be in (0, 1], got {density}")
        self.density = float(density)
        self.positions = positions

    def _kept_count(self, n: int) -> int:
        return max(1, round(self.density * n))

    def _positions(self) -> torch.Tensor:
        if self.positions is not None:
            p = self.positions.to(device=self.device_, dtype=_INDEX).flatten()
            if p.numel() and (int(p.min()) < 0 or int(p.max()) >= self.size):
                raise ValueError(f"positions must lie in [0, {self.size})")
            if p.numel() > 1 and not bool((p[1:] > p[:-1]).all()):
                raise ValueError("positions must be sorted and unique (as mask.flatten().nonzero() gives)")
            return p
        k = self._kept_count(self.size)
        perm = torch.randperm(self.size, generator=self._gen, device=self.device_)
        return perm[:k].sort().values

    def _kept(self) -> int:
        return self.tensors_["positions"].numel()

    def _send_buffers(self, k: int) -> dict[str, torch.Tensor]:
        """The send buffer for k kept entries: their values, and their positions as int32."""
        return {
            "send_values": torch.empty(k, dtype=self.dtype_, device=self.device_),
            "send_positions": torch.empty(k, dtype=_SEND_INDEX, device=self.device_),
        }

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        if hasattr(self, "tensors_"):
            d["kept"] = self._kept()
        if self.positions is None:
            d["density"] = self.density
        return d


class Scatter(_Kept):
    """``target[positions] = values``: k scattered writes into n elements."""

    name = "scatter"

    def _allocate(self) -> dict[str, torch.Tensor]:
        positions = self._positions()
        return {"target": self._randn(self.size), "positions": positions, "values": self._randn(positions.numel())}

    def __call__(self) -> None:
        t = self.tensors_
        t["target"].index_put_((t["positions"],), t["values"])

    def _counts(self, s: int) -> dict[str, int]:
        k = self.tensors_["positions"].numel()
        return {"elements": k, "bytes_read": k * (s + 8), "bytes_written": k * s, "launches": 1,
                "scattered_bytes_written": k * s, **scatter_layout(self.tensors_["positions"], s)}


class Runs(_Kept):
    """Write k kept entries as contiguous runs of ``run_length`` elements (block sparsity).
    ``size`` is rounded down to a multiple of ``run_length``; k is a whole number of runs."""

    name = "runs"

    def __init__(
        self,
        size: int,
        density: float = 0.01,
        dtype: str | torch.dtype = "float32",
        seed: int = 0,
        run_length: int = 32,
    ) -> None:
        if not 1 <= int(run_length) <= int(size):
            raise ValueError(f"run_length must be in [1, size], got {run_length} for size {size}")
        super().__init__(size - size % int(run_length), density, dtype, seed)
        self.run_length = int(run_length)

    def _allocate(self) -> dict[str, torch.Tensor]:
        r = self.run_length
        n_runs = self.size // r
        runs = max(1, round(self.density * n_runs))
        starts = torch.randperm(n_runs, generator=self._gen, device=self.device_)[:runs].sort().values
        return {"target": self._randn(self.size), "runs": starts, "values": self._randn(runs, r)}

    def __call__(self) -> None:
        t = self.tensors_
        t["target"].view(-1, self.run_length).index_put_((t["runs"],), t["values"])

    def _kept(self) -> int:
        return self.tensors_["runs"].numel() * self.run_length

    def _counts(self, s: int) -> dict[str, int]:
        runs, k = self.tensors_["runs"].numel(), self._kept()
        r = self.run_length
        written = (self.tensors_["runs"].unsqueeze(1) * r + torch.arange(r, device=self.device_)).reshape(-1)
        return {"elements": k, "bytes_read": k * s + runs * 8, "bytes_written": k * s, "launches": 1,
                "scattered_bytes_written": k * s, **scatter_layout(written, s)}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "run_length": self.run_length}


class Pack(_Kept):
    """Gather k kept values of an update into a send buffer, and their positions as int32."""

    name = "pack"

    def _allocate(self) -> dict[str, torch.Tensor]:
        if self.size > torch.iinfo(_SEND_INDEX).max:
            raise ValueError(f"pack sends int32 positions; size {self.size} is too large")
        positions = self._positions()
        return {"update": self._randn(self.size), "positions": positions, **self._send_buffers(positions.numel())}

    def __call__(self) -> None:
        t = self.tensors_
        torch.index_select(t["update"], 0, t["positions"], out=t["send_values"])
        t["send_positions"].copy_(t["positions"])

    def _counts(self, s: int) -> dict[str, int]:
        k = self.tensors_["positions"].numel()
        # index_select reads k positions and k values; the copy reads k int64, writes k int32
        return {"elements": k, "bytes_read": k * (8 + s + 8), "bytes_written": k * (s + 4), "launches": 2}


class Residual(_Kept):
    """Error feedback: ``residual += update`` over all n entries, then the k sent entries are
    cleared (``residual[positions] = 0``)."""

    name = "residual"

    def _allocate(self) -> dict[str, torch.Tensor]:
        return {"residual": self._randn(self.size), "update": self._randn(self.size), "positions": self._positions()}

    def __call__(self) -> None:
        t = self.tensors_
        t["residual"].add_(t["update"])
        t["residual"].index_fill_(0, t["positions"], 0)

    def _counts(self, s: int) -> dict[str, int]:
        n, k = self.size, self.tensors_["positions"].numel()
        return {"elements": n, "bytes_read": 2 * n * s + k * 8, "bytes_written": (n + k) * s, "flops": n,
                "launches": 2, "scattered_bytes_written": k * s,
                **scatter_layout(self.tensors_["positions"], s)}


class Compensation(TensorWorkload):
    """Error feedback's compensation: ``residual += update`` over all n entries of one tensor. A
    client runs it every round on every tensor, whatever its mask keeps (``ErrorFeedback.compensate``),
    so it is the part of a round no mask decides: calibration replays it on its own and profiles
    price it per layer as ``compensation_j``."""

    name = "compensation"

    def _allocate(self) -> dict[str, torch.Tensor]:
        return {"residual": self._randn(self.size), "update": self._randn(self.size)}

    def __call__(self) -> None:
        t = self.tensors_
        t["residual"].add_(t["update"])

    @classmethod
    def counts_for(cls, n: int, s: int) -> WorkCounts:
        """Counts of one call over a tensor of ``n`` entries of ``s`` bytes."""
        return WorkCounts(elements=n, bytes_read=2 * n * s, bytes_written=n * s, flops=n,
                          working_set_bytes=2 * n * s, launches=1)

    def _counts(self, s: int) -> dict[str, int]:
        c = self.counts_for(self.size, s)
        return {k: v for k, v in c.to_dict().items() if k != "working_set_bytes"}


class CompensationGroup(Workload):
    """The compensation (:class:`Compensation`) of several tensors, one launch each: a model's tensors
    too small for their own replay to resolve (a 64-entry bias costs about one launch), measured
    together so that their every-round cost is measured rather than extrapolated from the sweep.
    ``count_parts_`` prices each tensor on its own."""

    name = "compensation-group"

    def __init__(self, sizes: Sequence[int], dtype: str | torch.dtype = "float32", seed: int = 0) -> None:
        if not sizes or min(sizes) <= 0:
            raise ValueError(f"sizes must be positive and not empty, got {list(sizes)}")
        self.sizes = tuple(int(n) for n in sizes)
        self.dtype = _dtype(dtype)
        self.seed = int(seed)

    def setup(self, device: str | torch.device = "cpu") -> "CompensationGroup":
        self.device_ = _device(device)
        self.parts_ = [Compensation(n, dtype=self.dtype, seed=self.seed + i).setup(self.device_)
                       for i, n in enumerate(self.sizes)]
        self.count_parts_ = tuple(w.counts_ for w in self.parts_)
        self.tensors_ = {f"{i}.{k}": t for i, w in enumerate(self.parts_) for k, t in w.tensors_.items()}
        self.counts_ = WorkCounts(**{f.name: sum(getattr(c, f.name) for c in self.count_parts_)
                                     for f in fields(WorkCounts)})
        return self

    def __call__(self) -> None:
        for w in self.parts_:
            w()

    def describe(self) -> dict[str, Any]:
        return {"workload": self.name, "tensors": len(self.sizes), "entries": sum(self.sizes),
                "dtype": str(self.dtype).removeprefix("torch.")}


class UpdatePhase(_Kept):
    """The masked update phase of one parameter tensor: what a non-empty mask adds to a client's
    round to keep k entries of its update (the compensation ``residual += update`` that every round
    pays on every tensor is :class:`Compensation`, not part of it). This is "keeping update entries",
    defined once: calibration measures it, validation re-measures it and the cost model prices its
    counts. With k = 0 the client runs none of it.

    1. pack the kept entries into the send buffer: ``send_values = residual[positions]`` and the
       positions as int32 (its launches are the layer's fixed part)
    2. residual bookkeeping: ``residual[positions] = 0`` (scattered write)
    3. apply the kept values: ``param[positions] += send_values`` (scattered read-modify-write)
    """

    name = "update"
    LAUNCHES = 4

    def _allocate(self) -> dict[str, torch.Tensor]:
        if self.size > torch.iinfo(_SEND_INDEX).max:
            raise ValueError(f"the update phase sends int32 positions; size {self.size} is too large")
        positions = self._positions()
        return {
            "param": self._randn(self.size),
            "residual": self._randn(self.size),
            "positions": positions,
            **self._send_buffers(positions.numel()),
        }

    def __call__(self) -> None:
        t = self.tensors_
        torch.index_select(t["residual"], 0, t["positions"], out=t["send_values"])
        t["send_positions"].copy_(t["positions"])
        t["residual"].index_fill_(0, t["positions"], 0)
        t["param"].index_add_(0, t["positions"], t["send_values"])

    @classmethod
    def counts_for(cls, n: int, k: int, lines: int, s: int, pages: int = 0, runs: int = 0) -> WorkCounts:
        """Counts of one call over a tensor of ``n`` entries of ``s`` bytes that keeps ``k`` entries
        lying in ``lines`` distinct 64-byte lines, ``pages`` 4 KiB pages and ``runs`` runs of
        consecutive lines (both scattered ops write those lines; 0 pages and runs: not known)."""
        # index_select: r 8k + ks, w ks | copy_: r 8k, w 4k
        # index_fill_: r 8k, w ks (scattered) | index_add_: r 8k + 2ks, w ks (scattered), f k
        return WorkCounts(
            elements=k,
            bytes_read=32 * k + 3 * k * s,
            bytes_written=3 * k * s + 4 * k,
            flops=k,
            working_set_bytes=2 * n * s + k * (8 + s + 4),
            launches=cls.LAUNCHES,
            scattered_bytes_written=2 * k * s,
            lines_written=2 * lines,
            pages_written=2 * pages,
            line_runs_written=2 * runs,
        )

    def _counts(self, s: int) -> dict[str, int]:
        positions = self.tensors_["positions"]
        layout = scatter_layout(positions, s)
        c = self.counts_for(self.size, positions.numel(), layout["lines_written"], s, layout["pages_written"],
                            layout["line_runs_written"])
        return {k: v for k, v in c.to_dict().items() if k != "working_set_bytes"}


# ---------------------------------------------------------------------------- compute updates
class Sgd(TensorWorkload):
    """``param -= lr * grad`` (one FMA per element)."""

    name = "sgd"

    def __init__(self, size: int, dtype: str | torch.dtype = "float32", seed: int = 0, lr: float = 0.01) -> None:
        super().__init__(size, dtype, seed)
        self.lr = float(lr)

    def _allocate(self) -> dict[str, torch.Tensor]:
        return {"param": self._randn(self.size), "grad": self._randn(self.size)}

    def __call__(self) -> None:
        t = self.tensors_
        t["param"].add_(t["grad"], alpha=-self.lr)

    def _counts(self, s: int) -> dict[str, int]:
        n = self.size
        return {"elements": n, "bytes_read": 2 * n * s, "bytes_written": n * s, "flops": 2 * n, "launches": 1}


class Momentum(TensorWorkload):
    """SGD with momentum, as torch.optim.SGD does it: ``buf = mu * buf + grad``, ``param -= lr * buf``."""

    name = "momentum"

    def __init__(
        self, size: int, dtype: str | torch.dtype = "float32", seed: int = 0, lr: float = 0.01, momentum: float = 0.9
    ) -> None:
        super().__init__(size, dtype, seed)
        self.lr = float(lr)
        self.momentum = float(momentum)

    def _allocate(self) -> dict[str, torch.Tensor]:
        return {"param": self._randn(self.size), "grad": self._randn(self.size), "buf": self._randn(self.size)}

    def __call__(self) -> None:
        t = self.tensors_
        t["buf"].mul_(self.momentum).add_(t["grad"])
        t["param"].add_(t["buf"], alpha=-self.lr)

    def _counts(self, s: int) -> dict[str, int]:
        n = self.size
        # mul_: r1 w1 f1; add_: r2 w1 f1; param.add_(alpha): r2 w1 f2
        return {"elements": n, "bytes_read": 5 * n * s, "bytes_written": 3 * n * s, "flops": 4 * n, "launches": 3}


class Adam(TensorWorkload):
    """An Adam-like step (bias correction folded into the step size), one eager op at a time:
    ``m.lerp_(g, 1-b1)``; ``v.mul_(b2).addcmul_(g, g, 1-b2)``; ``d = sqrt(v) + eps``;
    ``param.addcdiv_(m, d, -step)``."""

    name = "adam"

    def __init__(
        self,
        size: int,
        dtype: str | torch.dtype = "float32",
        seed: int = 0,
        lr: float = 0.001,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__(size, dtype, seed)
        self.lr = float(lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)

    def _allocate(self) -> dict[str, torch.Tensor]:
        n = self.size
        return {
            "param": self._randn(n),
            "grad": self._randn(n),
            "exp_avg": self._randn(n),
            "exp_avg_sq": self._randn(n).abs_(),  # a second moment is >= 0
            "denom": torch.empty(n, dtype=self.dtype_, device=self.device_),
        }

    def __call__(self) -> None:
        t = self.tensors_
        b1, b2 = self.betas
        t["exp_avg"].lerp_(t["grad"], 1 - b1)
        t["exp_avg_sq"].mul_(b2).addcmul_(t["grad"], t["grad"], value=1 - b2)
        torch.sqrt(t["exp_avg_sq"], out=t["denom"])
        t["denom"].add_(self.eps)
        t["param"].addcdiv_(t["exp_avg"], t["denom"], value=-self.lr)

    def _counts(self, s: int) -> dict[str, int]:
        n = self.size
        # lerp_ r2 w1 f3; mul_ r1 w1 f1; addcmul_ r2 w1 f3; sqrt r1 w1 f1; add_ r1 w1 f1; addcdiv_ r3 w1 f3
        return {"elements": n, "bytes_read": 10 * n * s, "bytes_written": 6 * n * s, "flops": 12 * n,
                "launches": 6}


class Fma(TensorWorkload):
    """``fmas`` fused multiply-adds per element: ``y = x @ W`` with x of shape (n / fmas, fmas) and
    W of shape (fmas, fmas). Raising ``fmas`` raises FLOPs per byte, as in energy-roofline
    microbenchmarks. ``size`` is rounded down to a multiple of ``fmas``."""

    name = "fma"

    def __init__(self, size: int, dtype: str | torch.dtype = "float32", seed: int = 0, fmas: int = 16) -> None:
        if not 1 <= int(fmas) <= int(size):
            raise ValueError(f"fmas must be in [1, size], got {fmas} for size {size}")
        super().__init__(size - size % int(fmas), dtype, seed)
        self.fmas = int(fmas)

    def _allocate(self) -> dict[str, torch.Tensor]:
        rows, f = self.size // self.fmas, self.fmas
        return {
            "x": self._randn(rows, f),
            "w": self._randn(f, f) / math.sqrt(f),
            "y": torch.empty(rows, f, dtype=self.dtype_, device=self.device_),
        }

    def __call__(self) -> None:
        t = self.tensors_
        torch.matmul(t["x"], t["w"], out=t["y"])

    def _counts(self, s: int) -> dict[str, int]:
        n, f = self.size, self.fmas
        return {"elements": n, "bytes_read": (n + f * f) * s, "bytes_written": n * s, "flops": 2 * n * f,
                "launches": 1}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "fmas": self.fmas}


WORKLOADS: dict[str, type[TensorWorkload]] = {
    cls.name: cls for cls in (Scatter, Runs, Pack, Residual, UpdatePhase, Compensation, Sgd, Momentum, Adam, Fma)
}


def make_workload(
    name: str,
    size: int = 2**20,
    density: float | None = None,
    dtype: str | torch.dtype = "float32",
    seed: int = 0,
    **params: Any,
) -> TensorWorkload:
    """Build a registered workload by name (not yet set up). ``density`` only for sparse ones."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; workloads: {', '.join(WORKLOADS)}")
    cls = WORKLOADS[name]
    if density is not None:
        if not cls.sparse:
            raise ValueError(f"workload {name!r} updates every element; it takes no density")
        params["density"] = density
    return cls(size, dtype=dtype, seed=seed, **params)
