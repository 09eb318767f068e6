"""One gathering pass for the set-up-aware rule: per layer, every entry its selections may keep.

The rule (``cwmp.pruner``) makes three selections over the whole update: Top-K's mask (at a keep
ratio its energy is the budget), each layer's open item (``cwmp.setup_rule``), and the envelope
prefix. Each of them keeps, per layer, entries of large magnitude only. One sample of the update
(the selections' own, shared) estimates per layer a magnitude below which none of the three is
expected to reach, a margin of ``SIGMAS`` binomial standard deviations of the sample's ranks
further down; one pass over the update gathers every entry at or above it (its position and
magnitude), and the three selections then run on the gathered entries alone, a few times the kept
entries rather than the whole update. The retained sums that compare the candidates are read from
the gathered entries too.

Nothing estimated decides a mask: each result is checked, and a check that fails sends that
selection back to the whole update, as without this module. An entry left ungathered in layer i
has ``|u| < floors[i]``; every key the selections order by (magnitude, score, clipped score) is
a non-decreasing function of ``|u|`` computed with the same float operations, so such an entry's
key is at most the key of the largest float below the floor. Then:

- a prefix selection (longest prefix of the key order within a budget, ties by position) on the
  gathered entries is the one on the whole update when the first entry it leaves out has a key
  strictly above every ungathered entry's: everything before it in the whole order was gathered,
  in the same order, at the same costs;
- an open item (the best ``sum of scores / (F + k)`` over a layer's largest scores) is exact when
  its cap is strictly above every score it was not given: past the given ones the ratio only falls,
  and no unseen entry ties at the cap.

Only the CPU's numpy pass is served (float32 or float64 layers of the score dtype, power 1 or 2:
the keys are then computed with exactly the pass's operations), on updates of at least
``MIN_ENTRIES`` entries of which the sample says at most ``MAX_SHARE`` are to be gathered;
elsewhere ``gather`` returns None and the rule selects on the whole update.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cwmp import kernels as _k
from cwmp.parallel import map_largest_first
from cwmp.pools import Layers, _LayeredPool, layer_counts
from cwmp.selection import _magnitude_thresholds, gather_at_least
from cwmp.setup_rule import _SMALL, Opening, _best_prefix, _best_prefixes, _top_score, affordable_count

__all__ = ["Candidates", "Floors", "candidate_openings", "estimate", "expand", "gather", "gather_from"]

SIGMAS = 4.0  # margin past each estimated boundary, in binomial standard deviations of its sample rank
MIN_ENTRIES = 1 << 18  # below this a selection's pass costs little: select on the whole update
#: the most of the update worth gathering (estimated from the sample): the gathered magnitudes and
#: int32 positions take 8 bytes an entry, so a quarter of a float32 update holds half its size, and
#: the selections on them cost more the more there are (at a 10 % keep ratio about 16 % of the
#: update is gathered, on ResNet-18 and on the large benchmark model alike)
MAX_SHARE = 0.25


@dataclass
class Candidates:
    """The gathered entries: ``sub`` holds, per layer, the magnitudes of the entries with ``|u| >=
    floors[i]`` in position order, ``index[i]`` their positions in the layer. ``open_floors[i]``
    (at least ``floors[i]``) is where the layer's open item is looked for."""

    full: Layers
    sub: Layers
    index: list[np.ndarray]
    floors: list[float]
    open_floors: list[float]
    #: per layer, the gathered magnitudes at or above its open floor where that is above the floor
    #: (picked out by the gathering pass), else None
    opened: list[np.ndarray | None] | None = None

    def __post_init__(self) -> None:
        self.sizes = [f.numel() for f in self.full.flats]
        self.sub_sizes = [f.numel() for f in self.sub.flats]
        self.starts = np.concatenate(([0], np.cumsum(self.sizes))).tolist()  # of each layer in the whole update
        self.sub_starts = np.concatenate(([0], np.cumsum(self.sub_sizes))).tolist()  # ... in the gathered entries
        self.dtype = np.dtype(str(self.full.score_dtype).removeprefix("torch."))

    def complete(self, layer: int) -> bool:
        return self.sub_sizes[layer] == self.sizes[layer]

    def below(self, floor: float) -> float:
        """The largest magnitude under ``floor`` in the layers' dtype."""
        return float(np.nextafter(self.dtype.type(floor), self.dtype.type(0)))

    def exact_prefix(self, pool: _LayeredPool, sub_mask: Tensor, witness: Sequence[tuple[float, int]] = ()) -> bool:
        """Whether ``sub_mask``, a prefix selection over ``sub`` ordered by ``pool``'s keys, is the
        selection over the whole update (see the module's docstring). ``witness``: the selection's
        ``(key, count)`` (``cwmp.masks.layers_topk_mask``), which spares the count when it decides."""
        incomplete = [i for i in range(len(self.sizes)) if not self.complete(i)]
        if not incomplete:
            return True
        outside = np.array([self.below(self.floors[i]) for i in incomplete], dtype=self.dtype)
        bound = float(pool.numpy_scores(outside, np.array(incomplete)).max())
        # the first entry left out has the largest left-out key; it is above the bound exactly when
        # more gathered entries than were kept have keys above it (the kept ones all do, if it does)
        kept = int(np.count_nonzero(sub_mask.numpy()))
        if any(key > bound and count > kept for key, count in witness):
            return True  # more than were kept have keys >= a key above the bound
        above = _magnitude_thresholds(pool, bound, strict=True)  # per layer: key > bound from here up
        flats = pool.numpy_flats
        counts = map_largest_first(lambda i: int(np.count_nonzero(flats[i] >= above[i])), range(len(flats)),
                                   self.sub_sizes)
        return sum(counts) > kept

    def positions(self, sub_mask: Tensor) -> list[np.ndarray]:
        """Per layer, the positions (ascending, in the layer) of the entries ``sub_mask`` keeps."""
        return self.kept_positions(self.index, sub_mask.numpy(), self.sub_starts)

    @staticmethod
    def kept_positions(index: list[np.ndarray], flags: np.ndarray, sub_starts: list[int]) -> list[np.ndarray]:
        """``positions`` from the gathered positions ``index``, the flags over the gathered entries
        and where each layer's start among them."""
        # np.compress, not boolean indexing: a few times faster on an irregular mask (numpy 2.4)
        return map_largest_first(lambda i: np.compress(flags[sub_starts[i] : sub_starts[i + 1]], index[i]),
                                 range(len(index)), [p.size for p in index])

    def expand(self, positions: list[np.ndarray]) -> Tensor:
        """The flat mask over the whole update's concatenation that keeps the entries at
        ``positions`` (``positions()``)."""
        return expand(positions, self.starts)

    def counts(self, sub_mask: Tensor) -> list[int]:
        return layer_counts(sub_mask, self.sub_sizes)


