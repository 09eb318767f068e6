"""The sparse output of the error-feedback step: what a client sends (kept positions and values),
checked against the dense path and against the contract sent + residual == the compensated update,
exactly; bad input leaves the feedback state as it was."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cwmp import Budget, CostMap, ErrorFeedback, LayerPrice, MaskInputError, Pruner, SparseUpdate
from cwmp.sparse import narrow_positions

SHAPES = {"a.weight": (8, 16), "a.bias": (8,), "b.weight": (4, 3, 3, 3), "empty": (0,), "b.bias": (1,)}


def cost_map(names) -> CostMap:
    prices = {n: LayerPrice(2.0**-30 * (1 + i % 3), "measured", fixed_j=2.0**-24 * (i % 2)) for i, n in enumerate(names)}
    return CostMap(prices, simulated=True)


def updates_of(step: int, shapes=SHAPES, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    out = {n: (torch.randn(s, generator=g) * (1 + i)).to(dtype) for i, (n, s) in enumerate(shapes.items())}
    out["a.bias"] = torch.round(out["a.bias"] * 2) / 2  # ties
    return out


def check_sent(sparse: SparseUpdate, corrected: torch.Tensor, mask: torch.Tensor) -> None:
    """One layer's sparse output is exactly the kept entries of the compensated update, in order."""
    assert isinstance(sparse, SparseUpdate)
    assert sparse.shape == corrected.shape and sparse.numel == corrected.numel()
    assert sparse.indices.dtype == torch.int32 and sparse.values.dtype == corrected.dtype  # < 2**31 entries
    assert torch.equal(sparse.indices.long(), torch.nonzero(mask.reshape(-1)).squeeze(1))  # ascending positions
    assert torch.equal(sparse.values, corrected.reshape(-1)[mask.reshape(-1)])
    assert torch.equal(sparse.to_dense(), torch.where(mask, corrected, 0))


@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.3, 1.0])
def test_sparse_step_equals_the_dense_step_and_keeps_the_exact_contract(ratio):
    pruner = Pruner(cost_map(SHAPES), Budget.topk_keep_ratio(ratio))
    dense_fb, sparse_fb = ErrorFeedback(), ErrorFeedback()
    buffers = None
    for step in range(4):
        updates = updates_of(step)
        before = {n: u.clone() for n, u in updates.items()}
        corrected = {n: u + sparse_fb.residuals[n] if n in sparse_fb.residuals else u.clone()
                     for n, u in updates.items()}
        dense, dense_result = pruner.compress(updates, dense_fb)
        sparse, result = pruner.compress(updates, sparse_fb, sparse=True)
        assert all(torch.equal(updates[n], before[n]) for n in updates)  # the caller's update untouched
        assert set(sparse) == set(updates)
        for n in updates:
            mask = result.masks[n]
            assert torch.equal(mask, dense_result.masks[n])
            check_sent(sparse[n], corrected[n], mask)
            assert torch.equal(sparse[n].to_dense(), dense[n])
            assert torch.equal(sparse_fb.residuals[n], dense_fb.residuals[n])
            assert torch.equal(sparse[n].to_dense() + sparse_fb.residuals[n], corrected[n])  # sent + kept back
            assert not bool(sparse_fb.residuals[n][mask].any())
        pointers = {n: r.data_ptr() for n, r in sparse_fb.residuals.items()}
        if buffers is not None:
            assert pointers == buffers  # the residuals are updated in place
        buffers = pointers


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), ratio=st.floats(0, 1), steps=st.integers(1, 3),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16]))
def test_sparse_and_dense_paths_agree_on_random_updates(seed, ratio, steps, dtype):
    pruner = Pruner(cost_map(SHAPES), Budget.topk_keep_ratio(ratio))
    dense_fb, sparse_fb = ErrorFeedback(), ErrorFeedback()
    for step in range(steps):
        updates = updates_of(seed + step, dtype=dtype)
        corrected = sparse_fb.compensate(updates)  # not in place: new tensors, the state unchanged
        dense, _ = pruner.compress(updates, dense_fb)
        sparse, result = pruner.compress(updates, sparse_fb, sparse=True)
        for n in updates:
            check_sent(sparse[n], corrected[n], result.masks[n])
            assert torch.equal(sparse[n].to_dense(), dense[n])
            assert torch.equal(sparse_fb.residuals[n], dense_fb.residuals[n])
            assert torch.equal(sparse[n].to_dense() + sparse_fb.residuals[n], corrected[n])


def test_a_residual_of_another_layout_and_remember_called_directly():
    feedback = ErrorFeedback()
    feedback.load_state_dict({"residuals": {"w": torch.randn(16, 8).t()}})  # (8, 16), not contiguous
    assert not feedback.residuals["w"].is_contiguous()
    update = torch.randn(8, 16)
    corrected = feedback.compensate({"w": update}, in_place=True)
    expected = corrected["w"].clone()
    mask = corrected["w"].abs() > 1.0
    sent = feedback.remember(corrected, {"w": mask}, sparse=True)
    check_sent(sent["w"], expected, mask)
    assert torch.equal(sent["w"].to_dense() + feedback.residuals["w"], expected)
    # remember with tensors the feedback does not hold: they are copied, never written to
    other = ErrorFeedback()
    mine = torch.randn(5)
    copy = mine.clone()
    sent = other.remember({"v": mine}, {"v": mine > 0}, sparse=True)
    assert torch.equal(mine, copy) and other.residuals["v"].data_ptr() != mine.data_ptr()
    assert torch.equal(sent["v"].to_dense() + other.residuals["v"], mine)


