"""CWMP as a communication hook for ``torch.nn.parallel.DistributedDataParallel``.

Torch ships hooks that compress what DDP all-reduces (fp16, PowerSGD); this one prunes it under
an energy budget priced by each rank's own device profile::

    from cwmp import Budget
    from cwmp.ddp import cwmp_hook, make_hook_state

    ddp = DistributedDataParallel(model)
    ddp.register_comm_hook(make_hook_state(ddp, "my-device.yaml", model_name="mlp",
                                           budget=Budget.topk_keep_ratio(0.05)), cwmp_hook)

For every bucket of gradients DDP hands it, the hook maps the bucket's parameters to their names
(so every layer is priced with its own costs), adds the rank's error-feedback residual, prunes the
corrected gradients with ``cwmp.Pruner`` and keeps what the masks drop for the next step. The ranks
then exchange what they kept, positions in the bucket and values, with two all-gathers (the counts
first, so each rank pads to the largest), and every rank returns the same averaged sparse gradient:
the sum of all ranks' kept entries over the world size. At a 100 % budget that is DDP's own average.

A budget in joules is for the whole step (``Budget.of_joules``): every bucket pays its layers'
floor (the compensation of its tensors), and what is left above the model's floor is shared among
the buckets in proportion to what keeping all their entries would cost. ``Budget.topk_keep_ratio(r)``
gives every bucket the energy Top-K spends there at ratio r. The hook runs synchronously (it
returns a completed future): it does not overlap its exchange with the backward pass.

This module imports ``torch.distributed`` only; the ``cwmp`` core never imports it.
"""

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cwmp.costmap import CostMap
from cwmp.errors import MaskInputError
from cwmp.feedback import ErrorFeedback
from cwmp._whole_round import round_parts
from cwmp.pruner import METHODS, Budget, Pruner

__all__ = ["CWMPHookState", "StepStats", "cwmp_hook", "make_hook_state"]


@dataclass
class StepStats:
    """What the hook did on this rank in one step, all buckets together."""

    kept: int = 0
    total: int = 0
    predicted_j: float = 0.0  # whole step, from this rank's profile
    mask_j: float = 0.0  # what the masks added
    floor_j: float = 0.0  # the compensation of every tensor, whatever the masks keep
    simulated: bool = False
    kept_by_layer: dict[str, int] = field(default_factory=dict)

    @property
    def keep_ratio(self) -> float:
        return self.kept / self.total if self.total else 0.0


@dataclass
class CWMPHookState:
    """The hook's state on one rank: its cost map and budget, the parameter names, the residuals
    (error feedback, one per parameter, so per bucket), and the statistics of the last step."""

    cost_map: CostMap
    budget: Budget
    power: float = 1.0
    method: str = "cwmp"
    process_group: Optional[Any] = None
    names: dict[int, str] = field(default_factory=dict)  # id(parameter) -> name
    feedback: ErrorFeedback = field(default_factory=ErrorFeedback)
    last: StepStats = field(default_factory=StepStats)
    _pending: "StepStats" = field(default_factory=StepStats)
    _dense_j: dict[str, float] = field(default_factory=dict)

    def name_of(self, parameter: Tensor) -> str:
        try:
            return self.names[id(parameter)]
        except KeyError:
            raise MaskInputError(
                f"a bucket holds a parameter of shape {tuple(parameter.shape)} that the hook state does not name; "
                "build the state from the model DDP wraps (make_hook_state(ddp_model, ...))"
            ) from None

    def bucket_budget(self, names: list[str]) -> Budget:
        """This bucket's share of the step's budget (see the module docstring)."""
        if self.budget.joules is None:
            return self.budget
        floor_all = self.cost_map.floor_j()
        spare = self.budget.joules - floor_all
        dense_all = math.fsum(self._dense_j.values())
        share = math.fsum(self._dense_j[n] for n in names) / dense_all if dense_all > 0 else 0.0
        return Budget.of_joules(self.cost_map.floor_j(names) + spare * share)


