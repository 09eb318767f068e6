"""Masks under an energy budget: CWMP (cost-weighted magnitude) and the Top-K baseline.

The contract, which later checks rely on: score_i = |u_i|**power / c_i; order the entries by score,
descending, ties by lower flat index; keep the longest prefix of that order whose total cost is
<= the budget. Totals are kept in float64; a cost given as one number totals k entries as k * c.

Why no sort: sorting N entries to keep a prefix costs N log N, several times ``torch.topk``. The
prefix is decided by one score value (where the budget runs out), so this module finds that value
by weighted selection with sampled pivots (Floyd and Rivest's idea, with costs as weights):

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

import bisect
import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Union

import numpy as np
import torch
from torch import Tensor

from cwmp.errors import MaskInputError
from cwmp.parallel import extremes as tensor_extremes
from cwmp.parallel import in_parallel, map_largest_first, outer_threads, workers

__all__ = [
    "cwmp_mask",
    "cwmp_scores",
    "layers_budget_mask",
    "layers_topk_mask",
    "magnitude_budget_mask",
    "topk_mask",
]

Costs = Union[Tensor, float, int]

_EXACT_MAX = 1 << 15  # pools this small are sorted whole instead of sampled
_SAMPLE_MIN, _SAMPLE_MAX = 1 << 10, 1 << 16
_SIGMAS = 3.0  # bracket half-width, in binomial standard deviations of the boundary's sample rank
_CHUNK_CPU, _CHUNK_CUDA = 1 << 18, 1 << 26  # CPU: 1 MB of float32 per thread stays in cache; CUDA: few launches
_SEED = 20240917  # the sample decides only the speed, never the mask; fixed for repeatable timings
_NUMPY_ON_CPU = True  # CPU tensors: numpy kernels on views (faster there); False runs the torch ones
_THRESHOLD_STEPS = 4  # floats an estimated magnitude threshold is walked by before bisecting (it is off by 1 or 2)
_MIN_GROUP = 1 << 19  # entries a thread's task in a pass has at least (less is not worth a thread)


# ------------------------------------------------------------------------------ CPU threading
@contextlib.contextmanager
def single_threaded(device: torch.device | str | None):
    """On the CPU, run torch with one intra-op thread for the duration (restored after).

    The selection's long loops are numpy's (single-threaded) or chunks that stay in cache; between
    them are dozens of small torch operations per call. Each of those above torch's grain size
    wakes the intra-op thread pool, and on a busy machine a wake-up can take tens of milliseconds
    (measured: a 64 Ki-entry torch.sort, 0.3 ms alone, took 200 to 500 ms while other processes
    kept both cores busy). One thread avoids that; the work is the same. Nested uses are free.
    The passes over the whole update still use the caller's thread count, as plain threads
    (``cwmp.parallel``), which sleep on a lock rather than spin.
    """
    if device is None or torch.device(device).type != "cpu" or not _NUMPY_ON_CPU:
        yield
        return
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    token = outer_threads.set(threads)
    try:
        yield
    finally:
        outer_threads.reset(token)
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------- public API
def cwmp_mask(update: Tensor, costs: Costs, budget_j: float, power: float = 1.0, *, fill: bool = False) -> Tensor:
    """Keep the entries of largest ``|update|**power / costs`` until ``budget_j`` joules are spent.

    ``costs`` are joules per kept entry: a number (one cost for the whole tensor, the usual case
    for a layer) or a tensor broadcastable to ``update``. ``power=1`` is the paper's rule;
    ``power=2`` is the exact greedy rule for the squared-error projection. With ``fill=True`` the
    budget left after the prefix is spent on later entries that still fit, in score order.
    Returns a bool tensor of ``update``'s shape.
    """
    return _budget_mask(update, costs, budget_j, power, rank_by_cost=True, fill=fill)


def magnitude_budget_mask(update: Tensor, costs: Costs, budget_j: float, *, fill: bool = False) -> Tensor:
    """Top-K's order (largest ``|update|`` first, ties by lower index) under a budget in joules:
    the longest magnitude-ordered prefix whose cost is <= ``budget_j``. This is the cost-blind
    baseline spending the same energy as CWMP."""
    return _budget_mask(update, costs, budget_j, 1.0, rank_by_cost=False, fill=fill)


def topk_mask(update: Tensor, k: int) -> Tensor:
    """The ``k`` entries of largest magnitude, ties by lower flat index (``torch.topk`` alone does
    not promise which of several equal values it returns). Found by the same sort-free selection as
    CWMP: it is ``magnitude_budget_mask(update, 1.0, k)``."""
    if not isinstance(update, Tensor):
        _check_update(update)  # the error for a non-tensor
    n = update.numel()
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise MaskInputError(f"k must be an int in [0, {n}] (the update's numel), got {k!r}")
    return _budget_mask(update, 1.0, float(k), 1.0, rank_by_cost=False, fill=False)


def cwmp_scores(update: Tensor, costs: Costs, power: float = 1.0) -> Tensor:
    """The scores of the contract, ``|update|**power / costs``, in float32 or wider, exactly as the
    masks compute them chunk by chunk (for analysis and tests)."""
    flat, cost = _validated(update, costs, 0.0, power)
    return _UpdatePool(flat, cost, power, rank_by_cost=True).all_scores().view(update.shape)


# ------------------------------------------------------------------------------------- checks
def _check_update(update: Tensor) -> float:
    """Reject what cannot give a correct mask; return max |update| (0 for an empty update)."""
    if not isinstance(update, Tensor):
        raise MaskInputError(f"update must be a torch.Tensor, got {type(update).__name__}")
    if not update.is_floating_point():
        raise MaskInputError(f"update must be a floating-point tensor, got dtype {update.dtype}")
    if not update.numel():
        return 0.0
    low, high = (float(v) for v in torch.aminmax(update.detach()))  # NaN makes both NaN
    if not (math.isfinite(low) and math.isfinite(high)):
        bad = torch.nonzero(~torch.isfinite(update.detach().reshape(-1))).squeeze(1)
        raise MaskInputError(
            f"update has {bad.numel()} NaN or infinite entries (first at flat index {int(bad[0])}); "
            "a mask of such an update would be meaningless: fix the training step or clip the update"
        )
    return max(-low, high)


def _validated(update: Tensor, costs: Costs, budget_j: float, power: float) -> tuple[Tensor, "_CostModel"]:
    max_magnitude = _check_update(update)
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not (0 < power < math.inf):
        raise MaskInputError(f"power must be a finite number > 0 (1: magnitude / cost, 2: squared), got {power!r}")
    if isinstance(budget_j, bool) or not isinstance(budget_j, (int, float)) or math.isnan(budget_j) or budget_j < 0:
        raise MaskInputError(f"budget_j must be a number of joules >= 0, got {budget_j!r}")
    score_dtype = torch.promote_types(update.dtype, torch.float32)
    cost = _CostModel.of(costs, update.shape, update.device, score_dtype)
    top = max_magnitude**power / cost.min_joules
    if top > torch.finfo(score_dtype).max:
        raise MaskInputError(
            f"scores overflow {score_dtype}: max |update|**{power} / min cost = {top:.3g}; "
            "express the costs in larger units (they only need to be proportional) or use float64 updates"
        )
    return update.detach().reshape(-1), cost


# ---------------------------------------------------------------------------------- cost model
class _CostModel:
    """Joules per entry, and how totals of them are formed.

    An *amount* is what a set of entries costs in the model's own accounting unit: a count for one
    shared cost (so that k entries cost exactly k * c, as the contract says), float64 joules for
    per-entry costs. Totals are compared with the budget as ``to_joules(amount) <= budget``, never
    by subtracting floats. Two kinds: ``_UniformCost`` and ``_EntryCosts``, with the same methods.
    """

    min_joules: float

    @staticmethod
    def of(costs: Costs, shape: torch.Size, device: torch.device, score_dtype: torch.dtype) -> "_CostModel":
        if isinstance(costs, bool) or not isinstance(costs, (Tensor, int, float)):
            raise MaskInputError(
                f"costs must be a number or a tensor of joules per entry, got {type(costs).__name__}"
            )
        if isinstance(costs, Tensor):
            if costs.is_complex() or costs.dtype == torch.bool:
                raise MaskInputError(f"costs must be real numbers of joules, got dtype {costs.dtype}")
            try:
                broadcast = torch.broadcast_shapes(costs.shape, shape)
            except RuntimeError:
                broadcast = None
            if broadcast != shape:
                raise MaskInputError(
                    f"costs of shape {tuple(costs.shape)} do not broadcast to the update's shape {tuple(shape)}; "
                    "give one cost per layer (a number) or a tensor broadcastable to the update"
                )
            if costs.numel() != 1:
                low, high = torch.aminmax(costs.detach())
                _check_cost(float(low), float(high))
                per_entry = costs.detach().to(device).expand(shape).reshape(-1)
                return _EntryCosts(per_entry, float(low), score_dtype)
            costs = costs.item()
        _check_cost(float(costs), float(costs))
        return _UniformCost(float(costs))


def _check_cost(low: float, high: float) -> None:
    if not (low > 0 and high < math.inf):  # NaN fails both comparisons
        raise MaskInputError(
            f"costs must be finite and > 0 joules per entry, got values in [{low}, {high}]; "
            "a free entry has no place in an energy budget: give it a small positive cost"
        )


class _UniformCost(_CostModel):
    def __init__(self, joules: float) -> None:
        self.joules = self.min_joules = joules

    def divisor(self, start: int, stop: int) -> float:
        return self.joules

    def amount(self, mask: Tensor, count: Tensor, start: int, stop: int) -> Tensor:
        return count

    def to_joules(self, amount: float) -> float:
        return amount * self.joules

    def affordable_prefix(self, base: int, n: int, budget_j: float) -> int:
        """How many of the first n entries fit after ``base`` were spent: the largest j <= n with
        (base + j) * c <= budget, found by arithmetic and corrected for rounding."""
        j = min(n, max(0, math.floor(budget_j / self.joules) - base))
        while j < n and (base + j + 1) * self.joules <= budget_j:
            j += 1
        while j > 0 and (base + j) * self.joules > budget_j:
            j -= 1
        return j

    def amount_of_all(self, n: int) -> int:
        """The amount of all ``n`` entries this model prices."""
        return n

    def total(self, amounts: list[Tensor]) -> int:
        return int(torch.stack(amounts).sum())

    def gather(self, index: Tensor) -> "_UniformCost":
        return self

    def amounts_at(self, index: Tensor) -> Tensor:
        return torch.ones(index.shape, dtype=torch.int64, device=index.device)

    def estimate(self, amount, sample: "_Sample", first: int, end: int) -> Tensor:
        """Estimated joules of ``amount`` plus the pool's entries down to each sample point in
        [first, end): for pivots only, so rounding and sampling error cost speed, never exactness."""
        before = sample.cumulative[first - 1] if first else 0.0
        return self.to_joules(amount) + sample.scale * (sample.cumulative[first:end] - before)

    def sorted_sample(self, scores: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """Sample scores, largest first, and the cumulative joules along them (no order needed:
        every entry costs the same)."""
        descending, _ = _sort_descending(scores, order=False)
        counts = torch.arange(1, scores.numel() + 1, dtype=torch.float64, device=descending.device)
        return descending, counts * self.joules


class _EntryCosts(_CostModel):
    def __init__(self, joules: Tensor, min_joules: float, score_dtype: torch.dtype) -> None:
        self.joules, self.min_joules, self.score_dtype = joules, min_joules, score_dtype

    def divisor(self, start: int, stop: int) -> Tensor:
        return self.joules[start:stop].to(self.score_dtype)

    def amount(self, mask: Tensor, count: Tensor, start: int, stop: int) -> Tensor:
        return self.joules[start:stop][mask].sum(dtype=torch.float64)

    def to_joules(self, amount: float) -> float:
        return amount

    estimate = _UniformCost.estimate

    def affordable_prefix(self, base: float, n: int, budget_j: float) -> int:
        return _count_up_to(self.joules[:n].double().cumsum(0) + base, budget_j)

    def amount_of_all(self, n: int) -> float:
        return float(self.joules.sum(dtype=torch.float64))

    def total(self, amounts: list[Tensor]) -> float:
        return float(torch.stack(amounts).sum())

    def gather(self, index: Tensor) -> "_EntryCosts":
        return _EntryCosts(self.joules[index], self.min_joules, self.score_dtype)

    def amounts_at(self, index: Tensor) -> Tensor:
        return self.joules[index].double()

    def sorted_sample(self, scores: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        descending, order = _sort_descending(scores, order=True)
        return descending, self.amounts_at(index[order]).cumsum(0)


def _score(magnitudes: Tensor, divisor: float | Tensor | None, power: float, out: Tensor | None = None) -> Tensor:
    """|u|**power / divisor in the score dtype; the one place a score is computed."""
    dtype = torch.promote_types(magnitudes.dtype, torch.float32)
    if out is None:
        s = magnitudes.abs().to(dtype)
    elif out.dtype == magnitudes.dtype:
        s = torch.abs(magnitudes, out=out)
    else:
        s = out.copy_(magnitudes).abs_()
    if power == 2:
        s.mul_(s)
    elif power != 1:
        s.pow_(power)
    if divisor is not None:
        s.div_(divisor)
    return s


# --------------------------------------------------------------------------------------- pools
class _Pool(ABC):
    """Entries a mask is chosen from: the whole update (scores computed chunk by chunk) or a set
    gathered by an earlier pass (scores stored). ``n`` entries, pool-local indices."""

    n: int
    cost: _CostModel
    device: torch.device
    score_dtype: torch.dtype
    defer_gather = False  # gather the bracketed entries once per pass, not once per chunk

    def chunks(self) -> list[tuple[int, int]]:
        """The [start, stop) ranges a pass walks, each computed as one piece."""
        return _chunks(self.n, self.device)

    def sample_index(self, size: int, generator: torch.Generator) -> Tensor:
        """Uniform sample positions (with replacement)."""
        return torch.randint(self.n, (size,), generator=generator, device=self.device)

    @abstractmethod
    def scores(self, start: int, stop: int, out: Tensor | None) -> Tensor:
        """Scores of entries [start, stop), computed into ``out`` when the pool computes them."""

    @abstractmethod
    def all_scores(self) -> Tensor:
        """All scores, as the passes see them."""

    @abstractmethod
    def sample_scores(self, index: Tensor) -> Tensor:
        """Scores at sampled positions, for pivots only: ``pow`` may round the last bit differently
        outside the chunked pass, so a pivot may miss every entry's score by one ulp."""


