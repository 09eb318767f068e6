"""The pruner at model scale: one budget over many tensors, selected without concatenating them,
with per-layer fixed costs; checked against a literal walk over the concatenation. Also the cost
map's exact energy as the last word (a non-linear cost map), in-place error feedback, and CPU/CUDA
agreement."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.mask_tuning import TUNINGS, tuning
from tests.profile_helpers import layer_entry, profile_with_layers
from cwmp import Budget, CostMap, CostMapError, ErrorFeedback, FeedbackStateError, LayerPrice, MaskInputError, Pruner
from cwmp.masks import check_layers, cwmp_scores, layers_budget_mask, layers_topk_mask
from cwmp.pools import _LayeredPool

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- the reference
def layer_joules(counts, marginal, fixed) -> float:
    """The contract's cost of keeping counts[l] entries of each layer l."""
    return math.fsum(fixed[l] + marginal[l] * k for l, k in enumerate(counts) if k)


def reference_mask(tensors, marginal, fixed, budget, power=1.0, by_cost=True, fill=False) -> torch.Tensor:
    """Walk the concatenation in score order (ties by position); keep an entry if the layer costs
    after keeping it fit the budget; stop at the first that does not (or skip it, with fill)."""
    entries = []
    offset = 0
    for layer, t in enumerate(tensors):
        scores = (cwmp_scores(t, marginal[layer], power) if by_cost else t.abs()).reshape(-1).tolist()
        entries += [(-s, offset + i, layer) for i, s in enumerate(scores)]
        offset += t.numel()
    keep = torch.zeros(offset, dtype=torch.bool)
    counts = [0] * len(tensors)
    for _, position, layer in sorted(entries):
        counts[layer] += 1
        if layer_joules(counts, marginal, fixed) <= budget:
            keep[position] = True
        else:
            counts[layer] -= 1
            if not fill:
                break
    return keep


def mask_counts(mask, tensors):
    return [int(m.sum()) for m in torch.split(mask, [t.numel() for t in tensors])]


# ----------------------------------------------------------------------------------- strategies
def f32(lo: float, hi: float):
    return st.floats(float(np.float32(lo)), float(np.float32(hi)), width=32)


@st.composite
def layered_problems(draw, max_layers: int = 4, max_entries: int = 40):
    n_layers = draw(st.integers(1, max_layers))
    tensors = []
    for _ in range(n_layers):
        shape = draw(st.sampled_from([(0,), (1,), (3,), (2, 5), (max_entries,), (4, 4)]))
        n = math.prod(shape)
        if draw(st.booleans()):  # ties within and across layers
            values = draw(st.lists(st.sampled_from([0.0, 0.5, -0.5, 1.0, 2.0]), min_size=n, max_size=n))
        else:
            values = draw(st.lists(f32(-10, 10), min_size=n, max_size=n))
        tensors.append(torch.tensor(values, dtype=torch.float32).view(shape))
    # powers of two: scores and totals exact, so ties across layers are real ties
    marginal = [2.0 ** draw(st.integers(-3, 3)) for _ in range(n_layers)]
    if draw(st.booleans()):
        fixed = [0.0] * n_layers
    else:
        fixed = [draw(st.sampled_from([0.0, 0.25, 1.0, 4.0, 16.0])) for _ in range(n_layers)]
    total = layer_joules([t.numel() for t in tensors], marginal, fixed)
    budget = total * draw(st.floats(0, 1.1))
    if draw(st.booleans()):  # exactly what a prefix of the order costs: the boundary case
        scores = []
        for layer, t in enumerate(tensors):
            values = cwmp_scores(t, marginal[layer]).reshape(-1).tolist()
            scores += [(-s, len(scores) + i, layer) for i, s in enumerate(values)]
        k = draw(st.integers(0, len(scores)))
        counts = [0] * n_layers
        for _, _, layer in sorted(scores)[:k]:
            counts[layer] += 1
        budget = layer_joules(counts, marginal, fixed)
    power = draw(st.sampled_from([1.0, 2.0]))
    return tensors, marginal, fixed, budget, power


