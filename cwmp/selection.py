"""The selection engine: the longest score-ordered prefix of a pool whose cost fits a budget,
without sorting the pool.

The prefix is decided by one score value (where the budget runs out), so this module finds that
value by weighted selection with sampled pivots (Floyd and Rivest's idea, with costs as weights):

1. a uniform sample of the scores estimates where the budget runs out; two sample values a few
   standard deviations either side bracket that point;
2. one streaming pass over the update, in chunks that stay in cache (no full-size score tensor is
   made), writes the mask of scores above the bracket, totals the cost above and inside it, and
   gathers the few entries inside it;
3. those entries are resolved the same way; once they are few, all of them serve as the sample,
   which makes the pivot exact (a sort of at most 32 Ki scores, never of N).

A bracket that misses (rare: an unlucky sample) narrows the interval and costs one more pass; the
answer is exact either way. Ties at the boundary are resolved by flat index, as the contract says.
The same code runs on CPU and CUDA tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cwmp import kernels as _k
from cwmp.costs import _LayerCosts
from cwmp.kernels import count_up_to, next_float
from cwmp.parallel import in_parallel, map_largest_first
from cwmp.pools import _GatheredPool, _LayeredPool, _Pool, _UpdatePool, layer_counts

@dataclass
class _Split:
    """One pass with pivots lo <= hi: the mask of scores > hi, what the entries with score > hi
    and with score >= lo cost in total, and the gathered entries with lo <= score <= hi."""

    above: Tensor
    n_above: int
    above_amount: float
    n_upto: int
    upto_amount: float
    between: _GatheredPool

    def mask_with(self, inner: Tensor) -> Tensor:
        """The pool's mask: the entries above the bracket and the bracketed ones ``inner`` keeps."""
        if _k.NUMPY_ON_CPU and self.above.device.type == "cpu":  # numpy's indexing: several times faster
            self.above.numpy()[self.between.index.numpy()[inner.numpy()]] = True
        else:
            self.above[self.between.index[inner]] = True
        return self.above


def _split(pool: _Pool, lo: float, hi: float) -> _Split:
    if isinstance(pool, _LayeredPool) and pool.numpy_pass:
        return _split_layers_numpy(pool, lo, hi)
    chunks = pool.chunks()
    width = max(stop - start for start, stop in chunks)
    above = torch.empty(pool.n, dtype=torch.bool, device=pool.device)
    deferred = pool.defer_gather
    between_all = torch.empty(pool.n, dtype=torch.bool, device=pool.device) if deferred else None
    between_buffer = None if deferred else torch.empty(width, dtype=torch.bool, device=pool.device)
    buffer = torch.empty(width, dtype=pool.score_dtype, device=pool.device) if pool.computes_scores else None
    counts: list[Tensor] = []
    amounts: list[Tensor] = []
    index_parts: list[Tensor] = []
    score_parts: list[Tensor] = []
    for start, stop in chunks:
        s = pool.scores(start, stop, None if buffer is None else buffer[: stop - start])
        a = above[start:stop]
        if deferred:  # no host round trip here: the bracketed entries are gathered after the pass
            b = between_all[start:stop]
            torch.gt(s, hi, out=a)
            torch.ge(s, lo, out=b)
            b ^= a
            count = torch.count_nonzero(a)
        else:
            count, local = _bracket(s, lo, hi, a, between_buffer[: stop - start])
            index_parts.append(local + start)
            score_parts.append(s[local])
        counts.append(count)
        amounts.append(pool.cost.amount(a, count, start, stop))
    if deferred:
        index = torch.nonzero(between_all).squeeze(1)
        del between_all
        stored = pool.scores_at(index)
    else:
        index = torch.cat(index_parts)
        stored = torch.cat(score_parts)
    between = _GatheredPool(index, stored, pool.cost.gather(index))
    n_above = int(torch.stack(counts).sum())
    above_amount = pool.cost.total(amounts)
    upto_amount = above_amount + between.cost.amount_of_all(index.numel())
    return _Split(above, n_above, above_amount, n_above + index.numel(), upto_amount, between)