class _UpdatePool(_Pool):
    computes_scores = True

    def __init__(self, flat: Tensor, cost: _CostModel, power: float, rank_by_cost: bool) -> None:
        self.flat, self.cost, self.power, self.rank_by_cost = flat, cost, power, rank_by_cost
        self.n, self.device = flat.numel(), flat.device
        self.score_dtype = torch.promote_types(flat.dtype, torch.float32)

    def scores(self, start: int, stop: int, out: Tensor | None) -> Tensor:
        divisor = self.cost.divisor(start, stop) if self.rank_by_cost else None
        return _score(self.flat[start:stop], divisor, self.power, out)

    def all_scores(self) -> Tensor:
        """The scores exactly as the passes compute them (same chunks, so ``pow`` rounds alike)."""
        out = torch.empty(self.n, dtype=self.score_dtype, device=self.device)
        for start, stop in _chunks(self.n, self.device):
            self.scores(start, stop, out[start:stop])
        return out

    def sample_scores(self, index: Tensor) -> Tensor:
        divisor = self.cost.gather(index).divisor(0, index.numel()) if self.rank_by_cost else None
        return _score(self.flat[index], divisor, self.power)


class _GatheredPool(_Pool):
    computes_scores = False

    def __init__(self, index: Tensor, stored: Tensor, cost: _CostModel) -> None:
        self.index, self.stored, self.cost = index, stored, cost
        self.n, self.device, self.score_dtype = stored.numel(), stored.device, stored.dtype

    def scores(self, start: int, stop: int, out: Tensor | None) -> Tensor:
        return self.stored[start:stop]

    def all_scores(self) -> Tensor:
        return self.stored

    def sample_scores(self, index: Tensor) -> Tensor:
        return self.stored[index]