# ----------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("name", TUNINGS)
@settings(max_examples=120, deadline=None)
@given(problem=layered_problems(), by_cost=st.booleans())
def test_layers_match_the_walk_over_the_concatenation(name, problem, by_cost):
    tensors, marginal, fixed, budget, power = problem
    with tuning(name):
        got = layers_budget_mask(tensors, marginal, fixed, budget, power if by_cost else 1.0, rank_by_cost=by_cost)
    expected = reference_mask(tensors, marginal, fixed, budget, power if by_cost else 1.0, by_cost)
    assert torch.equal(got, expected)
    assert layer_joules(mask_counts(got, tensors), marginal, fixed) <= budget


@pytest.mark.parametrize("name", TUNINGS)
@settings(max_examples=60, deadline=None)
@given(problem=layered_problems())
def test_layers_fill_is_the_greedy_walk(name, problem):
    tensors, marginal, fixed, budget, power = problem
    with tuning(name):
        got = layers_budget_mask(tensors, marginal, fixed, budget, power, fill=True)
    assert torch.equal(got, reference_mask(tensors, marginal, fixed, budget, power, fill=True))


@pytest.mark.parametrize("name", TUNINGS)
@settings(max_examples=80, deadline=None)
@given(problem=layered_problems(), data=st.data())
def test_layers_topk_is_topk_of_the_concatenation(name, problem, data):
    tensors = problem[0]
    n = sum(t.numel() for t in tensors)
    k = data.draw(st.integers(0, n))
    with tuning(name):
        got = layers_topk_mask(tensors, k)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    order = sorted(range(n), key=lambda i: (-abs(float(flat[i])), i))
    expected = torch.zeros(n, dtype=torch.bool)
    expected[order[:k]] = True
    assert torch.equal(got, expected)


def test_large_layers_match_a_sorted_reference():
    """Shipped tuning on a few hundred thousand entries: ties, very unequal layer sizes, fixed costs
    that decide where the budget runs out."""
    g = torch.Generator().manual_seed(4)
    tensors = [torch.randn(300, 700, generator=g), torch.randn(64, generator=g), torch.randn(90_000, generator=g),
               torch.zeros(5_000), torch.round(torch.randn(40_000, generator=g) * 2) / 2]
    marginal = [2.0**-30, 2.0**-28, 2.0**-31, 2.0**-29, 2.0**-30]
    fixed = [2.0**-12, 2.0**-14, 0.0, 2.0**-13, 2.0**-10]
    flat_scores = torch.cat([cwmp_scores(t, c).reshape(-1) for t, c in zip(tensors, marginal)])
    layer = torch.repeat_interleave(torch.arange(5), torch.tensor([t.numel() for t in tensors]))
    order = torch.sort(flat_scores, descending=True, stable=True).indices
    step = torch.tensor(marginal, dtype=torch.float64)[layer[order]]
    first = torch.full((5,), len(order)).scatter_reduce(0, layer[order], torch.arange(len(order)), "amin")
    step[first[first < len(order)]] += torch.tensor(fixed, dtype=torch.float64)[first < len(order)]
    cumulative = step.cumsum(0)  # exact: dyadic costs
    for fraction in (0.0, 1e-4, 0.01, 0.3, 0.99, 1.0):
        budget = float(cumulative[-1]) * fraction
        expected = torch.zeros(len(order), dtype=torch.bool)
        expected[order[: int((cumulative <= budget).sum())]] = True
        assert torch.equal(layers_budget_mask(tensors, marginal, fixed, budget), expected)