def _split_layers_numpy(pool: "_LayeredPool", lo: float, hi: float) -> _Split:
    """``_split`` of a layered pool on the CPU, in numpy, without a score per entry: a layer's
    score is a monotone function of the magnitude, so "score > hi" is "magnitude >= t" for one
    threshold t per layer (``_magnitude_thresholds``, found with the score's own arithmetic), and
    only the bracketed entries' scores are computed, exactly as ``scores`` computes them. The
    chunks are shared among worker threads (numpy releases the GIL in its loops), each writing
    its own part of the mask; the results are put together in chunk order, so the outcome does
    not depend on the threads."""
    t_hi = _magnitude_thresholds(pool, hi, strict=True)
    t_lo = _magnitude_thresholds(pool, lo, strict=False)
    above_t = torch.empty(pool.n, dtype=torch.bool)
    above = above_t.numpy()
    width = max((stop - start for start, stop, _, _ in pool.chunk_info), default=0)

    def run(group: list[tuple[int, int, int, int]]) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
        buffer = np.empty(width, dtype=pool.numpy_dtype)
        between = np.empty(width, dtype=np.bool_)
        out = []
        for start, stop, layer, local in group:
            m = stop - start
            a, b = above[start:stop], between[:m]
            s = pool.numpy_flats[layer][local : local + m]
            if not pool.nonnegative:
                s = np.abs(s, out=buffer[:m])
            np.greater_equal(s, t_hi[layer], out=a)
            np.greater_equal(s, t_lo[layer], out=b)
            b ^= a
            inside = np.flatnonzero(b)
            scores = pool.numpy_scores(s[inside], layer, in_place=True)  # s[inside]: a copy
            inside += start
            out.append((layer, np.count_nonzero(a), inside, scores))
        return out

    parts = in_parallel(run, pool.chunk_groups())
    counts = np.zeros(len(pool.flats), dtype=np.int64)
    index_parts, score_parts = [], []
    for layer, count, inside, scores in parts:
        counts[layer] += count
        if inside.size:
            index_parts.append(inside)
            score_parts.append(scores)
    index = torch.from_numpy(np.concatenate(index_parts)) if index_parts else torch.empty(0, dtype=torch.int64)
    stored = (
        torch.from_numpy(np.concatenate(score_parts)) if score_parts else torch.empty(0, dtype=pool.score_dtype)
    )
    between_pool = _GatheredPool(index, stored, pool.cost.gather(index))
    n_above = int(counts.sum())
    if pool.first_split is None:
        pool.first_split = (lo, n_above + index.numel())  # the entries with a score >= lo
    above_amount = torch.from_numpy(counts) if isinstance(pool.cost, _LayerCosts) else torch.tensor(n_above)
    upto_amount = above_amount + between_pool.cost.amount_of_all(index.numel())
    return _Split(above_t, n_above, above_amount, n_above + index.numel(), upto_amount, between_pool)


