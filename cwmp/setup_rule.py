"""The set-up-aware rule's per-layer part: each layer's best value-per-joule prefix (its "open item").

With a set-up cost per layer, choosing entries is a knapsack with set-ups: a layer with k > 0 kept
entries costs ``fixed_j + marginal_j * k``, and keeping an entry of a closed layer also pays the
layer's set-up. Keep a layer's entries by magnitude (every entry of a layer costs the same), and
the value of its best k is ``V(k) = sum of its k largest |u|**power``. Per joule, the best a layer
can do is its *open item*: the k* (among the affordable k, ``fixed_j + marginal_j * k <= budget``)
that maximises ``V(k) / (fixed_j + marginal_j * k)``. In score units (score = ``|u|**power /
marginal_j``, F = ``fixed_j / marginal_j`` entries' worth) that ratio is
``r* = max_k (s_1 + ... + s_k) / (F + k)``.

Why it is the right object: the concave envelope of a layer's value against its joules runs from
(0, 0) straight to the open item, then along its next entries (whose scores are all below r*: the
prefix ratio rises while the next score is above it and falls for ever after). A fractional
knapsack over those envelopes is therefore an upper bound on every feasible choice, and its greedy
order is the order of the *clipped* scores ``min(score, r*)`` per layer: the open item's entries all
have score >= r*. The set-up-aware rule (``cwmp.pruner``) keeps the longest prefix of that order
(``layers_budget_mask(..., caps=...)``) and repairs the layer it broke at.

A layer's r* is found without sorting the layer: a sample of its scores estimates k*, one pass
gathers the entries above a score safely below the estimate, and those few are sorted. The result
is checked: it is exact when the bound used is at most the r* found (every entry left out scores
below it, so the ratio only falls past the gathered ones); otherwise the whole layer is taken.
With no set-up cost, r* is the layer's largest score and the cap changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cwmp import kernels as _k
from cwmp.pools import Layers, _LayeredPool, _score

__all__ = ["Opening", "openings"]

_SAMPLE = 4096  # sampled scores per layer to estimate its open item
_SIGMAS = 3.0  # margin below the estimated open item, in binomial standard deviations of its sample rank


@dataclass(frozen=True)
class Opening:
    """One layer's open item.

    - ``affordable``: the most entries the budget pays for on this layer alone (0: it cannot be
      opened at all);
    - ``ratio``: r*, the open item's retained ``|u|**power`` per joule, times ``marginal_j`` (score units);
    - ``cap``: r* in the score dtype, the most a score of this layer counts in the rule's order
      (inf: no set-up cost, nothing is clipped; 0: the layer cannot be opened);
    - ``count``: entries whose score is at least ``cap`` (the open item, ties included), at most
      ``affordable``;
    - ``at_cap``: all the entries whose score is at least ``cap`` (more than ``count`` when the
      budget cuts the open item short: its ratio still rises at ``affordable``);
    - ``value``: their retained ``sum |u|**power`` (float64).
    """

    affordable: int
    ratio: float
    cap: float
    count: int
    value: float
    at_cap: int = 0  # entries whose score is at least ``cap`` (``count`` is at most ``affordable``)


def affordable_count(fixed: float, marginal: float, budget_j: float, n: int) -> int:
    """The largest k <= n with ``fixed + marginal * k <= budget_j`` (0 if none), evaluated as the
    accounting evaluates it."""
    if n == 0 or fixed + marginal > budget_j:
        return 0
    k = min(n, max(1, math.floor((budget_j - fixed) / marginal)))
    while k < n and fixed + marginal * (k + 1) <= budget_j:
        k += 1
    while k > 1 and fixed + marginal * k > budget_j:
        k -= 1
    return k


def openings(layers: Layers, marginal: Sequence[float], fixed: Sequence[float], budget_j: float,
             power: float) -> list[Opening]:
    """Every layer's open item under ``budget_j`` (the mask's budget), scores as the selection
    computes them (``|u|**power / marginal_j`` in the score dtype)."""
    pool = _LayeredPool(layers, marginal, power)
    dtype = np.dtype(str(layers.score_dtype).removeprefix("torch."))
    out = []
    for layer, flat in enumerate(layers.flats):
        n = flat.numel()
        k_max = affordable_count(fixed[layer], marginal[layer], budget_j, n)
        if k_max == 0:
            out.append(Opening(0, 0.0, 0.0, 0, 0.0))
            continue
        if fixed[layer] == 0:
            top = _top_score(pool, layers, layer)
            out.append(Opening(k_max, top, math.inf, 0, 0.0))
            continue
        scores, index = _top_scores(pool, layer, fixed[layer] / marginal[layer], k_max)
        f_entries = fixed[layer] / marginal[layer]
        m = min(k_max, scores.numel())
        s = scores[:m].double()
        ratios = torch.cumsum(s, 0) / (f_entries + torch.arange(1, m + 1, dtype=torch.float64, device=s.device))
        best = int(torch.argmax(ratios))
        ratio = float(ratios[best])
        cap = float(np.array(ratio, dtype=dtype))
        if cap > ratio:  # round down: never clip an entry of the open item below r*
            cap = float(np.nextafter(np.array(ratio, dtype=dtype), dtype.type(0)))
        at_cap = int(torch.count_nonzero(scores >= cap))
        count = min(k_max, at_cap)  # ties at the cap, never past what fits
        magnitudes = flat[index[:count].to(flat.device)].double().abs()
        value = float(magnitudes.pow(power).sum()) if power != 1 else float(magnitudes.sum())
        out.append(Opening(k_max, ratio, cap, count, value, at_cap))
    return out


def _top_score(pool: _LayeredPool, layers: Layers, layer: int) -> float:
    flat = pool.flats[layer]
    magnitude = torch.tensor([layers.max_magnitudes[layer]], dtype=flat.dtype, device=flat.device)
    return float(_scores_of(pool, layer, magnitude)[0])


def _scores_of(pool: _LayeredPool, layer: int, magnitudes: Tensor) -> Tensor:
    """Scores of magnitudes of ``layer``, exactly as the selection computes them."""
    return _score(magnitudes.to(pool.score_dtype), pool.divisors[layer], pool.power)


def _top_scores(pool: _LayeredPool, layer: int, f_entries: float, k_max: int) -> tuple[Tensor, Tensor]:
    """The layer's largest scores, descending (ties by lower index), and their flat indices: at
    least every entry whose score could lie in the open item (see the module's docstring)."""
    flat = pool.flats[layer]
    n = flat.numel()
    if n <= _k.EXACT_MAX:
        return _sorted(pool, layer, torch.arange(n, device=flat.device))
    generator = torch.Generator(device=flat.device).manual_seed(_k.SEED + layer)
    sample = torch.randint(n, (min(n, _SAMPLE),), generator=generator, device=flat.device)
    s = torch.sort(_scores_of(pool, layer, flat[sample].abs()).double(), descending=True).values
    scale = n / s.numel()
    ranks = torch.arange(1, s.numel() + 1, dtype=torch.float64, device=s.device) * scale
    estimate = torch.cumsum(s, 0) * scale / (f_entries + ranks)
    estimate[ranks > max(k_max, scale)] = -math.inf
    j = int(torch.argmax(estimate))
    margin = math.ceil(_SIGMAS * math.sqrt(j + 1)) + 2
    bound = float(s[j + margin]) if j + margin < s.numel() else 0.0
    index = _at_least(flat, (bound * float(pool.divisors[layer])) ** (1.0 / pool.power) * (1 - 1e-5)) if bound > 0 \
        else torch.arange(n, device=flat.device)
    scores, index = _sorted(pool, layer, index)
    if index.numel() < n:
        m = min(k_max, scores.numel())
        ratios = torch.cumsum(scores[:m].double(), 0) / (
            f_entries + torch.arange(1, m + 1, dtype=torch.float64, device=scores.device))
        if m < k_max and not float(ratios.max()) >= bound:  # an entry left out might belong: take the layer
            return _sorted(pool, layer, torch.arange(n, device=flat.device))
    return scores, index


def _sorted(pool: _LayeredPool, layer: int, index: Tensor) -> tuple[Tensor, Tensor]:
    """Scores at ``index`` of ``layer``, descending, ties by lower index, and the indices in that order."""
    scores = _scores_of(pool, layer, pool.flats[layer][index].abs())
    order = torch.sort(scores, descending=True, stable=True).indices
    return scores[order], index[order]


def _at_least(flat: Tensor, threshold: float) -> Tensor:
    """Ascending indices of the entries with ``|u| >= threshold``, in cache-sized chunks on the CPU."""
    if not (_k.NUMPY_ON_CPU and flat.device.type == "cpu"):
        return torch.nonzero(flat.abs() >= threshold).squeeze(1)
    x = flat.numpy()
    width = _k.CHUNK_CPU
    buffer = np.empty(min(width, x.size), dtype=x.dtype)
    passing = np.empty(buffer.size, dtype=np.bool_)
    parts = []
    t = np.array(threshold, dtype=np.float64)
    for start in range(0, x.size, width):
        m = min(width, x.size - start)
        np.abs(x[start : start + m], out=buffer[:m])
        np.greater_equal(buffer[:m], t, out=passing[:m])
        found = np.flatnonzero(passing[:m])
        if found.size:
            parts.append(found + start)
    return torch.from_numpy(np.concatenate(parts)) if parts else torch.empty(0, dtype=torch.int64)