def test_mixed_dtypes_and_empty_updates():
    g = torch.Generator().manual_seed(8)
    tensors = [torch.randn(500, generator=g).half(), torch.randn(20, 30, generator=g), torch.zeros(0)]
    marginal, fixed = [2.0**-3, 2.0**-1, 1.0], [4.0, 0.0, 1.0]
    for tuning_name in TUNINGS:
        with tuning(tuning_name):
            for budget in (0.0, 10.0, 60.0, 400.0):
                got = layers_budget_mask(tensors, marginal, fixed, budget)
                assert torch.equal(got, reference_mask(tensors, marginal, fixed, budget))
    empty = Pruner(cost_map([], [], []), Budget.topk_keep_ratio(0.5)).masks({})
    assert empty.masks == {} and empty.kept == empty.total == 0 and empty.predicted_j == 0.0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda t: layers_budget_mask(t, [1.0], [0.0], 1.0), "one marginal and one fixed cost per tensor"),
        (lambda t: layers_budget_mask(t, [1.0, 0.0], None, 1.0), r"layer 1: marginal_j must be .* > 0"),
        (lambda t: layers_budget_mask(t, [1.0, 1.0], [0.0, -1.0], 1.0), r"layer 1: fixed_j must be .* >= 0"),
        (lambda t: layers_budget_mask(t, [1.0, math.nan], None, 1.0), "marginal_j"),
        (lambda t: layers_budget_mask(t, [1.0, 1.0], None, -1.0), "budget_j"),
        (lambda t: layers_budget_mask([t[0], torch.tensor([1.0, math.nan])], [1.0, 1.0], None, 1.0),
         "tensor 1: .*NaN or infinite.*first at flat index 1"),
        (lambda t: layers_budget_mask([t[0], torch.tensor([1, 2])], [1.0, 1.0], None, 1.0), "floating-point"),
        (lambda t: layers_topk_mask(t, 99), "k must be an int"),
    ],
)
def test_layered_bad_input_is_an_error(call, message):
    with pytest.raises(MaskInputError, match=message):
        call([torch.ones(3), torch.ones(2, 2)])


# ------------------------------------------------------------------------------- the pruner
def cost_map(names_shapes, marginal, fixed, cls=CostMap) -> CostMap:
    prices = {n: LayerPrice(m, "measured", fixed_j=f) for (n, _), m, f in zip(names_shapes, marginal, fixed)}
    return cls(prices, simulated=True)


LAYERS = [("a.weight", (8, 16)), ("a.bias", (8,)), ("b.weight", (4, 8)), ("b.bias", (4,))]


def updates_of(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in LAYERS}


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), fraction=st.floats(0, 1.05), method=st.sampled_from(["cwmp", "topk"]),
       fixed=st.lists(st.sampled_from([0.0, 2.0**-20, 2.0**-16]), min_size=4, max_size=4))
def test_pruner_with_fixed_costs_matches_the_walk(seed, fraction, method, fixed):
    marginal = [2.0**-30, 2.0**-27, 2.0**-29, 2.0**-26]
    cmap = cost_map(LAYERS, marginal, fixed)
    updates = updates_of(seed)
    tensors = list(updates.values())
    budget_j = layer_joules([t.numel() for t in tensors], marginal, fixed) * fraction
    result = Pruner(cmap, Budget.of_joules(budget_j), method=method, rule="prefix").masks(updates)
    expected = reference_mask(tensors, marginal, fixed, budget_j, by_cost=method == "cwmp")
    assert torch.equal(torch.cat([m.reshape(-1) for m in result.masks.values()]), expected)
    assert result.predicted_j == cmap.predicted_joules(result.masks) <= budget_j
    assert result.joules_by_layer == cmap.joules_by_layer(result.masks)


