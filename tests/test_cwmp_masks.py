"""The mask contract: CWMP keeps the longest score-ordered prefix within the budget, Top-K is its
c = 1 case, and bad input is an error. The fast path is checked against a brute-force reading of
the definition, both with the shipped tuning and with a tiny one that forces every branch (missed
brackets, several chunks, deep recursion) on small tensors."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

import cwmp.costs as cwmp_costs
import cwmp.pools as pools
from cwmp import cwmp_mask, cwmp_scores, magnitude_budget_mask, topk_mask
from cwmp.errors import MaskInputError
from energyprof.errors import EnergyprofError
from tests.mask_tuning import TUNINGS, tuning

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- reference reading
def per_entry(update: torch.Tensor, costs) -> list[float]:
    return torch.as_tensor(costs, dtype=torch.float64).expand(update.shape).reshape(-1).tolist()


def reference_order(update, costs, power, by_cost=True) -> list[int]:
    scores = (cwmp_scores(update, costs, power) if by_cost else update.abs()).reshape(-1).tolist()
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def reference_mask(update, costs, budget, power=1.0, fill=False, by_cost=True) -> torch.Tensor:
    """The definition, read literally: walk the order, stop at the first entry that does not fit
    (or, with fill, skip it and go on)."""
    c = per_entry(update, costs)
    keep = torch.zeros(update.numel(), dtype=torch.bool)
    spent = 0.0
    for i in reference_order(update, costs, power, by_cost):
        if spent + c[i] <= budget:
            spent += c[i]
            keep[i] = True
        elif not fill:
            break
    return keep.view(update.shape)


def mask_cost(update, costs, mask) -> float:
    """The contract's total: k * c for one shared cost, a float64 sum for per-entry costs."""
    if isinstance(costs, float):
        return int(mask.sum()) * costs
    return float(torch.as_tensor(costs, dtype=torch.float64).expand(update.shape)[mask].sum())


# ----------------------------------------------------------------------------------- strategies
def f32(lo: float, hi: float) -> st.SearchStrategy[float]:
    """float32 values: their float64 sums are exact here, so totals do not depend on the order."""
    return st.floats(float(np.float32(lo)), float(np.float32(hi)), width=32)


