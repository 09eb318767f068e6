"""Exact reference for the knapsack with set-ups, and random instances, for the tests of the
set-up-aware rule and for ``benchmarks/setup_gap.py``.

The problem: layers l with entries of value ``|u_i|**p``, a marginal cost ``c_l`` per kept entry and
a set-up ``f_l`` paid once when the layer keeps any entry; maximise the retained value within the
budget. A layer's best k entries are its k largest, so a solution is one k_l per layer. With integer
costs, a dynamic programme over the joules spent is exact: ``best[j]`` is the most value any choice
of the layers seen so far retains for at most j joules, and each layer adds the option of keeping
its top k at ``f_l + c_l k`` joules (k = 0 costs nothing). It is checked against brute force over
every subset of entries on tiny instances (``tests/test_setup_rule.py``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from cwmp import CostMap, LayerPrice


@dataclass
class Instance:
    """Magnitudes per layer, integer marginal and fixed costs in joules."""

    updates: dict[str, torch.Tensor]
    marginal: list[int]
    fixed: list[int]

    def cost_map(self) -> CostMap:
        return CostMap({name: LayerPrice(float(c), "measured", fixed_j=float(f))
                        for name, c, f in zip(self.updates, self.marginal, self.fixed)}, simulated=True)

    def curves(self, power: float) -> list[np.ndarray]:
        """Per layer, V(k) for k = 0..n: the sum of its k largest ``|u|**power`` (float64)."""
        out = []
        for u in self.updates.values():
            v = np.sort(np.abs(u.double().numpy().reshape(-1)) ** power)[::-1]
            out.append(np.concatenate([[0.0], np.cumsum(v)]))
        return out

    def retained(self, masks: dict[str, torch.Tensor], power: float) -> float:
        return math.fsum(float(self.updates[n][m].double().abs().pow(power).sum()) for n, m in masks.items())

    def joules(self, masks: dict[str, torch.Tensor]) -> int:
        total = 0
        for (name, m), c, f in zip(masks.items(), self.marginal, self.fixed):
            k = int(m.sum())
            total += (f + c * k) if k else 0
        return total


def optimum(instance: Instance, budget: int, power: float) -> float:
    """The exact optimum of the knapsack with set-ups, integer costs, budget in whole joules."""
    best = np.zeros(budget + 1)
    for curve, c, f in zip(instance.curves(power), instance.marginal, instance.fixed):
        new = best.copy()
        for k in range(1, len(curve)):
            cost = f + c * k
            if cost > budget:
                break
            np.maximum(new[cost:], best[: budget + 1 - cost] + curve[k], out=new[cost:])
        best = new
    return float(best[budget])


def brute_force(instance: Instance, budget: int, power: float) -> float:
    """The optimum by trying every subset of entries (a handful of entries only)."""
    items = []
    for layer, u in enumerate(instance.updates.values()):
        for x in u.reshape(-1).tolist():
            items.append((layer, abs(x) ** power))
    best = 0.0
    for chosen in itertools.product((0, 1), repeat=len(items)):
        counts = [0] * len(instance.marginal)
        value = 0.0
        for take, (layer, v) in zip(chosen, items):
            if take:
                counts[layer] += 1
                value += v
        cost = sum(f + c * k for c, f, k in zip(instance.marginal, instance.fixed, counts) if k)
        if cost <= budget:
            best = max(best, value)
    return best


def random_instance(rng: np.random.Generator, layers: tuple[int, int] = (2, 8), entries: tuple[int, int] = (20, 200),
                    marginal: tuple[int, int] = (1, 4), fixed_entries: float = 60.0) -> Instance:
    """Layers of N(0, 1) or heavy-tailed entries, each scaled by its own factor; integer costs; a
    set-up of 0 to ``fixed_entries`` entries' worth (a third of the layers have none)."""
    n_layers = int(rng.integers(layers[0], layers[1] + 1))
    updates, c, f = {}, [], []
    for i in range(n_layers):
        n = int(rng.integers(entries[0], entries[1] + 1))
        values = rng.standard_normal(n) if rng.random() < 0.5 else rng.standard_t(2, n)
        updates[f"layer{i}"] = torch.from_numpy(values * float(np.exp(rng.normal(0, 1)))).float()
        c.append(int(rng.integers(marginal[0], marginal[1] + 1)))
        f.append(0 if rng.random() < 1 / 3 else int(rng.integers(1, int(fixed_entries * c[-1]) + 2)))
    return Instance(updates, c, f)