def test_topk_energy_includes_the_fixed_costs_of_the_layers_topk_touches():
    marginal, fixed = [2.0**-30, 2.0**-27, 2.0**-29, 2.0**-26], [2.0**-20, 2.0**-18, 0.0, 2.0**-17]
    cmap = cost_map(LAYERS, marginal, fixed)
    updates = updates_of(3)
    updates["b.bias"] = updates["b.bias"] * 1e-3  # Top-K keeps nothing of it: no fixed cost
    tensors = list(updates.values())
    n = sum(t.numel() for t in tensors)
    k = round(0.1 * n)
    top = Pruner(cmap, Budget.topk_keep_ratio(0.1), method="topk").masks(updates)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    order = sorted(range(n), key=lambda i: (-abs(float(flat[i])), i))
    expected = torch.zeros(n, dtype=torch.bool)
    expected[order[:k]] = True
    assert torch.equal(torch.cat([m.reshape(-1) for m in top.masks.values()]), expected)
    counts = mask_counts(expected, tensors)
    assert counts[3] == 0 and all(counts[:3])
    assert top.budget_j == top.predicted_j == layer_joules(counts, marginal, fixed)
    cw = Pruner(cmap, Budget.topk_keep_ratio(0.1), method="cwmp", rule="prefix").masks(updates)
    assert cw.budget_j == top.budget_j and cw.predicted_j <= cw.budget_j
    assert torch.equal(torch.cat([m.reshape(-1) for m in cw.masks.values()]),
                       reference_mask(tensors, marginal, fixed, top.budget_j))


class ConcaveCostMap(CostMap):
    """A cost map whose layer cost is not linear in k: a concave extra term, as a cache-line count
    would add. The pruner must keep to the budget by this function, not by its own arithmetic."""

    extra_j = 2.0**-22

    def layer_joules(self, name, mask, kept=None):
        k = int(torch.count_nonzero(mask)) if kept is None else kept
        linear = super().layer_joules(name, mask, kept=k)
        return linear + (self.extra_j * math.sqrt(k) if k else 0.0)


@pytest.mark.parametrize("method", ["cwmp", "topk"])
@pytest.mark.parametrize("fraction", [0.02, 0.1, 0.3, 0.6, 1.0])
def test_a_non_linear_cost_map_never_sees_its_budget_exceeded(method, fraction):
    marginal, fixed = [2.0**-30, 2.0**-27, 2.0**-29, 2.0**-26], [2.0**-20, 2.0**-18, 0.0, 2.0**-17]
    cmap = cost_map(LAYERS, marginal, fixed, cls=ConcaveCostMap)
    linear = cost_map(LAYERS, marginal, fixed)
    updates = updates_of(11)
    budget_j = linear.predicted_joules({n: torch.ones_like(u, dtype=torch.bool) for n, u in updates.items()}) * fraction
    result = Pruner(cmap, Budget.of_joules(budget_j), method=method, rule="prefix").masks(updates)
    assert result.predicted_j == math.fsum(cmap.joules_by_layer(result.masks).values())
    assert result.predicted_j <= budget_j
    plain = Pruner(linear, Budget.of_joules(budget_j), method=method, rule="prefix").masks(updates)
    if (method, fraction) in {("cwmp", 0.3), ("cwmp", 0.6), ("cwmp", 1.0), ("topk", 1.0)}:
        # the linear selection alone would be over the budget; the pruner keeps fewer, not none
        assert math.fsum(cmap.joules_by_layer(plain.masks).values()) > budget_j
        assert 0 < result.kept < plain.kept
        kept = torch.cat([m.reshape(-1) for m in result.masks.values()])
        assert torch.equal(kept & torch.cat([m.reshape(-1) for m in plain.masks.values()]), kept)  # a prefix


def test_a_cost_map_that_charges_for_nothing_is_refused():
    class Broken(CostMap):
        def layer_joules(self, name, mask, kept=None):
            return 1.0

    cmap = cost_map(LAYERS, [1e-9] * 4, [0.0] * 4, cls=Broken)
    with pytest.raises(MaskInputError, match="keeping nothing"):
        Pruner(cmap, Budget.of_joules(1e-9)).masks(updates_of(0))


