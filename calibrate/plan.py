"""The calibration plan: what ``energyprof calibrate`` measures, and how long it takes.

Two parts (see :mod:`calibrate.calibration` for the run): a **workload sweep** for the global
coefficients, and **layer replays** for each model (the masked update phase of each distinct
tensor shape at several densities, its compensation on its own, and the compensation of the
tensors too small for their own replay, measured together). :func:`estimate_seconds` and
:func:`extra_seconds` give the wall time that ``--dry-run`` prints.
"""


from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch

from energyprof.costmodel import LAYER_DENSITIES as LAYER_DENSITIES_ALL

__all__ = ["ModelPlan", "PlanItem", "build_plan", "estimate_seconds", "extra_seconds", "protocol_settings",
           "reference_count"]



LAYER_DENSITIES = {"quick": LAYER_DENSITIES_ALL, "full": LAYER_DENSITIES_ALL}
SWEEP_SIZES = {"quick": (4**6, 4**8, 4**10, 4**12), "full": (4**7, 4**8, 4**9, 4**10, 4**11, 4**12, 4**13)}
SPARSE_SIZES = {"quick": (4**6, 4**8, 4**10, 4**12), "full": (4**7, 4**9, 4**11, 4**13)}
SPARSE_DENSITIES = (0.01, 0.2)
MIN_LAYER_NUMEL = {"quick": 16384, "full": 4096}
SPARSE_KERNELS = ("scatter", "pack", "residual", "runs", "update")
COMPUTE_KERNELS = ("sgd", "momentum", "adam", "fma", "compensation")


IDLE_EVERY_S = 120.0  # the shared idle baseline is re-measured after this much meter time
REFERENCE_EVERY = 10  # the reference kernel is re-measured after this many measurements


def protocol_settings(quick: bool) -> dict[str, Any]:
    """The measurement protocol's parameters for a calibration (recorded in the profile). The idle
    baseline is shared: measured at the start and again every ``IDLE_EVERY_S`` of meter time."""
    if quick:  # fewer measurements (see the plan), each with longer windows
        return dict(min_window_s=0.5, min_periods=5, min_calls=32, trials=3, idle_windows=10, warmup_s=0.05)
    return dict(min_window_s=0.3, min_periods=3, min_calls=32, trials=3, idle_windows=10, warmup_s=0.05)



@dataclass(frozen=True)
class PlanItem:
    """One measurement: a workload sweep point or a layer replay at one density."""

    id: str
    kind: str  # "sweep" or "layer"
    workload: str
    size: int
    dtype: str = "float32"
    density: float | None = None
    model: str | None = None
    tensors: tuple[str, ...] = field(default=())  # the tensors this replay prices (same numel, dtype)
    sizes: tuple[int, ...] = field(default=())  # a compensation group: each tensor's entries (same order)

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode()) & 0x7FFFFFFF


@dataclass
class ModelPlan:
    label: str
    shapes: dict[str, tuple[list[int], str]]  # tensor -> (shape, dtype)
    groups: dict[tuple[int, str], list[str]]  # (numel, dtype) -> tensors
    measured: dict[tuple[int, str], list[PlanItem]]  # groups that are replayed
    too_small: list[tuple[int, str]]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def build_plan(models: dict[str, torch.nn.Module], quick: bool = False,
               min_layer_numel: int | None = None) -> tuple[list[PlanItem], dict[str, ModelPlan]]:
    mode = "quick" if quick else "full"
    items: list[PlanItem] = []
    for size in SWEEP_SIZES[mode]:
        for name in COMPUTE_KERNELS:
            items.append(PlanItem(f"sweep/{name}/n={size}", "sweep", name, size))
    for size in SPARSE_SIZES[mode]:
        for name in SPARSE_KERNELS:
            for d in SPARSE_DENSITIES:
                items.append(PlanItem(f"sweep/{name}/n={size}/d={d:g}", "sweep", name, size, density=d))
    min_numel = MIN_LAYER_NUMEL[mode] if min_layer_numel is None else min_layer_numel
    model_plans: dict[str, ModelPlan] = {}
    for label, module in models.items():
        shapes = {n: (list(p.shape), _dtype_name(p.dtype)) for n, p in module.named_parameters()}
        groups: dict[tuple[int, str], list[str]] = {}
        for n, p in module.named_parameters():
            groups.setdefault((p.numel(), _dtype_name(p.dtype)), []).append(n)
        measured, too_small = {}, []
        for (numel, dtype), tensors in groups.items():
            if numel < min_numel:
                too_small.append((numel, dtype))
                continue
            measured[(numel, dtype)] = [
                PlanItem(f"layer/{label}/{tensors[0]}/d={d:g}", "layer", "update", numel, dtype, d, label, tuple(tensors))
                for d in LAYER_DENSITIES[mode]
            ] + [PlanItem(f"layer/{label}/{tensors[0]}/compensation", "compensation", "compensation", numel, dtype,
                          None, label, tuple(tensors))]
            items.extend(measured[(numel, dtype)])
        small: dict[str, list[str]] = {}
        for numel, dtype in too_small:
            small.setdefault(dtype, []).extend(groups[(numel, dtype)])
        for dtype, tensors in small.items():  # measured together: one replay, one launch per tensor
            sizes = tuple(math.prod(shapes[n][0]) for n in tensors)
            items.append(PlanItem(f"layer/{label}/small-{dtype}/compensation", "compensation-group", "compensation-group",
                                  sum(sizes), dtype, None, label, tuple(tensors), sizes))
        model_plans[label] = ModelPlan(label, shapes, groups, measured, too_small)
    return items, model_plans


def estimate_seconds(items: list[PlanItem], settings: dict[str, Any], update_period_s: float | None) -> float:
    """Wall time of a plan on a real meter, from the protocol's settings (kernel windows, idle
    windows, warm-up, one update period per window for alignment): the plan the README states."""
    period = update_period_s or 0.0
    window = max(settings["min_window_s"], settings["min_periods"] * period)
    per = settings["warmup_s"] + settings["trials"] * (window + 2 * period)
    total = len(items) * per
    return total + (1 + total // IDLE_EVERY_S) * settings["idle_windows"] * window


def reference_count(n_items: int) -> int:
    """How many times a plan of ``n_items`` measures the reference kernel (first, every
    :data:`REFERENCE_EVERY`, last)."""
    return 0 if n_items == 0 else 2 + (n_items - 1) // REFERENCE_EVERY


def extra_seconds(n_items: int, settings: dict[str, Any], update_period_s: float | None,
                  cooldown_s: float = 0.0) -> dict[str, float]:
    """What the reference kernel and the cool-downs add to a plan's time (seconds)."""
    refs = reference_count(n_items)
    period = update_period_s or 0.0
    window = max(settings["min_window_s"], settings["min_periods"] * period)
    per = settings["warmup_s"] + settings["trials"] * (window + 2 * period)
    return {"references": refs, "reference_s": refs * per, "cooldown_s": (n_items + refs) * cooldown_s}

