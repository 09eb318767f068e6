"""Cost maps: what keeping update entries costs, for every named tensor of one model on one device.

A round's cost is split by who decides it. Each tensor's compensation (error feedback's dense
``residual += update``, ``compensation_j``) is paid every round whatever its mask keeps: the round's
floor (``floor_j``), never charged to a mask. A non-empty mask on a tensor adds its update phase: a
fixed cost (the sparse kernels' set-up, paid once when any entry is kept), a cost per kept entry and
a cost per 64-byte line holding a kept entry (scattered writes are paid in whole lines). The energy
is predicted by :mod:`energyprof.costmodel` (``layer_joules``, ``round_joules``) and nowhere else.

A device profile prices the layers it was calibrated on. A layer it lacks is an error by default,
because a guessed cost silently changes which entries CWMP keeps; ``allow_predicted=True`` prices it
from the profile's global coefficients instead, and the map records which costs were predicted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Union

import numpy as np
import torch
from torch import Tensor

from cwmp.errors import CostMapError
from energyprof.costmodel import RoundJoules, expected_lines, layer_joules, lines_touched, round_joules

if TYPE_CHECKING:  # calibrate is imported only for the type; any object with the API works
    from calibrate.profile import DeviceProfile

__all__ = ["CostMap", "LayerPrice", "NamedTensors", "named_tensors"]

NamedTensors = Union[Mapping[str, Tensor], Iterable[tuple[str, Tensor]]]


def named_tensors(tensors: NamedTensors) -> dict[str, Tensor]:
    """A dict of name -> tensor from a dict or from ``model.named_parameters()``."""
    named = dict(tensors.items() if isinstance(tensors, Mapping) else tensors)
    for name, tensor in named.items():
        if not isinstance(tensor, Tensor):
            raise CostMapError(f"{name!r} is a {type(tensor).__name__}, not a torch.Tensor")
    return named


def dtype_name(dtype: torch.dtype) -> str:
    """The profile's spelling of a dtype: ``torch.float32`` -> ``float32``."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class LayerPrice:
    """What keeping entries of one tensor costs, and where the numbers came from: the profile's
    per-layer table ('measured' or 'predicted' there) or a prediction made here ('predicted').
    ``compensation_j`` is paid every round whatever the mask keeps; ``fixed_j`` once when any entry
    is kept, ``joules_per_update`` per kept entry and ``joules_per_line`` per 64-byte line holding a
    kept entry (``itemsize`` bytes per entry)."""

    joules_per_update: float
    method: Literal["measured", "predicted"]
    fixed_j: float = 0.0
    joules_per_line: float = 0.0
    itemsize: int = 4
    joules_per_update_density: float = 0.0
    compensation_j: float = 0.0

    def marginal_j(self, numel: int, density: float = 0.01) -> float:
        """Average cost per kept entry at ``density`` of the tensor's ``numel`` entries (its lines
        shared at that density, its density term), fixed cost aside: the per-entry price a
        selection rule uses."""
        if numel <= 0:
            return self.joules_per_update
        kept = max(1.0, density * numel)
        lines = expected_lines(kept, numel, self.itemsize) if self.joules_per_line else 0.0
        return self.joules_per_update + self.joules_per_line * lines / kept + self.joules_per_update_density * kept / numel