def test_cost_map_fixed_costs_from_a_profile():
    profile = profile_with_layers("m", [layer_entry("a.weight", [8, 16], 2e-9, fixed_j=3e-6, ci=(1e-9, 3e-9))])
    cmap = CostMap.from_profile(profile, "m", updates_of(0), allow_predicted=True)
    assert cmap.fixed_j("a.weight") == 3e-6 and cmap.marginal_j("a.weight") == cmap["a.weight"] == 2e-9
    assert "b.weight" in cmap.predicted_layers  # predicted through the cost model, with its fixed part
    assert cmap.fixed_j("b.weight") == pytest.approx(profile.predict_layer(updates_of(0)["b.weight"].numel(), "float32").fixed_j)
    mask = torch.zeros(8, 16, dtype=torch.bool)
    assert cmap.layer_joules("a.weight", mask) == 0.0
    mask[0, :3] = True
    assert cmap.layer_joules("a.weight", mask) == 3e-6 + 2e-9 * 3
    with pytest.raises(CostMapError, match="fixed_j must be finite and >= 0"):
        CostMap({"w": LayerPrice(1e-9, "measured", fixed_j=-1.0)}, simulated=False)
    with pytest.raises(CostMapError, match="no layer 'zz'"):
        cmap.fixed_j("zz")


# ------------------------------------------------------------------------------ error feedback
def test_error_feedback_step_works_in_the_residual_it_holds():
    marginal, fixed = [2.0**-30, 2.0**-27, 2.0**-29, 2.0**-26], [2.0**-20, 0.0, 0.0, 2.0**-17]
    pruner = Pruner(cost_map(LAYERS, marginal, fixed), Budget.topk_keep_ratio(0.1))
    feedback = ErrorFeedback()
    owed = {n: torch.zeros(s) for n, s in LAYERS}
    sent_total = {n: torch.zeros(s) for n, s in LAYERS}
    buffers = None
    for step in range(4):
        updates = updates_of(step)
        before = {n: u.clone() for n, u in updates.items()}
        expected_corrected = {n: u + feedback.residuals[n] if n in feedback.residuals else u.clone()
                              for n, u in updates.items()}
        sent, result = pruner.compress(updates, feedback)
        assert all(torch.equal(updates[n], before[n]) for n in updates)  # the caller's update untouched
        for n in updates:
            kept = result.masks[n]
            assert torch.equal(sent[n], torch.where(kept, expected_corrected[n], 0.0))
            assert torch.equal(feedback.residuals[n], torch.where(kept, 0.0, expected_corrected[n]))
            owed[n] += updates[n]
            sent_total[n] += sent[n]
            torch.testing.assert_close(sent_total[n] + feedback.residuals[n], owed[n])
        pointers = {n: r.data_ptr() for n, r in feedback.residuals.items()}
        if buffers is not None:
            assert pointers == buffers  # the same residual buffers, updated in place
        buffers = pointers


def test_a_bad_update_leaves_the_feedback_state_as_it_was():
    pruner = Pruner(cost_map(LAYERS, [1e-9] * 4, [0.0] * 4), Budget.topk_keep_ratio(0.1))
    feedback = ErrorFeedback()
    pruner.compress(updates_of(0), feedback)
    saved = {n: r.clone() for n, r in feedback.residuals.items()}
    bad = updates_of(1)
    bad["a.bias"][3] = math.nan
    with pytest.raises(MaskInputError, match=r"update 'a\.bias' has 1 NaN"):
        pruner.compress(bad, feedback)
    with pytest.raises(CostMapError, match="no layer 'extra'"):
        pruner.compress({**updates_of(1), "extra": torch.ones(2)}, feedback)
    assert all(torch.equal(feedback.residuals[n], saved[n]) for n in saved)
    feedback.compensate(updates_of(2), in_place=True)
    with pytest.raises(FeedbackStateError, match="twice without remember"):
        feedback.compensate(updates_of(2), in_place=True)


