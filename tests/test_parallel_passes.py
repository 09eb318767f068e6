"""The CPU passes on several threads (cwmp.parallel) and what they rest on: the per-layer magnitude
thresholds that stand for the score comparisons, the piecewise gathering of kept entries, and the
checks that error feedback's compensation hands to the pruner. The masks must not depend on how
many threads ran them."""

from __future__ import annotations

import math
import multiprocessing
import threading
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cwmp.kernels as kernels
import cwmp.masks as masks
import cwmp.pools as pools
import cwmp.selection as selection
import cwmp.parallel as parallel
import cwmp.sparse as sparse
from cwmp import Budget, CostMap, ErrorFeedback, LayerPrice, MaskInputError, Pruner
from cwmp.masks import layers_budget_mask, layers_topk_mask
from tests.mask_tuning import TINY



# ------------------------------------------------------------------------------ in_parallel
@pytest.fixture
def two_threads():
    with parallel.torch_threads(2):
        yield


def test_in_parallel_keeps_the_group_order_and_runs_each_group_once(two_threads):
    seen = []
    lock = threading.Lock()

    def run(group):
        with lock:
            seen.append(group)
        return [group * 10, group * 10 + 1]

    assert parallel.in_parallel(run, list(range(25))) == [v for g in range(25) for v in (g * 10, g * 10 + 1)]
    assert sorted(seen) == list(range(25))


def test_in_parallel_uses_the_callers_thread_count(two_threads):
    idents = set()

    def run(group):
        idents.add(threading.get_ident())
        threading.Event().wait(0.002)  # long enough for the helper to take a group
        return [group]

    parallel.in_parallel(run, list(range(40)))
    assert len(idents) <= 2
    torch.set_num_threads(1)
    idents.clear()
    parallel.in_parallel(run, list(range(10)))
    assert idents == {threading.get_ident()}  # one thread: all on the caller's
    with masks.single_threaded("cpu"):  # torch runs on one thread here, the passes on the caller's count
        assert torch.get_num_threads() == 1 and parallel.workers() == 1
    torch.set_num_threads(2)
    with masks.single_threaded("cpu"):
        assert torch.get_num_threads() == 1 and parallel.workers() == 2
    assert torch.get_num_threads() == 2


def test_in_parallel_runs_first_on_the_callers_thread_while_the_helpers_take_groups(two_threads):
    """``first`` (a serial step hidden behind a pass: the pruner's estimate beside the checks) runs
    once, on the calling thread, before that thread takes groups; the helper starts on the groups
    meanwhile; the results are the groups' in order. With one thread, ``first`` runs before all."""
    caller = threading.get_ident()
    events = []
    lock = threading.Lock()
    helper_started = threading.Event()

    def run(group):
        with lock:
            events.append(("group", group))
        if threading.get_ident() != caller:
            helper_started.set()  # after its group is recorded
        return [group]

    def first():
        assert threading.get_ident() == caller
        helper_started.wait(5.0)  # the helper takes groups while the caller is busy here
        with lock:
            events.append(("first", None))

    assert parallel.in_parallel(run, list(range(30)), first) == list(range(30))
    assert events.count(("first", None)) == 1 and sorted(g for k, g in events if k == "group") == list(range(30))
    assert helper_started.is_set() and events.index(("first", None)) > 0  # groups ran before first ended
    torch.set_num_threads(1)
    events.clear()
    assert parallel.in_parallel(run, [1, 2], first=lambda: events.append(("first", None))) == [1, 2]
    assert events == [("first", None), ("group", 1), ("group", 2)]


def test_in_parallel_raises_what_first_raised_after_the_helpers_stopped(two_threads):
    running = []

    def run(group):
        running.append(group)
        threading.Event().wait(0.001)
        return [group]

    def first():
        threading.Event().wait(0.005)
        raise KeyError("the step beside failed")

    with pytest.raises(KeyError, match="the step beside failed"):
        parallel.in_parallel(run, list(range(200)), first)
    settled = len(running)
    threading.Event().wait(0.02)
    assert len(running) == settled  # the helper had stopped: nothing runs after the call returned


def test_in_parallel_raises_what_a_group_raised_after_every_thread_stopped(two_threads):
    running = []

    def run(group):
        running.append(group)
        if group == 3:
            raise ValueError("group 3 failed")
        threading.Event().wait(0.001)
        return [group]

    with pytest.raises(ValueError, match="group 3 failed"):
        parallel.in_parallel(run, list(range(30)))
    assert len(running) < 30  # the others stopped taking groups
    assert parallel.in_parallel(lambda g: [g], [1, 2, 3]) == [1, 2, 3]  # and the pool still works


def _child_pass(queue) -> None:
    queue.put(parallel.in_parallel(lambda g: [g * 2], list(range(8))))


def test_a_forked_child_gets_threads_of_its_own(two_threads):
    parallel.in_parallel(lambda g: [g], list(range(8)))  # the parent's pool exists
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_pass, args=(queue,))
    child.start()
    child.join(60)
    assert child.exitcode == 0, "the child hung or failed: its copy of the pool has no threads"
    assert queue.get(timeout=5) == [g * 2 for g in range(8)]