@dataclass(frozen=True)
class Floors:
    """Per layer, where the gathering pass starts (``floors``) and where the open item is looked
    for (at least the floor; inf: the layer has none), estimated from the sample (``estimate``)."""

    floors: list[float]
    open_floors: list[float]


def gather(layers: Layers, marginal: Sequence[float], fixed: Sequence[float], power: float, *,
           k: int | None = None, budget_j: float | None = None) -> Candidates | None:
    """The candidates for the set-up-aware rule at Top-K's energy for ``k`` entries, or at a mask
    budget of ``budget_j`` joules (one of the two); None where this module does not serve (see the
    module's docstring) or the update is small."""
    floors = estimate(layers, marginal, fixed, power, k=k, budget_j=budget_j)
    return None if floors is None else gather_from(layers, floors)


def gather_from(layers: Layers, floors: Floors) -> Candidates:
    """The gathering pass from floors that ``estimate`` gave for these layers; where a layer's open
    item is looked for above its floor, the magnitudes there are picked out in the same pass."""
    higher = [o if o > f else math.inf for f, o in zip(floors.floors, floors.open_floors)]
    found = gather_at_least(_LayeredPool(layers, None, 1.0), floors.floors, narrow=True, above=higher)
    index_parts = [i_.numpy() for i_, _, _ in found]
    flats = [s_ for _, s_, _ in found]
    largest = [m if f.numel() else 0.0 for f, m in zip(flats, layers.max_magnitudes)]  # the largest is always gathered
    sub = Layers(flats, largest, layers.score_dtype, layers.device, nonnegative=True)
    empty = np.zeros(0, dtype=np.dtype(str(layers.score_dtype).removeprefix("torch.")))
    opened = [None if h == math.inf else (p if p is not None else empty) for h, (_, _, p) in zip(higher, found)]
    return Candidates(layers, sub, index_parts, floors.floors, floors.open_floors, opened)