def test_without_feedback_the_sparse_output_is_the_kept_entries():
    updates = updates_of(7)
    pruner = Pruner(cost_map(SHAPES), Budget.topk_keep_ratio(0.2))
    before = {n: u.clone() for n, u in updates.items()}
    dense, _ = pruner.compress(updates)
    sparse, result = pruner.compress(updates, sparse=True)
    for n, u in updates.items():
        assert torch.equal(u, before[n])
        check_sent(sparse[n], u, result.masks[n])
        assert torch.equal(sparse[n].to_dense(), dense[n])


def test_bad_input_leaves_the_feedback_state_as_it_was():
    pruner = Pruner(cost_map(SHAPES), Budget.topk_keep_ratio(0.1))
    feedback = ErrorFeedback()
    pruner.compress(updates_of(0), feedback, sparse=True)
    saved = {n: r.clone() for n, r in feedback.residuals.items()}
    bad = updates_of(1)
    bad["a.bias"][3] = math.inf
    with pytest.raises(MaskInputError, match=r"update 'a\.bias' has 1 NaN or infinite"):
        pruner.compress(bad, feedback, sparse=True)
    assert all(torch.equal(feedback.residuals[n], saved[n]) for n in saved)
    masks = {n: torch.zeros(s, dtype=torch.bool) for n, s in SHAPES.items()}
    masks["b.bias"] = torch.zeros(2, dtype=torch.bool)  # the wrong shape, last: nothing may change before
    with pytest.raises(MaskInputError, match=r"bool tensor of the update's shape \(1,\)"):
        feedback.remember(updates_of(2), masks, sparse=True)
    assert all(torch.equal(feedback.residuals[n], saved[n]) for n in saved)
    masks["b.bias"] = torch.zeros(1, dtype=torch.uint8)
    with pytest.raises(MaskInputError, match="got torch.uint8"):
        feedback.remember(updates_of(2), masks, sparse=True)


def test_remember_with_kept_positions_still_refuses_bad_masks_and_bad_positions():
    """Given positions (as the pruner passes them), ``remember`` still checks the masks it is
    given and the positions themselves, before anything changes."""
    import numpy as np

    feedback = ErrorFeedback()
    feedback.load_state_dict({"residuals": {"w": torch.arange(10.0), "v": torch.ones(4)}})
    saved = {n: r.clone() for n, r in feedback.residuals.items()}
    update = {"w": torch.ones(10), "v": torch.ones(4)}
    good = {"w": torch.zeros(10, dtype=torch.bool), "v": torch.zeros(4, dtype=torch.bool)}
    good["w"][[0, 5]] = True
    at = {"w": np.array([0, 5], dtype=np.int32), "v": np.zeros(0, dtype=np.int32)}
    cases = [
        ({"w": torch.zeros(3), "v": good["v"]}, at, r"bool tensor of the update's shape \(10,\)"),
        (good, {"w": np.array([0, 10], dtype=np.int32), "v": at["v"]}, "within the update's 10 entries"),
        (good, {"w": np.array([-1, 5]), "v": at["v"]}, "within the update's 10 entries"),
        (good, {"w": np.array([0.0, 5.0]), "v": at["v"]}, "integer numpy array"),
        (good, {"w": [0, 5], "v": at["v"]}, "got list"),
    ]
    for masks, positions, message in cases:
        corrected = feedback.compensate(update, in_place=True)
        with pytest.raises(MaskInputError, match=message):
            feedback.remember(corrected, masks, sparse=True, positions=positions)
        feedback.undo(update)
        assert all(torch.equal(feedback.residuals[n], saved[n]) for n in saved)
    corrected = feedback.compensate(update, in_place=True)
    sent = feedback.remember(corrected, good, sparse=True, positions=at)
    assert sent["w"].indices.tolist() == [0, 5] and sent["w"].values.tolist() == [1.0, 6.0]


def test_sparse_update_sizes_and_refusals():
    s = SparseUpdate(torch.tensor([0, 5, 9]), torch.tensor([1.0, -2.0, 3.0]), (2, 5))
    assert s.numel == 10 and s.dtype == torch.float32
    assert torch.equal(s.to_dense(), torch.tensor([[1.0, 0, 0, 0, 0], [-2.0, 0, 0, 0, 3.0]]))
    assert s.nbytes_sent() == 3 * (4 + 4) and s.nbytes_sent(index_bytes=1) == 3 * 5
    big = SparseUpdate(torch.tensor([70000]), torch.tensor([1.0], dtype=torch.float64), (100000,))
    assert big.nbytes_sent() == 12
    with pytest.raises(ValueError, match="2-byte indices cannot address 100000 entries; use index_bytes=3"):
        big.nbytes_sent(index_bytes=2)
    assert narrow_positions(torch.tensor([5]), 2**31).dtype == torch.int64  # too many entries for int32
    assert narrow_positions(torch.tensor([5]), 2**31 - 1).dtype == torch.int32
    with pytest.raises(ValueError, match="positive int"):
        s.nbytes_sent(index_bytes=0)
    with pytest.raises(MaskInputError, match="1-D int64"):
        SparseUpdate(torch.tensor([0.0]), torch.tensor([1.0]), (2,))
    with pytest.raises(MaskInputError, match="one value per index"):
        SparseUpdate(torch.tensor([0, 1]), torch.tensor([1.0]), (2,))
