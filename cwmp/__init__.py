"""Cost-Weighted Magnitude Pruning (CWMP): masks under an energy budget, the Top-K baseline, error
feedback, per-layer cost maps from device profiles, and a pruner that switches methods by name.

Pure torch; no dependency on Flower or on the meters.
"""

from cwmp.masks import cwmp_mask, cwmp_scores, magnitude_budget_mask, topk_mask

__all__ = ["cwmp_mask", "cwmp_scores", "magnitude_budget_mask", "topk_mask"]
