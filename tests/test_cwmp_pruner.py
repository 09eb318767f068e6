"""Cost maps from device profiles, the pruner over named tensors, and error feedback."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from calibrate.profile import DeviceProfile, ProfileError, load_profile
from tests.profile_helpers import layer_entry, profile_with_layers
from cwmp import (
    Budget,
    CostMap,
    CostMapError,
    ErrorFeedback,
    FeedbackStateError,
    LayerPrice,
    MaskInputError,
    Pruner,
    topk_mask,
)

# dyadic costs: exact in float32 and float64, so every order of summation gives the same total
COSTS = {"0.weight": 3 * 2.0**-33, "0.bias": 3 * 2.0**-33, "2.weight": 5 * 2.0**-30, "2.bias": 5 * 2.0**-30}


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))


def profile_with(model: nn.Module, costs: dict[str, float], name: str = "tiny") -> DeviceProfile:
    """The simulated H100 profile with a per-layer table for ``model`` (built here, validated by
    the profile schema like a file would be)."""
    layers = [layer_entry(n, list(p.shape), costs[n]) for n, p in model.named_parameters() if n in costs]
    return profile_with_layers(name, layers)


def updates_of(model: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------------ cost map
def test_cost_map_prices_every_parameter_from_the_profile():
    model = small_model()
    cmap = CostMap.from_profile(profile_with(model, COSTS), "tiny", model.named_parameters())
    assert {n: cmap[n] for n in COSTS} == COSTS
    assert cmap.simulated and cmap.profile == "sim-h100" and cmap.predicted_layers == []


def test_a_missing_layer_is_an_error_unless_predicted_costs_are_allowed():
    model = small_model()
    partial = {k: v for k, v in COSTS.items() if k != "2.bias"}
    profile = profile_with(model, partial)
    with pytest.raises(CostMapError, match=r"prices no layer 2\.bias.*allow_predicted=True"):
        CostMap.from_profile(profile, "tiny", model.named_parameters())
    cmap = CostMap.from_profile(profile, "tiny", model.named_parameters(), allow_predicted=True)
    assert cmap.predicted_layers == ["2.bias"]
    predicted = profile.predict_layer(8, "float32")
    assert cmap.fixed_j("2.bias") == predicted.fixed_j
    one = torch.zeros(8, dtype=torch.bool)
    one[3] = True
    assert cmap.layer_joules("2.bias", one) == pytest.approx(predicted.joules(1, 1))
    assert cmap["0.weight"] == COSTS["0.weight"]


def test_a_model_the_profile_lacks():
    model = small_model()
    shipped = load_profile("sim-h100")
    with pytest.raises(ProfileError, match="no per-layer table for model 'tiny'"):
        CostMap.from_profile(shipped, "tiny", model.named_parameters())
    cmap = CostMap.from_profile(shipped, "tiny", model.named_parameters(), allow_predicted=True)
    assert sorted(cmap.predicted_layers) == sorted(n for n, _ in model.named_parameters())
    assert cmap.simulated


@pytest.mark.parametrize("change", ["shape", "dtype"])
def test_a_table_entry_for_another_tensor_is_an_error(change):
    model = small_model()
    profile = profile_with(model, COSTS)
    tensors = dict(model.named_parameters())
    tensors["0.weight"] = torch.zeros(16, 31) if change == "shape" else torch.zeros(16, 32, dtype=torch.float16)
    with pytest.raises(CostMapError, match=r"layer '0\.weight' was priced as float32\[16, 32\]"):
        CostMap.from_profile(profile, "tiny", tensors, allow_predicted=True)


def test_cost_map_rejects_bad_costs_and_unknown_names():
    with pytest.raises(CostMapError, match="must cost something"):
        CostMap({"w": LayerPrice(0.0, "measured")}, simulated=False)
    with pytest.raises(CostMapError, match="finite and >= 0"):
        CostMap({"w": LayerPrice(-1.0, "measured")}, simulated=False)
    cmap = CostMap({"w": LayerPrice(1e-9, "measured")}, simulated=False)
    with pytest.raises(CostMapError, match="no layer 'v'"):
        cmap["v"]


# -------------------------------------------------------------------------------------- pruner
def reference_masks(updates, costs, budget_j, by_cost=True):
    """Walk all entries of all layers in score order (ties by position in the concatenation)."""
    entries = []
    offset = 0
    for name, u in updates.items():
        scores = (u.abs() / costs[name] if by_cost else u.abs()).reshape(-1).tolist()
        entries += [(-s, offset + i, name, i) for i, s in enumerate(scores)]
        offset += u.numel()
    masks = {n: torch.zeros(u.numel(), dtype=torch.bool) for n, u in updates.items()}
    spent = 0.0
    for _, _, name, i in sorted(entries):
        if spent + costs[name] > budget_j:
            break
        spent += costs[name]
        masks[name][i] = True
    return {n: m.view(updates[n].shape) for n, m in masks.items()}


@pytest.fixture
def setup():
    model = small_model()
    cmap = CostMap.from_profile(profile_with(model, COSTS), "tiny", model.named_parameters())
    return model, cmap


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), fraction=st.floats(0, 1.05), method=st.sampled_from(["cwmp", "topk"]))
def test_pruner_matches_the_definition_over_all_layers(seed, fraction, method):
    model = small_model()
    cmap = CostMap.from_profile(profile_with(model, COSTS), "tiny", model.named_parameters())
    updates = updates_of(model, seed)
    total_j = sum(u.numel() * COSTS[n] for n, u in updates.items())
    budget_j = total_j * fraction
    result = Pruner(cmap, Budget.of_joules(budget_j), method=method, rule="prefix").masks(updates)
    expected = reference_masks(updates, COSTS, budget_j, by_cost=method == "cwmp")
    assert all(torch.equal(result.masks[n], expected[n]) for n in updates)
    assert result.predicted_j == math.fsum(int(m.sum()) * COSTS[n] for n, m in result.masks.items())
    assert result.predicted_j <= budget_j
    assert result.kept == sum(int(m.sum()) for m in result.masks.values()) and result.total == 664


def test_topk_at_a_keep_ratio_is_global_topk_and_sets_the_budget(setup):
    model, cmap = setup
    updates = updates_of(model)
    result = Pruner(cmap, Budget.topk_keep_ratio(0.1), method="topk").masks(updates)
    flat = torch.cat([u.reshape(-1) for u in updates.values()])
    expected = topk_mask(flat, 66)  # round(0.1 * 664)
    assert torch.equal(torch.cat([m.reshape(-1) for m in result.masks.values()]), expected)
    assert result.kept == 66 and result.predicted_j == result.budget_j


def test_cwmp_at_topk_energy_keeps_more_of_the_update(setup):
    """The point of CWMP: at the energy Top-K spends, moving entries from the expensive layer to the
    cheap one keeps more entries and more total magnitude."""
    model, cmap = setup
    updates = updates_of(model, seed=5)
    budget = Budget.topk_keep_ratio(0.05)
    top = Pruner(cmap, budget, method="topk").masks(updates)
    cw = Pruner(cmap, budget, method="cwmp").masks(updates)
    assert cw.budget_j == top.budget_j and cw.predicted_j <= cw.budget_j
    assert cw.kept > top.kept

    def magnitude(result):
        return sum(float(updates[n].abs()[m].sum()) for n, m in result.masks.items())

    assert magnitude(cw) > magnitude(top)


def test_fill_spends_more_of_the_budget_without_exceeding_it(setup):
    model, cmap = setup
    updates = updates_of(model, seed=2)
    budget = Budget.of_joules(2.5e-8)
    plain = Pruner(cmap, budget).masks(updates)
    filled = Pruner(cmap, budget, fill=True).masks(updates)
    assert plain.predicted_j <= filled.predicted_j <= 2.5e-8
    assert all(bool((filled.masks[n] | ~plain.masks[n]).all()) for n in updates)


def test_pruner_reports_simulated_costs_and_missing_layers(setup):
    model, cmap = setup
    result = Pruner(cmap, Budget.of_joules(1e-9)).masks(model.named_parameters())
    assert result.simulated and "SIMULATED" in result.summary()
    with pytest.raises(CostMapError, match="no layer 'extra'"):
        Pruner(cmap, Budget.of_joules(1e-9)).masks({**updates_of(model), "extra": torch.ones(3)})


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda c: Pruner(c, Budget.of_joules(1.0), method="random"), "unknown pruning method 'random'"),
        (lambda c: Pruner(c, 1.0), "must be a Budget"),
        (lambda c: Budget(), "either"),
        (lambda c: Budget(joules=1.0, keep_ratio=0.1), "either"),
        (lambda c: Budget.of_joules(-1), ">= 0"),
        (lambda c: Budget.of_joules(float("nan")), ">= 0"),
        (lambda c: Budget.topk_keep_ratio(1.5), r"\[0, 1\]"),
    ],
)
def test_pruner_configuration_errors(setup, make, message):
    with pytest.raises(MaskInputError, match=message):
        make(setup[1])


# ------------------------------------------------------------------------------ error feedback
def test_error_feedback_delays_dropped_mass_and_never_loses_it(setup):
    model, cmap = setup
    pruner = Pruner(cmap, Budget.topk_keep_ratio(0.05))
    feedback = ErrorFeedback()
    owed = {n: torch.zeros(p.shape) for n, p in model.named_parameters()}
    sent_total = {n: torch.zeros(p.shape) for n, p in model.named_parameters()}
    for step in range(4):
        updates = updates_of(model, seed=step)
        sent, result = pruner.compress(updates, feedback)
        for n in updates:
            owed[n] += updates[n]
            sent_total[n] += sent[n]
            assert torch.equal(sent[n] != 0, result.masks[n] & (sent[n] != 0))  # only kept entries are sent
            torch.testing.assert_close(sent_total[n] + feedback.residuals[n], owed[n])
    assert any(bool(r.abs().max() > 0) for r in feedback.residuals.values())


def test_error_feedback_is_saved_and_restored_with_the_model(setup, tmp_path):
    model, cmap = setup
    pruner = Pruner(cmap, Budget.topk_keep_ratio(0.1), method="topk")
    feedback = ErrorFeedback()
    pruner.compress(updates_of(model, 0), feedback)
    torch.save({"model": model.state_dict(), "feedback": feedback.state_dict()}, tmp_path / "client.pt")

    checkpoint = torch.load(tmp_path / "client.pt")
    restored_model = small_model()
    restored_model.load_state_dict(checkpoint["model"])
    restored = ErrorFeedback()
    restored.load_state_dict(checkpoint["feedback"], like=restored_model.named_parameters())

    a, _ = pruner.compress(updates_of(model, 1), feedback)
    b, _ = pruner.compress(updates_of(model, 1), restored)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_error_feedback_state_of_another_model_is_refused(setup):
    model, _ = setup
    other = ErrorFeedback()
    other.load_state_dict({"residuals": {"0.weight": torch.zeros(3, 3)}})
    with pytest.raises(FeedbackStateError, match=r"residual '0\.weight' has shape \(3, 3\)"):
        other.compensate(model.named_parameters())
    with pytest.raises(FeedbackStateError, match=r"0\.weight \(3, 3\) vs \(16, 32\)"):
        ErrorFeedback().load_state_dict(other.state_dict(), like=model.named_parameters())
    with pytest.raises(FeedbackStateError, match="expected"):
        ErrorFeedback().load_state_dict({"weights": {}})
    with pytest.raises(FeedbackStateError, match="one mask per update"):
        ErrorFeedback().remember({"a": torch.ones(2)}, {"b": torch.ones(2, dtype=torch.bool)})


def test_compress_without_feedback_sends_the_kept_entries(setup):
    model, cmap = setup
    updates = updates_of(model, 3)
    sent, result = Pruner(cmap, Budget.topk_keep_ratio(0.2)).compress(updates)
    for n, u in updates.items():
        assert torch.equal(sent[n], torch.where(result.masks[n], u, 0))


def test_the_greedy_walk_does_not_crawl_past_a_layer_it_cannot_open(monkeypatch):
    """A layer whose set-up never fits (C: the largest entries, a 1e9 J set-up) stays out of the
    greedy walk's gathered set. The pivots' estimate once charged its set-up anyway, every estimate
    was over the budget, and the walk kept one entry per pass over the set: thousands of passes
    (fl with the mlp took 10 s a step). Counted in passes, not timed."""
    import cwmp.selection as selection
    from cwmp import CostMap, LayerPrice

    g = torch.Generator().manual_seed(0)
    updates = {"a": torch.randn(20000, generator=g), "b": 0.5 * torch.randn(20000, generator=g),
               "c": torch.full((100,), 10.0)}
    cmap = CostMap({"a": LayerPrice(1.0, "measured"), "b": LayerPrice(1.0, "measured"),
                    "c": LayerPrice(1.0, "measured", 1e9)}, simulated=False)
    splits = {"n": 0}
    real = selection._split

    def counting(*args, **kwargs):
        splits["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(selection, "_split", counting)
    result = Pruner(cmap, Budget.of_joules(2000.0), method="cwmp", rule="prefix", fill=True).masks(updates)
    assert result.kept == 2000 and not result.masks["c"].any() and result.predicted_j <= 2000.0
    # the 2000 largest of a and b together (every entry of them costs 1 J)
    both = torch.cat([updates["a"].abs(), updates["b"].abs()])
    assert torch.equal(torch.cat([result.masks["a"], result.masks["b"]]), both >= torch.topk(both, 2000).values.min())
    assert splits["n"] < 50, splits["n"]  # 4 here; 223 with the estimate that charged C


def test_joules_of_counts_is_joules_by_layer_for_a_linear_map_and_refuses_lines():
    """The pruner prices selections on the gathered entries from their counts (``joules_of_counts``):
    the same figures as pricing the masks, for a linear map; a map with a line term needs the masks."""
    prices = {"a": LayerPrice(2e-9, "measured", fixed_j=3e-6), "b": LayerPrice(5e-9, "predicted"),
              "c": LayerPrice(1e-9, "measured", fixed_j=1e-7)}
    linear = CostMap(prices, simulated=True)
    g = torch.Generator().manual_seed(0)
    masks = {"a": torch.rand(37, 5, generator=g) < 0.3, "b": torch.rand(11, generator=g) < 0.5,
             "c": torch.zeros(8, dtype=torch.bool)}
    kept = {n: (int(m.sum()), m.numel()) for n, m in masks.items()}
    assert linear.joules_of_counts(kept) == linear.joules_by_layer(masks)
    assert linear.joules_of_counts(kept)["c"] == 0.0  # a layer that keeps nothing costs nothing
    lines = CostMap({"a": LayerPrice(2e-9, "measured", joules_per_line=1e-9)}, simulated=True)
    with pytest.raises(ValueError, match="give the masks"):
        lines.joules_of_counts({"a": kept["a"]})
