"""The set-up-aware rule's gathering pass (``cwmp.candidates``): the selections made on the gathered
entries are the selections on the whole update, whatever the sample estimated.

Each test runs the pruner twice on one update: as shipped (the gathering pass) and with the pass
switched off (``cwmp.pruner.estimate`` returning None: every selection on the whole update, the rule
as it was before the pass). Masks, candidate, joules and what error feedback sends must be the same.
A spy checks that the gathered path was really taken (or, with the estimates forced to miss, that
its checks refused it), so that no test passes by never reaching the code it is about.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

import cwmp.candidates as candidates
import cwmp.pruner as pruner_module
from cwmp import Budget, BudgetError, CostMap, ErrorFeedback, LayerPrice, MaskInputError, Pruner
from cwmp.masks import check_layers, layers_budget_mask, layers_topk_mask
from cwmp.pools import _LayeredPool
from cwmp.pruner import LazyMasks
from cwmp.setup_rule import openings

SHAPES = [(64, 300), (64,), (128, 200), (128,), (500, 60), (30000,), (40, 40), (10,)]


def problem(seed: int, fixed_share: float = 1000.0):
    """An update of layers of different sizes and scales, and a linear cost map whose layers cost
    differently per entry, each with a set-up of ``fixed_share`` entries' worth."""
    g = torch.Generator().manual_seed(seed)
    update, prices = {}, {}
    for i, shape in enumerate(SHAPES):
        scale = 2.0 ** float(torch.empty(()).uniform_(-3, 3, generator=g))
        values = torch.randn(shape, generator=g) * scale
        if i % 3 == 0:  # heavy tails in some layers
            values = values * torch.rand(shape, generator=g).pow(-0.5)
        update[f"layer{i}"] = values
        per_entry = 1e-9 * (0.5 + 0.25 * (i % 5))
        prices[f"layer{i}"] = LayerPrice(per_entry, "predicted", fixed_j=fixed_share * per_entry * (i % 4 != 3),
                                         compensation_j=1e-6)
    return update, CostMap(prices, simulated=True)


@pytest.fixture
def small_updates_gathered(monkeypatch):
    """Serve updates this small (the shipped threshold is 2**18 entries) and count what happens."""
    monkeypatch.setattr(candidates, "MIN_ENTRIES", 1 << 12)
    monkeypatch.setattr(candidates, "MAX_SHARE", 1.0)
    seen = {"gathered": 0, "exact": 0, "refused": 0}
    gather, exact = candidates.gather_from, candidates.Candidates.exact_prefix

    def counting_gather(*args, **kwargs):
        out = gather(*args, **kwargs)
        seen["gathered"] += 1
        return out

    def counting_exact(self, pool, sub, witness=()):
        out = exact(self, pool, sub, witness)
        seen["exact" if out else "refused"] += 1
        return out

    monkeypatch.setattr(pruner_module, "gather_from", counting_gather)
    monkeypatch.setattr(candidates.Candidates, "exact_prefix", counting_exact)
    return seen


def whole_update(monkeypatch):
    monkeypatch.setattr(pruner_module, "estimate", lambda *a, **k: None)


def run_both(monkeypatch, update, costs, budget, power, sparse=False):
    """(as shipped, on the whole update) results of one masks() call, or of two compress() calls."""
    results = []
    for switch_off in (False, True):
        if switch_off:
            whole_update(monkeypatch)
        pruner = Pruner(costs, budget, method="cwmp", power=power)
        if sparse:
            feedback = ErrorFeedback()
            pruner.compress({n: u.clone() for n, u in update.items()}, feedback)
            corrected = {n: u + feedback.residuals[n] for n, u in update.items()}
            sent, result = pruner.compress({n: u.clone() for n, u in update.items()}, feedback, sparse=True)
            results.append((result, sent, feedback.residuals, corrected))
        else:
            results.append(pruner.masks(update))
    return results