def _magnitude_thresholds(pool: "_LayeredPool", bound: float, strict: bool) -> np.ndarray:
    """Per layer, the least magnitude x (in the score dtype) whose score passes ``bound``
    (score > bound when ``strict``, else score >= bound); inf when none does. The score, computed
    by ``numpy_scores``, never decreases as x grows (each IEEE operation rounds monotonically), so
    the entries that pass are exactly those with magnitude >= x. Found from an estimate,
    corrected one float at a time with that very arithmetic, and by bisection over the bit
    patterns when a few such steps do not settle it; for all layers at once."""
    dtype = pool.numpy_dtype
    n_layers = len(pool.flats)
    if math.isnan(bound):
        raise AssertionError("a pivot is never NaN")
    if bound < 0 or (bound == 0 and not strict):
        return np.zeros(n_layers, dtype=dtype)  # every score (>= +0) passes
    divisors = np.ones(n_layers) if pool.numpy_divisors is None else pool.numpy_divisors.astype(np.float64)
    layers = np.arange(n_layers)

    def passes(x: np.ndarray) -> np.ndarray:
        s = pool.numpy_scores(x, layers)
        return s > bound if strict else s >= bound

    with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
        t = np.asarray((bound * divisors) ** (1.0 / pool.power), dtype=np.float64).astype(dtype)
        zero, top = dtype.type(0), dtype.type(np.inf)
        for _ in range(_k.THRESHOLD_STEPS):  # the estimate is a float or two off, except near 0
            ok = passes(t)
            below = np.nextafter(t, zero)
            down = ok & (t > 0) & passes(below)  # a smaller magnitude passes too
            up = ~ok & (t < top)
            if not (down.any() or up.any()):
                return t
            t = np.where(down, below, np.where(up, np.nextafter(t, top), t))
        # bisection over the bit patterns (ordered as the non-negative floats they encode): the
        # largest that fails stays in low, the smallest that passes (or inf) in high
        unsigned = np.uint32 if dtype.itemsize == 4 else np.uint64
        high = np.full(n_layers, np.array(np.inf, dtype=dtype).view(unsigned), dtype=unsigned)
        at_zero = passes(np.zeros(n_layers, dtype=dtype))
        high[at_zero] = 0
        low = np.zeros(n_layers, dtype=unsigned)
        while True:
            open_ = high - low > 1
            open_ &= ~at_zero
            if not open_.any():
                return high.view(dtype)
            middle = low + (high - low) // 2
            ok = passes(middle.view(dtype))
            high = np.where(open_ & ok, middle, high)
            low = np.where(open_ & ~ok, middle, low)


def _bracket(s: Tensor, lo: float, hi: float, above: Tensor, between: Tensor) -> tuple[Tensor, Tensor]:
    """Write s > hi into ``above`` and lo <= s <= hi into ``between``; return the count above and
    the indices between. On the CPU numpy's comparison and nonzero kernels do this about twice as
    fast as torch's (they work on views of the same memory, no copy)."""
    if _k.NUMPY_ON_CPU and s.device.type == "cpu":
        s_, above_, between_ = s.numpy(), above.numpy(), between.numpy()
        np.greater(s_, hi, out=above_)
        np.greater_equal(s_, lo, out=between_)
        between_ ^= above_
        return torch.tensor(np.count_nonzero(above_)), torch.from_numpy(np.flatnonzero(between_))
    torch.gt(s, hi, out=above)
    torch.ge(s, lo, out=between)
    between ^= above
    return torch.count_nonzero(above), torch.nonzero(between).squeeze(1)


class _Sample:
    """A uniform sample of a pool's scores and costs, sorted by score, descending. Restricted to a
    score interval it is a uniform sample of the pool's entries in that interval. A pool of at most
    ``_k.EXACT_MAX`` entries is taken whole ("exhaustive"): its estimates are then exact."""

    def __init__(self, pool: _Pool) -> None:
        self.exhaustive = pool.n <= _k.EXACT_MAX
        if self.exhaustive:
            self.size = pool.n
            index = torch.arange(pool.n, device=pool.device)
            scores = pool.all_scores()
        else:
            self.size = max(_k.SAMPLE_MIN, min(_k.SAMPLE_MAX, int(16 * math.sqrt(pool.n))))
            generator = torch.Generator(device=pool.device).manual_seed(_k.SEED)
            index = pool.sample_index(self.size, generator)
            scores = pool.sample_scores(index)
        self.cost = pool.cost
        self.scores, self.cumulative = pool.cost.sorted_sample(scores, index)
        self.scale = pool.n / self.size

    def pivots(self, lo: float, hi: float, above, budget_j: float, narrow: bool) -> tuple[float, float]:
        """Pivots lo <= p_lo <= p_hi <= hi that bracket where the budget runs out, estimated from
        the sample points in [lo, hi] after the ``above`` amount is spent; ``narrow`` asks for a
        single pivot (a tie-breaking step)."""
        scores = self.scores
        first = count_up_to(-scores, -hi, inclusive=False)  # sample points above hi
        end = count_up_to(-scores, -lo)  # ... and at or above lo
        if first >= end:
            return lo, hi
        estimate = self.cost.estimate(above, self, first, end)
        fits = first + count_up_to(estimate, budget_j)
        if narrow or self.exhaustive:  # one pivot: the score of the first entry that does not fit
            pivot = float(scores[min(fits, end - 1)])
            return pivot, pivot
        margin = math.ceil(_k.SIGMAS * math.sqrt(fits * max(0.0, 1 - fits / self.size))) + 1
        p_hi = float(scores[fits - 1 - margin]) if fits - 1 - margin >= first else hi
        p_lo = float(scores[fits + margin]) if fits + margin < end else lo
        return p_lo, p_hi


