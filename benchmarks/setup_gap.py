"""How far the set-up-aware rule is from the exact optimum, and how it compares with Top-K and the
plain prefix rule, on random instances of the knapsack with set-ups.

Instances (``tests/setup_reference.py``): 2 to 8 layers of 20 to 200 entries (N(0, 1) or Student-t
with 2 degrees of freedom, each layer scaled by its own factor), integer marginal costs of 1 to 4 J
per entry and set-ups of 0 to 60 entries' worth (none on a third of the layers). Budgets: Top-K's
energy at keep ratios of 1 %, 5 %, 10 % and 25 %, and budgets in joules drawn between 1 % and 40 %
of what keeping everything costs. The exact optimum is a dynamic programme over the joules spent
(integer costs), checked against brute force in the tests.

Printed per power: the mean and worst gap (1 - rule / optimum) of the set-up-aware rule and of the
prefix rule, which candidate the rule kept, and at Top-K's energy the worst ratio of the rule's
retained ``sum |u|**p`` to Top-K's and of the prefix rule's. Exit status 1 when a goal is missed:
mean gap <= 1 %, worst <= 5 %, never below Top-K at Top-K's energy, never over the budget.

    python benchmarks/setup_gap.py                 # 400 instances per power
    python benchmarks/setup_gap.py --instances 2000 --seed 1
"""

from __future__ import annotations

import argparse
import collections
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from cwmp import Budget, Pruner  # noqa: E402
from tests.setup_reference import optimum, random_instance  # noqa: E402

RATIOS = (0.01, 0.05, 0.1, 0.25)


def run(instances: int, seed: int, power: float) -> dict:
    rng = np.random.default_rng(seed)
    gaps = {"setup": [], "prefix": []}
    versus_topk = {"setup": [], "prefix": []}
    candidates: collections.Counter = collections.Counter()
    over = 0
    worst_case = None
    for i in range(instances):
        inst = random_instance(rng)
        cmap = inst.cost_map()
        everything = sum(f + c * u.numel() for u, c, f in zip(inst.updates.values(), inst.marginal, inst.fixed))
        budgets = [Budget.topk_keep_ratio(RATIOS[i % len(RATIOS)]),
                   Budget.of_joules(float(int(everything * rng.uniform(0.01, 0.4))))]
        for budget in budgets:
            top = Pruner(cmap, budget, method="topk").masks(inst.updates) if budget.keep_ratio else None
            results = {rule: Pruner(cmap, budget, power=power, rule=rule).masks(inst.updates) for rule in gaps}
            budget_j = results["setup"].budget_j
            best = optimum(inst, int(math.floor(budget_j)), power)
            for rule, result in results.items():
                value = inst.retained(result.masks, power)
                over += inst.joules(result.masks) > budget_j
                gap = 1 - value / best if best > 0 else 0.0
                gaps[rule].append(gap)
                if rule == "setup":
                    candidates[result.candidate] += 1
                    if worst_case is None or gap > worst_case[0]:
                        worst_case = (gap, i, str(budget), len(inst.updates))
                if top is not None:
                    top_value = inst.retained(top.masks, power)
                    versus_topk[rule].append(value / top_value if top_value > 0 else 1.0)
    return {"gaps": gaps, "versus_topk": versus_topk, "candidates": candidates, "over": over,
            "worst_case": worst_case}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=400, help="random instances per power (two budgets each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--powers", type=float, nargs="+", default=[1.0, 2.0])
    args = parser.parse_args(argv)
    missed = False
    print(f"# {args.instances} random instances per power (2-8 layers, 20-200 entries each, set-ups 0-60 entries' "
          f"worth), two budgets each (Top-K's energy at {', '.join(f'{r:.0%}' for r in RATIOS)} in turn, and a "
          f"budget in joules); seed {args.seed}")
    for power in args.powers:
        start = time.perf_counter()
        out = run(args.instances, args.seed, power)
        seconds = time.perf_counter() - start
        print(f"\npower {power:g} ({seconds:.0f} s)")
        print(f"{'rule':<8} {'mean gap':>9} {'worst gap':>10} {'gap > 1%':>9} {'min x topk':>11} {'below topk':>11}")
        for rule in ("setup", "prefix"):
            g = np.array(out["gaps"][rule])
            t = np.array(out["versus_topk"][rule])
            print(f"{rule:<8} {g.mean():>9.3%} {g.max():>10.3%} {int((g > 0.01).sum()):>9} {t.min():>10.3f}x "
                  f"{int((t < 1).sum()):>5} of {t.size}")
        print(f"setup rule kept: {dict(out['candidates'])}; masks over their budget: {out['over']}")
        gap, index, budget, layers = out["worst_case"]
        print(f"worst instance: #{index} ({layers} layers, budget {budget}), gap {gap:.3%}")
        g = np.array(out["gaps"]["setup"])
        t = np.array(out["versus_topk"]["setup"])
        missed |= g.mean() > 0.01 or g.max() > 0.05 or bool((t < 1).any()) or out["over"] > 0
    print("\n# goals: mean gap <= 1 %, worst <= 5 %, never below Top-K at Top-K's energy, never over budget: "
          + ("MISSED" if missed else "met"))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
