"""What the layer-skipping rule buys: retained magnitude at equal energy, against the greedy rule and
Top-K, in one run.

The update and the costs are those of ``benchmarks/prune_speed.py`` (ResNet-18 shapes, N(0, 1)
float32 scaled per tensor; a SIMULATED per-layer table with ``fixed_j`` = 1000 x the marginal cost).
For each Top-K keep ratio r, the budget is Top-K's energy at r, and the rows are Top-K, CWMP with
the greedy prefix rule (``rule="prefix"``), that rule with ``skip_layers=n`` for each n asked, and
CWMP's default, the set-up-aware rule (``setup``): entries kept,
retained ``sum |u|`` (``sum |u|**2`` with ``--power 2``), its ratio to the greedy rule's, open
layers, predicted joules against the budget, and the call's time.

    python benchmarks/skip_layers.py
    python benchmarks/skip_layers.py --keep 0.001 0.01 --skips 4 16 --power 2
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cwmp import Budget, Pruner  # noqa: E402
from prune_speed import builtin_shapes, make_costs, make_update  # noqa: E402


def retained(update: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], power: float) -> float:
    return math.fsum(float(update[n][m].double().abs().pow(power).sum()) for n, m in masks.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", choices=["resnet18", "cnn", "mlp"])
    parser.add_argument("--keep", type=float, nargs="+", default=[0.001, 0.01, 0.1], help="Top-K keep ratios")
    parser.add_argument("--skips", type=int, nargs="+", default=[4, 16], help="skip_layers values to try")
    parser.add_argument("--power", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shapes = builtin_shapes(args.model)
    update = make_update(shapes, args.seed)
    costs = make_costs(args.model, shapes)
    print(f"# {args.model}, {sum(u.numel() for u in update.values())} entries, power {args.power:g}; costs: SIMULATED "
          "sim-h100 profile with a made-up per-layer table (fixed_j = 1000 x the marginal cost)")
    print(f"{'keep':>6} {'rule':<12} {'kept':>9} {'retained':>12} {'x greedy':>9} {'open':>5} {'J / budget':>11} {'ms':>7}")
    worse = False
    for ratio in args.keep:
        budget = Budget.topk_keep_ratio(ratio)
        rows = [("Top-K", Pruner(costs, budget, method="topk"))]
        rows += [("greedy", Pruner(costs, budget, power=args.power, rule="prefix"))]
        rows += [(f"skip {n}", Pruner(costs, budget, power=args.power, skip_layers=n, rule="prefix"))
                 for n in args.skips]
        rows += [("setup", Pruner(costs, budget, power=args.power))]  # CWMP's default, the set-up-aware rule
        results = []
        for label, pruner in rows:
            start = time.perf_counter()
            result = pruner.masks(update)
            results.append((label, result, time.perf_counter() - start, retained(update, result.masks, args.power)))
        greedy_value = results[1][3]
        for label, result, seconds, value in results:
            worse |= label.startswith(("skip", "setup")) and value < greedy_value
            print(f"{ratio:>6.1%} {label:<12} {result.kept:>9} {value:>12.6g} {value / greedy_value:>8.3f}x "
                  f"{sum(bool(m.any()) for m in result.masks.values()):>5} "
                  f"{result.predicted_j / result.budget_j:>10.4f}x {seconds * 1e3:>7.0f}", flush=True)
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main())