# ----------------------------------------------------------------------------------- selection
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
        if _NUMPY_ON_CPU and self.above.device.type == "cpu":  # numpy's indexing: several times faster
            self.above.numpy()[self.between.index.numpy()[inner.numpy()]] = True
        else:
            self.above[self.between.index[inner]] = True
        return self.above


def _chunks(n: int, device: torch.device) -> list[tuple[int, int]]:
    chunk = _CHUNK_CUDA if device.type == "cuda" else _CHUNK_CPU
    return [(start, min(start + chunk, n)) for start in range(0, n, chunk)]


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
            s, a, b = buffer[:m], above[start:stop], between[:m]
            np.abs(pool.numpy_flats[layer][local : local + m], out=s)
            np.greater_equal(s, t_hi[layer], out=a)
            np.greater_equal(s, t_lo[layer], out=b)
            b ^= a
            inside = np.flatnonzero(b)
            scores = pool.numpy_scores(s[inside], layer, in_place=True)
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
        for _ in range(_THRESHOLD_STEPS):  # the estimate is a float or two off, except near 0
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
    if _NUMPY_ON_CPU and s.device.type == "cpu":
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
    ``_EXACT_MAX`` entries is taken whole ("exhaustive"): its estimates are then exact."""

    def __init__(self, pool: _Pool) -> None:
        self.exhaustive = pool.n <= _EXACT_MAX
        if self.exhaustive:
            self.size = pool.n
            index = torch.arange(pool.n, device=pool.device)
            scores = pool.all_scores()
        else:
            self.size = max(_SAMPLE_MIN, min(_SAMPLE_MAX, int(16 * math.sqrt(pool.n))))
            generator = torch.Generator(device=pool.device).manual_seed(_SEED)
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
        first = _count_up_to(-scores, -hi, inclusive=False)  # sample points above hi
        end = _count_up_to(-scores, -lo)  # ... and at or above lo
        if first >= end:
            return lo, hi
        estimate = self.cost.estimate(above, self, first, end)
        fits = first + _count_up_to(estimate, budget_j)
        if narrow or self.exhaustive:  # one pivot: the score of the first entry that does not fit
            pivot = float(scores[min(fits, end - 1)])
            return pivot, pivot
        margin = math.ceil(_SIGMAS * math.sqrt(fits * max(0.0, 1 - fits / self.size))) + 1
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
            lo = _next_float(p_hi, up=True, dtype=pool.score_dtype)
            n_left = split.n_above - n_kept
        elif cost.to_joules(base + split.upto_amount) <= budget_j:  # everything >= p_lo fits
            if split.n_upto == pool.n:
                return torch.ones(pool.n, dtype=torch.bool, device=pool.device)
            hi = _next_float(p_lo, up=False, dtype=pool.score_dtype)
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


def _sort_descending(values: Tensor, order: bool) -> tuple[Tensor, Tensor | None]:
    """``values`` sorted, largest first, as float64, and (if asked) the order that sorts them; ties
    in any order (callers never depend on it). On the CPU numpy's vectorised sort is used: it is
    many times faster there than torch.sort."""
    if not (_NUMPY_ON_CPU and values.device.type == "cpu"):
        result = torch.sort(values, descending=True)
        return result.values.double(), result.indices if order else None
    negated = -values.double().numpy()
    if not order:
        negated.sort()
        return torch.from_numpy(-negated), None
    permutation = np.argsort(negated)
    return torch.from_numpy(-negated[permutation]), torch.from_numpy(permutation)


def _count_up_to(ascending: Tensor, value: float, inclusive: bool = True) -> int:
    """How many entries of an ascending tensor are <= value (< value when not ``inclusive``)."""
    probe = torch.tensor(value, dtype=ascending.dtype, device=ascending.device)
    return int(torch.searchsorted(ascending, probe, right=inclusive))


def _next_float(value: float, up: bool, dtype: torch.dtype) -> float:
    v = torch.tensor(value, dtype=dtype)
    return float(torch.nextafter(v, torch.tensor(math.inf if up else -math.inf, dtype=dtype)))


def _budget_mask(
    update: Tensor, costs: Costs, budget_j: float, power: float, rank_by_cost: bool, fill: bool
) -> Tensor:
    with single_threaded(update.device if isinstance(update, Tensor) else None):
        flat, cost = _validated(update, costs, budget_j, power)
        budget_j = float(budget_j)
        pool = _UpdatePool(flat, cost, power, rank_by_cost)
        if pool.n == 0:
            return torch.zeros(update.shape, dtype=torch.bool, device=update.device)
        mask = _select(pool, budget_j, 0)
        if fill:
            _fill(pool, mask, budget_j)
        return mask.view(update.shape)


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


# ------------------------------------------------------------------------ many tensors, one budget
# The pruner's case: one budget over all tensors of a model update, one cost per tensor (a layer).
# The contract is the single-tensor one read over the concatenation of the tensors, in their order,
# without making it: score = |u|**power / marginal_j of the entry's layer, ties by position in the
# concatenation, and the longest prefix of that order whose cost is <= the budget, where a prefix
# costs, per layer it keeps k > 0 entries of, ``fixed_j + marginal_j * k`` (summed with math.fsum;
# a layer it keeps nothing of costs nothing). The scores are computed layer by layer, chunk by
# chunk, each layer's scaled by one number; no concatenated copy and no per-entry cost tensor exist.


def layers_budget_mask(
    tensors: Sequence[Tensor] | Layers,
    marginal_j: Sequence[float],
    fixed_j: Sequence[float] | None,
    budget_j: float,
    power: float = 1.0,
    *,
    rank_by_cost: bool = True,
    fill: bool = False,
) -> Tensor:
    """One bool mask over the (virtual) concatenation of ``tensors``, flat, in their order: the
    longest prefix of the score order (``|u|**power / marginal_j[layer]`` when ``rank_by_cost``,
    else ``|u|``; ties by concatenated position) whose cost is ``<= budget_j``, a layer with k > 0
    kept entries costing ``fixed_j[layer] + marginal_j[layer] * k``. With ``fill=True`` the budget
    left is spent on later entries that still fit, in score order (the greedy walk)."""
    with single_threaded(_device_of(tensors)):
        return _layers_budget_mask(tensors, marginal_j, fixed_j, budget_j, power, rank_by_cost, fill)


def _device_of(tensors: Sequence[Tensor]) -> torch.device | None:
    if isinstance(tensors, Layers):
        return tensors.device
    first = next(iter(tensors), None)
    return first.device if isinstance(first, Tensor) else None


def _layers_budget_mask(tensors, marginal_j, fixed_j, budget_j, power, rank_by_cost, fill) -> Tensor:
    layers = tensors if isinstance(tensors, Layers) else check_layers(tensors)
    n_layers = len(layers.flats)
    if len(marginal_j) != n_layers or (fixed_j is not None and len(fixed_j) != n_layers):
        raise MaskInputError(
            f"give one marginal and one fixed cost per tensor: {n_layers} tensors, {len(marginal_j)} "
            f"marginal costs, {'no' if fixed_j is None else len(fixed_j)} fixed costs"
        )
    marginal = [_layer_cost(j, i, "marginal_j", positive=True) for i, j in enumerate(marginal_j)]
    fixed = [0.0] * n_layers if fixed_j is None else [_layer_cost(j, i, "fixed_j") for i, j in enumerate(fixed_j)]
    _check_power_and_budget(power, budget_j)
    divisors = marginal if rank_by_cost else None
    top = [_power_over(m, power, c if divisors else 1.0) for m, c in zip(layers.max_magnitudes, marginal)]
    if top and max(top) > torch.finfo(layers.score_dtype).max:
        raise MaskInputError(
            f"scores overflow {layers.score_dtype}: max |update|**{power} / marginal cost = {max(top):.3g}; "
            "express the costs in larger units (they only need to be proportional) or use float64 updates"
        )
    pool = _LayeredPool(layers, divisors, power)
    if pool.n == 0:
        return torch.zeros(0, dtype=torch.bool, device=pool.device)
    pool.cost = _LayerCosts(marginal, fixed, pool.offsets, top, pool.device)
    mask = _select(pool, float(budget_j), 0)
    if fill:
        _fill_layers(pool, mask, float(budget_j))
    return mask


def layers_topk_mask(tensors: Sequence[Tensor] | Layers, k: int) -> Tensor:
    """Global Top-K over several tensors without concatenating them: one flat bool mask over their
    concatenation keeping the ``k`` entries of largest magnitude, ties by concatenated position."""
    with single_threaded(_device_of(tensors)):
        return _layers_topk_mask(tensors, k)


def _layers_topk_mask(tensors: Sequence[Tensor], k: int) -> Tensor:
    layers = tensors if isinstance(tensors, Layers) else check_layers(tensors)
    n = sum(f.numel() for f in layers.flats)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise MaskInputError(f"k must be an int in [0, {n}] (the entries of all tensors), got {k!r}")
    pool = _LayeredPool(layers, None, 1.0)
    if pool.n == 0:
        return torch.zeros(0, dtype=torch.bool, device=pool.device)
    pool.cost = _UniformCost(1.0)
    return _select(pool, float(k), 0)


def layer_counts(mask: Tensor, sizes: Sequence[int]) -> list[int]:
    """Kept entries per layer of a flat mask over concatenated layers of ``sizes`` entries (one
    host round trip in all, not one per layer)."""
    if not sizes:
        return []
    parts = torch.split(mask, list(sizes))
    if _NUMPY_ON_CPU and mask.device.type == "cpu":
        return [int(np.count_nonzero(p.numpy())) for p in parts]  # many times faster than torch's
    return [int(c) for c in torch.stack([torch.count_nonzero(p) for p in parts]).tolist()]


@dataclass
class Layers:
    """Tensors checked once (``check_layers``), to be given to several selections in place of
    the tensors: their flat views, largest magnitudes, score dtype and device."""

    flats: list[Tensor]
    max_magnitudes: list[float]
    score_dtype: torch.dtype
    device: torch.device
    #: the sample's positions and magnitudes by sample size, shared by the selections over these
    #: tensors (Top-K's energy, then CWMP's masks): the seed is fixed, so the positions are the same
    samples: dict[int, list] = field(default_factory=dict)


def check_layers(tensors: Sequence[Tensor], known: Sequence[tuple[float, float] | None] | None = None) -> Layers:
    """Flat views of the tensors, checked as ``_check_update`` checks one, with one host round trip
    for all of them (their min and max are reduced on their device and fetched together).
    ``known[i]``, where given, is tensor i's (min, max), just computed by the caller (error
    feedback's in-place compensation reduces each residual while it is still in cache)."""
    flats: list[Tensor] = []
    devices = set()
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise MaskInputError(f"tensor {i} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise MaskInputError(f"tensor {i} must be floating-point, got dtype {t.dtype}")
        flats.append(t.detach().reshape(-1))
        devices.add(t.device)
    if len(devices) > 1:
        raise MaskInputError(f"all tensors must be on one device, got {sorted(map(str, devices))}; move them first")
    device = devices.pop() if devices else torch.device("cpu")
    score_dtype = torch.float32
    for f in flats:
        score_dtype = torch.promote_types(score_dtype, f.dtype)
    if isinstance(tensors, Layers):
        raise AssertionError("already checked")
    known = [None] * len(flats) if known is None else list(known)
    if len(known) != len(flats):
        raise AssertionError("one known (min, max) or None per tensor")
    filled = [f for f, k in zip(flats, known) if f.numel() and k is None]
    if filled and device.type == "cpu":  # on the caller's threads
        extremes = map_largest_first(tensor_extremes, filled, [f.numel() for f in filled])
    else:  # one host round trip for all tensors
        extremes = (
            torch.stack([torch.stack(torch.aminmax(f)).to(torch.float64) for f in filled]).tolist() if filled else []
        )
    max_magnitudes, it = [], iter(extremes)
    for i, f in enumerate(flats):
        if not f.numel():
            max_magnitudes.append(0.0)
            continue
        low, high = next(it) if known[i] is None else known[i]
        if not (math.isfinite(low) and math.isfinite(high)):
            try:
                _check_update(f)
            except MaskInputError as exc:
                raise MaskInputError(f"tensor {i}: {exc}") from None
        max_magnitudes.append(max(-low, high))
    return Layers(flats, max_magnitudes, score_dtype, device)


def _power_over(magnitude: float, power: float, divisor: float) -> float:
    try:
        return magnitude**power / divisor
    except OverflowError:
        return math.inf


def _layer_cost(j: float, i: int, what: str, positive: bool = False) -> float:
    number = isinstance(j, (int, float)) and not isinstance(j, bool)
    ok = number and math.isfinite(j) and (j > 0 if positive else j >= 0)
    if not ok:
        raise MaskInputError(
            f"layer {i}: {what} must be a finite number {'> 0' if positive else '>= 0'} of joules, got {j!r}"
        )
    return float(j)


def _check_power_and_budget(power: float, budget_j: float) -> None:
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not (0 < power < math.inf):
        raise MaskInputError(f"power must be a finite number > 0 (1: magnitude / cost, 2: squared), got {power!r}")
    if isinstance(budget_j, bool) or not isinstance(budget_j, (int, float)) or math.isnan(budget_j) or budget_j < 0:
        raise MaskInputError(f"budget_j must be a number of joules >= 0, got {budget_j!r}")


class _LayeredPool(_Pool):
    """The concatenation of several tensors, never made: chunks never cross a layer, and each
    layer's scores are its magnitudes (to the power) divided by the layer's one divisor."""

    computes_scores = True

    def __init__(self, layers: Layers, divisors: Sequence[float] | None, power: float) -> None:
        self.flats, self.power, self.samples = layers.flats, power, layers.samples
        self.device, self.score_dtype = layers.device, layers.score_dtype
        self.sizes = [f.numel() for f in self.flats]
        self.offsets = [0]
        for size in self.sizes:
            self.offsets.append(self.offsets[-1] + size)
        self.n = self.offsets[-1]
        # a device tensor, so that CPU and CUDA both divide (CUDA multiplies by the reciprocal of a
        # Python number, which can differ in the last bit)
        self.divisors = (
            None if divisors is None else torch.tensor(list(divisors), dtype=self.score_dtype, device=self.device)
        )
        self._bounds = torch.tensor(self.offsets, dtype=torch.int64, device=self.device)
        width = _CHUNK_CUDA if self.device.type == "cuda" else _CHUNK_CPU
        self._chunks: list[tuple[int, int]] = []
        self._where: dict[int, tuple[int, int]] = {}
        for layer, (offset, size) in enumerate(zip(self.offsets, self.sizes)):
            for local in range(0, size, width):
                self._chunks.append((offset + local, offset + min(local + width, size)))
                self._where[offset + local] = (layer, local)
        self.defer_gather = not (_NUMPY_ON_CPU and self.device.type == "cpu")
        self._numpy = not self.defer_gather
        self._divisors_np = None if self.divisors is None or not self._numpy else self.divisors.numpy()
        # the all-numpy pass: float32 or float64 layers of the score dtype, power 1 or 2
        self.numpy_pass = (
            self._numpy and power in (1, 2) and all(f.dtype == self.score_dtype for f in self.flats)
            and self.score_dtype in (torch.float32, torch.float64)
        )
        if self.numpy_pass:
            self.numpy_flats = [f.numpy() for f in self.flats]
            self.numpy_divisors = self._divisors_np
            self.numpy_dtype = self.numpy_flats[0].dtype if self.flats else np.dtype(np.float32)
            self.chunk_info = [(start, stop) + self._where[start] for start, stop in self._chunks]

    def numpy_scores(self, magnitudes: np.ndarray, layer, in_place: bool = False) -> np.ndarray:
        """Scores of magnitudes of ``layer`` (an int, or one layer per magnitude), with the very
        operations of ``_score``: the square (power 2), then the IEEE division by the divisor;
        written over ``magnitudes`` when ``in_place``."""
        s = magnitudes if in_place else magnitudes.copy()
        if self.power == 2:
            np.multiply(s, s, out=s)
        if self.numpy_divisors is not None:
            np.divide(s, self.numpy_divisors[layer], out=s)
        return s

    def chunk_groups(self) -> list[list[tuple[int, int, int, int]]]:
        """The chunks in contiguous groups, one task of a pass each: about four per worker thread
        (so that a thread held up by the machine's other work does not hold the pass up), none
        below ``_MIN_GROUP`` entries; one group when one thread is all there is."""
        threads = workers()
        if threads == 1 or self.n < 2 * _MIN_GROUP:
            return [self.chunk_info]
        target = max(_MIN_GROUP, self.n // (4 * threads))
        out: list[list[tuple[int, int, int, int]]] = [[]]
        size = 0
        for chunk in self.chunk_info:
            if size >= target:
                out.append([])
                size = 0
            out[-1].append(chunk)
            size += chunk[1] - chunk[0]
        return out

    def chunks(self) -> list[tuple[int, int]]:
        return self._chunks

    def _divisor(self, layer: int) -> Tensor | None:
        return None if self.divisors is None else self.divisors[layer]

    def scores(self, start: int, stop: int, out: Tensor | None) -> Tensor:
        layer, local = self._where[start]
        piece = self.flats[layer][local : local + stop - start]
        if self._numpy and out is not None and self.power in (1, 2) and piece.dtype == out.dtype:
            o = out.numpy()  # numpy's kernels, on views of the same memory: faster on the CPU
            np.abs(piece.numpy(), out=o)
            if self.power == 2:
                np.multiply(o, o, out=o)
            if self._divisors_np is not None:
                np.divide(o, self._divisors_np[layer], out=o)  # IEEE division, as torch's
            return out
        return _score(piece, self._divisor(layer), self.power, out)

    def all_scores(self) -> Tensor:
        out = torch.empty(self.n, dtype=self.score_dtype, device=self.device)
        for start, stop in self._chunks:
            self.scores(start, stop, out[start:stop])
        return out

    def scores_at(self, index: Tensor) -> Tensor:
        """Scores at ascending concatenated positions: one host round trip for the layer bounds,
        then one gather per layer."""
        bounds = torch.searchsorted(index, self._bounds).tolist()
        parts = []
        for layer in range(len(self.flats)):
            a, b = bounds[layer], bounds[layer + 1]
            if b > a:
                local = index[a:b] - self.offsets[layer]
                magnitudes = self.flats[layer][local].to(self.score_dtype)
                parts.append(_score(magnitudes, self._divisor(layer), self.power))
        return torch.cat(parts) if parts else torch.empty(0, dtype=self.score_dtype, device=self.device)

    def sample_scores(self, index: Tensor) -> Tensor:
        """Scores at the sample's positions, from magnitudes gathered once per sample for all the
        selections over these tensors (the gather, random access, is most of a sample's cost)."""
        cached = self.samples.get(index.numel())
        if cached is None or cached[0] is not index:
            return self.scores_at(index)
        if cached[1] is None:
            bounds = torch.searchsorted(index, self._bounds).tolist()
            parts = [self.flats[layer][index[a:b] - self.offsets[layer]].to(self.score_dtype).abs_()
                     for layer, (a, b) in enumerate(zip(bounds, bounds[1:]))]
            cached[1], cached[2] = parts, bounds
        parts = [_score(part, self._divisor(layer), self.power) for layer, part in enumerate(cached[1]) if part.numel()]
        return torch.cat(parts) if parts else torch.empty(0, dtype=self.score_dtype, device=self.device)

    def sample_index(self, size: int, generator: torch.Generator) -> Tensor:
        cached = self.samples.get(size)
        if cached is not None:
            return cached[0]
        index = super().sample_index(size, generator)  # ascending, for scores_at
        index = torch.from_numpy(np.sort(index.numpy())) if self._numpy else torch.sort(index).values
        self.samples[size] = [index, None, None]
        return index


class _LayerCosts(_CostModel):
    """Per-layer accounting: an amount is a tensor of kept entries per layer (int64, on the
    device), and its joules are ``fsum(fixed_j + marginal_j * k for each layer with k > 0)``: the
    cost map's linear layer cost, evaluated exactly as the cost map evaluates it."""

    def __init__(
        self, marginal: list[float], fixed: list[float], offsets: list[int], max_scores: list[float], device
    ) -> None:
        self.marginal, self.fixed, self.offsets = marginal, fixed, offsets
        self.n_layers = len(marginal)
        self.device = device
        self.min_joules = min(marginal) if marginal else 1.0
        self.marginal_t = torch.tensor(marginal, dtype=torch.float64, device=device)
        self._eye = torch.eye(self.n_layers, dtype=torch.int64, device=device)
        self._starts = torch.tensor(offsets[:-1], dtype=torch.int64, device=device)
        self._layer_ids = torch.arange(self.n_layers, device=device)
        self.has_fixed = any(f > 0 for f in fixed)
        # for the pivots' estimate of fixed costs: each layer's largest score
        self._top = torch.tensor(max_scores, dtype=torch.float64, device=device)
        self._fixed_t = torch.tensor(fixed, dtype=torch.float64, device=device)

    # exact accounting
    def to_joules(self, amount) -> float:
        if not isinstance(amount, Tensor):
            if amount != 0:
                raise AssertionError(f"a layer amount is a per-layer count tensor, got {amount!r}")
            return 0.0
        return self.joules_of_counts(amount.tolist())

    def joules_of_counts(self, counts: Sequence[int]) -> float:
        return math.fsum(self.fixed[l] + self.marginal[l] * k for l, k in enumerate(counts) if k)

    def zero(self) -> Tensor:
        return torch.zeros(self.n_layers, dtype=torch.int64, device=self.device)

    def amount(self, mask: Tensor, count: Tensor, start: int, stop: int) -> Tensor:
        """A chunk of the layered pool lies in one layer."""
        layer = bisect.bisect_right(self.offsets, start) - 1
        return self._eye[layer] * count.to(self.device)

    def total(self, amounts: list[Tensor]) -> Tensor:
        return torch.stack(amounts).sum(0)

    def amount_of_all(self, n: int) -> Tensor:
        raise AssertionError("the whole layered pool is never counted at once")

    def gather(self, index: Tensor) -> "_GatheredLayerCosts":
        return _GatheredLayerCosts(self, self.layer_of(index))

    def layer_of(self, index: Tensor) -> Tensor:
        """The layer of each of ascending concatenated positions: O(n) and no host round trip
        (torch's searchsorted of many values is slow on the CPU)."""
        end = torch.full((1,), index.numel(), dtype=torch.int64, device=index.device)
        per_layer = torch.diff(torch.searchsorted(index, self._starts), append=end)
        return torch.repeat_interleave(self._layer_ids, per_layer, output_size=index.numel())

    # estimates, for pivots only
    def sorted_sample(self, scores: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        return self._sorted_sample(scores, self.layer_of(index))

    def _sorted_sample(self, scores: Tensor, layers: Tensor) -> tuple[Tensor, Tensor]:
        descending, order = _sort_descending(scores, order=True)
        return descending, self.marginal_t[layers[order.to(layers.device)]].cumsum(0)

    def estimate(self, amount, sample: "_Sample", first: int, end: int) -> Tensor:
        """Marginal joules as for one shared cost, plus the fixed joules of each layer not yet
        touched whose largest score is at or above the sample point (it is then kept too)."""
        base = _UniformCost.estimate(self, amount, sample, first, end)
        if not self.has_fixed:
            return base
        if isinstance(amount, Tensor):
            fixed = torch.where(amount == 0, self._fixed_t, 0.0)
        else:
            fixed = self._fixed_t
        points = sample.scores[first:end].to(self.device)  # descending
        # a layer's fixed cost counts from the first sample point at or below its largest score
        start = torch.searchsorted(-points, -self._top.to(points.dtype))  # points above the top
        extra = torch.zeros(points.numel() + 1, dtype=torch.float64, device=self.device)
        extra.scatter_add_(0, start, fixed)
        return base + extra.cumsum(0)[:-1].to(base.device)


class _GatheredLayerCosts(_CostModel):
    """Per-layer accounting for a gathered set: the layer of each entry, ascending (gathered sets
    keep the concatenated order)."""

    def __init__(self, parent: _LayerCosts, layers: Tensor) -> None:
        self.parent, self.layers = parent, layers
        self.min_joules = parent.min_joules

    def to_joules(self, amount) -> float:
        return self.parent.to_joules(amount)

    estimate = _LayerCosts.estimate

    def __getattr__(self, name: str):  # the parent's tables (marginal_t, fixed, ...) for estimate
        return getattr(self.parent, name)

    def amount(self, mask: Tensor, count: Tensor, start: int, stop: int) -> Tensor:
        return self.parent.zero().scatter_add_(0, self.layers[start:stop], mask.to(torch.int64))

    def total(self, amounts: list[Tensor]) -> Tensor:
        return torch.stack(amounts).sum(0)

    def amount_of_all(self, n: int) -> Tensor:
        return self.parent.zero().scatter_add_(0, self.layers, torch.ones_like(self.layers))

    def gather(self, index: Tensor) -> "_GatheredLayerCosts":
        return _GatheredLayerCosts(self.parent, self.layers[index])

    def sorted_sample(self, scores: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        return self.parent._sorted_sample(scores, self.layers[index])

    def affordable_prefix(self, base, n: int, budget_j: float) -> int:
        """The largest j <= n with joules(base + the first j entries) <= budget: estimated from a
        cumulative sum, then corrected by exact evaluation (the cost only grows with j)."""
        if n == 0:
            return 0
        parent = self.parent
        base_counts = base if isinstance(base, Tensor) else parent.zero()
        layers = self.layers[:n]
        step = parent.marginal_t[layers]
        if parent.has_fixed:
            first = torch.ones(n, dtype=torch.bool, device=layers.device)
            first[1:] = layers[1:] != layers[:-1]
            fixed = torch.tensor(parent.fixed, dtype=torch.float64, device=layers.device)
            step = step + torch.where(first & (base_counts[layers] == 0), fixed[layers], 0.0)
        estimate = parent.to_joules(base) + step.cumsum(0)
        j = _count_up_to(estimate, budget_j)

        def exact(j: int) -> float:
            counts = base_counts + parent.zero().scatter_add_(0, layers[:j], torch.ones_like(layers[:j]))
            return parent.to_joules(counts)

        while j < n and exact(j + 1) <= budget_j:
            j += 1
        while j > 0 and exact(j) > budget_j:
            j -= 1
        return j


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
