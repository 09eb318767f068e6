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
from cwmp.selection import gather_at_least

__all__ = ["Opening", "openings"]

_SMALL = 4096  # layers this small are gathered whole
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
    - ``value``: their retained ``sum |u|**power`` (float64, from their scores: to float rounding).
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
    computes them (``|u|**power / marginal_j`` in the score dtype). One pass over the layers with
    a set-up gathers their candidates (``gather_at_least``); a layer whose check fails is gathered
    whole in a second pass."""
    pool = _LayeredPool(layers, marginal, power)
    n_layers = len(layers.flats)
    k_max = [affordable_count(fixed[i], marginal[i], budget_j, pool.sizes[i]) for i in range(n_layers)]
    wanted = [i for i in range(n_layers) if k_max[i] and fixed[i] > 0]
    bounds = _estimated_bounds(pool, wanted, [fixed[i] / marginal[i] for i in range(n_layers)], k_max)
    thresholds = [math.inf] * n_layers
    for i in wanted:
        thresholds[i] = _magnitude_below(bounds[i], float(pool.divisors[i]), power)
    gathered = gather_at_least(pool, thresholds)
    found: dict[int, tuple] = {}
    retry = [math.inf] * n_layers
    for i in wanted:
        index, scores = gathered[i]
        result = _best_prefix(scores, fixed[i] / marginal[i], k_max[i], layers.score_dtype)
        complete = index.numel() == pool.sizes[i]
        if complete or result[-1] or result[0] >= bounds[i]:  # every entry left out scores below r*
            found[i] = result
        else:
            retry[i] = 0.0
    if any(t == 0.0 for t in retry):
        for i, (index, scores) in enumerate(gather_at_least(pool, retry)):
            if retry[i] == 0.0:
                found[i] = _best_prefix(scores, fixed[i] / marginal[i], k_max[i], layers.score_dtype)
    out = []
    for i, flat in enumerate(layers.flats):
        if not k_max[i]:
            out.append(Opening(0, 0.0, 0.0, 0, 0.0))
        elif fixed[i] == 0:
            out.append(Opening(k_max[i], _top_score(pool, layers, i), math.inf, 0, 0.0))
        else:
            ratio, cap, at_cap, score_sum, _ = found[i]
            count = min(k_max[i], at_cap)  # ties at the cap, never past what fits
            out.append(Opening(k_max[i], ratio, cap, count, score_sum * marginal[i], at_cap))
    return out


def _best_prefix(scores: Tensor, f_entries: float, k_max: int, score_dtype: torch.dtype) -> tuple:
    """From a layer's gathered scores: (r*, its cap in the score dtype rounded down, how many
    scores are at least the cap, the sum of the largest ``min(k_max, at_cap)`` scores, whether
    every affordable k was examined)."""
    dtype = np.dtype(str(score_dtype).removeprefix("torch."))
    if _k.NUMPY_ON_CPU and scores.device.type == "cpu":  # numpy throughout: a few times faster here
        ordered = np.sort(scores.numpy())[::-1]  # largest first (a reversed view)
        m = min(k_max, ordered.size)
        if m == 0:
            return 0.0, 0.0, 0, 0.0, False
        # sequential float64 sums, as numpy's cumsum makes them; torch's loop is a few times faster
        sums = torch.cumsum(torch.from_numpy(ordered[:m].astype(np.float64)), 0).numpy()
        ratios = sums / (f_entries + np.arange(1, m + 1, dtype=np.float64))
        best = int(np.argmax(ratios))  # the first maximum, as torch's
        ratio = float(ratios[best])
        cap = np.array(ratio, dtype=dtype)
        if float(cap) > ratio:
            cap = np.nextafter(cap, dtype.type(0))
        at_cap = int(np.count_nonzero(ordered >= cap))
        return ratio, float(cap), at_cap, float(sums[min(m, at_cap) - 1]) if at_cap else 0.0, m == k_max
    else:
        ordered = torch.sort(scores, descending=True).values
    m = min(k_max, ordered.numel())
    if m == 0:
        return 0.0, 0.0, 0, 0.0, False
    sums = torch.cumsum(ordered[:m].double(), 0)
    ratios = sums / (f_entries + torch.arange(1, m + 1, dtype=torch.float64, device=ordered.device))
    best = int(torch.argmax(ratios))
    ratio = float(ratios[best])
    cap = np.array(ratio, dtype=dtype)
    if float(cap) > ratio:  # round down: never clip an entry of the open item below r*
        cap = np.nextafter(cap, dtype.type(0))
    at_cap = int(torch.count_nonzero(ordered >= float(cap)))
    return ratio, float(cap), at_cap, float(sums[min(m, at_cap) - 1]) if at_cap else 0.0, m == k_max


def _best_prefixes(scores: Sequence[np.ndarray], f_entries: Sequence[float], k_max: Sequence[int],
                   score_dtype: torch.dtype) -> list[tuple]:
    """``_best_prefix`` of several layers' scores (numpy arrays of the score dtype) at once, with
    the same results to the bit: the layers of about one size are sorted, summed and divided as
    rows of one array (padded to the next power of two, the padding never counted), so that many
    small layers cost a few numpy calls instead of a few each. The row-wise sums are sequential,
    as the one-layer sums are."""
    dtype = np.dtype(str(score_dtype).removeprefix("torch."))
    out: list[tuple | None] = [None] * len(scores)
    by_width: dict[int, list[int]] = {}
    for j, s in enumerate(scores):
        if not min(k_max[j], s.size):
            out[j] = (0.0, 0.0, 0, 0.0, False)
        else:
            by_width.setdefault(1 << (s.size - 1).bit_length(), []).append(j)
    for width, rows in by_width.items():
        negated = np.full((len(rows), width), np.inf, dtype=dtype)  # sorted ascending: the padding last
        for r, j in enumerate(rows):
            np.negative(scores[j], out=negated[r, : scores[j].size])
        negated.sort(axis=1)
        ordered = np.negative(negated, out=negated)  # largest first, the padding -inf
        m = np.array([min(k_max[j], scores[j].size) for j in rows])
        sums = torch.cumsum(torch.from_numpy(ordered.astype(np.float64)), 1).numpy()  # as _best_prefix's
        ratios = sums / (np.array([f_entries[j] for j in rows])[:, None] + np.arange(1, width + 1, dtype=np.float64))
        ratios[np.arange(width)[None, :] >= m[:, None]] = -np.inf  # only k <= min(k_max, size)
        best = np.argmax(ratios, axis=1)  # the first maximum of each row
        ratio = ratios[np.arange(len(rows)), best]
        cap = ratio.astype(dtype)
        over = cap.astype(np.float64) > ratio  # round down: never clip an entry of the open item below r*
        cap[over] = np.nextafter(cap[over], dtype.type(0))
        at_cap = np.count_nonzero(ordered >= cap[:, None], axis=1)
        for r, j in enumerate(rows):
            a, mm = int(at_cap[r]), int(m[r])
            out[j] = (float(ratio[r]), float(cap[r]), a, float(sums[r, min(mm, a) - 1]) if a else 0.0, mm == k_max[j])
    return out


def _magnitude_below(bound: float, divisor: float, power: float) -> float:
    """A magnitude whose score is below ``bound``: every entry scoring at least ``bound`` has a
    magnitude at or above it (0 when ``bound`` is 0: everything)."""
    if bound <= 0:
        return 0.0
    return (bound * divisor) ** (1.0 / power) * (1 - 1e-5)


def _estimated_bounds(pool: _LayeredPool, wanted: list[int], f_entries: list[float], k_max: list[int]) -> list[float]:
    """Per wanted layer, a score safely below its open item's, from the selection's shared sample
    (0: gather the whole layer, for small layers, too few sample points, or when the sample says
    the open item is most of the layer)."""
    bounds = [0.0] * len(pool.flats)
    large = [i for i in wanted if pool.sizes[i] > _SMALL]
    if not large:
        return bounds
    size = max(_k.SAMPLE_MIN, min(_k.SAMPLE_MAX, int(16 * math.sqrt(pool.n))))
    generator = torch.Generator(device=pool.device).manual_seed(_k.SEED)
    index = pool.sample_index(size, generator)
    scores = pool.sample_scores(index).double().cpu().numpy()
    edges = torch.searchsorted(index, pool._bounds).tolist()
    for i in large:
        s = -np.sort(-scores[edges[i] : edges[i + 1]])
        if s.size < 8:
            continue
        scale = pool.sizes[i] / s.size
        ranks = np.arange(1, s.size + 1, dtype=np.float64) * scale
        estimate = np.cumsum(s) * scale / (f_entries[i] + ranks)
        estimate[ranks > max(k_max[i], scale)] = -np.inf
        j = int(np.argmax(estimate))
        margin = math.ceil(_SIGMAS * math.sqrt(j + 1)) + 2
        at = max(0, j + margin)
        bounds[i] = float(s[at]) if at < s.size else 0.0
    return bounds


def _top_score(pool: _LayeredPool, layers: Layers, layer: int) -> float:
    flat = pool.flats[layer]
    magnitude = torch.tensor([layers.max_magnitudes[layer]], dtype=flat.dtype, device=flat.device)
    return float(_score(magnitude.to(pool.score_dtype), pool.divisors[layer], pool.power)[0])
