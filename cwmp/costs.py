"""The selection's accounting: what a set of entries costs, exactly, and estimates for pivots.

An *amount* is what a set of entries costs in a model's own unit: a count for one shared cost (so
that k entries cost exactly k * c), float64 joules for per-entry costs, a per-layer count tensor for
layers with a fixed and a marginal cost each. Totals are compared with the budget as
``to_joules(amount) <= budget``, never by subtracting floats.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Union

import torch
from torch import Tensor

from cwmp.errors import MaskInputError
from cwmp.kernels import count_up_to, sort_descending

if TYPE_CHECKING:
    from cwmp.selection import _Sample

Costs = Union[Tensor, float, int]

class _CostModel:
    """Joules per entry, and how totals of them are formed.

    An *amount* is what a set of entries costs in the model's own accounting unit: a count for one
    shared cost (so that k entries cost exactly k * c, as the contract says), float64 joules for
    per-entry costs. Totals are compared with the budget as ``to_joules(amount) <= budget``, never
    by subtracting floats. Two kinds: ``_UniformCost`` and ``_EntryCosts``, with the same methods.
    """

    min_joules: float

    @staticmethod
    def of(costs: Costs, shape: torch.Size, device: torch.device, score_dtype: torch.dtype) -> "_CostModel":
        if isinstance(costs, bool) or not isinstance(costs, (Tensor, int, float)):
            raise MaskInputError(
                f"costs must be a number or a tensor of joules per entry, got {type(costs).__name__}"
            )
        if isinstance(costs, Tensor):
            if costs.is_complex() or costs.dtype == torch.bool:
                raise MaskInputError(f"costs must be real numbers of joules, got dtype {costs.dtype}")
            try:
                broadcast = torch.broadcast_shapes(costs.shape, shape)
            except RuntimeError:
                broadcast = None
            if broadcast != shape:
                raise MaskInputError(
                    f"costs of shape {tuple(costs.shape)} do not broadcast to the update's shape {tuple(shape)}; "
                    "give one cost per layer (a number) or a tensor broadcastable to the update"
                )
            if costs.numel() != 1:
                low, high = torch.aminmax(costs.detach())
                _check_cost(float(low), float(high))
                per_entry = costs.detach().to(device).expand(shape).reshape(-1)
                return _EntryCosts(per_entry, float(low), score_dtype)
            costs = costs.item()
        _check_cost(float(costs), float(costs))
        return _UniformCost(float(costs))


def _check_cost(low: float, high: float) -> None:
    if not (low > 0 and high < math.inf):  # NaN fails both comparisons
        raise MaskInputError(
            f"costs must be finite and > 0 joules per entry, got values in [{low}, {high}]; "
            "a free entry has no place in an energy budget: give it a small positive cost"
        )


class _UniformCost(_CostModel):
    def __init__(self, joules: float) -> None:
        self.joules = self.min_joules = joules

    def divisor(self, start: int, stop: int) -> float:
        return self.joules

    def amount(self, mask: Tensor, count: Tensor, start: int, stop: int) -> Tensor:
        return count

    def to_joules(self, amount: float) -> float:
        return amount * self.joules

    def affordable_prefix(self, base: int, n: int, budget_j: float) -> int:
        """How many of the first n entries fit after ``base`` were spent: the largest j <= n with
        (base + j) * c <= budget, found by arithmetic and corrected for rounding."""
        j = min(n, max(0, math.floor(budget_j / self.joules) - base))
        while j < n and (base + j + 1) * self.joules <= budget_j:
            j += 1
        while j > 0 and (base + j) * self.joules > budget_j:
            j -= 1
        return j

    def amount_of_all(self, n: int) -> int:
        """The amount of all ``n`` entries this model prices."""
        return n

    def total(self, amounts: list[Tensor]) -> int:
        return int(torch.stack(amounts).sum())

    def gather(self, index: Tensor) -> "_UniformCost":
        return self

    def amounts_at(self, index: Tensor) -> Tensor:
        return torch.ones(index.shape, dtype=torch.int64, device=index.device)

    def estimate(self, amount, sample: "_Sample", first: int, end: int) -> Tensor:
        """Estimated joules of ``amount`` plus the pool's entries down to each sample point in
        [first, end): for pivots only, so rounding and sampling error cost speed, never exactness."""
        before = sample.cumulative[first - 1] if first else 0.0
        return self.to_joules(amount) + sample.scale * (sample.cumulative[first:end] - before)

    def sorted_sample(self, scores: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """Sample scores, largest first, and the cumulative joules along them (no order needed:
        every entry costs the same)."""
        descending, _ = sort_descending(scores, order=False)
        counts = torch.arange(1, scores.numel() + 1, dtype=torch.float64, device=descending.device)
        return descending, counts * self.joules


class _EntryCosts(_CostModel):
    def __init__(self, joules: Tensor, min_joules: float, score_dtype: torch.dtype) -> None:
        self.joules, self.min_joules, self.score_dtype = joules, min_joules, score_dtype

    def divisor(self, start: int, stop: int) -> Tensor:
        return self.joules[start:stop].to(self.score_dtype)

    def amount(self, mask: Tensor, count: Tensor, start: int, stop: int) -> Tensor:
        return self.joules[start:stop][mask].sum(dtype=torch.float64)

    def to_joules(self, amount: float) -> float:
        return amount

    estimate = _UniformCost.estimate

    def affordable_prefix(self, base: float, n: int, budget_j: float) -> int:
        return count_up_to(self.joules[:n].double().cumsum(0) + base, budget_j)

    def amount_of_all(self, n: int) -> float:
        return float(self.joules.sum(dtype=torch.float64))

    def total(self, amounts: list[Tensor]) -> float:
        return float(torch.stack(amounts).sum())

    def gather(self, index: Tensor) -> "_EntryCosts":
        return _EntryCosts(self.joules[index], self.min_joules, self.score_dtype)

    def amounts_at(self, index: Tensor) -> Tensor:
        return self.joules[index].double()

    def sorted_sample(self, scores: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        descending, order = sort_descending(scores, order=True)
        return descending, self.amounts_at(index[order]).cumsum(0)



class _LayerCosts(_CostModel):
    """Per-layer accounting: an amount is a tensor of kept entries per layer (int64, on the
    device), and its joules are ``fsum(fixed_j + marginal_j * k for each layer with k > 0)``: the
    cost map's linear layer cost, evaluated exactly as the cost map evaluates it."""

    def __init__(
        self, marginal: list[float], fixed: list[float], offsets: list[int], max_scores: list[float], device
    ) -> None:
        self.marginal, self.fixed, self.offsets = marginal, fixed, offsets
        self.n_layers = len(marginal)
        self.device = device
        self.min_joules = min(marginal) if marginal else 1.0
        self.marginal_t = torch.tensor(marginal, dtype=torch.float64, device=device)
        self._eye = torch.eye(self.n_layers, dtype=torch.int64, device=device)
        self._starts = torch.tensor(offsets[:-1], dtype=torch.int64, device=device)
        self._layer_ids = torch.arange(self.n_layers, device=device)
        self.has_fixed = any(f > 0 for f in fixed)
        # for the pivots' estimate of fixed costs: each layer's largest score
        self._top = torch.tensor(max_scores, dtype=torch.float64, device=device)
        self._fixed_t = torch.tensor(fixed, dtype=torch.float64, device=device)

    # exact accounting
    def to_joules(self, amount) -> float:
        if not isinstance(amount, Tensor):
            if amount != 0:
                raise AssertionError(f"a layer amount is a per-layer count tensor, got {amount!r}")
            return 0.0
        return self.joules_of_counts(amount.tolist())

    def joules_of_counts(self, counts: Sequence[int]) -> float:
        return math.fsum(self.fixed[l] + self.marginal[l] * k for l, k in enumerate(counts) if k)

    def zero(self) -> Tensor:
        return torch.zeros(self.n_layers, dtype=torch.int64, device=self.device)

    def amount(self, mask: Tensor, count: Tensor, start: int, stop: int) -> Tensor:
        """A chunk of the layered pool lies in one layer."""
        layer = bisect.bisect_right(self.offsets, start) - 1
        return self._eye[layer] * count.to(self.device)

    def total(self, amounts: list[Tensor]) -> Tensor:
        return torch.stack(amounts).sum(0)

    def amount_of_all(self, n: int) -> Tensor:
        raise AssertionError("the whole layered pool is never counted at once")

    def gather(self, index: Tensor) -> "_GatheredLayerCosts":
        return _GatheredLayerCosts(self, self.layer_of(index))

    def layer_of(self, index: Tensor) -> Tensor:
        """The layer of each of ascending concatenated positions: O(n) and no host round trip
        (torch's searchsorted of many values is slow on the CPU)."""
        end = torch.full((1,), index.numel(), dtype=torch.int64, device=index.device)
        per_layer = torch.diff(torch.searchsorted(index, self._starts), append=end)
        return torch.repeat_interleave(self._layer_ids, per_layer, output_size=index.numel())

    # estimates, for pivots only
    def sorted_sample(self, scores: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        return self._sorted_sample(scores, self.layer_of(index))

    def _sorted_sample(self, scores: Tensor, layers: Tensor) -> tuple[Tensor, Tensor]:
        descending, order = sort_descending(scores, order=True)
        return descending, self.marginal_t[layers[order.to(layers.device)]].cumsum(0)

    def estimate(self, amount, sample: "_Sample", first: int, end: int) -> Tensor:
        """Marginal joules as for one shared cost, plus the fixed joules of each layer not yet
        touched whose largest score is at or above the sample point (it is then kept too)."""
        base = _UniformCost.estimate(self, amount, sample, first, end)
        if not self.has_fixed:
            return base
        if isinstance(amount, Tensor):
            fixed = torch.where(amount == 0, self._fixed_t, 0.0)
        else:
            fixed = self._fixed_t
        present = getattr(self, "present", None)
        if present is not None:  # a gathered set: a layer none of whose entries it holds adds nothing
            fixed = torch.where(present, fixed, 0.0)
        points = sample.scores[first:end].to(self.device)  # descending
        # a layer's fixed cost counts from the first sample point at or below its largest score
        start = torch.searchsorted(-points, -self._top.to(points.dtype))  # points above the top
        extra = torch.zeros(points.numel() + 1, dtype=torch.float64, device=self.device)
        extra.scatter_add_(0, start, fixed)
        return base + extra.cumsum(0)[:-1].to(base.device)


class _GatheredLayerCosts(_CostModel):
    """Per-layer accounting for a gathered set: the layer of each entry, ascending (gathered sets
    keep the concatenated order)."""

    def __init__(self, parent: _LayerCosts, layers: Tensor) -> None:
        self.parent, self.layers = parent, layers
        self.min_joules = parent.min_joules
        # the layers this set holds entries of (for the pivots' estimate: counting the set-up of a
        # layer it does not hold made every estimate too high, and the selection crawled an entry
        # per pass)
        self.present = torch.bincount(layers, minlength=parent.n_layers) > 0 if parent.has_fixed else None

    def to_joules(self, amount) -> float:
        return self.parent.to_joules(amount)

    estimate = _LayerCosts.estimate

    def __getattr__(self, name: str):  # the parent's tables (marginal_t, fixed, ...) for estimate
        return getattr(self.parent, name)

    def amount(self, mask: Tensor, count: Tensor, start: int, stop: int) -> Tensor:
        return self.parent.zero().scatter_add_(0, self.layers[start:stop], mask.to(torch.int64))

    def total(self, amounts: list[Tensor]) -> Tensor:
        return torch.stack(amounts).sum(0)

    def amount_of_all(self, n: int) -> Tensor:
        return self.parent.zero().scatter_add_(0, self.layers, torch.ones_like(self.layers))

    def gather(self, index: Tensor) -> "_GatheredLayerCosts":
        return _GatheredLayerCosts(self.parent, self.layers[index])

    def sorted_sample(self, scores: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        return self.parent._sorted_sample(scores, self.layers[index])

    def affordable_prefix(self, base, n: int, budget_j: float) -> int:
        """The largest j <= n with joules(base + the first j entries) <= budget: estimated from a
        cumulative sum, then corrected by exact evaluation (the cost only grows with j)."""
        if n == 0:
            return 0
        parent = self.parent
        base_counts = base if isinstance(base, Tensor) else parent.zero()
        layers = self.layers[:n]
        step = parent.marginal_t[layers]
        if parent.has_fixed:
            first = torch.ones(n, dtype=torch.bool, device=layers.device)
            first[1:] = layers[1:] != layers[:-1]
            fixed = torch.tensor(parent.fixed, dtype=torch.float64, device=layers.device)
            step = step + torch.where(first & (base_counts[layers] == 0), fixed[layers], 0.0)
        estimate = parent.to_joules(base) + step.cumsum(0)
        j = count_up_to(estimate, budget_j)

        def exact(j: int) -> float:
            counts = base_counts + parent.zero().scatter_add_(0, layers[:j], torch.ones_like(layers[:j]))
            return parent.to_joules(counts)

        while j < n and exact(j + 1) <= budget_j:
            j += 1
        while j > 0 and exact(j) > budget_j:
            j -= 1
        return j