# ---------------------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available here")
@pytest.mark.parametrize("method", ["cwmp", "topk"])
def test_cpu_and_cuda_pruners_agree(method):
    from energyprof.models import build_model

    model = build_model("resnet18")
    g = torch.Generator().manual_seed(5)
    updates = {n: torch.randn(p.shape, generator=g) * (1 + i % 7) for i, (n, p) in enumerate(model.named_parameters())}
    for u in list(updates.values())[::5]:
        u.copy_(torch.round(u * 4) / 4)  # ties
    prices = {n: LayerPrice(2.0**-30 * (1 + i % 5), "measured", fixed_j=2.0**-20 * (i % 3))
              for i, n in enumerate(updates)}
    cmap = CostMap(prices, simulated=True)
    for budget in (Budget.topk_keep_ratio(0.01), Budget.topk_keep_ratio(0.1), Budget.of_joules(1e-4)):
        cpu = Pruner(cmap, budget, method=method).masks(updates)
        gpu = Pruner(cmap, budget, method=method).masks({n: u.cuda() for n, u in updates.items()})
        assert all(gpu.masks[n].is_cuda and torch.equal(gpu.masks[n].cpu(), cpu.masks[n]) for n in updates)
        assert gpu.predicted_j == cpu.predicted_j and gpu.budget_j == cpu.budget_j
    feedback_cpu, feedback_gpu = ErrorFeedback(), ErrorFeedback()
    pruner = Pruner(cmap, Budget.topk_keep_ratio(0.01), method=method)
    for _ in range(2):
        sent_cpu, _ = pruner.compress(updates, feedback_cpu)
        sent_gpu, _ = pruner.compress({n: u.cuda() for n, u in updates.items()}, feedback_gpu)
        assert all(torch.equal(sent_gpu[n].cpu(), sent_cpu[n]) for n in updates)
    sparse_cpu, sparse_gpu = ErrorFeedback(), ErrorFeedback()
    for _ in range(2):  # the sparse output: the same positions and values on both
        wire_cpu, _ = pruner.compress(updates, sparse_cpu, sparse=True)
        wire_gpu, _ = pruner.compress({n: u.cuda() for n, u in updates.items()}, sparse_gpu, sparse=True)
        assert all(wire_gpu[n].values.is_cuda for n in updates)
        assert all(torch.equal(wire_gpu[n].indices.cpu(), wire_cpu[n].indices)
                   and torch.equal(wire_gpu[n].values.cpu(), wire_cpu[n].values) for n in updates)
        assert all(torch.equal(sparse_gpu.residuals[n].cpu(), sparse_cpu.residuals[n]) for n in updates)


# ----------------------------------------------------------------------------------- benchmark
def test_the_prune_speed_benchmark_runs_and_checks_its_masks(capsys):
    spec = importlib.util.spec_from_file_location("prune_speed", ROOT / "benchmarks" / "prune_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--quick"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line and not line.startswith("#")][1:]
    assert len(rows) >= 8 and all(row[-1] == "yes" for row in rows)


def test_a_cost_map_with_shared_lines_is_priced_at_the_densities_selected_and_spends_its_budget():
    """With line costs (scattered writes paid in whole lines), an entry's cost falls as its layer's
    density rises: the pruner selects again at the densities it selected and spends what the first
    (1 %) pricing left, within the budget by the cost map's exact energy."""
    names_shapes = {"a": (4096,), "b": (256, 64)}
    prices = {n: LayerPrice(1e-9, "measured", fixed_j=1e-6, joules_per_line=8e-9) for n in names_shapes}
    cmap = CostMap(prices, simulated=True)
    cmap.numel = {n: math.prod(s) for n, s in names_shapes.items()}
    assert not cmap.linear
    g = torch.Generator().manual_seed(0)
    update = {n: torch.randn(s, generator=g) for n, s in names_shapes.items()}
    everything = cmap.predicted_joules({n: torch.ones(s, dtype=torch.bool) for n, s in names_shapes.items()})
    budget_j = everything / 3
    result = Pruner(cmap, Budget.of_joules(budget_j), method="cwmp").masks(update)
    assert result.predicted_j <= budget_j
    assert result.predicted_j == pytest.approx(cmap.predicted_joules(result.masks))
    assert result.predicted_j > 0.99 * budget_j  # the budget is spent, not left at the 1 % pricing's estimate
    linear_guess = (budget_j - 2e-6) / (1e-9 + 8e-9)  # entries bought if every entry paid a whole line
    assert result.kept > 1.2 * linear_guess


