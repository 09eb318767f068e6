"""Errors of the pruner. They derive from the project's base class so that a caller can catch every
error energyprof raises on purpose with one ``except EnergyprofError``."""

from __future__ import annotations

from energyprof.errors import EnergyprofError


class MaskInputError(EnergyprofError, ValueError):
    """An update, cost, budget, power or k that cannot give a correct mask (NaN, a cost <= 0, a
    negative budget, shapes that do not broadcast). Raised instead of returning a wrong mask."""


class CostMapError(EnergyprofError, LookupError):
    """A layer the device profile does not price, or a profile layer whose shape or dtype is not the
    tensor's, so its cost would be another layer's cost."""


class FeedbackStateError(EnergyprofError, ValueError):
    """Error-feedback state that does not belong to these tensors (names, shapes or dtypes differ)."""


class BudgetError(EnergyprofError, ValueError):
    """A whole-round budget that cannot be met: it is below what every round pays whatever the mask
    keeps (the compensation over every tensor, ``CostMap.floor_j``). The message names the floor."""
