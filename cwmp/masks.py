"""Masks under an energy budget: CWMP (cost-weighted magnitude) and the Top-K baseline; the public API.

The contract, which later checks rely on: score_i = |u_i|**power / c_i; order the entries by score,
descending, ties by lower flat index; keep the longest prefix of that order whose total cost is
<= the budget. Totals are kept in float64; a cost given as one number totals k entries as k * c.

Why no sort: sorting N entries to keep a prefix costs N log N, several times ``torch.topk``. The
prefix is decided by one score value, found by weighted selection with sampled pivots
(``cwmp.selection``), over pools of entries (``cwmp.pools``) priced by ``cwmp.costs``. The set-up-aware
rule that decides which layers to open is ``cwmp.setup_rule``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor

from cwmp.costs import _CostModel, _LayerCosts, _UniformCost
from cwmp.errors import MaskInputError
from cwmp.kernels import single_threaded
from cwmp.pools import Layers, _check_update, _LayeredPool, _UpdatePool, check_layers, layer_counts
from cwmp.selection import _fill, _fill_layers, _select

__all__ = [
    "Layers",
    "check_layers",
    "cwmp_mask",
    "cwmp_scores",
    "layer_counts",
    "layers_budget_mask",
    "layers_topk_mask",
    "magnitude_budget_mask",
    "single_threaded",
    "topk_mask",
]

Costs = Union[Tensor, float, int]


def cwmp_mask(update: Tensor, costs: Costs, budget_j: float, power: float = 1.0, *, fill: bool = False) -> Tensor:
    """Keep the entries of largest ``|update|**power / costs`` until ``budget_j`` joules are spent.

    ``costs`` are joules per kept entry: a number (one cost for the whole tensor, the usual case
    for a layer) or a tensor broadcastable to ``update``. ``power=1`` is the paper's rule;
    ``power=2`` is the exact greedy rule for the squared-error projection. With ``fill=True`` the
    budget left after the prefix is spent on later entries that still fit, in score order.
    Returns a bool tensor of ``update``'s shape.
    """
    return _budget_mask(update, costs, budget_j, power, rank_by_cost=True, fill=fill)


def magnitude_budget_mask(update: Tensor, costs: Costs, budget_j: float, *, fill: bool = False) -> Tensor:
    """Top-K's order (largest ``|update|`` first, ties by lower index) under a budget in joules:
    the longest magnitude-ordered prefix whose cost is <= ``budget_j``. This is the cost-blind
    baseline spending the same energy as CWMP."""
    return _budget_mask(update, costs, budget_j, 1.0, rank_by_cost=False, fill=fill)


def topk_mask(update: Tensor, k: int) -> Tensor:
    """The ``k`` entries of largest magnitude, ties by lower flat index (``torch.topk`` alone does
    not promise which of several equal values it returns). Found by the same sort-free selection as
    CWMP: it is ``magnitude_budget_mask(update, 1.0, k)``."""
    if not isinstance(update, Tensor):
        _check_update(update)  # the error for a non-tensor
    n = update.numel()
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise MaskInputError(f"k must be an int in [0, {n}] (the update's numel), got {k!r}")
    return _budget_mask(update, 1.0, float(k), 1.0, rank_by_cost=False, fill=False)


def cwmp_scores(update: Tensor, costs: Costs, power: float = 1.0) -> Tensor:
    """The scores of the contract, ``|update|**power / costs``, in float32 or wider, exactly as the
    masks compute them chunk by chunk (for analysis and tests)."""
    flat, cost = _validated(update, costs, 0.0, power)
    return _UpdatePool(flat, cost, power, rank_by_cost=True).all_scores().view(update.shape)


def _validated(update: Tensor, costs: Costs, budget_j: float, power: float) -> tuple[Tensor, "_CostModel"]:
    max_magnitude = _check_update(update)
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not (0 < power < math.inf):
        raise MaskInputError(f"power must be a finite number > 0 (1: magnitude / cost, 2: squared), got {power!r}")
    if isinstance(budget_j, bool) or not isinstance(budget_j, (int, float)) or math.isnan(budget_j) or budget_j < 0:
        raise MaskInputError(f"budget_j must be a number of joules >= 0, got {budget_j!r}")
    score_dtype = torch.promote_types(update.dtype, torch.float32)
    cost = _CostModel.of(costs, update.shape, update.device, score_dtype)
    top = max_magnitude**power / cost.min_joules
    if top > torch.finfo(score_dtype).max:
        raise MaskInputError(
            f"scores overflow {score_dtype}: max |update|**{power} / min cost = {top:.3g}; "
            "express the costs in larger units (they only need to be proportional) or use float64 updates"
        )
    return update.detach().reshape(-1), cost


def _budget_mask(
    update: Tensor, costs: Costs, budget_j: float, power: float, rank_by_cost: bool, fill: bool
) -> Tensor:
    with single_threaded(update.device if isinstance(update, Tensor) else None):
        flat, cost = _validated(update, costs, budget_j, power)
        budget_j = float(budget_j)
        pool = _UpdatePool(flat, cost, power, rank_by_cost)
        if pool.n == 0:
            return torch.zeros(update.shape, dtype=torch.bool, device=update.device)
        mask = _select(pool, budget_j, 0)
        if fill:
            _fill(pool, mask, budget_j)
        return mask.view(update.shape)


# ------------------------------------------------------------------------ many tensors, one budget
# The pruner's case: one budget over all tensors of a model update, one cost per tensor (a layer).
# The contract is the single-tensor one read over the concatenation of the tensors, in their order,
# without making it: score = |u|**power / marginal_j of the entry's layer, ties by position in the
# concatenation, and the longest prefix of that order whose cost is <= the budget, where a prefix
# costs, per layer it keeps k > 0 entries of, ``fixed_j + marginal_j * k`` (summed with math.fsum;
# a layer it keeps nothing of costs nothing). The scores are computed layer by layer, chunk by
# chunk, each layer's scaled by one number; no concatenated copy and no per-entry cost tensor exist.


def layers_budget_mask(
    tensors: Sequence[Tensor] | Layers,
    marginal_j: Sequence[float],
    fixed_j: Sequence[float] | None,
    budget_j: float,
    power: float = 1.0,
    *,
    rank_by_cost: bool = True,
    fill: bool = False,
    caps: Sequence[float] | None = None,
    witness: list | None = None,
) -> Tensor:
    """One bool mask over the (virtual) concatenation of ``tensors``, flat, in their order: the
    longest prefix of the score order (``|u|**power / marginal_j[layer]`` when ``rank_by_cost``,
    else ``|u|``; ties by concatenated position) whose cost is ``<= budget_j``, a layer with k > 0
    kept entries costing ``fixed_j[layer] + marginal_j[layer] * k``. With ``fill=True`` the budget
    left is spent on later entries that still fit, in score order (the greedy walk). ``caps``, one
    per tensor (inf: none), clip each layer's scores to at most its cap before ordering: the
    set-up-aware rule's order (``cwmp.setup_rule``). ``witness``: see ``layers_topk_mask``."""
    with single_threaded(_device_of(tensors)):
        return _layers_budget_mask(tensors, marginal_j, fixed_j, budget_j, power, rank_by_cost, fill, caps, witness)


