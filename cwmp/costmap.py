"""Cost maps: what keeping update entries costs, for every named tensor of one model on one device.

A layer's cost for keeping k of its entries is ``fixed_j + joules_per_update * k`` when k > 0 and
nothing when k = 0 (``CostMap.layer_joules``); the pruner selects with the fixed and the marginal
(per-entry) parts, and checks every mask it returns with ``layer_joules``.

A device profile prices the layers it was calibrated on. A layer it lacks is an error by default,
because a guessed cost silently changes which entries CWMP keeps; ``allow_predicted=True`` prices it
from the profile's global coefficients instead, and the map records which costs were predicted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Union

import numpy as np
import torch
from torch import Tensor

from cwmp.errors import CostMapError

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
    """What keeping entries of one tensor costs: ``joules_per_update`` per kept entry plus
    ``fixed_j`` once if any entry is kept, and where the numbers came from: the profile's per-layer
    table ('measured' or 'predicted' there) or a prediction made here ('predicted')."""

    joules_per_update: float
    method: Literal["measured", "predicted"]
    fixed_j: float = 0.0


class CostMap:
    """Joules per kept update entry, per tensor name, with the provenance a report must carry."""

    def __init__(
        self, prices: Mapping[str, LayerPrice], *, simulated: bool, profile: str = "", model: str = ""
    ) -> None:
        for name, price in prices.items():
            j = price.joules_per_update
            if not (isinstance(j, (int, float)) and math.isfinite(j) and j > 0):
                raise CostMapError(f"layer {name!r}: joules_per_update must be finite and > 0, got {j!r}")
            f = price.fixed_j
            if not (isinstance(f, (int, float)) and math.isfinite(f) and f >= 0):
                raise CostMapError(f"layer {name!r}: fixed_j must be finite and >= 0, got {f!r}")
        self.prices = dict(prices)
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
                    # TODO(cost model): predicted layers get no fixed part until the cost model prices it
                    prices[name] = LayerPrice(profile.predict_joules_per_update(tensor.numel(), dtype), "predicted")
                else:
                    missing.append(name)
                continue
            if list(layer.shape) != list(tensor.shape) or layer.dtype != dtype:
                raise CostMapError(
                    f"profile {profile.name!r}, model {model!r}: layer {name!r} was priced as "
                    f"{layer.dtype}{list(layer.shape)}, but the tensor is {dtype}{list(tensor.shape)}; "
                    "calibrate this model as it is, or pass the tensors of the model the profile describes"
                )
            prices[name] = LayerPrice(layer.joules_per_update, layer.method, getattr(layer, "fixed_j", 0.0))
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise CostMapError(
                f"profile {profile.name!r} prices no layer {shown} of model {model!r} "
                f"(it prices {len(table)} layers); calibrate them, or pass allow_predicted=True to price "
                "them from the profile's global coefficients"
            )
        return cls(prices, simulated=profile.simulated, profile=profile.name, model=model)

    # ------------------------------------------------------------------------------ lookups
    def price(self, name: str) -> LayerPrice:
        try:
            return self.prices[name]
        except KeyError:
            raise CostMapError(
                f"the cost map ({self._source()}) has no layer {name!r}; it prices {len(self.prices)} layers"
            ) from None

    def marginal_j(self, name: str) -> float:
        """Joules per kept entry of the layer: what the pruner ranks and selects by."""
        return self.price(name).joules_per_update

    def fixed_j(self, name: str) -> float:
        """Joules the layer costs once any of its entries is kept."""
        return self.price(name).fixed_j

    def __getitem__(self, name: str) -> float:
        """The marginal cost (``marginal_j``)."""
        return self.marginal_j(name)

    def __contains__(self, name: object) -> bool:
        return name in self.prices

    @property
    def predicted_layers(self) -> list[str]:
        return [name for name, price in self.prices.items() if price.method == "predicted"]

    def layer_joules(self, name: str, mask: Tensor, kept: int | None = None) -> float:
        """Predicted joules of keeping the entries ``mask`` keeps in layer ``name``: nothing if it
        keeps none, else ``fixed_j + joules_per_update * k``. ``kept`` is the mask's count when the
        caller has it (``joules_by_layer`` counts all layers with one host round trip)."""
        k = int(torch.count_nonzero(mask)) if kept is None else kept
        if k == 0:
            return 0.0
        price = self.price(name)
        return price.fixed_j + price.joules_per_update * k

    def joules_by_layer(self, masks: Mapping[str, Tensor]) -> dict[str, float]:
        """Predicted joules of keeping the entries each mask keeps (``layer_joules`` per layer)."""
        names = list(masks)
        if all(masks[n].device.type == "cpu" and masks[n].dtype == torch.bool for n in names):
            counts = [int(np.count_nonzero(masks[n].numpy())) for n in names]  # many times faster than torch's
        else:
            counts = [torch.count_nonzero(masks[n]) for n in names]
            if len({c.device for c in counts}) == 1:  # one host round trip for all layers
                counts = torch.stack(counts).tolist()
        return {name: self.layer_joules(name, masks[name], kept=int(k)) for name, k in zip(names, counts)}

    def predicted_joules(self, masks: Mapping[str, Tensor]) -> float:
        return math.fsum(self.joules_by_layer(masks).values())

    def _source(self) -> str:
        label = f"profile {self.profile!r}, model {self.model!r}" if self.profile else "given directly"
        return label + (", SIMULATED" if self.simulated else "")
