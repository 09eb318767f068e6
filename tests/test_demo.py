import pytest
import torch

from cwmp.demo import build_model, one_update, run
from cwmp.masks import topk_mask
from energyprof.meters.sim import PRESETS
from energyprof.workloads import LayerReplay


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_demo_recovers_the_simulated_per_entry_costs_and_labels_them():
    lines: list[str] = []
    result = run(meter_spec="sim:preset=rpi4,seed=0", min_window_s=0.5, trials=3, say=lines.append)
    assert result["meter"]["simulated"] is True
    assert all("SIMULATED" in line for line in lines if line.startswith(("meter", "joules", "same budget")))

    # the simulator's truth for the same replayed kernels
    model = build_model()
    update = one_update(model, torch.device("cpu"))
    masks = {n: topk_mask(u, max(1, round(0.1 * u.numel()))) for n, u in update.items()}
    replay = LayerReplay(model, masks).setup("cpu")
    preset = PRESETS["rpi4"]
    for name, w in replay.layers_.items():
        truth = preset.price(w.counts_) / int(masks[name].sum())
        assert result["prices"][name] == pytest.approx(truth, rel=0.25), name
    # the two layers sit on different memory levels, so their entries cost differently
    assert result["prices"]["0.weight"] > 5 * result["prices"]["2.weight"]

    topk, cwmp = result["topk"], result["cwmp"]
    assert cwmp["predicted_j"] <= topk["predicted_j"] * (1 + 1e-9)  # same budget, never exceeded
    assert 0 < topk["norm_kept"] <= 1 and 0 < cwmp["norm_kept"] <= 1