def _device_of(tensors: Sequence[Tensor]) -> torch.device | None:
    if isinstance(tensors, Layers):
        return tensors.device
    first = next(iter(tensors), None)
    return first.device if isinstance(first, Tensor) else None


def _layers_budget_mask(tensors, marginal_j, fixed_j, budget_j, power, rank_by_cost, fill, caps=None,
                        witness=None) -> Tensor:
    layers = tensors if isinstance(tensors, Layers) else check_layers(tensors)
    n_layers = len(layers.flats)
    if len(marginal_j) != n_layers or (fixed_j is not None and len(fixed_j) != n_layers):
        raise MaskInputError(
            f"give one marginal and one fixed cost per tensor: {n_layers} tensors, {len(marginal_j)} "
            f"marginal costs, {'no' if fixed_j is None else len(fixed_j)} fixed costs"
        )
    marginal = [_layer_cost(j, i, "marginal_j", positive=True) for i, j in enumerate(marginal_j)]
    fixed = [0.0] * n_layers if fixed_j is None else [_layer_cost(j, i, "fixed_j") for i, j in enumerate(fixed_j)]
    _check_power_and_budget(power, budget_j)
    divisors = marginal if rank_by_cost else None
    top = [_power_over(m, power, c if divisors else 1.0) for m, c in zip(layers.max_magnitudes, marginal)]
    if top and max(top) > torch.finfo(layers.score_dtype).max:
        raise MaskInputError(
            f"scores overflow {layers.score_dtype}: max |update|**{power} / marginal cost = {max(top):.3g}; "
            "express the costs in larger units (they only need to be proportional) or use float64 updates"
        )
    if caps is not None:
        if len(caps) != n_layers or any(math.isnan(c) or c < 0 for c in caps):
            raise MaskInputError(f"give one cap >= 0 per tensor (inf: none): {n_layers} tensors, caps {list(caps)!r}")
        top = [min(s, c) for s, c in zip(top, caps)]
    pool = _LayeredPool(layers, divisors, power, caps)
    if pool.n == 0:
        return torch.zeros(0, dtype=torch.bool, device=pool.device)
    pool.cost = _LayerCosts(marginal, fixed, pool.offsets, top, pool.device)
    mask = _select(pool, float(budget_j), 0)
    _witness(pool, witness)
    if fill:
        _fill_layers(pool, mask, float(budget_j))
    return mask