def _select(pool: _Pool, budget_j: float, base: float, narrow: bool = False, tied: bool = False) -> Tensor:
    """Pool-local mask of the longest score-ordered prefix with cost(base) + cost(prefix) <= budget.

    ``base`` is the amount already spent above this pool. ``tied`` says all scores are equal (the
    order is the index order); ``narrow`` says the last split did not shrink the pool.
    """
    if tied:
        return _index_order_prefix(pool, budget_j, base)
    cost = pool.cost
    sample = _Sample(pool)
    lo, hi = -math.inf, math.inf  # scores of the entries still undecided; above hi: kept
    n_kept, kept_amount, n_open = 0, 0, pool.n
    stalled = False
    while True:
        if stalled:
            p_lo, p_hi = lo, hi
        else:
            p_lo, p_hi = sample.pivots(lo, hi, base + kept_amount, budget_j, narrow)
        split = _split(pool, p_lo, p_hi)
        if p_lo > p_hi:
            # nothing is undecided any more: the entries above hi were admitted by the accounting that
            # summed them with the ones below (upto); summed on their own they may round a hair over
            # a budget that is exactly their cost (a Top-K energy budget): keep them, do not loop
            return split.above
        if cost.to_joules(base + split.above_amount) > budget_j:  # the boundary lies above p_hi
            lo = next_float(p_hi, up=True, dtype=pool.score_dtype)
            n_left = split.n_above - n_kept
        elif cost.to_joules(base + split.upto_amount) <= budget_j:  # everything >= p_lo fits
            if split.n_upto == pool.n:
                return torch.ones(pool.n, dtype=torch.bool, device=pool.device)
            hi = next_float(p_lo, up=False, dtype=pool.score_dtype)
            n_left = n_open - (split.n_upto - n_kept)
            n_kept, kept_amount = split.n_upto, split.upto_amount
        else:  # the boundary lies in [p_lo, p_hi]: resolve the gathered entries
            between = split.between
            inner = _select(between, budget_j, base + split.above_amount,
                            narrow=between.n == pool.n, tied=p_lo == p_hi)
            return split.mask_with(inner)
        stalled = n_left == n_open  # possible only when pow() rounds differently in the sample
        n_open = n_left


def _index_order_prefix(pool: _Pool, budget_j: float, base: float) -> Tensor:
    """Equal scores: the order is the index order, so no sort is needed."""
    keep = pool.cost.affordable_prefix(base, pool.n, budget_j)
    mask = torch.zeros(pool.n, dtype=torch.bool, device=pool.device)
    mask[:keep] = True
    return mask


def _fill(pool: _UpdatePool, mask: Tensor, budget_j: float) -> None:
    """Greedy continuation: walk the rest in score order, keeping each entry that still fits.

    Done as repeated prefixes: entries that cost more than what is left can never fit again, so
    drop them, keep the longest prefix of the others that fits, drop the entry that stopped it
    (the best of the rest), and repeat with what is left. With one shared cost nothing is left
    to fill, and no score is computed."""
    cost = pool.cost
    spent = cost.total([cost.amount(mask, torch.count_nonzero(mask), 0, pool.n)])
    rest = torch.nonzero(~mask).squeeze(1)
    scores = None
    while True:
        rest = rest[cost.to_joules(spent + cost.amounts_at(rest)) <= budget_j]  # the rest can never fit
        if not rest.numel():
            return
        if scores is None:
            scores = pool.all_scores()
        candidates = _GatheredPool(rest, scores[rest], cost.gather(rest))
        inner = _select(candidates, budget_j, spent)
        spent = spent + cost.total([candidates.cost.amount(inner, torch.count_nonzero(inner), 0, rest.numel())])
        mask[rest[inner]] = True
        outside = torch.nonzero(~inner).squeeze(1)
        if outside.numel():
            stopper = outside[torch.argmax(candidates.stored[outside])]  # first maximum: lowest index
            outside = outside[outside != stopper]
        rest = rest[outside]