def estimate(layers: Layers, marginal: Sequence[float], fixed: Sequence[float], power: float, *,
             k: int | None = None, budget_j: float | None = None) -> Floors | None:
    """The floors of the gathering pass, from one sample of the update (shared with the
    selections: ``layers.samples``); None where this module does not serve or more than
    ``MAX_SHARE`` of the update would be gathered. Reads neither ``layers.max_magnitudes`` nor
    anything the layers' checks decide (``cwmp.pools.check_layers_beside`` runs it meanwhile)."""
    pool = _LayeredPool(layers, None, 1.0)  # keys: the magnitudes
    if not pool.numpy_pass or power not in (1, 2) or pool.n < MIN_ENTRIES or (k is None) == (budget_j is None):
        return None
    n_layers = len(layers.flats)
    size = max(_k.SAMPLE_MIN, min(_k.SAMPLE_MAX, int(16 * math.sqrt(pool.n))))
    index = pool.sample_index(size, torch.Generator(device=pool.device).manual_seed(_k.SEED))
    magnitudes = pool.sample_scores(index).double().numpy()
    edges = torch.searchsorted(index, pool._bounds).tolist()
    layer_of = np.repeat(np.arange(n_layers), np.diff(edges))
    scale = pool.n / size
    marg = np.asarray(marginal, dtype=np.float64)
    fix = np.asarray(fixed, dtype=np.float64)

    # Top-K's boundary (k entries, or the magnitude order's prefix within the budget)
    if k is not None:
        j = min(size, math.ceil(k / scale))
        order = _largest_first(magnitudes, _margin_end(j, size) + 1)  # an estimate: ties in any order
        counts = np.bincount(layer_of[order[:j]], minlength=n_layers) * scale
        mask_j = float(np.sum(fix[counts > 0]) + np.sum(marg * counts))  # Top-K's joules, estimated
        spread = 1 + SIGMAS / math.sqrt(max(j, 1))  # the estimate's relative error, a margin above it
    else:
        order = _largest_first(magnitudes, _paid_end(budget_j, marg, scale, size) + 1)
        j = _fits(layer_of[order], marg, fix, scale, budget_j)
        mask_j, spread = budget_j, 1.0
    top_floor = _past(magnitudes[order], j, size)

    # each layer's open item, estimated: its cap and a score safely below it
    scores = magnitudes**power / marg[layer_of]
    caps = np.full(n_layers, np.inf)
    open_floor = np.full(n_layers, np.inf)
    for i in range(n_layers):
        n_i = pool.sizes[i]
        if not fix[i] > 0 or not n_i:
            continue
        k_max = affordable_count(fixed[i], marginal[i], mask_j, n_i)
        if not k_max:
            caps[i] = 0.0  # cannot be opened (by the estimate)
            continue
        if n_i <= _SMALL or edges[i + 1] - edges[i] < 8:
            open_floor[i] = 0.0  # the whole layer
            continue
        s = -np.sort(-scores[edges[i] : edges[i + 1]])
        local_scale = n_i / s.size
        ranks = np.arange(1, s.size + 1, dtype=np.float64) * local_scale
        estimate = torch.cumsum(torch.from_numpy(s), 0).numpy() * local_scale / (fix[i] / marg[i] + ranks)
        estimate[ranks > max(k_max, local_scale)] = -np.inf
        best = int(np.argmax(estimate))
        caps[i] = estimate[best]
        at = max(0, best + math.ceil(SIGMAS * math.sqrt(best + 1)) + 2)
        open_floor[i] = (s[at] * marg[i]) ** (1.0 / power) if at < s.size else 0.0

    # the envelope prefix: clipped scores, within Top-K's (estimated) joules
    clipped = np.minimum(scores, caps[layer_of])
    order = _largest_first(clipped, _paid_end(mask_j * spread, marg, scale, size) + 1)
    boundary = _past(clipped[order], _fits(layer_of[order], marg, fix, scale, mask_j * spread), size)
    envelope_floor = np.where(caps > boundary, (boundary * marg) ** (1.0 / power), np.inf)

    dtype = np.dtype(str(layers.score_dtype).removeprefix("torch."))
    floors = [_down(min(top_floor, envelope_floor[i], open_floor[i]) * (1 - 1e-6), dtype) for i in range(n_layers)]
    expected = sum(np.count_nonzero(magnitudes[edges[i] : edges[i + 1]] >= floors[i]) for i in range(n_layers))
    if expected * scale > MAX_SHARE * pool.n:
        return None
    open_floors = [max(f, _down(o * (1 - 1e-6), dtype)) if o < math.inf else f for f, o in zip(floors, open_floor)]
    return Floors(floors, open_floors)