# ---------------------------------------------------------------------- the layer-skipping rule
def retained(update: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], power: float = 1.0) -> float:
    return math.fsum(float(update[n][m].double().abs().pow(power).sum()) for n, m in masks.items())


def test_skipping_a_layer_whose_fixed_cost_buys_little_keeps_more_at_the_same_budget():
    """Layer a's one large entry comes first in CWMP's order, so the greedy rule opens a and pays
    its fixed cost for one entry; closing a buys 51 of b's entries instead."""
    cmap = CostMap({"a": LayerPrice(1.0, "measured", fixed_j=50.0), "b": LayerPrice(1.0, "measured")},
                   simulated=True)
    update = {"a": torch.tensor([10.0, 0.01, 0.01]), "b": torch.ones(100)}
    greedy = Pruner(cmap, Budget.of_joules(60.0), rule="prefix").masks(update)
    skipped = Pruner(cmap, Budget.of_joules(60.0), skip_layers=1, rule="prefix").masks(update)
    assert {n: int(m.sum()) for n, m in greedy.masks.items()} == {"a": 1, "b": 9}
    assert {n: int(m.sum()) for n, m in skipped.masks.items()} == {"a": 0, "b": 60}
    assert retained(update, skipped.masks) == 60 > retained(update, greedy.masks) == 19
    assert skipped.predicted_j == cmap.predicted_joules(skipped.masks) <= 60.0
    # a layer whose fixed cost does not fit at all stops the prefix at its first entry: the greedy
    # rule keeps nothing, closing that layer lets the prefix go on
    greedy = Pruner(cmap, Budget.of_joules(40.0), rule="prefix").masks(update)
    skipped = Pruner(cmap, Budget.of_joules(40.0), skip_layers=1, rule="prefix").masks(update)
    assert greedy.kept == 0 and {n: int(m.sum()) for n, m in skipped.masks.items()} == {"a": 0, "b": 40}


def test_the_first_try_is_not_spent_on_a_layer_that_blocked_nothing():
    """The budget runs out inside layer c (open, fixed 95 J): b, untouched, stopped nothing, so the
    one try closes the layer that returns least for its joules, c, and b's entries take its place."""
    cmap = CostMap({"a": LayerPrice(1.0, "measured"), "b": LayerPrice(1.0, "measured"),
                    "c": LayerPrice(1.0, "measured", fixed_j=95.0)}, simulated=True)
    update = {"a": torch.full((100,), 10.0), "b": torch.full((100,), 5.0), "c": torch.full((100,), 9.0)}
    greedy = Pruner(cmap, Budget.of_joules(200.0), rule="prefix").masks(update)
    skipped = Pruner(cmap, Budget.of_joules(200.0), skip_layers=1, rule="prefix").masks(update)
    assert {n: int(m.sum()) for n, m in greedy.masks.items()} == {"a": 100, "b": 0, "c": 5}
    assert {n: int(m.sum()) for n, m in skipped.masks.items()} == {"a": 100, "b": 100, "c": 0}
    assert retained(update, skipped.masks) == 1500 > retained(update, greedy.masks) == 1045


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), fraction=st.floats(0, 1.05), power=st.sampled_from([1.0, 2.0]),
       skips=st.integers(1, 5), fixed=st.lists(st.sampled_from([0.0, 2.0**-22, 2.0**-18, 2.0**-15]),
                                                min_size=4, max_size=4))
def test_the_skipping_rule_is_never_worse_than_the_greedy_rule_at_equal_budget(seed, fraction, power, skips, fixed):
    marginal = [2.0**-30, 2.0**-27, 2.0**-29, 2.0**-26]
    cmap = cost_map(LAYERS, marginal, fixed)
    update = updates_of(seed)
    budget = Budget.of_joules(layer_joules([t.numel() for t in update.values()], marginal, fixed) * fraction)
    greedy = Pruner(cmap, budget, power=power, rule="prefix").masks(update)
    skipped = Pruner(cmap, budget, power=power, skip_layers=skips, rule="prefix").masks(update)
    assert retained(update, skipped.masks, power) >= retained(update, greedy.masks, power)
    assert skipped.predicted_j == cmap.predicted_joules(skipped.masks) <= budget.joules
    assert skipped.kept == sum(int(m.sum()) for m in skipped.masks.values())
    same = all(torch.equal(skipped.masks[n], greedy.masks[n]) for n in update)
    assert same or retained(update, skipped.masks, power) > retained(update, greedy.masks, power)  # kept if better


