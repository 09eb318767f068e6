"""Cost-Weighted Magnitude Pruning (CWMP): masks under an energy budget, the Top-K baseline, error
feedback, per-layer cost maps from device profiles, and a pruner that switches methods by name.

Pure torch; no dependency on Flower or on the meters.
"""

from cwmp.costmap import CostMap, LayerPrice, named_tensors
from cwmp.errors import BudgetError, CostMapError, FeedbackStateError, MaskInputError
from cwmp.feedback import ErrorFeedback
from cwmp.masks import (
    cwmp_mask,
    cwmp_scores,
    layers_budget_mask,
    layers_topk_mask,
    magnitude_budget_mask,
    topk_mask,
)
from cwmp.pruner import METHODS, RULES, Budget, Pruner, PruneResult
from cwmp.sparse import SparseUpdate

__all__ = [
    "METHODS",
    "RULES",
    "Budget",
    "BudgetError",
    "CostMap",
    "CostMapError",
    "ErrorFeedback",
    "FeedbackStateError",
    "LayerPrice",
    "MaskInputError",
    "PruneResult",
    "Pruner",
    "SparseUpdate",
    "cwmp_mask",
    "cwmp_scores",
    "layers_budget_mask",
    "layers_topk_mask",
    "magnitude_budget_mask",
    "named_tensors",
    "topk_mask",
]