def _fill_layers(pool: _LayeredPool, mask: Tensor, budget_j: float) -> None:
    """The greedy walk after the prefix, with per-layer costs: an entry fits if its layer's next
    entry (fixed_j + marginal_j if the layer is untouched, else marginal_j) fits in what is left.
    All entries of a layer cost the same next, and what is left only shrinks, so a layer whose next
    entry does not fit never fits again: each round keeps the longest prefix of the entries of the
    layers that still fit, then drops the layer of the entry that stopped it."""
    cost: _LayerCosts = pool.cost
    counts = layer_counts(mask, pool.sizes)
    alive = set(range(len(pool.sizes)))
    scores = None
    while True:
        fits = []
        for layer in sorted(alive):
            if counts[layer] < pool.sizes[layer]:
                trial = list(counts)
                trial[layer] += 1
                if cost.joules_of_counts(trial) <= budget_j:
                    fits.append(layer)
        if not fits:
            return
        open_ = ~mask
        for layer in set(range(len(pool.sizes))) - set(fits):
            open_[pool.offsets[layer] : pool.offsets[layer + 1]] = False
        rest = torch.nonzero(open_).squeeze(1)
        if scores is None:
            scores = pool.all_scores()
        spent = torch.tensor(counts, dtype=torch.int64, device=pool.device)
        candidates = _GatheredPool(rest, scores[rest], cost.gather(rest))
        inner = _select(candidates, budget_j, spent)
        mask[rest[inner]] = True
        counts = layer_counts(mask, pool.sizes)
        outside = torch.nonzero(~inner).squeeze(1)
        if not outside.numel():
            return
        stopper = outside[torch.argmax(candidates.stored[outside])]  # first maximum: lowest index
        alive = set(fits) - {int(candidates.cost.layers[stopper])}


# ------------------------------------------------------------- passes for the set-up-aware rule
def gather_at_least(pool: _LayeredPool, thresholds: Sequence[float], narrow: bool = False,
                    above: Sequence[float] | None = None) -> list[tuple[Tensor, Tensor]]:
    """Per layer, the local indices (ascending) and scores of the entries with ``|u| >=
    thresholds[layer]`` (inf: none), in one pass over the layers concerned, shared among the
    worker threads on the CPU; scores exactly as the selection computes them. ``narrow``: int32
    indices where a layer has fewer than 2**31 entries (the numpy pass). ``above`` (the numpy
    pass): per layer a higher threshold (inf: none); the scores of the gathered entries with
    ``|u| >= above[layer]`` are then also picked out while in cache, a third item per layer (a
    numpy array, or None where ``above`` is inf)."""
    n_layers = len(pool.flats)
    if above is not None and not pool.numpy_pass:
        raise AssertionError("above: the numpy pass only")
    empty = (torch.empty(0, dtype=torch.int64, device=pool.device),
             torch.empty(0, dtype=pool.score_dtype, device=pool.device))
    out: list[tuple] = [empty] * n_layers  # the layers not wanted keep nothing
    picked: list[np.ndarray | None] = [None] * n_layers
    wanted = [i for i in range(n_layers) if thresholds[i] < math.inf and pool.sizes[i]]
    if pool.numpy_pass:
        t = np.asarray(thresholds, dtype=np.float64)
        higher = None if above is None else np.asarray(above, dtype=np.float64)
        width = max((stop - start for start, stop, _, _ in pool.chunk_info), default=0)

        def one(layer: int) -> tuple:
            # a layer per task, its comparison chunk by chunk (the absolute values stay in cache)
            # into one flag per entry, then one nonzero and one read of the entries found: the
            # layer's results come out whole, with no pieces to join
            flat = pool.numpy_flats[layer]
            passing = np.empty(flat.size, dtype=np.bool_)
            buffer = np.empty(min(width, flat.size), dtype=pool.numpy_dtype)
            for local in range(0, flat.size, width):
                piece = flat[local : local + width]
                s = np.abs(piece, out=buffer[: piece.size])
                np.greater_equal(s, t[layer], out=passing[local : local + piece.size])
            inside = np.flatnonzero(passing)
            del passing
            magnitudes = flat[inside]  # a copy, made absolute in place
            np.abs(magnitudes, out=magnitudes)
            at = inside.astype(np.int32) if narrow and flat.size < 2**31 else inside
            high = None if higher is None or not higher[layer] < math.inf else magnitudes >= higher[layer]
            scored = pool.numpy_scores(magnitudes, layer, in_place=True)
            return at, scored, None if high is None else np.compress(high, scored)

        for layer, (inside, s, high) in zip(wanted, map_largest_first(one, wanted, [pool.sizes[i] for i in wanted])):
            out[layer] = (torch.from_numpy(inside), torch.from_numpy(s))
            picked[layer] = high
    else:
        for layer in wanted:
            inside = torch.nonzero(pool.flats[layer].abs() >= thresholds[layer]).squeeze(1)
            out[layer] = (inside, pool.scores_at(inside + pool.offsets[layer]))
    if above is not None:
        return [pair + (high,) for pair, high in zip(out, picked)]
    return out