@st.composite
def problems(draw, max_n: int = 120):
    rows = draw(st.integers(1, 4))
    cols = draw(st.integers(1, max_n // rows))
    n = rows * cols
    if draw(st.booleans()):  # few distinct values: long runs of ties
        values = draw(st.lists(st.sampled_from([0.0, -0.5, 0.5, 1.0, -1.0, 2.0, 3.0]), min_size=n, max_size=n))
    else:
        values = draw(st.lists(f32(-100, 100), min_size=n, max_size=n))
    update = torch.tensor(values, dtype=torch.float32).view(rows, cols)
    kind = draw(st.sampled_from(["layer", "entry", "row"]))
    if kind == "layer":
        costs = float(draw(f32(0.01, 10)))
    elif kind == "entry":
        costs = torch.tensor(draw(st.lists(f32(0.01, 10), min_size=n, max_size=n))).view(rows, cols)
    else:
        costs = torch.tensor(draw(st.lists(f32(0.01, 10), min_size=rows, max_size=rows))).view(rows, 1)
    total = sum(per_entry(update, costs))
    if draw(st.booleans()):
        budget = total * draw(st.floats(0, 1.2))
    else:  # exactly the cost of the first k entries of the order: the boundary case
        power = 1.0
        order = reference_order(update, costs, power)
        k = draw(st.integers(0, n))
        c = per_entry(update, costs)
        budget = float(sum(c[i] for i in order[:k])) if k else 0.0
    power = draw(st.sampled_from([1.0, 2.0, 0.5, 1.5]))
    return update, costs, budget, power


# ----------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("name", TUNINGS)
@settings(max_examples=150, deadline=None)
@given(problem=problems())
def test_matches_the_definition_and_never_exceeds_the_budget(name, problem):
    update, costs, budget, power = problem
    with tuning(name):
        got = cwmp_mask(update, costs, budget, power)
    assert got.dtype == torch.bool and got.shape == update.shape
    assert torch.equal(got, reference_mask(update, costs, budget, power))
    assert mask_cost(update, costs, got) <= budget


@pytest.mark.parametrize("name", TUNINGS)
@settings(max_examples=100, deadline=None)
@given(problem=problems())
def test_fill_is_the_greedy_walk(name, problem):
    update, costs, budget, power = problem
    with tuning(name):
        prefix = cwmp_mask(update, costs, budget, power)
        filled = cwmp_mask(update, costs, budget, power, fill=True)
    assert torch.equal(filled, reference_mask(update, costs, budget, power, fill=True))
    assert bool((filled | ~prefix).all())  # a superset of the prefix
    assert mask_cost(update, costs, filled) <= budget


@pytest.mark.parametrize("name", TUNINGS)
@settings(max_examples=100, deadline=None)
@given(problem=problems())
def test_magnitude_budget_mask_ranks_by_magnitude_only(name, problem):
    update, costs, budget, _ = problem
    with tuning(name):
        got = magnitude_budget_mask(update, costs, budget)
    assert torch.equal(got, reference_mask(update, costs, budget, by_cost=False))


@pytest.mark.parametrize("name", TUNINGS)
@settings(max_examples=100, deadline=None)
@given(problem=problems(), data=st.data())
def test_topk_is_cwmp_with_unit_costs(name, problem, data):
    update = problem[0]
    k = data.draw(st.integers(0, update.numel()))
    with tuning(name):
        top = topk_mask(update, k)
        assert torch.equal(cwmp_mask(update, 1.0, k), top)
        assert torch.equal(cwmp_mask(update, torch.ones_like(update), float(k)), top)
    expected = torch.zeros(update.numel(), dtype=torch.bool)
    expected[reference_order(update, 1.0, 1.0)[:k]] = True
    assert torch.equal(top, expected.view(update.shape))


@pytest.mark.parametrize("name", TUNINGS)
@settings(max_examples=100, deadline=None)
@given(problem=problems(), more=st.floats(0, 50))
def test_monotone_in_the_budget(name, problem, more):
    update, costs, budget, power = problem
    with tuning(name):
        small = cwmp_mask(update, costs, budget, power)
        large = cwmp_mask(update, costs, budget + more, power)
    assert bool((large | ~small).all())


@settings(max_examples=60, deadline=None)
@given(problem=problems(max_n=40))
def test_the_prefix_is_optimal_for_the_fractional_knapsack(problem):
    """max sum(v x) s.t. sum(c x) <= B, 0 <= x <= 1, with v = |u|**power: the prefix plus a fraction
    of the next entry in score order is the LP optimum, and at B = cost(prefix) the prefix alone."""
    update, costs, budget, power = problem
    mask = cwmp_mask(update, costs, budget, power).reshape(-1)
    values = (update.double().abs() ** power).reshape(-1).numpy()
    c = np.array(per_entry(update, costs))
    spent = float(c[mask.numpy()].sum())
    order = reference_order(update, costs, power)
    rest = [i for i in order if not mask[i]]
    greedy = float(values[mask.numpy()].sum())
    if rest:
        greedy += (budget - spent) / c[rest[0]] * values[rest[0]]
    for b, expected in ((budget, greedy), (spent, float(values[mask.numpy()].sum()))):
        lp = linprog(-values, A_ub=c[None, :], b_ub=[b], bounds=(0, 1), method="highs")
        assert lp.status == 0
        assert -lp.fun == pytest.approx(expected, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("name", TUNINGS)
@settings(max_examples=50, deadline=None)
@given(problem=problems())
def test_a_budget_below_every_cost_keeps_nothing(name, problem):
    update, costs, _, power = problem
    cheapest = min(per_entry(update, costs))
    with tuning(name):
        assert not cwmp_mask(update, costs, cheapest * 0.999, power).any()
        assert not cwmp_mask(update, costs, 0.0, power).any()


# ------------------------------------------------------------------------- shipped tuning, big
def vectorised_reference(update, costs, budget, power):
    scores = cwmp_scores(update, costs, power).reshape(-1)
    order = torch.sort(scores, descending=True, stable=True).indices
    totals = torch.as_tensor(costs, dtype=torch.float64).expand(update.shape).reshape(-1)[order].cumsum(0)
    keep = torch.zeros(update.numel(), dtype=torch.bool)
    keep[order[: int((totals <= budget).sum())]] = True
    return keep.view(update.shape)


@pytest.mark.parametrize(
    "case",
    ["gaussian", "rounded", "mostly_zero", "all_equal", "per_entry", "squared", "tiny_budget", "whole_budget"],
)
def test_large_updates_match_the_reference(case):
    g = torch.Generator().manual_seed(7)
    n = 300_000
    update = torch.randn(n, generator=g)
    costs: float | torch.Tensor = 2.5e-9
    fraction, power = 0.1, 1.0
    if case == "rounded":
        update = torch.round(update * 4) / 4
    elif case == "mostly_zero":  # the boundary falls inside 290 000 zeros: a tie group
        update[10_000:] = 0
        fraction = 0.5
    elif case == "all_equal":
        update = torch.full((n,), 0.25)
    elif case == "per_entry":
        costs = (torch.rand(n, generator=g) * 9 + 1) * 1e-9
    elif case == "squared":
        power = 2.0
    elif case == "tiny_budget":
        fraction = 3 / n
    elif case == "whole_budget":
        fraction = 1.0
    total = float(torch.as_tensor(costs, dtype=torch.float64).expand(n).sum())
    budget = total * fraction
    got = cwmp_mask(update, costs, budget, power)
    assert torch.equal(got, vectorised_reference(update, costs, budget, power))
    assert mask_cost(update, costs, got) <= budget


def test_topk_at_a_keep_ratio_on_a_large_update():
    update = torch.randn(500_000, generator=torch.Generator().manual_seed(3))
    k = 5_000
    top = topk_mask(update, k)
    assert int(top.sum()) == k
    assert float(update.abs()[top].min()) >= float(update.abs()[~top].max())
    assert torch.equal(cwmp_mask(update, 1.0, k), top)


def test_a_pivot_that_misses_by_one_ulp_still_gives_the_exact_mask():
    """pow() may round the last bit differently at sampled positions than in the chunked pass; the
    selection must then still end, and exactly. Emulated by nudging every sampled score up."""
    update = torch.full((100_000,), 0.5)
    real = pools._UpdatePool.sample_scores

    def nudged(self, index):
        s = real(self, index)
        return torch.nextafter(s, torch.full_like(s, math.inf))

    with mock.patch.object(pools._UpdatePool, "sample_scores", nudged):
        got = cwmp_mask(update, 1.0, 1234.5, power=1.5)
    expected = torch.zeros(100_000, dtype=torch.bool)
    expected[:1234] = True  # all tied: the lowest indices
    assert torch.equal(got, expected)


@settings(max_examples=300, deadline=None)
@given(
    c=st.floats(1e-12, 10, allow_subnormal=False),
    k=st.integers(0, 10**9),
    nudge=st.sampled_from([-1, 0, 1]),
    base=st.integers(0, 10**6),
)
@example(c=0.3, k=7973049, nudge=0, base=0)  # the division rounds down below k
@example(c=0.1, k=2311729, nudge=-1, base=0)  # the division rounds up to k
def test_one_shared_cost_totals_k_entries_as_k_times_c(c, k, nudge, base):
    """The count that fits is found by division, then corrected where the division rounds."""
    budget = k * c
    if nudge:
        budget = math.nextafter(budget, math.inf if nudge > 0 else 0.0)
    n = 10**10
    j = cwmp_costs._UniformCost(c).affordable_prefix(base, n, budget)
    if j > 0:
        assert (base + j) * c <= budget
    assert (base + j + 1) * c > budget


# ---------------------------------------------------------------------------------- dtypes, CUDA
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_score_in_float32_or_wider(dtype):
    update = torch.randn(5_000, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = cwmp_mask(update, 0.5, 600.0, power=2.0)
    assert torch.equal(got, vectorised_reference(update, 0.5, 600.0, 2.0))
    assert cwmp_scores(update, 0.5).dtype == torch.promote_types(dtype, torch.float32)


def test_scores_are_the_contract_formula():
    update = torch.randn(1_000, generator=torch.Generator().manual_seed(2))
    costs = torch.rand(1_000, generator=torch.Generator().manual_seed(3)) + 0.1
    assert torch.equal(cwmp_scores(update, costs, 1.0), update.abs() / costs)
    assert torch.equal(cwmp_scores(update, costs, 2.0), update.abs() ** 2 / costs)
    torch.testing.assert_close(cwmp_scores(update, costs, 1.5), update.abs() ** 1.5 / costs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available here")
@pytest.mark.parametrize("power", [1.0, 2.0])
@pytest.mark.parametrize("per_entry_costs", [False, True])
def test_cpu_and_cuda_agree(power, per_entry_costs):
    g = torch.Generator().manual_seed(11)
    update = torch.randn(3_000_000, generator=g)
    update[::7] = torch.round(update[::7])  # some ties
    costs = torch.rand(update.shape, generator=g) + 0.5 if per_entry_costs else 0.75
    budget = 0.05 * float(torch.as_tensor(costs, dtype=torch.float64).expand(update.shape).sum())
    cpu = cwmp_mask(update, costs, budget, power)
    cuda_costs = costs.cuda() if per_entry_costs else costs
    gpu = cwmp_mask(update.cuda(), cuda_costs, budget, power)
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)
    assert torch.equal(topk_mask(update.cuda(), 30_000).cpu(), topk_mask(update, 30_000))


# ----------------------------------------------------------------------------------------- errors
GOOD = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, -1.0]])


@pytest.mark.parametrize(
    "update, costs, budget, power, message",
    [
        (torch.tensor([1.0, float("nan")]), 1.0, 1.0, 1.0, "NaN or infinite"),
        (torch.tensor([1.0, float("inf")]), 1.0, 1.0, 1.0, "NaN or infinite"),
        (torch.tensor([1.0, -float("inf")]), 1.0, 1.0, 1.0, "first at flat index 1"),
        (torch.tensor([1, 2]), 1.0, 1.0, 1.0, "floating-point"),
        (GOOD, 0.0, 1.0, 1.0, "finite and > 0"),
        (GOOD, -1.0, 1.0, 1.0, "finite and > 0"),
        (GOOD, float("nan"), 1.0, 1.0, "finite and > 0"),
        (GOOD, torch.tensor([1.0, 2.0, float("inf")]), 1.0, 1.0, "finite and > 0"),
        (GOOD, torch.tensor([1.0, 0.0, 1.0]), 1.0, 1.0, "finite and > 0"),
        (GOOD, torch.ones(3, 2), 1.0, 1.0, "do not broadcast"),
        (GOOD, torch.ones(2, 3, 1), 1.0, 1.0, "do not broadcast"),
        (GOOD, "1.0", 1.0, 1.0, "number or a tensor"),
        (GOOD, torch.ones(3, dtype=torch.complex64), 1.0, 1.0, "real numbers"),
        ([1.0, 2.0], 1.0, 1.0, 1.0, "must be a torch.Tensor"),
        (GOOD, 1.0, -0.1, 1.0, "budget_j"),
        (GOOD, 1.0, float("nan"), 1.0, "budget_j"),
        (GOOD, 1.0, 1.0, 0.0, "power"),
        (GOOD, 1.0, 1.0, float("inf"), "power"),
        (torch.tensor([1e30]), 1e-20, 1.0, 2.0, "overflow"),
    ],
)
def test_bad_input_is_an_error_not_a_mask(update, costs, budget, power, message):
    with pytest.raises(MaskInputError, match=message) as info:
        cwmp_mask(update, costs, budget, power)
    assert isinstance(info.value, EnergyprofError)


@pytest.mark.parametrize("k", [-1, 7, 2.0, True])
def test_topk_rejects_a_k_outside_the_tensor(k):
    with pytest.raises(MaskInputError, match="k must be an int in"):
        topk_mask(GOOD, k)


def test_empty_update_and_infinite_budget():
    assert cwmp_mask(torch.empty(0, 3), 1.0, 5.0).shape == (0, 3)
    assert cwmp_mask(GOOD, 1.0, math.inf).all()
    assert topk_mask(GOOD, 0).sum() == 0 and topk_mask(GOOD, 6).all()


def test_the_speed_benchmark_runs_and_checks_its_masks(capsys):
    spec = importlib.util.spec_from_file_location("mask_speed", ROOT / "benchmarks" / "mask_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--sizes", "20000", "--keep", "0.01", "0.5", "--repeats", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if not line.startswith("#")][1:]
    assert len(rows) == 2 and all(row[-1] == "yes" for row in rows)


def test_a_budget_exactly_at_a_prefix_cost_with_many_zero_entries_terminates():
    """Regression: equal per-entry costs given as a tensor, a third of the entries exactly 0, and a
    budget that is exactly the cost of k entries (what a Top-K energy budget is) made the pivot
    search loop forever once float sums of the same entries, grouped differently, disagreed by one
    rounding. Run in a subprocess so that a hang fails the test instead of the suite."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import math, torch
        from cwmp import cwmp_mask
        g = torch.Generator().manual_seed(0)
        for trial in range(8):
            n = 152074
            flat = torch.randn(n, generator=g) * 1e-3
            flat[torch.randperm(n, generator=g)[:41709]] = 0
            costs = torch.full((n,), 6.8e-10, dtype=torch.float64)
            k = 7604 + trial
            budget = math.fsum([6.8e-10] * k)
            m = cwmp_mask(flat, costs, budget, 1.0)
            kept = int(m.sum())
            assert kept in (k - 1, k), (trial, kept, k)  # k - 1 only when a float sum rounds over
            assert math.fsum(costs[m].tolist()) <= budget * (1 + 1e-12)
        print("done")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "done" in r.stdout, r.stderr