# --------------------------------------------------------------------------- the thresholds
def pool_of(divisors, power, dtype=torch.float32):
    layers = masks.check_layers([torch.ones(3, dtype=dtype) for _ in divisors])
    return pools._LayeredPool(layers, divisors, power)


floats32 = st.floats(min_value=0, max_value=float(np.finfo(np.float32).max), width=32)


@settings(max_examples=300, deadline=None)
@given(divisors=st.lists(st.floats(min_value=2.0**-140, max_value=2.0**120, width=32), min_size=1, max_size=5),
       bound=st.one_of(floats32, st.sampled_from([0.0, -1.0, math.inf, 1e-45, 3e38])),
       power=st.sampled_from([1.0, 2.0]), strict=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_a_threshold_is_the_least_magnitude_whose_score_passes(divisors, bound, power, strict, dtype):
    """"score > bound" (or >=) is exactly "magnitude >= t": t passes, the float below it does not."""
    pool = pool_of(divisors, power, dtype)
    t = selection._magnitude_thresholds(pool, bound, strict)
    assert t.dtype == pool.numpy_dtype
    layers = np.arange(len(divisors))

    def passes(x):
        s = pool.numpy_scores(np.asarray(x, dtype=pool.numpy_dtype), layers)
        return s > bound if strict else s >= bound

    with np.errstate(over="ignore"):
        top = np.full(len(divisors), np.finfo(pool.numpy_dtype).max, dtype=pool.numpy_dtype)
        below = np.nextafter(t, np.zeros_like(t))
        for i in range(len(divisors)):
            if math.isinf(t[i]):
                assert not passes(top)[i]  # no finite magnitude passes
            else:
                assert passes(t)[i]
                assert t[i] == 0 or not passes(below)[i]


def test_thresholds_near_zero_and_at_the_edges():
    pool = pool_of([1.0, 3.0], 2.0)
    t = selection._magnitude_thresholds(pool, 0.0, strict=True)  # the least x with x * x / c > 0: far from 0 * c
    assert (t > 0).all() and (pool.numpy_scores(t, np.arange(2)) > 0).all()
    assert (selection._magnitude_thresholds(pool, 0.0, strict=False) == 0).all()
    assert np.isinf(selection._magnitude_thresholds(pool, math.inf, strict=True)).all()


# ------------------------------------------------------------------ masks vs thread counts
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), sizes=st.lists(st.integers(0, 90), min_size=1, max_size=6),
       ratio=st.floats(0, 1), power=st.sampled_from([1.0, 2.0]))
def test_the_masks_do_not_depend_on_the_thread_count(seed, sizes, ratio, power):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.round(torch.randn(n, generator=g) * 4) / 4 for n in sizes]  # ties
    marginal = [float(1 + (i * 7) % 3) for i in range(len(sizes))]
    fixed = [float(i % 2) for i in range(len(sizes))]
    budget = ratio * (sum(sizes) * 3 + len(sizes))
    k = int(ratio * sum(sizes))
    results = []
    for workers in (1, 3):
        with mock.patch.multiple(kernels, **TINY), mock.patch.object(parallel, "MAX_WORKERS", workers), \
                parallel.torch_threads(workers):
            results.append((layers_budget_mask(tensors, marginal, fixed, budget, power), layers_topk_mask(tensors, k)))
    with mock.patch.multiple(kernels, **TINY, NUMPY_ON_CPU=False):  # the torch kernels (CUDA's path)
        results.append((layers_budget_mask(tensors, marginal, fixed, budget, power), layers_topk_mask(tensors, k)))
    for cwmp_mask, topk_mask in results[1:]:
        assert torch.equal(cwmp_mask, results[0][0]) and torch.equal(topk_mask, results[0][1])


# ------------------------------------------------------------------ error feedback's step
SHAPES = {"w": (40, 9), "b": (9,), "v": (123,)}


def pruner() -> Pruner:
    prices = {n: LayerPrice(2.0**-20 * (1 + i), "measured", fixed_j=2.0**-18 * i) for i, n in enumerate(SHAPES)}
    return Pruner(CostMap(prices, simulated=True), Budget.topk_keep_ratio(0.3))


@pytest.mark.parametrize("piece", [1, 5, 64, 1 << 18])
def test_kept_entries_are_gathered_the_same_piece_by_piece(piece):
    g = torch.Generator().manual_seed(piece)
    with mock.patch.object(sparse, "_PIECE", piece):
        feedback = ErrorFeedback()
        for step in range(3):
            update = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
            corrected = feedback.compensate(update)  # not in place: the expected values
            sent, result = pruner().compress(update, feedback, sparse=True)
            for n, mask in result.masks.items():
                flat = mask.reshape(-1)
                assert sent[n].indices.dtype == torch.int32
                assert torch.equal(sent[n].indices.long(), torch.nonzero(flat).squeeze(1))
                assert torch.equal(sent[n].values, corrected[n].reshape(-1)[flat])
                assert torch.equal(feedback.residuals[n], torch.where(mask, 0.0, corrected[n]))
            for whole in (False, True):  # piece by piece, and the one-kernel way a device uses
                target = corrected["w"].clone()
                positions, values = sparse.take_kept(result.masks["w"], target, clear=True, pieces=not whole)
                assert torch.equal(positions, sent["w"].indices) and torch.equal(values, sent["w"].values)
                assert torch.equal(target, feedback.residuals["w"])


