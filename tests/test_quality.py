"""A calibration says what it cannot explain: drift correction from the reference kernel, residuals
by feature, and a verdict (calibrate/quality.py); ``profile validate --strict`` fails a poor one."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from calibrate.profile import load_profile
from calibrate.quality import MAX_CV_MAPE, assess, correct_drift, drift_factors, residual_bins

ROOT = Path(__file__).resolve().parent.parent


def test_drift_is_divided_out_and_one_disturbed_reference_does_not_move_it():
    # the device warms: energy per call rises 8 % over the run; one reference hit by a burst (+30 %)
    t = np.linspace(0, 100, 11)
    drift = 1 + 0.08 * t / 100
    ref = pd.DataFrame({"t_meter": t, "joules_per_call": 2.0 * drift, "session": "a"})
    ref.loc[5, "joules_per_call"] *= 1.3
    rows = pd.DataFrame({"t_meter": [5.0, 47.0, 95.0], "session": "a", "joules_per_call": [1.0, 1.0, 1.0],
                         "ci_low_j": 0.9, "ci_high_j": 1.1, "se_j": 0.05})
    rows["joules_per_call"] *= 1 + 0.08 * rows["t_meter"] / 100  # the same kernel, measured as it drifted
    factors, report = drift_factors(rows, ref)
    fixed = correct_drift(rows, factors)
    assert report["corrected"] and report["drift"] == pytest.approx(0.08, abs=0.01)
    assert fixed["joules_per_call"].std() / fixed["joules_per_call"].mean() < 0.005  # drift gone
    assert rows["joules_per_call"].std() / rows["joules_per_call"].mean() > 0.03  # it was there
    # a session of the meter's clock without references is left alone
    other = rows.assign(session="b")
    assert (drift_factors(other, ref)[0] == 1).all()


def test_residual_bins_by_feature():
    points = pd.DataFrame({"residual": [0.01, -0.01, 0.2, 0.22], "se": 0.01,
                           "working_set_bytes": [1.1e3, 1.2e3, 1.1e8, 1.2e8], "density": [0.01, 0.01, 0.2, 0.2],
                           "layer_numel": [np.nan, np.nan, 1e6, 1e6]})
    bins = residual_bins(points)
    assert set(bins) == {"working_set_bytes", "density", "layer_numel"}
    ws = bins["working_set_bytes"]
    assert len(ws) == 2 and ws[1]["mean"] == pytest.approx(0.21) and ws[1]["ci_low"] > 0.15
    assert bins["layer_numel"][0]["n"] == 2


def test_verdicts_name_the_cause_and_the_remedy():
    assert assess(0.05, {"cnn": (3, 3)}, [], 0.01, 0.02, 0.5) == ("ok", None)
    q, why = assess(0.137, {"cnn": (0, 3)}, ["j_per_byte_written.dram"], 0.12, 0.01, 0.5)
    assert q == "poor" and "0 of 3 replayed layers of cnn" in why and "j_per_byte_written.dram" in why
    assert "noise or windows too short" in why and "remedy" in why
    q, why = assess(MAX_CV_MAPE + 0.01, {}, [], 0.01, 0.09, 0.5)
    assert q == "poor" and "drift or interference" in why and "--cooldown" in why


def test_profile_validate_strict_fails_a_poor_profile(tmp_path):
    data = yaml.safe_load(load_profile("sim-rpi4").to_yaml())
    data.update(quality="poor", quality_reason="0 of 3 replayed layers of cnn were resolved. Likely cause: noise")
    path = tmp_path / "poor.yaml"
    path.write_text(yaml.safe_dump(data))

    def run(*args):
        return subprocess.run([sys.executable, "-m", "energyprof", "profile", "validate", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    plain, strict = run(str(path)), run("--strict", str(path))
    assert plain.returncode == 0 and "quality poor" in plain.stdout
    assert strict.returncode == 1 and "poor" in strict.stderr and "0 of 3 replayed layers" in strict.stderr
    assert "Traceback" not in strict.stderr and len(strict.stderr.strip().splitlines()) == 1
    assert run("--strict", "sim-rpi4").returncode == 0  # an older file without a verdict still loads


def test_a_noisy_calibration_is_poor_says_why_and_fails_strict(tmp_path):
    """The issue's case on the virtual clock: a meter whose noise drowns the layers' costs (2 W on a
    board that spends about 1 W above idle) must not write a profile that looks fine."""
    from calibrate.calibration import calibrate

    said = []
    out = tmp_path / "noisy.yaml"
    profile = calibrate("sim:preset=rpi4,noise_w=2,seed=1", models=["mlp"], out=out, quick=True, progress=False,
                        say=said.append)
    assert profile.quality == "poor" and "Likely cause" in profile.quality_reason
    assert "remedy" in profile.quality_reason
    assert any(line.startswith("WARNING: this calibration is poor") for line in said)
    assert load_profile(out).quality == "poor"  # recorded in the file
    assert set(profile.fit_residuals) >= {"working_set_bytes", "density", "layer_numel"}
    r = subprocess.run([sys.executable, "-m", "energyprof", "profile", "validate", "--strict", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "poor" in r.stderr