class CostMap:
    """Joules per kept update entry, per tensor name, with the provenance a report must carry."""

    def __init__(
        self, prices: Mapping[str, LayerPrice], *, simulated: bool, profile: str = "", model: str = ""
    ) -> None:
        for name, price in prices.items():
            j = price.joules_per_update
            if not (isinstance(j, (int, float)) and math.isfinite(j) and j >= 0):
                raise CostMapError(f"layer {name!r}: joules_per_update must be finite and >= 0, got {j!r}")
            if not j + price.joules_per_line > 0:
                raise CostMapError(f"layer {name!r}: keeping an entry must cost something "
                                   f"(joules_per_update {j!r}, joules_per_line {price.joules_per_line!r})")
            for what in ("fixed_j", "joules_per_line", "joules_per_update_density", "compensation_j"):
                v = getattr(price, what)
                if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                    raise CostMapError(f"layer {name!r}: {what} must be finite and >= 0, got {v!r}")
        self.prices = dict(prices)
        self.numel: dict[str, int] = {}
        self.expected_density: dict[str, float] = {}
        self.simulated, self.profile, self.model = simulated, profile, model

    @classmethod
    def from_profile(
        cls, profile: "DeviceProfile", model: str, tensors: NamedTensors, *, allow_predicted: bool = False
    ) -> "CostMap":
        """Price every tensor of ``tensors`` (a dict or ``model.named_parameters()``) for ``model``
        from the profile's per-layer table; a table entry must have the tensor's shape and dtype."""
        named = named_tensors(tensors)
        if allow_predicted and model not in profile.models:
            table = {}  # no table for this model: every layer is predicted
        else:
            table = profile.layer_costs(model)  # a ProfileError names the models it has
        prices: dict[str, LayerPrice] = {}
        missing: list[str] = []
        for name, tensor in named.items():
            dtype = dtype_name(tensor.dtype)
            layer = table.get(name)
            if layer is None:
                if allow_predicted:
                    c = profile.predict_layer(tensor.numel(), dtype)
                    prices[name] = LayerPrice(c.joules_per_update, "predicted", c.fixed_j, c.joules_per_line,
                                              c.itemsize, c.joules_per_update_density, c.compensation_j)
                else:
                    missing.append(name)
                continue
            if list(layer.shape) != list(tensor.shape) or layer.dtype != dtype:
                raise CostMapError(
                    f"profile {profile.name!r}, model {model!r}: layer {name!r} was priced as "
                    f"{layer.dtype}{list(layer.shape)}, but the tensor is {dtype}{list(tensor.shape)}; "
                    "calibrate this model as it is, or pass the tensors of the model the profile describes"
                )
            prices[name] = LayerPrice(layer.joules_per_update, layer.method, layer.fixed_j, layer.joules_per_line,
                                      tensor.element_size(), layer.joules_per_update_density, layer.compensation_j)
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise CostMapError(
                f"profile {profile.name!r} prices no layer {shown} of model {model!r} "
                f"(it prices {len(table)} layers); calibrate them, or pass allow_predicted=True to price "
                "them from the profile's global coefficients"
            )
        cmap = cls(prices, simulated=profile.simulated, profile=profile.name, model=model)
        cmap.numel = {name: t.numel() for name, t in named.items()}
        return cmap

    # ------------------------------------------------------------------------------ lookups
    def price(self, name: str) -> LayerPrice:
        try:
            return self.prices[name]
        except KeyError:
            raise CostMapError(
                f"the cost map ({self._source()}) has no layer {name!r}; it prices {len(self.prices)} layers"
            ) from None

    def __getitem__(self, name: str) -> float:
        """The marginal cost (``marginal_j``)."""
        return self.marginal_j(name)

    def __contains__(self, name: object) -> bool:
        return name in self.prices

    @property
    def linear(self) -> bool:
        """Is every layer's cost fixed + marginal x k (no line or density term)?"""
        return all(p.joules_per_line == 0 and p.joules_per_update_density == 0 for p in self.prices.values())

    @property
    def predicted_layers(self) -> list[str]:
        return [name for name, price in self.prices.items() if price.method == "predicted"]

    def fixed_j(self, name: str) -> float:
        """Joules the layer costs once any of its entries is kept."""
        return self.price(name).fixed_j

    def compensation_j(self, name: str) -> float:
        """Joules the layer pays every round whatever the mask keeps (error feedback's dense
        ``residual += update``): never part of what a mask decides."""
        return self.price(name).compensation_j

    def floor_j(self, names: Iterable[str] | None = None) -> float:
        """Joules a round pays whatever the masks keep: the compensation of every tensor in
        ``names`` (default: every tensor of the map). A whole-round budget below it cannot be met."""
        return math.fsum(self.compensation_j(n) for n in (self.prices if names is None else names))

    def marginal_j(self, name: str, density: float | None = None) -> float:
        """Joules per kept entry of ``name`` at ``density`` of its entries kept (lines shared at that
        density, the density term; fixed cost aside): what the pruner ranks and selects by. Without
        ``density``, at the density the cost map was told to expect (``expect_density``, 1 %)."""
        price = self.price(name)
        d = self.expected_density.get(name, 0.01) if density is None else density
        return price.marginal_j(self.numel.get(name, 0), d)

    def expect_density(self, densities: Mapping[str, float]) -> None:
        """Tell the map at which density each layer will be pruned (the pruner refines its selection
        with the densities of a first pass)."""
        self.expected_density.update({n: float(d) for n, d in densities.items() if n in self.prices})

    def layer_joules(self, name: str, mask: Tensor, kept: int | None = None) -> float:
        """Predicted joules of keeping the entries ``mask`` keeps in tensor ``name``, through the cost
        model (nothing when it keeps none). ``kept`` is the mask's count when the caller has it."""
        price = self.price(name)
        k = int(torch.count_nonzero(mask)) if kept is None else int(kept)
        lines = lines_touched(mask.bool(), price.itemsize) if k and price.joules_per_line else 0
        return layer_joules(price.fixed_j, price.joules_per_update, price.joules_per_line, k, lines,
                            price.joules_per_update_density, mask.numel())

    def joules_by_layer(self, masks: Mapping[str, Tensor], counts: Sequence[int] | None = None) -> dict[str, float]:
        """Predicted joules of keeping the entries each mask keeps (``layer_joules`` per layer);
        ``counts`` are the masks' kept entries, in their order, when the caller has them."""
        names = list(masks)
        if counts is not None:
            if len(counts) != len(names):
                raise ValueError(f"{len(counts)} counts for {len(names)} masks")
        elif all(masks[n].device.type == "cpu" and masks[n].dtype == torch.bool for n in names):
            counts = [int(np.count_nonzero(masks[n].numpy())) for n in names]  # many times faster than torch's
        else:
            counts = [torch.count_nonzero(masks[n]) for n in names]
            if len({c.device for c in counts}) == 1:  # one host round trip for all layers
                counts = torch.stack(counts).tolist()
        return {name: self.layer_joules(name, masks[name], kept=int(k)) for name, k in zip(names, counts)}

    def joules_of_counts(self, kept: Mapping[str, tuple[int, int]]) -> dict[str, float]:
        """``joules_by_layer`` from counts alone, for a linear map (no line or density term: where
        the kept entries lie does not matter): ``kept[name]`` is (kept entries, the tensor's entries)."""
        if not self.linear:
            raise ValueError("this cost map prices lines or density: give the masks (joules_by_layer)")
        out = {}
        for name, (k, n) in kept.items():
            price = self.price(name)
            out[name] = layer_joules(price.fixed_j, price.joules_per_update, price.joules_per_line, int(k), 0,
                                     price.joules_per_update_density, int(n))
        return out

    def mask_joules(self, masks: Mapping[str, Tensor]) -> float:
        """What the masks add to the round: their layers' update phases (the floor aside)."""
        return math.fsum(self.joules_by_layer(masks).values())

    def round_joules(self, masks: Mapping[str, Tensor], *, by_layer: Mapping[str, float] | None = None,
                     transmission_j: float = 0.0) -> RoundJoules:
        """The whole round of a client that compensates every tensor of the map and keeps what
        ``masks`` keep: the floor beside the masks' part (``by_layer``: the masks' joules by layer,
        when the caller has them)."""
        parts = self.joules_by_layer(masks) if by_layer is None else by_layer
        return round_joules((self.compensation_j(n) for n in self.prices), parts.values(), transmission_j)

    def uniform_mask_joules(self, ratio: float) -> float:
        """What masks keeping ``ratio`` of every tensor's entries, at random positions, add to a round
        (expected lines touched): a budget level that does not depend on any one update."""
        if not 0 < ratio <= 1:
            raise CostMapError(f"keep ratio must be in (0, 1], got {ratio!r}")
        total = []
        for name, price in self.prices.items():
            n = self.numel.get(name, 0)
            if n <= 0:
                raise CostMapError(f"the cost map does not know how many entries {name!r} has; build it with "
                                   "CostMap.from_profile")
            k = max(1, round(ratio * n))
            lines = round(expected_lines(k, n, price.itemsize)) if price.joules_per_line else 0
            total.append(layer_joules(price.fixed_j, price.joules_per_update, price.joules_per_line, k, lines,
                                      price.joules_per_update_density, n))
        return math.fsum(total)

    def predicted_joules(self, masks: Mapping[str, Tensor]) -> float:
        """The whole round's joules (floor + the masks' part; ``round_joules`` has both)."""
        return self.round_joules(masks).total_j

    def _source(self) -> str:
        label = f"profile {self.profile!r}, model {self.model!r}" if self.profile else "given directly"
        return label + (", SIMULATED" if self.simulated else "")