def make_hook_state(
    model: nn.Module,
    profile: Union[str, Any, None] = None,
    *,
    model_name: Optional[str] = None,
    cost_map: Optional[CostMap] = None,
    budget: Union[Budget, float],
    p: float = 1.0,
    method: str = "cwmp",
    allow_predicted: bool = False,
    process_group: Optional[Any] = None,
) -> CWMPHookState:
    """The state for ``cwmp_hook`` on this rank. ``model`` is the DDP-wrapped model (or the module
    it wraps); the costs come from ``profile`` (a name, a YAML path or a ``DeviceProfile``) and
    its per-layer table ``model_name``, or from a ready ``cost_map`` priced for the module's
    parameter names. ``budget``: joules per step (whole step) or ``Budget.topk_keep_ratio(r)``."""
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    named = [(n, t) for n, t in module.named_parameters() if t.requires_grad]
    if cost_map is None:
        if profile is None or model_name is None:
            raise MaskInputError("make_hook_state needs profile=... with model_name=..., or cost_map=...")
        if not hasattr(profile, "layer_costs"):
            from calibrate.profile import load_profile

            profile = load_profile(profile)
        cost_map = CostMap.from_profile(profile, model_name, named, allow_predicted=allow_predicted)
    else:
        missing = [n for n, _ in named if n not in cost_map.prices]
        if missing:
            raise MaskInputError(f"the cost map prices no parameter {', '.join(map(repr, missing[:5]))} of the model; "
                                 "build it from this model's named_parameters()")
    if method not in METHODS:
        raise MaskInputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not isinstance(budget, Budget):
        budget = Budget.of_joules(float(budget))
    if budget.joules is not None:
        floor = cost_map.floor_j([n for n, _ in named])
        if budget.joules < floor:
            raise MaskInputError(
                f"the budget of {budget.joules:.6g} J per step is below the step's floor of {floor:.6g} J (the error "
                "feedback's compensation on every tensor): raise the budget to at least the floor")
    state = CWMPHookState(cost_map, budget, float(p), method, process_group,
                          names={id(t): n for n, t in named})
    state._dense_j = {n: cost_map.layer_joules(n, torch.ones(t.numel(), dtype=torch.bool)) for n, t in named}
    return state


# no ``from __future__ import annotations`` here: DDP checks these two annotations as objects
def cwmp_hook(state: CWMPHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: prune this rank's bucket, exchange kept entries, return their mean."""
    buffer = bucket.buffer()
    params = bucket.parameters()
    grads = bucket.gradients()
    names = [state.name_of(p) for p in params]
    base = buffer.storage_offset()
    offsets = {name: g.storage_offset() - base for name, g in zip(names, grads)}
    updates = {name: g.view(p.shape) for name, g, p in zip(names, grads, params)}

    pruner = Pruner(state.cost_map, state.bucket_budget(names), method=state.method, power=state.power)
    sent, result = pruner.compress(updates, state.feedback, sparse=True)
    index_dtype = torch.int32 if buffer.numel() <= torch.iinfo(torch.int32).max else torch.int64
    positions = torch.cat([sent[n].indices.to(index_dtype) + offsets[n] for n in names]) if names else \
        torch.zeros(0, dtype=index_dtype)
    values = torch.cat([sent[n].values.to(buffer.dtype) for n in names]) if names else buffer.new_zeros(0)

    stats = state._pending
    stats.kept += int(result.kept)
    stats.total += int(result.total)
    whole_j, mask_j, floor_j = round_parts(result, state.cost_map, names)
    stats.predicted_j += whole_j
    stats.mask_j += mask_j
    stats.floor_j += floor_j
    stats.simulated = stats.simulated or bool(result.simulated)
    for n in names:
        stats.kept_by_layer[n] = int(sent[n].indices.numel())
    if bucket.is_last():
        state.last, state._pending = stats, StepStats()

    out = _all_gather_mean(positions, values, buffer, state.process_group)
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(out)
    return future


def _all_gather_mean(positions: Tensor, values: Tensor, like: Tensor, group) -> Tensor:
    """Every rank's (positions, values) summed into a tensor like ``like``, over the world size."""
    world = dist.get_world_size(group)
    device = like.device
    count = torch.tensor([positions.numel()], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    counts_host = [int(c.item()) for c in counts]
    width = max(counts_host)
    padded_pos = torch.zeros(width, dtype=positions.dtype, device=device)
    padded_val = torch.zeros(width, dtype=values.dtype, device=device)
    padded_pos[: positions.numel()] = positions.to(device)
    padded_val[: values.numel()] = values.to(device)
    all_pos = [torch.empty_like(padded_pos) for _ in range(world)]
    all_val = [torch.empty_like(padded_val) for _ in range(world)]
    dist.all_gather(all_pos, padded_pos, group=group)
    dist.all_gather(all_val, padded_val, group=group)
    out = torch.zeros_like(like)
    for k, pos, val in zip(counts_host, all_pos, all_val):  # in rank order: the same sum on every rank
        out.index_add_(0, pos[:k], val[:k])
    return out.div_(world)
