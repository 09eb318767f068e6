"""Whole-round figures for the framework adapters (``cwmp.flower``, ``cwmp.ddp``).

A round pays a floor whatever the masks keep (the error feedback's compensation of every tensor,
``CostMap.floor_j``) plus what the masks add. The adapters report the whole round beside the
mask's part and the floor: a ``PruneResult`` that carries ``mask_j`` and ``floor_j`` says so
itself; for one that does not, its ``predicted_j`` is the masks' part and the floor is added here.
"""

from __future__ import annotations

from collections.abc import Iterable

from cwmp.costmap import CostMap
from cwmp.pruner import PruneResult

__all__ = ["round_parts"]


def round_parts(result: PruneResult, cost_map: CostMap, names: Iterable[str]) -> tuple[float, float, float]:
    """(whole round, the masks' part, the floor) of a prune result over ``names``, in joules."""
    mask_j = getattr(result, "mask_j", None)
    floor_j = getattr(result, "floor_j", None)
    if mask_j is not None and floor_j is not None:
        return float(result.predicted_j), float(mask_j), float(floor_j)
    floor = cost_map.floor_j(list(names))
    return float(result.predicted_j) + floor, float(result.predicted_j), floor
