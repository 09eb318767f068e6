"""Replays of a model's update, built from the workloads of :mod:`energyprof.workloads`:
:class:`LayerReplay` (one memory-write kernel per parameter tensor of a ``torch.nn.Module``, with
the positions a mask keeps), :class:`RoundReplay` (a whole round: every tensor's compensation, then
the update phase of the tensors the mask keeps entries of), and :class:`SimKernel`, the simulated
meter's stand-in kernel for protocol tests and benchmarks.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Mapping

import torch

from energyprof.counts import WorkCounts
from energyprof.workloads import Compensation, Pack, Residual, Scatter, UpdatePhase, Workload, _device, _Kept

__all__ = ["LayerReplay", "RoundReplay", "SimKernel"]


# ---------------------------------------------------------------------------- layer replay
_REPLAY_KERNELS: dict[str, type[_Kept]] = {cls.name: cls for cls in (UpdatePhase, Scatter, Pack, Residual)}


class LayerReplay(Workload):
    """Replay the sparse update of a ``torch.nn.Module``: for each parameter named in ``masks``
    (boolean, same shape), a ``kernel`` workload ("update", the masked update phase, by default; or
    "scatter", "pack" or "residual") over that
    tensor's size and dtype and the positions the mask keeps. ``layers_`` holds one set-up
    workload per parameter, to be measured one by one; calling the replay runs them all.
    ``counts_`` sums the tensors' counts; ``count_parts_`` keeps each tensor's counts, since each
    has its own working set (the protocol reports them one by one)."""

    name = "replay"

    def __init__(self, module: torch.nn.Module, masks: Mapping[str, torch.Tensor], kernel: str = "update", seed: int = 0) -> None:
        if kernel not in _REPLAY_KERNELS:
            raise ValueError(f"unknown replay kernel {kernel!r}; choose one of {', '.join(_REPLAY_KERNELS)}")
        self.module = module
        self.masks = masks
        self.kernel = kernel
        self.seed = int(seed)

    def setup(self, device: str | torch.device = "cpu") -> "LayerReplay":
        params = dict(self.module.named_parameters())
        unknown = sorted(set(self.masks) - set(params))
        if unknown:
            raise KeyError(f"masks name no parameter of the module: {', '.join(unknown)}")
        self.device_ = _device(device)
        self.layers_: dict[str, _Kept] = {}
        for i, (name, p) in enumerate(params.items()):
            if name not in self.masks:
                continue
            mask = self.masks[name]
            if tuple(mask.shape) != tuple(p.shape) or mask.dtype != torch.bool:
                raise ValueError(f"mask for {name} must be a bool tensor of shape {tuple(p.shape)}")
            positions = mask.flatten().nonzero().squeeze(1)
            w = _REPLAY_KERNELS[self.kernel](p.numel(), dtype=p.dtype, seed=self.seed + i, positions=positions)
            self.layers_[name] = w.setup(self.device_)
        return self._sum_parts()

    def _sum_parts(self) -> "LayerReplay":
        layers = list(self.layers_.values())
        self.count_parts_ = tuple(w.counts_ for w in layers)  # each tensor's work, priced on its own
        self.tensors_ = {f"{n}.{k}": t for n, w in self.layers_.items() for k, t in w.tensors_.items()}
        self.counts_ = WorkCounts(**{f.name: sum(getattr(w.counts_, f.name) for w in layers) for f in fields(WorkCounts)})
        return self

    def __call__(self) -> None:
        for w in self.layers_.values():
            w()

    def describe(self) -> dict[str, Any]:
        return {"workload": self.name, "kernel": self.kernel, "layers": len(self.masks)}


class RoundReplay(LayerReplay):
    """Replay a client's whole round of update work on a ``torch.nn.Module``: the compensation
    (:class:`Compensation`, ``residual += update``) on every parameter tensor, paid whatever the
    masks keep, then the masked update phase (:class:`UpdatePhase`) of every tensor whose mask
    keeps an entry. ``layers_`` holds the compensations under ``"<name>#compensation"`` and the
    update phases under the tensor's name; ``count_parts_`` prices each on its own."""

    name = "round"

    def __init__(self, module: torch.nn.Module, masks: Mapping[str, torch.Tensor], seed: int = 0) -> None:
        super().__init__(module, masks, kernel="update", seed=seed)

    def setup(self, device: str | torch.device = "cpu") -> "RoundReplay":
        kept = {n: m for n, m in self.masks.items() if bool(m.any())}
        masks, self.masks = self.masks, kept
        try:
            super().setup(device)
        finally:
            self.masks = masks
        updates = self.layers_
        self.layers_ = {}
        for i, (name, p) in enumerate(self.module.named_parameters()):
            self.layers_[f"{name}#compensation"] = Compensation(p.numel(), dtype=p.dtype, seed=self.seed + 7919 + i).setup(self.device_)
        self.layers_.update(updates)
        return self._sum_parts()

    def describe(self) -> dict[str, Any]:
        return {"workload": self.name, "tensors": sum(1 for _ in self.module.parameters()),
                "layers_kept": sum(1 for m in self.masks.values() if bool(m.any()))}


# ---------------------------------------------------------------------------- simulator stand-in
class SimKernel(Workload):
    """A stand-in kernel for the simulated meter: each call advances the meter's clock by
    ``duration_s`` and reports ``counts`` itself (``meter.run_kernel``), so ``reports_work`` is
    True and the protocol does not report it again. No tensors; for protocol tests and benchmarks."""

    name = "sim-kernel"
    reports_work = True

    def __init__(self, meter: Any, counts: WorkCounts, duration_s: float) -> None:
        if duration_s <= 0:
            raise ValueError(f"duration_s must be > 0, got {duration_s}")
        self.meter = meter
        self.counts = counts
        self.duration_s = float(duration_s)

    def setup(self, device: str | torch.device = "cpu") -> "SimKernel":
        self.device_ = torch.device(device)
        self.tensors_ = {}
        self.counts_ = self.counts
        return self

    def __call__(self) -> None:
        self.meter.run_kernel(self.counts, self.duration_s)

    def describe(self) -> dict[str, Any]:
        return {"workload": self.name, "duration_s": self.duration_s, **self.counts.to_dict()}