def same(a, b) -> bool:
    return (a.candidate == b.candidate and a.predicted_j == b.predicted_j and a.budget_j == b.budget_j
            and all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ratio", [0.003, 0.01, 0.05])
@pytest.mark.parametrize("power", [1.0, 2.0])
def test_masks_on_the_gathered_entries_are_the_masks_on_the_whole_update(monkeypatch, small_updates_gathered,
                                                                         seed, ratio, power):
    update, costs = problem(seed)
    shipped, whole = run_both(monkeypatch, update, costs, Budget.topk_keep_ratio(ratio), power)
    seen = small_updates_gathered  # Top-K and the envelope were both selected there, and checked
    assert seen["gathered"] == 1 and seen["exact"] >= 1 and seen["exact"] + seen["refused"] >= 2
    assert same(shipped, whole)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("share", [0.002, 0.02])
def test_a_budget_in_joules_too(monkeypatch, small_updates_gathered, seed, share):
    update, costs = problem(seed)
    budget = costs.floor_j(list(update)) + share * sum(costs.marginal_j(n) * u.numel() for n, u in update.items())
    shipped, whole = run_both(monkeypatch, update, costs, Budget.of_joules(budget), 1.0)
    seen = small_updates_gathered  # Top-K and the envelope were both selected there, and checked
    assert seen["gathered"] == 1 and seen["exact"] >= 1 and seen["exact"] + seen["refused"] >= 2
    assert same(shipped, whole)


@pytest.mark.parametrize("seed", range(4))
def test_estimates_that_miss_are_caught_and_the_whole_update_decides(monkeypatch, small_updates_gathered, seed):
    """Margins pulled far inside the estimates: the gathered entries miss part of what the
    selections keep. The checks must refuse them, and the masks are still the exact ones."""
    monkeypatch.setattr(candidates, "SIGMAS", -40.0)
    update, costs = problem(seed)
    shipped, whole = run_both(monkeypatch, update, costs, Budget.topk_keep_ratio(0.02), 1.0)
    assert small_updates_gathered["gathered"] == 1 and small_updates_gathered["refused"] >= 1
    assert same(shipped, whole)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("ratio", [0.01, 0.05])
def test_error_feedback_sends_the_same_from_the_gathered_positions(monkeypatch, small_updates_gathered, seed, ratio):
    update, costs = problem(seed)
    (shipped, sent, residuals, corrected), (whole, sent_w, residuals_w, _) = run_both(
        monkeypatch, update, costs, Budget.topk_keep_ratio(ratio), 1.0, sparse=True)
    assert small_updates_gathered["gathered"] >= 1
    assert same(shipped, whole)
    for name in update:
        assert sent[name].indices.dtype == sent_w[name].indices.dtype == torch.int32
        assert torch.equal(sent[name].indices, sent_w[name].indices)
        assert torch.equal(sent[name].values, sent_w[name].values)
        assert torch.equal(residuals[name], residuals_w[name])
        assert torch.equal(sent[name].to_dense() + residuals[name], corrected[name])


def test_the_sparse_steps_masks_are_made_from_the_kept_positions_only_when_read(monkeypatch, small_updates_gathered):
    update, costs = problem(2)  # the envelope wins, selected on the gathered entries
    made = []
    real_expand = pruner_module.expand
    monkeypatch.setattr(pruner_module, "expand", lambda *a: made.append(1) or real_expand(*a))
    pruner = Pruner(costs, Budget.topk_keep_ratio(0.05), method="cwmp")
    sparse_fb, dense_fb = ErrorFeedback(), ErrorFeedback()
    for feedback in (sparse_fb, dense_fb):
        pruner.compress({n: u.clone() for n, u in update.items()}, feedback)
    sent, result = pruner.compress({n: u.clone() for n, u in update.items()}, sparse_fb, sparse=True)
    assert small_updates_gathered["gathered"] == 3 and result.candidate == "envelope"
    assert isinstance(result.masks, LazyMasks) and not result.masks.made and not made  # what is sent needs none
    assert list(result.masks) == list(update) and len(result.masks) == len(update) and "layer0" in result.masks
    kept = {n: s.indices.clone() for n, s in sent.items()}
    for s in sent.values():
        s.indices.add_(1)  # what is sent may be changed by its receiver: the masks do not follow
    masks = dict(result.masks)
    assert result.masks.made and len(made) == 1 and result.masks["layer0"] is masks["layer0"]  # made once, kept
    dense, dense_result = pruner.compress({n: u.clone() for n, u in update.items()}, dense_fb)
    assert isinstance(dense_result.masks, dict)
    for name, mask in masks.items():
        assert mask.shape == update[name].shape and mask.dtype == torch.bool
        assert torch.equal(torch.nonzero(mask.reshape(-1)).squeeze(1), kept[name].long())
        assert torch.equal(mask, dense_result.masks[name])
        assert torch.equal(dense[name], torch.where(mask, dense[name], 0))


def test_lazy_masks_are_made_once_from_several_threads_and_pickle_as_their_masks(monkeypatch, small_updates_gathered):
    import pickle
    import threading

    update, costs = problem(2)
    pruner = Pruner(costs, Budget.topk_keep_ratio(0.05), method="cwmp")
    feedback = ErrorFeedback()
    pruner.compress({n: u.clone() for n, u in update.items()}, feedback)
    _, result = pruner.compress({n: u.clone() for n, u in update.items()}, feedback, sparse=True)
    assert isinstance(result.masks, LazyMasks) and not result.masks.made
    made, real_expand = [], pruner_module.expand
    start = threading.Barrier(4)

    def slow_expand(*args):
        made.append(1)
        return real_expand(*args)

    monkeypatch.setattr(pruner_module, "expand", slow_expand)
    seen: list = []

    def read():
        start.wait()
        seen.append(result.masks["layer0"])

    threads = [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and all(m is seen[0] for m in seen)
    again = pickle.loads(pickle.dumps(result))
    assert isinstance(again.masks, dict) and list(again.masks) == list(update)
    assert all(torch.equal(again.masks[n], result.masks[n]) for n in update)
    assert again.kept == result.kept and again.predicted_j == result.predicted_j


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("sigmas", [4.0, -40.0])
def test_open_items_from_the_gathered_entries_are_the_layers_open_items(monkeypatch, seed, sigmas):
    """Against ``setup_rule.openings`` on the whole update, field by field; with the estimates
    forced to miss, the layers are gathered again down to the ratio found (or the answer is None)."""
    monkeypatch.setattr(candidates, "MIN_ENTRIES", 1 << 12)
    monkeypatch.setattr(candidates, "MAX_SHARE", 1.0)
    monkeypatch.setattr(candidates, "SIGMAS", sigmas)
    update, costs = problem(seed, fixed_share=5000.0)
    names = list(update)
    layers = check_layers([update[n] for n in names])
    marginal, fixed = [costs.marginal_j(n) for n in names], [costs.fixed_j(n) for n in names]
    n = sum(f.numel() for f in layers.flats)
    cand = candidates.gather(layers, marginal, fixed, 1.0, k=int(0.01 * n))
    assert cand is not None
    budget = 0.01 * sum(m * f.numel() for m, f in zip(marginal, layers.flats)) + sum(fixed)
    found = candidates.candidate_openings(cand, marginal, fixed, budget, 1.0)
    expected = openings(check_layers([update[n] for n in names]), marginal, fixed, budget, 1.0)
    assert found is not None or sigmas < 0
    if found is not None:
        for got, want in zip(found, expected):
            assert got.affordable == want.affordable and got.cap == want.cap and got.count == want.count
            assert got.at_cap == want.at_cap
            assert math.isclose(got.ratio, want.ratio, rel_tol=1e-12)
            assert math.isclose(got.value, want.value, rel_tol=1e-9)


def test_the_gathered_entries_are_every_entry_at_or_above_each_floor(monkeypatch):
    monkeypatch.setattr(candidates, "MIN_ENTRIES", 1 << 12)
    monkeypatch.setattr(candidates, "MAX_SHARE", 1.0)
    update, costs = problem(7)
    names = list(update)
    layers = check_layers([update[n] for n in names])
    n = sum(f.numel() for f in layers.flats)
    cand = candidates.gather(layers, [costs.marginal_j(x) for x in names], [costs.fixed_j(x) for x in names], 1.0,
                             k=int(0.01 * n))
    for i, flat in enumerate(layers.flats):
        expected = np.flatnonzero(flat.abs().numpy() >= cand.floors[i])
        assert np.array_equal(cand.index[i], expected)
        assert np.array_equal(cand.sub.flats[i].numpy(), flat.abs().numpy()[expected])
        assert cand.open_floors[i] >= cand.floors[i]
        magnitudes = flat.abs().numpy()  # where the open item is looked for above the floor: picked out too
        if cand.open_floors[i] > cand.floors[i]:
            assert np.array_equal(cand.opened[i], magnitudes[magnitudes >= cand.open_floors[i]])
        else:
            assert cand.opened[i] is None
    assert any(o is not None and 0 < o.size < f.numel() for o, f in zip(cand.opened, layers.flats))


def test_small_or_unserved_updates_are_not_gathered():
    update, costs = problem(0)
    names = list(update)
    layers = check_layers([update[n] for n in names])
    args = (layers, [costs.marginal_j(x) for x in names], [costs.fixed_j(x) for x in names])
    assert candidates.gather(*args, 1.0, k=100) is None  # 90 k entries: below MIN_ENTRIES
    half = check_layers([update[n].half() for n in names])
    assert candidates.gather(half, *args[1:], 1.0, k=100) is None


# ------------------------------------------------------------------ the estimate beside the checks
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", [(0, 7), (5, 29_999)])
def test_a_bad_entry_is_refused_by_the_checks_whatever_the_estimate_made_of_it(monkeypatch, small_updates_gathered,
                                                                               bad, where):
    """The floors are estimated while the checks reduce the update (``check_layers_beside``): the
    estimate sees the entries before they are checked. A NaN or infinite entry is still refused
    with the checks' own message, the one the pruner gives with the pass off, and nothing is
    gathered from it."""
    update, costs = problem(0)
    layer, at = where
    update[f"layer{layer}"].view(-1)[at] = bad
    messages = []
    for switch_off in (False, True):
        if switch_off:
            whole_update(monkeypatch)
        with pytest.raises(MaskInputError) as refused:
            Pruner(costs, Budget.topk_keep_ratio(0.01), method="cwmp").masks(update)
        messages.append(str(refused.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith(f"tensor {layer}: update has 1 NaN or infinite entries (first at flat index {at})")
    assert small_updates_gathered["gathered"] == 0


def test_the_estimate_runs_beside_the_checks_and_its_floors_are_used(monkeypatch, small_updates_gathered):
    """The pruner's first estimate runs inside ``check_layers_beside`` (before ``max_magnitudes``
    exist), and its floors are the ones gathered from: no second estimate is made."""
    update, costs = problem(1)
    calls = []
    real = candidates.estimate

    def spying(layers, *args, **kwargs):
        calls.append(list(layers.max_magnitudes))  # empty: the checks have not filled them in yet
        return real(layers, *args, **kwargs)

    monkeypatch.setattr(pruner_module, "estimate", spying)
    Pruner(costs, Budget.topk_keep_ratio(0.01), method="cwmp").masks(update)
    assert calls == [[]] and small_updates_gathered["gathered"] == 1


def test_a_budget_below_the_floor_is_the_budget_error_with_the_estimate_beside_the_checks(small_updates_gathered):
    update, costs = problem(2)
    floor = costs.floor_j(list(update))
    with pytest.raises(BudgetError, match="below the .* every round pays"):
        Pruner(costs, Budget.of_joules(floor / 2), method="cwmp").masks(update)


def test_check_layers_beside_gives_the_checks_error_first_and_its_own_after():
    from cwmp.pools import check_layers_beside

    good = [torch.randn(5000), torch.randn(300)]
    layers, found = check_layers_beside(good, lambda ls: [f.numel() for f in ls.flats])
    assert found == [5000, 300] and layers.max_magnitudes == check_layers(good).max_magnitudes

    def broken(ls):
        raise RuntimeError("the step beside failed")

    with pytest.raises(RuntimeError, match="the step beside failed"):
        check_layers_beside(good, broken)
    bad = [torch.randn(5000), torch.tensor([1.0, math.nan])]
    with pytest.raises(MaskInputError, match="tensor 1: update has 1 NaN"):
        check_layers_beside(bad, broken)  # the checks' error, not the step's


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(1, 3000), share=st.floats(0.0, 1.5),
       sigmas=st.sampled_from([4.0, 0.0, -40.0]))
def test_the_estimates_partial_sorts_read_what_a_full_sort_would(seed, size, share, sigmas):
    """The estimate sorts only the sample's largest keys, as many as the budget can pay for and the
    margin reads (each point costs at least the cheapest marginal cost): the prefix that fits and
    the key past it are those of the full sort."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(candidates, "SIGMAS", sigmas)
        partial_sorts_read_what_a_full_sort_would(seed, size, share)


def partial_sorts_read_what_a_full_sort_would(seed: int, size: int, share: float) -> None:
    rng = np.random.default_rng(seed)
    n_layers = int(rng.integers(1, 8))
    keys = rng.permutation(size).astype(np.float64)  # distinct: the order is the full sort's exactly
    layer_of = rng.integers(0, n_layers, size)
    marg = rng.uniform(0.1, 3.0, n_layers)
    fix = rng.uniform(0.0, 50.0, n_layers) * (rng.random(n_layers) < 0.7)
    scale = float(rng.uniform(1.0, 20.0))
    budget = share * float(np.sum(marg[layer_of])) * scale
    full = np.argsort(-keys)
    j = candidates._fits(layer_of[full], marg, fix, scale, budget)
    end = candidates._paid_end(budget, marg, scale, size)
    assert end >= size or candidates._margin_end(j, size) <= end
    order = candidates._largest_first(keys, end + 1)
    assert np.array_equal(order, full[: end + 1])
    assert candidates._fits(layer_of[order], marg, fix, scale, budget) == j
    assert candidates._past(keys[order], j, size) == candidates._past(keys[full], j, size)


@pytest.mark.parametrize("seed", range(4))
def test_an_open_floor_set_too_high_is_looked_below_again_in_the_gathered_entries(monkeypatch, seed):
    """Open floors raised past part of each open item (the gathered entries still reach lower): the
    open items come out exact, looked for again in the gathered entries, with no pass over the
    update for a layer the gathered entries reach down to."""
    monkeypatch.setattr(candidates, "MIN_ENTRIES", 1 << 12)
    monkeypatch.setattr(candidates, "MAX_SHARE", 1.0)
    update, costs = problem(seed, fixed_share=5000.0)
    names = list(update)
    layers = check_layers([update[n] for n in names])
    marginal, fixed = [costs.marginal_j(n) for n in names], [costs.fixed_j(n) for n in names]
    n = sum(f.numel() for f in layers.flats)
    budget = 0.01 * sum(m * f.numel() for m, f in zip(marginal, layers.flats)) + sum(fixed)
    expected = openings(check_layers([update[n] for n in names]), marginal, fixed, budget, 1.0)
    cand = candidates.gather(layers, marginal, fixed, 1.0, k=int(0.01 * n))
    raised = []
    for i, (flat, want) in enumerate(zip(cand.sub.flats, expected)):
        gathered = np.sort(flat.numpy())[::-1]
        if fixed[i] > 0 and want.count > 20 and gathered.size > want.count:
            floor = float(gathered[int(0.95 * want.count)])  # a twentieth of the open item left out
            cand.open_floors[i] = floor
            cand.opened[i] = flat.numpy()[flat.numpy() >= floor]
            raised.append(i)
    assert raised
    passes = []
    real_gather = candidates.gather_at_least
    monkeypatch.setattr(candidates, "gather_at_least", lambda pool, low, *a, **k: passes.append(list(low)) or
                        real_gather(pool, low, *a, **k))
    found = candidates.candidate_openings(cand, marginal, fixed, budget, 1.0)
    for got, want in zip(found, expected):
        assert got.affordable == want.affordable and got.cap == want.cap and got.count == want.count
        assert got.at_cap == want.at_cap and math.isclose(got.ratio, want.ratio, rel_tol=1e-12)
    again = [i for i in raised if not passes or passes[0][i] == math.inf]  # not in a pass: in the gathered entries
    assert again


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("sigmas", [4.0, -3.0, -40.0])
def test_a_selections_witness_is_true_and_decides_as_the_count_does(monkeypatch, seed, sigmas):
    """The first pass of a selection on the gathered entries says how many have a key at least
    some key (``witness``); that count is true, and ``exact_prefix`` with it says what it says
    with the full count, for prefixes that are and are not the whole update's."""
    monkeypatch.setattr(candidates, "MIN_ENTRIES", 1 << 12)
    monkeypatch.setattr(candidates, "MAX_SHARE", 1.0)
    monkeypatch.setattr(candidates, "SIGMAS", sigmas)
    update, costs = problem(seed)
    names = list(update)
    layers = check_layers([update[n] for n in names])
    marginal, fixed = [costs.marginal_j(x) for x in names], [costs.fixed_j(x) for x in names]
    n = sum(f.numel() for f in layers.flats)
    cand = candidates.gather(layers, marginal, fixed, 2.0, k=int(0.02 * n))
    gathered = sum(cand.sub_sizes)
    caps = [float(np.quantile(f.numpy() ** 2 / m, 0.9)) if f.numel() else math.inf
            for f, m in zip(cand.sub.flats, marginal)]
    decided = 0
    for share in (0.3, 0.8, 0.99, 1.0):
        k = int(share * gathered)
        budget = share * sum(m * s for m, s in zip(marginal, cand.sub_sizes)) + sum(fixed)
        for pool, select in (
            (_LayeredPool(cand.sub, None, 1.0), lambda w: layers_topk_mask(cand.sub, k, w)),
            (_LayeredPool(cand.sub, marginal, 2.0, caps),
             lambda w: layers_budget_mask(cand.sub, marginal, fixed, budget, 2.0, caps=caps, witness=w)),
        ):
            witness: list = []
            mask = select(witness)
            keys = np.concatenate([pool.numpy_scores(f.numpy(), i) for i, f in enumerate(cand.sub.flats)])
            for key, count in witness:
                assert count == int(np.count_nonzero(keys >= key))
            assert cand.exact_prefix(pool, mask, witness) == cand.exact_prefix(pool, mask)
            kept = int(np.count_nonzero(mask.numpy()))
            decided += any(count > kept for _, count in witness)
    assert decided


def test_a_witness_decides_only_above_the_bound_and_past_what_was_kept(monkeypatch):
    """The rule itself, on a prefix that is not the whole update's (the floors pulled far inside):
    a witness decides only with a key strictly above the largest key left ungathered and a count
    strictly above the kept entries; any other falls back to the count, which refuses."""
    monkeypatch.setattr(candidates, "MIN_ENTRIES", 1 << 12)
    monkeypatch.setattr(candidates, "MAX_SHARE", 1.0)
    monkeypatch.setattr(candidates, "SIGMAS", -40.0)
    update, costs = problem(3)
    names = list(update)
    layers = check_layers([update[n] for n in names])
    marginal, fixed = [costs.marginal_j(x) for x in names], [costs.fixed_j(x) for x in names]
    cand = candidates.gather(layers, marginal, fixed, 1.0, k=int(0.02 * sum(f.numel() for f in layers.flats)))
    pool = _LayeredPool(cand.sub, None, 1.0)
    mask = torch.ones(sum(cand.sub_sizes), dtype=torch.bool)  # everything gathered kept: the next is ungathered
    assert not cand.exact_prefix(pool, mask)
    incomplete = [i for i in range(len(cand.sizes)) if not cand.complete(i)]
    outside = np.array([cand.below(cand.floors[i]) for i in incomplete], dtype=cand.dtype)
    bound = float(pool.numpy_scores(outside, np.array(incomplete)).max())
    kept = int(mask.sum())
    above = float(np.nextafter(np.float32(bound), np.float32(np.inf)))
    assert cand.exact_prefix(pool, mask, [(above, kept + 1)])  # what such a witness would prove
    for claim in ([(bound, kept + 1)], [(above, kept)], [(-math.inf, kept + 1)], [(bound, kept), (above, kept)]):
        assert not cand.exact_prefix(pool, mask, claim)