def candidate_openings(cand: Candidates, marginal: Sequence[float], fixed: Sequence[float], budget_j: float,
                       power: float) -> list[Opening] | None:
    """Every layer's open item (as ``cwmp.setup_rule.openings`` finds it) from the gathered
    entries; None when one of them cannot be shown exact from them."""
    pool = _LayeredPool(cand.sub, marginal, power)
    whole = None
    out: list[Opening | None] = []
    looked: list[tuple[int, np.ndarray, float, int]] = []  # (layer, the scores it is looked for in, from where, k_max)
    for i, n_i in enumerate(cand.sizes):
        k_max = affordable_count(fixed[i], marginal[i], budget_j, n_i)
        if not k_max:
            out.append(Opening(0, 0.0, 0.0, 0, 0.0))
        elif fixed[i] == 0:
            whole = _LayeredPool(cand.full, marginal, power) if whole is None else whole
            out.append(Opening(k_max, _top_score(whole, cand.full, i), math.inf, 0, 0.0))
        else:
            magnitudes, floor = pool.numpy_flats[i], cand.open_floors[i]
            picked = magnitudes
            if floor > cand.floors[i]:
                picked = cand.opened[i] if cand.opened is not None and cand.opened[i] is not None \
                    else np.compress(magnitudes >= floor, magnitudes)
            looked.append((i, pool.numpy_scores(picked, i), floor, k_max))
            out.append(None)
    # the small layers' best prefixes in a few numpy calls, the others one by one
    small = [job for job in looked if job[1].size <= _SMALL]
    found = dict(zip([i for i, _, _, _ in small], _best_prefixes(
        [s_ for _, s_, _, _ in small], [fixed[i] / marginal[i] for i, _, _, _ in small],
        [k for _, _, _, k in small], cand.full.score_dtype)))
    retry = [math.inf] * len(cand.sizes)  # layers to gather again, from this magnitude
    for i, scores, floor, k_max in looked:
        best = found.get(i)
        if best is None:
            best = _best_prefix(torch.from_numpy(scores), fixed[i] / marginal[i], k_max, cand.full.score_dtype)
        out[i], ratio = _open_item(best, scores.size < cand.sizes[i], floor, pool, cand, i, k_max, marginal[i])
        if out[i] is None and scores.size:  # r* is at least the ratio found: gather down to it
            retry[i] = _down((ratio * marginal[i]) ** (1.0 / power) * (1 - 1e-5), cand.dtype)
        elif out[i] is None:
            retry[i] = 0.0
    # where the open floor was set too high: look again from lower down, in the gathered entries
    # when they reach that low, else in one pass over the layers concerned
    lower = [t if t < cand.floors[i] else math.inf for i, t in enumerate(retry)]
    passed = gather_at_least(_LayeredPool(cand.full, None, 1.0), lower) if any(t < math.inf for t in lower) else None
    for i, _, _, k_max in looked:
        t = retry[i]
        if t < math.inf:
            if lower[i] < math.inf:
                magnitudes = passed[i][1].numpy()
            else:
                gathered = pool.numpy_flats[i]
                magnitudes = np.compress(gathered >= t, gathered)
            out[i] = _opening(pool.numpy_scores(magnitudes, i), magnitudes.size < cand.sizes[i], t, pool, cand, i,
                              k_max, fixed[i] / marginal[i], marginal[i])[0]
            if out[i] is None:
                return None
    return out


def _opening(scores: np.ndarray, partial: bool, floor: float, pool: _LayeredPool, cand: Candidates, i: int,
             k_max: int, f_entries: float, marginal: float) -> tuple[Opening | None, float]:
    """Layer ``i``'s open item from the scores of its entries of magnitude at least ``floor``
    (``partial``: not all of them), None when the entries left out may change it; and the ratio
    found (r* is at least this)."""
    best = _best_prefix(torch.from_numpy(scores), f_entries, k_max, cand.full.score_dtype)
    return _open_item(best, partial, floor, pool, cand, i, k_max, marginal)


