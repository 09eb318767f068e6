"""``energyprof demo``: the whole chain on this machine, in about a minute.

1. open the best real meter (or, when there is none, the simulator, and say so on every line);
2. take one real backpropagation step of a small MLP whose layers span the memory hierarchy;
3. measure, with the measurement protocol, what keeping one update entry costs in each layer
   (the Top-K masks' scatter, replayed layer by layer);
4. prune the update with Top-K and with CWMP at the same predicted energy, and compare how much of
   the update each keeps.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from cwmp.costmap import CostMap, LayerPrice
from cwmp.errors import CostMapError
from cwmp.masks import topk_mask
from cwmp.pruner import Budget, Pruner


class ResolutionError(CostMapError):
    """A layer's cost could not be told apart from idle noise in the windows used."""


CLASSES = 32


def build_model(seed: int = 0) -> torch.nn.Module:
    """A two-layer MLP whose weights are 32 MiB and 512 KiB in float32: on most devices one layer's
    update lives in DRAM/HBM and the other's in the last-level cache, so their entries cost
    differently. (Smaller tensors cost too little per call to resolve in a demo's short windows.)"""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(2048, 4096, bias=False),
        torch.nn.ReLU(),
        torch.nn.Linear(4096, CLASSES, bias=False),
    )


def one_update(model: torch.nn.Module, device: torch.device, lr: float = 0.1, seed: int = 0) -> dict[str, torch.Tensor]:
    """The update (-lr x gradient) of one real backprop step on a random batch."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 2048, generator=gen).to(device)
    y = torch.randint(0, CLASSES, (64,), generator=gen).to(device)
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return {n: (-lr * p.grad).detach() for n, p in model.named_parameters()}


def _open(meter_spec: str | None, say: Callable[[str], None]):
    from energyprof.errors import MeterUnavailable
    from energyprof.meters import open_meter

    if meter_spec:
        return open_meter(meter_spec)
    try:
        return open_meter("auto")
    except MeterUnavailable as exc:
        say(f"no real meter here ({exc})")
        say("falling back to the simulator: every figure below is SIMULATED, not a measurement")
        return open_meter("sim:preset=rpi4")


def run(meter_spec: str | None = None, device: str | None = None, keep_ratio: float = 0.1, density: float = 0.1,
        min_window_s: float = 1.0, trials: int = 4, say: Callable[[str], None] = print) -> dict:
    """Run the demo; ``density`` is the share of each layer's entries scattered when its cost is
    measured, ``keep_ratio`` the Top-K keep ratio that sets both methods' energy budget."""
    from energyprof.protocol import MeasurementProtocol
    from energyprof.workloads import LayerReplay

    with _open(meter_spec, say) as meter:
        info = meter.info
        if device is None:  # run the kernels where the meter looks
            device = "cuda:0" if info.backend == "nvml" and torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        tag = "  [SIMULATED]" if info.simulated else ""
        say(f"meter: {info.backend} ({info.scope}), update period {info.update_period_s} s, kernels on {dev}{tag}")
        model = build_model().to(dev)
        update = one_update(model, dev)
        # each layer's own largest entries, at the measuring density
        masks = {n: topk_mask(u, max(1, round(density * u.numel()))) for n, u in update.items()}
        replay = LayerReplay(model, masks, kernel="scatter").setup(dev)
        # align windows to counter updates whenever one period is over 0.1 % of a window: a cheap
        # layer's dynamic energy is a small fraction of static power, and edge errors would swamp it
        protocol = MeasurementProtocol(min_window_s=min_window_s, trials=trials, max_edge_error=0.001, random_state=0)
        prices: dict[str, LayerPrice] = {}
        say(f"\njoules per kept update entry: scatter of each layer's largest {density:.0%} entries, "
            f"measured with the protocol{tag}")
        for name, workload in replay.layers_.items():
            kept = int(masks[name].sum())
            r = protocol.measure(workload, meter)
            if r.ci_low_j <= 0:
                raise ResolutionError(
                    f"layer {name}: the energy of one call ({r.joules_per_call:.3g} J, 95 % CI {r.ci_low_j:.3g} .. "
                    f"{r.ci_high_j:.3g} J) is not resolved above idle by this meter in {min_window_s:g} s windows; "
                    "lengthen them (--min-window-s) or add trials (--trials)"
                )
            prices[name] = LayerPrice(r.joules_per_call / kept, "measured")
            say(f"  {name:<9} {str(tuple(update[name].shape)):<13} {kept:>8} entries  "
                f"{r.joules_per_call / kept:.3e} J/entry  (95 % CI {r.ci_low_j / kept:.3e} .. {r.ci_high_j / kept:.3e})")
        costs = CostMap(prices, simulated=info.simulated, profile=f"measured now on {info.backend}")
        total_sq = math.fsum(float((u.double() ** 2).sum()) for u in update.values())
        say(f"\nsame budget for both: what Top-K at keep ratio {keep_ratio:g} spends{tag}")
        results = {}
        for method in ("topk", "cwmp"):
            res = Pruner(costs, Budget.topk_keep_ratio(keep_ratio), method=method).masks(update)
            kept_sq = math.fsum(float((update[n].double()[m] ** 2).sum()) for n, m in res.masks.items())
            per_layer = {n: int(m.sum()) for n, m in res.masks.items()}
            results[method] = {"kept": res.kept, "kept_by_layer": per_layer, "predicted_j": res.predicted_j,
                               "norm_kept": kept_sq / total_sq}
            layers = ", ".join(f"{n} {k}" for n, k in per_layer.items())
            say(f"  {method:<5} kept {res.kept:>8} entries ({layers}), predicted {res.predicted_j:.4e} J, "
                f"{kept_sq / total_sq:.1%} of the update's squared norm")
        return {"meter": info.to_dict(), "prices": {n: p.joules_per_update for n, p in prices.items()}, **results}
