"""`energyprof validate` on the simulator (SIMULATED numbers): a profile calibrated here on the simulated
rpi4 (every effect of its device model on), and the shipped simulated profiles for the warnings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from calibrate.profile import load_profile, save_profile
from calibrate.calibration import calibrate
from cwmp.apps.validate import doubled, shrunk_cache, validate

ROOT = Path(__file__).resolve().parent.parent
FAST = dict(min_window_s=0.5, min_periods=5, trials=3, idle_windows=3, warmup_s=0.05)


def energyprof(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "energyprof", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "rpi4-mlp.yaml"
    calibrate("sim:preset=rpi4,seed=11", models=["mlp"], out=out, quick=True, progress=False, say=lambda s: None)
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory, profile_path):
    report = tmp_path_factory.mktemp("val") / "report"
    return validate(str(profile_path), "sim:preset=rpi4,seed=11", model="mlp", ratios=(0.01, 0.1), report=report,
                    progress=False, protocol_kwargs=FAST, say=lambda s: None)


def test_predicted_against_measured_and_the_truth(run):
    t, s = run.table, run.summary
    assert len(t) == 6 and set(t["mask"]) == {"topk", "cwmp-p1", "cwmp-p2"}
    assert s["n"] == 6 and s["simulated"] is True
    assert s["mape"] == pytest.approx(t["error"].abs().mean())
    assert s["mape"] < 0.05, t[["mask", "ratio", "predicted_j", "measured_j", "truth_j"]]
    # the third column tells model error from measurement error
    assert {"truth_j", "model_error", "measurement_error"} <= set(t.columns)
    assert s["model_mape"] < 0.05 and s["measurement_mape"] < 0.05
    assert (t["ci_low_j"] < t["measured_j"]).all() and (t["measured_j"] < t["ci_high_j"]).all()


def test_the_report_says_simulated_in_every_file(run):
    names = sorted(p.name for p in run.report.iterdir())
    assert names == ["SIMULATED-error-by-ratio.png", "SIMULATED-layers.csv", "SIMULATED-predicted-vs-measured.png",
                     "SIMULATED-residuals.png", "SIMULATED-summary.json", "SIMULATED-summary.md",
                     "SIMULATED-validation.csv"]
    md = (run.report / "SIMULATED-summary.md").read_text()
    assert "SIMULATED" in md.splitlines()[0] and "MAPE" in md and "predicted from global coefficients" in md
    summary = json.loads((run.report / "SIMULATED-summary.json").read_text())
    assert summary["simulated"] is True and {"mape", "n", "worst", "bias"} <= set(summary)


def test_per_layer_residuals_against_the_three_features(run):
    layers = run.layers
    assert len(layers) == 12 and set(layers["mask"]) == {"random"} and set(layers["ratio"]) == {0.01, 0.1}
    assert {"working_set_bytes", "density", "layer_numel", "residual", "se", "truth_j"} <= set(layers.columns)
    assert run.summary["layers_measured"] == len(layers) and "bias_features" in run.summary
    assert "Per-layer residuals" in (run.report / "SIMULATED-summary.md").read_text()


def test_a_profile_with_a_quarter_of_the_cache_fails_the_gate(tmp_path, profile_path):
    # (that its residuals point at the working set is checked on cnn, whose layers span more sizes:
    # tests/test_calibrate.py)
    wrong = save_profile(shrunk_cache(load_profile(profile_path), 4), tmp_path / "cache-div4.yaml")
    r = energyprof("validate", "--profile", str(wrong), "--meter", "sim:preset=rpi4,seed=11", "--model", "mlp",
                   "--ratios", "0.01,0.1", "--max-mape", "0.05", "--json")
    assert r.returncode == 3, r.stderr
    assert json.loads(r.stdout)["mape"] > 0.05


def test_a_doubled_profile_fails_the_gate(tmp_path, profile_path):
    bad = save_profile(doubled(load_profile(profile_path)), tmp_path / "doubled.yaml")
    r = energyprof("validate", "--profile", str(bad), "--meter", "sim:preset=rpi4", "--model", "mlp",
                   "--ratios", "0.01,0.1", "--max-mape", "0.1", "--json")
    assert r.returncode == 3, r.stderr
    summary = json.loads(r.stdout)
    assert summary["mape"] > 0.5 and summary["simulated"] is True
    assert "exceeds --max-mape" in r.stderr


def test_a_profile_for_another_device_or_without_the_models_table_is_warned_about(tmp_path):
    result = validate("sim-h100", "sim:preset=rpi4,seed=2", model="tests.test_validate:tiny_model",
                      ratios=(0.1,), updates="random", progress=False, protocol_kwargs=FAST, say=lambda s: None)
    text = " ".join(result.warnings)
    assert "no per-layer table" in text and "global coefficients" in text
    assert "calibrated with meter sim (gpu)" in text and "sim (board)" in text
    assert result.summary["predicted_layers"] == ["0.weight", "0.bias"]


def tiny_model():
    import torch

    return torch.nn.Sequential(torch.nn.Linear(300, 200))