def test_compensation_hands_the_pruner_each_residuals_min_and_max():
    feedback = ErrorFeedback()
    g = torch.Generator().manual_seed(0)
    pruner().compress({n: torch.randn(s, generator=g) for n, s in SHAPES.items()}, feedback)
    update = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    corrected = feedback.compensate(update, in_place=True)
    for n, c in corrected.items():
        low, high = torch.aminmax(c)
        assert feedback.extremes_of(c) == (float(low), float(high))
        assert feedback.extremes_of(c.clone()) is None  # only the tensors it returned
    feedback.remember(corrected, {n: torch.zeros(s, dtype=torch.bool) for n, s in SHAPES.items()})
    assert all(feedback.extremes_of(c) is None for c in corrected.values())  # closed: they may change now


def test_a_finite_update_whose_sum_overflows_is_accepted_and_nan_is_not():
    feedback = ErrorFeedback()
    huge = {"w": torch.full((40, 9), 3e38), "b": torch.zeros(9), "v": torch.zeros(123)}
    big_pruner = Pruner(CostMap({n: LayerPrice(1.0, "measured") for n in SHAPES}, simulated=True),
                        Budget.topk_keep_ratio(0.5))
    sent, result = big_pruner.compress(huge, feedback, sparse=True)  # sum is inf, every entry finite
    assert result.kept == round(0.5 * result.total)
    bad = {n: torch.zeros(s) for n, s in SHAPES.items()}
    bad["v"][7] = math.nan
    saved = {n: r.clone() for n, r in feedback.residuals.items()}
    with pytest.raises(MaskInputError, match=r"update 'v' has 1 NaN or infinite entries \(first at flat index 7\)"):
        big_pruner.compress(bad, feedback, sparse=True)
    assert all(torch.equal(feedback.residuals[n], saved[n]) for n in saved)


def test_a_nan_in_a_held_residual_is_refused_whatever_piece_it_is_in():
    import cwmp.feedback as fb

    feedback = ErrorFeedback()
    n, at = 2 * fb._PIECE + 1000, fb._PIECE + 500  # in a later piece than the first
    residual = torch.zeros(n)
    residual[at] = math.nan
    feedback.load_state_dict({"residuals": {"w": residual}})
    prices = CostMap({"w": LayerPrice(1.0, "measured")}, simulated=True)
    with pytest.raises(MaskInputError, match="NaN or infinite"):
        Pruner(prices, Budget.topk_keep_ratio(0.1)).compress({"w": torch.ones(n)}, feedback, sparse=True)
    assert feedback.residuals["w"][0] == 0 and torch.isnan(feedback.residuals["w"][at])  # taken back
    assert feedback.compensate({"w": torch.ones(n)}, in_place=True)  # not stuck half-open


def test_a_compensation_that_fails_takes_back_what_it_added(two_threads, monkeypatch):
    import cwmp.feedback as fb

    feedback = ErrorFeedback()
    names = [f"layer{i}" for i in range(6)]
    feedback.load_state_dict({"residuals": {n: torch.full((1000 * (i + 1),), 2.0) for i, n in enumerate(names)}})
    saved = {n: r.clone() for n, r in feedback.residuals.items()}
    real = fb._add_and_reduce

    def flaky(pair):
        if pair[0].numel() == 3000:
            raise RuntimeError("the addition of layer2 failed")
        return real(pair)

    monkeypatch.setattr(fb, "_add_and_reduce", flaky)
    update = {n: torch.full((1000 * (i + 1),), 1.0) for i, n in enumerate(names)}
    with pytest.raises(RuntimeError, match="layer2 failed"):
        feedback.compensate(update, in_place=True)
    assert all(torch.equal(feedback.residuals[n], saved[n]) for n in names)  # 2 + 1 - 1: exact here
    monkeypatch.setattr(fb, "_add_and_reduce", real)
    corrected = feedback.compensate(update, in_place=True)  # not stuck: the failed call closed itself
    assert all(torch.equal(corrected[n], saved[n] + 1) for n in names)


def test_views_without_a_plain_numpy_view_are_added_by_torch():
    feedback = ErrorFeedback()
    feedback.load_state_dict({"residuals": {"w": torch.ones(1000)}})
    update = torch._neg_view(torch.full((1000,), 3.0))  # .numpy() refuses a negative view
    corrected = feedback.compensate({"w": update}, in_place=True)
    assert torch.equal(corrected["w"], torch.full((1000,), -2.0))
    assert feedback.extremes_of(corrected["w"]) == (-2.0, -2.0)