def _open_item(best: tuple, partial: bool, floor: float, pool: _LayeredPool, cand: Candidates, i: int,
               k_max: int, marginal: float) -> tuple[Opening | None, float]:
    """``_opening`` from the best prefix (``_best_prefix``'s result) of those scores."""
    ratio, cap, at_cap, score_sum, _ = best
    if partial:  # entries it did not see score at most this
        unseen = pool.numpy_scores(np.array([cand.below(floor)], dtype=cand.dtype), i)
        if not (at_cap and cap > float(unseen[0])):
            return None, ratio
    return Opening(k_max, ratio, cap, min(k_max, at_cap), score_sum * marginal, at_cap), ratio


def expand(positions: Sequence[np.ndarray], starts: Sequence[int]) -> Tensor:
    """The flat bool mask over the layers' concatenation (layer i at ``starts[i]`` up to
    ``starts[i + 1]``) that keeps the entries at ``positions[i]`` of each layer, the layers shared
    among the worker threads."""
    out = np.zeros(starts[-1], dtype=np.bool_)

    def mark(i: int) -> None:
        out[starts[i] : starts[i + 1]][positions[i]] = True

    map_largest_first(mark, range(len(positions)), [p.size for p in positions])
    return torch.from_numpy(out)


def _fits(layer_sorted: np.ndarray, marg: np.ndarray, fix: np.ndarray, scale: float, budget_j: float) -> int:
    """How many of the sample's points, in their order, fit in ``budget_j``, each standing for
    ``scale`` entries of its layer, a layer's first point also paying its set-up."""
    if not layer_sorted.size:
        return 0
    step = marg[layer_sorted] * scale
    where = np.full(marg.size, -1)
    where[layer_sorted[::-1]] = np.arange(layer_sorted.size - 1, -1, -1)  # the last write is a layer's first point
    where = where[where >= 0]
    step[where] += fix[layer_sorted[where]]
    return int(np.searchsorted(np.cumsum(step), budget_j, side="right"))


def _past(descending: np.ndarray, j: int, size: int) -> float:
    """The key a margin of ``SIGMAS`` binomial standard deviations past rank ``j`` of a sample of
    ``size`` points (0: the margin runs past the sample, take everything); ``descending``: the
    sample's largest keys in order, at least up to ``_margin_end(j, size)``."""
    at = _margin_end(j, size)
    return float(descending[at]) if at < size else 0.0


def _margin_end(j: int, size: int) -> int:
    """The sample rank ``_past`` reads for rank ``j``."""
    return max(0, j + math.ceil(SIGMAS * math.sqrt(max(j, 1) * max(0.0, 1 - j / size))) + 2)


def _paid_end(budget_j: float, marg: np.ndarray, scale: float, size: int) -> int:
    """A sample rank at least ``_margin_end`` of what ``_fits`` can find within ``budget_j``: each
    point costs at least the least marginal cost times ``scale``, so at most ``budget_j`` over that
    many fit (``size`` when the costs do not bound it)."""
    cheapest = float(marg.min()) * scale if marg.size else 0.0
    if not cheapest > 0 or not budget_j < cheapest * size:
        return size
    j = max(1, int(budget_j / cheapest) + 1)
    return j + max(0, math.ceil(SIGMAS * math.sqrt(j))) + 2  # at least _margin_end(j', size) for any j' <= j


def _largest_first(keys: np.ndarray, count: int) -> np.ndarray:
    """The positions of the ``count`` largest keys, largest first, ties in any order (an estimate
    needs no more): a partition, then a sort of those alone."""
    if count >= keys.size:
        return np.argsort(-keys)
    if count <= 0:
        return np.zeros(0, dtype=np.intp)
    top = np.argpartition(-keys, count - 1)[:count]
    return top[np.argsort(-keys[top])]


def _down(value: float, dtype: np.dtype) -> float:
    """``value`` in ``dtype``, rounded down (a floor never above the magnitude it stands for)."""
    if not value < math.inf:
        return math.inf
    v = dtype.type(value)
    if float(v) > value:
        v = np.nextafter(v, dtype.type(0))
    return float(v)