def layers_topk_mask(tensors: Sequence[Tensor] | Layers, k: int, witness: list | None = None) -> Tensor:
    """Global Top-K over several tensors without concatenating them: one flat bool mask over their
    concatenation keeping the ``k`` entries of largest magnitude, ties by concatenated position.
    ``witness``, a list: the selection's first pass over the tensors appends ``(key, count)``,
    a key (magnitude; for ``layers_budget_mask`` a score) and how many entries have a key at least
    that large, where its numpy pass made one (a certificate for ``Candidates.exact_prefix``)."""
    with single_threaded(_device_of(tensors)):
        return _layers_topk_mask(tensors, k, witness)


def _witness(pool: _LayeredPool, witness: list | None) -> None:
    if witness is not None and pool.first_split is not None:
        witness.append(pool.first_split)


def _layers_topk_mask(tensors: Sequence[Tensor], k: int, witness: list | None = None) -> Tensor:
    layers = tensors if isinstance(tensors, Layers) else check_layers(tensors)
    n = sum(f.numel() for f in layers.flats)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise MaskInputError(f"k must be an int in [0, {n}] (the entries of all tensors), got {k!r}")
    pool = _LayeredPool(layers, None, 1.0)
    if pool.n == 0:
        return torch.zeros(0, dtype=torch.bool, device=pool.device)
    pool.cost = _UniformCost(1.0)
    mask = _select(pool, float(k), 0)
    _witness(pool, witness)
    return mask


def _power_over(magnitude: float, power: float, divisor: float) -> float:
    try:
        return magnitude**power / divisor
    except OverflowError:
        return math.inf


def _layer_cost(j: float, i: int, what: str, positive: bool = False) -> float:
    number = isinstance(j, (int, float)) and not isinstance(j, bool)
    ok = number and math.isfinite(j) and (j > 0 if positive else j >= 0)
    if not ok:
        raise MaskInputError(
            f"layer {i}: {what} must be a finite number {'> 0' if positive else '>= 0'} of joules, got {j!r}"
        )
    return float(j)


def _check_power_and_budget(power: float, budget_j: float) -> None:
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not (0 < power < math.inf):
        raise MaskInputError(f"power must be a finite number > 0 (1: magnitude / cost, 2: squared), got {power!r}")
    if isinstance(budget_j, bool) or not isinstance(budget_j, (int, float)) or math.isnan(budget_j) or budget_j < 0:
        raise MaskInputError(f"budget_j must be a number of joules >= 0, got {budget_j!r}")