def test_skip_layers_is_checked_and_leaves_topk_alone():
    cmap = cost_map(LAYERS, [1.0] * 4, [5.0] * 4)
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(MaskInputError, match="skip_layers must be an int >= 0"):
            Pruner(cmap, Budget.of_joules(1.0), skip_layers=bad)
    update = updates_of(1)
    plain = Pruner(cmap, Budget.topk_keep_ratio(0.2), method="topk").masks(update)
    asked = Pruner(cmap, Budget.topk_keep_ratio(0.2), method="topk", skip_layers=3).masks(update)
    assert all(torch.equal(plain.masks[n], asked.masks[n]) for n in update)  # Top-K is cost-blind


def test_the_skip_layers_benchmark_runs_and_is_never_worse(capsys):
    spec = importlib.util.spec_from_file_location("skip_layers", ROOT / "benchmarks" / "skip_layers.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--model", "cnn", "--keep", "0.01", "0.1", "--skips", "2"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line and not line.startswith("#")][1:]
    assert [row[1] for row in rows] == ["Top-K", "greedy", "skip", "setup", "Top-K", "greedy", "skip", "setup"]


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_a_sample_read_once_scores_as_the_pass_does_for_every_pool_over_the_layers(power):
    """The sample's magnitudes are read once per Layers and shared: a numpy pool scores them in one
    array, a torch pool (power 3) per layer; both give the scores at the sample's positions."""
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(s, generator=g) * (i + 1) for i, s in enumerate([(300, 7), (5,), (0,), (4000,)])]
    layers = check_layers(tensors)
    pool = _LayeredPool(layers, [0.5, 3.0, 1.0, 7.0], power, caps=[math.inf, 0.2, 1.0, 2.0])
    other = _LayeredPool(layers, None, 3.0)
    assert pool.numpy_pass and not other.numpy_pass
    index = pool.sample_index(1500, torch.Generator().manual_seed(0))
    assert other.sample_index(1500, torch.Generator().manual_seed(1)) is index  # shared by size
    for first, second in ((pool, other), (other, pool)):
        for p in (first, second):
            assert torch.equal(p.sample_scores(index), p.scores_at(index))


def test_sample_positions_are_drawn_once_per_size_and_each_update_reads_its_own_values():
    """The positions depend on the number of entries, the sample's size and the seed alone: a
    second update of the same shapes reuses them (a client's update keeps its size every round)
    and reads its own magnitudes there; another size draws its own; a few sizes are kept."""
    import cwmp.pools as pools

    g = torch.Generator().manual_seed(4)
    first = check_layers([torch.randn(5000, generator=g), torch.randn(300, generator=g)])
    second = check_layers([torch.randn(5000, generator=g), torch.randn(300, generator=g)])
    other = check_layers([torch.randn(5001, generator=g)])

    def index_of(layers):
        return _LayeredPool(layers, None, 1.0).sample_index(1000, torch.Generator().manual_seed(7))

    index = index_of(first)
    assert index_of(second) is index and index_of(other) is not index
    assert torch.equal(index, torch.sort(torch.randint(5300, (1000,), generator=torch.Generator().manual_seed(7))).values)
    for layers in (first, second):
        pool = _LayeredPool(layers, None, 1.0)
        assert torch.equal(pool.sample_scores(index), pool.scores_at(index))
    for n in range(20):
        index_of(check_layers([torch.ones(100 + n)]))
    assert len(pools._POSITIONS) <= pools._POSITIONS_KEPT
