"""The pruner: one budget across all tensors of an update, CWMP or Top-K chosen by name.

The budget is global because the point of CWMP is to move entries between layers: a joule spent on
an expensive layer's entry buys less than one spent on a cheap layer's. The masks are chosen over
the concatenation of all tensors, each entry priced by its layer's cost, and every result states
its predicted energy (kept entries x joules per update, from the cost map) and whether those costs
came from a simulated profile.

Methods (``METHODS``):

- ``cwmp``: largest ``|u|**power / c`` first until the budget is spent (``cwmp_mask``);
- ``topk``: largest ``|u|`` first, cost-blind. With a keep-ratio budget it is exactly Top-K (the
  k = round(r N) largest entries over all tensors); with a budget in joules it keeps the longest
  magnitude-ordered prefix that the budget pays for.

A budget is joules per step, or ``Budget.topk_keep_ratio(r)``: the joules that Top-K at keep ratio
r spends on this very update, so that both methods can be compared at equal energy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from cwmp.costmap import CostMap, NamedTensors, named_tensors
from cwmp.errors import MaskInputError
from cwmp.feedback import ErrorFeedback
from cwmp.masks import cwmp_mask, magnitude_budget_mask, topk_mask

__all__ = ["METHODS", "Budget", "PruneResult", "Pruner"]

METHODS = ("cwmp", "topk")


@dataclass(frozen=True)
class Budget:
    """Joules per pruning step, given directly or as what Top-K spends at a keep ratio."""

    joules: Optional[float] = None
    keep_ratio: Optional[float] = None

    def __post_init__(self) -> None:
        if (self.joules is None) == (self.keep_ratio is None):
            raise MaskInputError(
                "a Budget is either Budget.of_joules(j) or Budget.topk_keep_ratio(r), not both or neither"
            )
        if self.joules is not None and not (self.joules >= 0):
            raise MaskInputError(f"a budget in joules must be >= 0, got {self.joules!r}")
        if self.keep_ratio is not None and not (0 <= self.keep_ratio <= 1):
            raise MaskInputError(f"a keep ratio must be in [0, 1], got {self.keep_ratio!r}")

    @classmethod
    def of_joules(cls, joules: float) -> "Budget":
        return cls(joules=float(joules))

    @classmethod
    def topk_keep_ratio(cls, ratio: float) -> "Budget":
        return cls(keep_ratio=float(ratio))

    def __str__(self) -> str:
        if self.joules is not None:
            return f"{self.joules:.6g} J"
        return f"Top-K energy at keep ratio {self.keep_ratio:g}"


@dataclass(frozen=True)
class PruneResult:
    """Masks of one step, with what they are predicted to cost."""

    method: str
    masks: dict[str, Tensor]
    budget_j: float
    predicted_j: float
    joules_by_layer: dict[str, float]
    kept: int
    total: int
    simulated: bool  # the costs came from a simulated profile

    @property
    def keep_ratio(self) -> float:
        return self.kept / self.total if self.total else 0.0

    def summary(self) -> str:
        label = "  [SIMULATED costs]" if self.simulated else ""
        return (
            f"{self.method}: kept {self.kept}/{self.total} ({self.keep_ratio:.3%}), predicted "
            f"{self.predicted_j:.6g} J of a {self.budget_j:.6g} J budget{label}"
        )


class Pruner:
    """Masks for named updates under an energy budget; ``method`` is ``'cwmp'`` or ``'topk'``."""

    def __init__(
        self, cost_map: CostMap, budget: Budget, method: str = "cwmp", power: float = 1.0, fill: bool = False
    ) -> None:
        if method not in METHODS:
            raise MaskInputError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")
        if not isinstance(budget, Budget):
            raise MaskInputError(
                f"budget must be a Budget (Budget.of_joules or Budget.topk_keep_ratio), got {budget!r}"
            )
        self.cost_map, self.budget, self.method, self.power, self.fill = cost_map, budget, method, power, fill

    def masks(self, updates: NamedTensors) -> PruneResult:
        named = named_tensors(updates)
        names = list(named)
        costs = [self.cost_map[name] for name in names]  # a missing layer fails here, by name
        flat = torch.cat([named[name].detach().reshape(-1) for name in names]) if names else torch.empty(0)
        top = None
        if self.budget.keep_ratio is not None:
            top = topk_mask(flat, _k_of(self.budget.keep_ratio, flat.numel()))
            budget_j = self.cost_map.predicted_joules(_unflatten(top, named))
        else:
            budget_j = self.budget.joules
        if self.method == "topk" and top is not None:
            mask = top
        else:
            per_entry = torch.repeat_interleave(
                torch.tensor(costs, dtype=torch.float64, device=flat.device),
                torch.tensor([named[name].numel() for name in names], device=flat.device),
            )
            if self.method == "cwmp":
                mask = cwmp_mask(flat, per_entry, budget_j, self.power, fill=self.fill)
            else:
                mask = magnitude_budget_mask(flat, per_entry, budget_j, fill=self.fill)
        masks = _unflatten(mask, named)
        by_layer = self.cost_map.joules_by_layer(masks)
        return PruneResult(
            method=self.method,
            masks=masks,
            budget_j=budget_j,
            predicted_j=math.fsum(by_layer.values()),
            joules_by_layer=by_layer,
            kept=int(torch.count_nonzero(mask)),
            total=flat.numel(),
            simulated=self.cost_map.simulated,
        )

    def compress(
        self, updates: NamedTensors, feedback: ErrorFeedback | None = None
    ) -> tuple[dict[str, Tensor], PruneResult]:
        """One client step: add the residuals, choose the masks, keep what they drop for next time.
        Returns the sparse updates to send (zeros where masked) and the result."""
        if feedback is None:
            named = named_tensors(updates)
            result = self.masks(named)
            return {n: torch.where(result.masks[n], u.detach(), 0) for n, u in named.items()}, result
        corrected = feedback.compensate(updates)
        result = self.masks(corrected)
        return feedback.remember(corrected, result.masks), result


def _k_of(ratio: float, n: int) -> int:
    return min(n, int(math.floor(ratio * n + 0.5)))


def _unflatten(mask: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    parts = torch.split(mask, [t.numel() for t in like.values()]) if like else ()
    return {name: part.view(t.shape) for (name, t), part in zip(like.items(), parts)}
