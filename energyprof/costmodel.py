"""The cost model: the one place in energyprof where energy is predicted.

Everything that turns work into joules goes through this module: the simulator's ground truth
(with the preset's true coefficients), the calibration fit (which estimates the coefficients), a
profile's per-layer predictions, the pruner's cost maps and the validation.

Work is described by :class:`~energyprof.counts.WorkCounts` (exact counts that the kernels declare).
The model turns counts into **features**:

``calls``              kernel launches (a fixed energy per launch: launch and dispatch)
``read_<level>``       bytes read, split between the levels ``cache`` and ``dram``
``write_<level>``      bytes written contiguously (streams), split the same way
``lines_<level>``      64-byte cache lines touched by scattered writes (an entry alone in its line
                       costs the line; entries that share a line share its cost)
``flops``              floating-point operations

and features times coefficients into joules. The split between memory levels is a smooth function
of the working set: the share priced at the DRAM level is a logistic in log2(working set / cache
size) whose width is ``transition_octaves`` (0 makes it a step at ``cache_bytes``).

Per-layer costs. What one round of one parameter tensor of n entries costs is split by who
decides it (:func:`round_joules`):

* the **compensation**, ``compensation_j``: error feedback's dense ``residual += update``
  (:class:`energyprof.workloads.Compensation`), paid every round on every tensor whatever its mask
  keeps. It is the round's floor: no mask can avoid it, so no mask is ever charged for it.
* the **masked update phase** (:class:`energyprof.workloads.UpdatePhase`), added by a non-empty
  mask: keeping k of the n entries costs

    fixed_j + joules_per_update * k + joules_per_line * lines + joules_per_update_density * k * k / n

  and nothing when k = 0 (:func:`layer_joules`). ``fixed_j`` is the sparse kernels' set-up.
  ``lines`` is the number of 64-byte lines of the tensor that hold a kept entry (scattered writes
  are paid in whole lines, so the cost per entry falls as density rises); the last term is what the
  data show beyond a straight line: the kept entries' send buffers grow the working set, which near
  the cache size moves traffic to DRAM as density rises.

Those five numbers are measured per layer by the calibration (the compensation replayed on its own,
not extrapolated from the update phase), or derived from the global coefficients by
:func:`layer_costs_from_global`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np

from energyprof.counts import WorkCounts

__all__ = [
    "LINE_BYTES",
    "LEVELS",
    "FEATURES",
    "CostCoefficients",
    "LayerCoefficients",
    "dram_fraction",
    "features",
    "feature_matrix",
    "predict_joules",
    "layer_joules",
    "RoundJoules",
    "round_joules",
    "transmission_joules",
    "lines_touched",
    "expected_lines",
    "layer_costs_from_global",
    "layer_design",
    "LAYER_DENSITIES",
]

LINE_BYTES = 64
LEVELS = ("cache", "dram")
FEATURES = (
    "calls",
    "read_cache",
    "read_dram",
    "write_cache",
    "write_dram",
    "lines_cache",
    "lines_dram",
    "flops",
)


def dram_fraction(working_set_bytes: float, cache_bytes: float, transition_octaves: float = 0.0) -> float:
    """Share of a working set's traffic priced at the DRAM level (0 .. 1).

    A step at ``cache_bytes`` when ``transition_octaves`` is 0; otherwise a logistic in
    ``log2(working_set / cache_bytes)`` that goes from 12 % to 88 % over ``transition_octaves``
    octaves centred on ``cache_bytes``."""
    if cache_bytes <= 0:
        raise ValueError(f"cache_bytes must be > 0, got {cache_bytes}")
    if working_set_bytes <= 0:
        return 0.0
    if transition_octaves <= 0:
        return 0.0 if working_set_bytes <= cache_bytes else 1.0
    x = 2.0 * math.log2(working_set_bytes / cache_bytes) / transition_octaves
    if x > 60:
        return 1.0
    if x < -60:
        return 0.0
    return 1.0 / (1.0 + math.exp(-x))


@dataclass(frozen=True)
class CostCoefficients:
    """Global coefficients of a device: joules per launch, per byte read and written contiguously,
    per scattered-written line and per FLOP, at each memory level; the cache size and the width of
    the cache-to-DRAM transition. ``static_power_w`` is the idle power (not part of a kernel's
    energy above idle)."""

    j_per_call: float
    j_per_byte_read: Mapping[str, float]
    j_per_byte_written: Mapping[str, float]
    j_per_line_written: Mapping[str, float]
    j_per_flop: float
    cache_bytes: int
    transition_octaves: float = 0.0
    static_power_w: float = 0.0

    def __post_init__(self) -> None:
        for name in ("j_per_byte_read", "j_per_byte_written", "j_per_line_written"):
            levels = getattr(self, name)
            missing = set(LEVELS) - set(levels)
            if missing:
                raise ValueError(f"{name} needs the levels {', '.join(LEVELS)}; missing {', '.join(sorted(missing))}")
        if self.cache_bytes <= 0:
            raise ValueError(f"cache_bytes must be > 0, got {self.cache_bytes}")

    def vector(self) -> np.ndarray:
        """Coefficients in the order of :data:`FEATURES`."""
        r, w, ln = self.j_per_byte_read, self.j_per_byte_written, self.j_per_line_written
        return np.array(
            [self.j_per_call, r["cache"], r["dram"], w["cache"], w["dram"], ln["cache"], ln["dram"], self.j_per_flop],
            dtype=float,
        )

    @classmethod
    def from_vector(
        cls, v: Any, cache_bytes: int, transition_octaves: float = 0.0, static_power_w: float = 0.0
    ) -> "CostCoefficients":
        v = [float(x) for x in v]
        if len(v) != len(FEATURES):
            raise ValueError(f"expected {len(FEATURES)} coefficients ({', '.join(FEATURES)}), got {len(v)}")
        return cls(
            j_per_call=v[0],
            j_per_byte_read={"cache": v[1], "dram": v[2]},
            j_per_byte_written={"cache": v[3], "dram": v[4]},
            j_per_line_written={"cache": v[5], "dram": v[6]},
            j_per_flop=v[7],
            cache_bytes=int(cache_bytes),
            transition_octaves=float(transition_octaves),
            static_power_w=float(static_power_w),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("j_per_byte_read", "j_per_byte_written", "j_per_line_written"):
            d[k] = dict(d[k])
        return d


def features(counts: WorkCounts, cache_bytes: float, transition_octaves: float = 0.0) -> np.ndarray:
    """The feature vector (:data:`FEATURES`) of the work ``counts`` describes."""
    f = dram_fraction(counts.working_set_bytes, cache_bytes, transition_octaves)
    contiguous = counts.bytes_written - counts.scattered_bytes_written
    return np.array(
        [
            counts.launches,
            (1 - f) * counts.bytes_read,
            f * counts.bytes_read,
            (1 - f) * contiguous,
            f * contiguous,
            (1 - f) * counts.lines_written,
            f * counts.lines_written,
            counts.flops,
        ],
        dtype=float,
    )


def feature_matrix(counts: list[WorkCounts], cache_bytes: float, transition_octaves: float = 0.0) -> np.ndarray:
    """One row of :func:`features` per counts."""
    if not counts:
        return np.zeros((0, len(FEATURES)))
    return np.vstack([features(c, cache_bytes, transition_octaves) for c in counts])


def predict_joules(counts: WorkCounts, coefficients: CostCoefficients) -> float:
    """Joules above idle of the work ``counts`` describes."""
    x = features(counts, coefficients.cache_bytes, coefficients.transition_octaves)
    return float(x @ coefficients.vector())


# ------------------------------------------------------------------------------ per-layer costs
LAYER_DENSITIES = (0.001, 0.01, 0.1, 0.3, 1.0)  # where a layer's cost curve is measured (and fitted)


@dataclass(frozen=True)
class LayerCoefficients:
    """What one tensor of ``numel`` entries costs in one round (see the module docstring):
    ``compensation_j`` every round whatever is kept; then ``fixed_j`` once when any entry is kept, ``joules_per_update`` per kept entry,
    ``joules_per_line`` per 64-byte line holding a kept entry, ``joules_per_update_density`` per kept
    entry and unit of density."""

    fixed_j: float
    joules_per_update: float
    joules_per_line: float = 0.0
    joules_per_update_density: float = 0.0
    numel: int = 0
    itemsize: int = 4
    compensation_j: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def joules(self, kept: int, lines: int) -> float:
        return layer_joules(self.fixed_j, self.joules_per_update, self.joules_per_line, kept, lines,
                            self.joules_per_update_density, self.numel)


def layer_joules(
    fixed_j: float, joules_per_update: float, joules_per_line: float, kept: int, lines: int,
    joules_per_update_density: float = 0.0, numel: int = 0,
) -> float:
    """Joules of keeping ``kept`` of the ``numel`` entries of one tensor, spread over ``lines``
    cache lines, in one step."""
    if kept < 0 or lines < 0:
        raise ValueError(f"kept and lines must be >= 0, got {kept} and {lines}")
    if kept == 0:
        return 0.0
    quadratic = joules_per_update_density * kept * kept / numel if joules_per_update_density else 0.0
    return fixed_j + joules_per_update * kept + joules_per_line * lines + quadratic


@dataclass(frozen=True)
class RoundJoules:
    """What one client's round of update work costs, split by who decides it: ``floor_j`` is paid
    whatever the masks keep (the compensation of every tensor), ``mask_j`` is what the masks add
    (their layers' update phases), ``transmission_j`` what sending the kept entries costs (0 when
    the profile has no radio entry). ``total_j`` is the whole round."""

    floor_j: float
    mask_j: float
    transmission_j: float = 0.0

    @property
    def total_j(self) -> float:
        return math.fsum((self.floor_j, self.mask_j, self.transmission_j))

    def to_dict(self) -> dict[str, float]:
        return {"total_j": self.total_j, "floor_j": self.floor_j, "mask_j": self.mask_j,
                "transmission_j": self.transmission_j}


def round_joules(compensation_j: Any, mask_j: Any, transmission_j: float = 0.0) -> RoundJoules:
    """The whole round from its parts: the compensations of every tensor (iterable of joules), the
    masked update phases of the tensors a mask keeps entries of (iterable of :func:`layer_joules`),
    and the transmission."""
    return RoundJoules(floor_j=math.fsum(compensation_j), mask_j=math.fsum(mask_j), transmission_j=float(transmission_j))


def layer_design(kept: Any, lines: Any, numel: int) -> np.ndarray:
    """The per-layer model's design matrix (columns: 1, k, lines, k^2 / n) for replays with
    ``kept`` entries in ``lines`` lines: what a per-layer fit regresses joules on."""
    k = np.asarray(kept, float)
    return np.column_stack([np.ones_like(k), k, np.asarray(lines, float), k * k / numel])


def transmission_joules(bytes_sent: int, joules_per_byte: float) -> float:
    """Joules of sending ``bytes_sent`` bytes over a link that costs ``joules_per_byte`` (a profile's
    radio entry: a stated datasheet or paper figure, not measured by energyprof)."""
    if bytes_sent < 0 or joules_per_byte < 0:
        raise ValueError(f"bytes_sent and joules_per_byte must be >= 0, got {bytes_sent} and {joules_per_byte}")
    return joules_per_byte * bytes_sent


def lines_touched(mask_or_positions: Any, itemsize: int, numel: int | None = None) -> int:
    """64-byte lines that hold at least one kept entry: from a boolean mask (any shape; the tensor's
    storage is assumed to start on a line boundary, as torch's allocators align it) or from flat
    positions (then ``numel`` is not needed)."""
    import torch

    per_line = max(1, LINE_BYTES // int(itemsize))
    t = mask_or_positions
    if isinstance(t, torch.Tensor) and t.dtype == torch.bool:
        flat = t.reshape(-1)
        n = flat.numel()
        pad = (-n) % per_line
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        return int(flat.view(-1, per_line).any(dim=1).sum())
    positions = t if isinstance(t, torch.Tensor) else torch.as_tensor(t)
    if positions.numel() == 0:
        return 0
    return int(torch.unique(positions.reshape(-1) // per_line).numel())


def expected_lines(kept: float, numel: int, itemsize: int) -> float:
    """Expected lines touched by ``kept`` entries drawn uniformly without replacement from ``numel``."""
    per_line = max(1, LINE_BYTES // int(itemsize))
    n_lines = math.ceil(numel / per_line)
    if kept <= 0:
        return 0.0
    if kept >= numel:
        return float(n_lines)
    # P(a line of e entries holds none of the kept) = C(n-e, k) / C(n, k) ~ (1 - k/n)^e
    p_empty = (1.0 - kept / numel) ** per_line
    return n_lines * (1.0 - p_empty)


def layer_costs_from_global(
    coefficients: CostCoefficients, numel: int, dtype: str, densities: tuple[float, ...] = LAYER_DENSITIES
) -> LayerCoefficients:
    """Per-layer costs predicted from the global coefficients: the compensation's counts priced
    directly, and the cost model's prediction for the update phase's own counts (:meth:`energyprof.workloads.UpdatePhase.counts_for`, random positions)
    at ``densities``, fitted with the per-layer model (non-negative least squares, relative error)."""
    from scipy.optimize import nnls

    from energyprof.workloads import Compensation, UpdatePhase, itemsize_of

    s = itemsize_of(dtype)
    fixed = predict_joules(UpdatePhase.counts_for(numel, 0, 0, s), coefficients)
    compensation = predict_joules(Compensation.counts_for(numel, s), coefficients)
    kept = sorted({max(1, round(d * numel)) for d in densities})
    lines = [max(1, round(expected_lines(k, numel, s))) for k in kept]
    y = np.array([predict_joules(UpdatePhase.counts_for(numel, k, n, s), coefficients) for k, n in zip(kept, lines)])
    x = layer_design(kept, lines, numel)[:, 1:]  # the fixed part is known exactly: E(k=0)
    target = y - fixed
    scale = np.sqrt((x**2).mean(axis=0))
    scale[scale == 0] = 1.0
    coef, _ = nnls((x / scale) / y[:, None], target / y)
    coef = coef / scale
    return LayerCoefficients(
        fixed_j=fixed, joules_per_update=float(coef[0]), joules_per_line=float(coef[1]),
        joules_per_update_density=float(coef[2]), numel=int(numel), itemsize=s, compensation_j=compensation,
    )