#: relative error the fast retained sums may have, with a wide margin (float32 powers, numpy's
#: pairwise float32 sums of a chunk, about 1e-6; chunks summed exactly); candidates nearer than
#: twice this are compared again with exact sums
RETAINED_TOLERANCE = 1e-3


def retained(pool: _LayeredPool, masks: Sequence[Tensor], exact: bool = False) -> list[float]:
    """For each flat mask over the layers' concatenation, the retained ``sum |u|**power``, all masks
    in one pass shared among the worker threads, summed chunk by chunk in a fixed order. ``exact``:
    float64 throughout; else on the CPU each chunk is summed in float32 (well within
    ``RETAINED_TOLERANCE`` of the exact sum, several times faster)."""
    if not pool.n or not masks:
        return [0.0] * len(masks)
    if pool.numpy_pass:
        flags = [m.numpy() for m in masks]
        width = max((stop - start for start, stop, _, _ in pool.chunk_info), default=0)
        dtype = np.float64 if exact else np.float32

        def powered(values: np.ndarray, out: np.ndarray) -> np.ndarray:
            if pool.nonnegative and pool.power == 1 and values.dtype == dtype:
                return values  # |u| as it is (the sums only read it)
            np.abs(values, out=out)
            if pool.power == 2:
                np.multiply(out, out, out=out)
            elif pool.power != 1:
                np.power(out, pool.power, out=out)
            return out

        def run(group):
            buffer = np.empty(width, dtype=dtype)
            weights = np.empty(width, dtype=dtype)
            out = []
            for start, stop, layer, local in group:
                m = stop - start
                data = pool.numpy_flats[layer][local : local + m]
                s = None
                sums = []
                for f in flags:
                    chunk = f[start:stop]
                    kept = np.count_nonzero(chunk)
                    if 4 * kept < m:  # a sparse mask: only its kept entries are read (pairwise sum)
                        picked = data[np.flatnonzero(chunk)]
                        sums.append(float(powered(picked, np.empty(kept, dtype=dtype)).sum()) if kept else 0.0)
                        continue
                    if s is None:
                        s = powered(data, buffer[:m])
                    w = weights[:m]
                    np.multiply(s, chunk, out=w)  # products by 0 or 1 are exact; numpy's sum is pairwise
                    sums.append(float(w.sum()))
                out.append(sums)
            return out

        parts = in_parallel(run, pool.chunk_groups())
        return [math.fsum(p[i] for p in parts) for i in range(len(masks))]
    totals = []
    for mask in masks:
        total = []
        for layer, flat in enumerate(pool.flats):
            kept = flat[mask[pool.offsets[layer] : pool.offsets[layer + 1]]].to(torch.float64).abs_()
            total.append(float(kept.pow_(pool.power).sum()) if pool.power != 1 else float(kept.sum()))
        totals.append(math.fsum(total))
    return totals
