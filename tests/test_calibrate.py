"""`energyprof calibrate` end to end on the simulator (SIMULATED numbers), and the profile commands.

One calibration (cnn on the simulated rpi4, --quick) is killed half-way, resumed, and then serves
every check of issue 8's "done when": the profile validates, DRAM-sized layers cost more per kept
entry than cache-sized ones as the truth says, predictions agree with the truth, a corrupted value
fails validation naming the field and line, a second run without --force leaves the file as it was.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from calibrate.calibration import CalibrationError, build_plan, calibrate
from calibrate.profile import ProfileError, load_profile
from energyprof.costmodel import lines_touched
from energyprof.meters.sim import PRESETS
from energyprof.models import build_model
from energyprof.workloads import Compensation, UpdatePhase, scatter_layout


def true_joules(numel: int, positions: torch.Tensor, temperature: float = 0.0) -> float:
    """The simulated rpi4's truth of one update phase keeping ``positions`` (its device model)."""
    layout = scatter_layout(positions.sort().values, 4)
    counts = UpdatePhase.counts_for(numel, positions.numel(), layout["lines_written"], 4, layout["pages_written"],
                                    layout["line_runs_written"])
    return PRESETS["rpi4"].device.price(counts, temperature)

ROOT = Path(__file__).resolve().parent.parent
SPEC = "sim:preset=rpi4,seed=3"


def energyprof(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "energyprof", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, **kw)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """cnn on the simulated rpi4: killed after a third of its measurements, then resumed."""
    out = tmp_path_factory.mktemp("cal") / "rpi4-cnn.yaml"
    csv = out.with_name(out.name + ".measurements.csv")
    args = ["calibrate", "--meter", SPEC, "--model", "cnn", "--quick", "--out", str(out), "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "energyprof", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    items, _ = build_plan({"cnn": build_model("cnn")}, quick=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if csv.exists() and csv.read_text().count("\n") > len(items) // 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = pd.read_csv(csv)
    assert 0 < (before.kind != "reference").sum() < len(items), "the run was to be killed half-way"
    assert not out.exists()
    resumed = energyprof(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"({(before.kind != 'reference').sum()} already in" in resumed.stderr
    after = pd.read_csv(csv)
    return {"out": out, "csv": csv, "before": before, "after": after, "items": items, "args": args}


def test_a_killed_run_resumes_and_remeasures_nothing_it_had_finished(calibrated):
    before, after, items = calibrated["before"], calibrated["after"], calibrated["items"]
    assert after.id.is_unique
    plan_rows = after[after.kind != "reference"]
    assert len(plan_rows) == len(items) and set(plan_rows.id) == {i.id for i in items}
    assert (after.kind == "reference").sum() >= 2  # the reference kernel, re-measured in both sessions
    # the finished rows are kept as they were, not measured again
    kept = after.iloc[: len(before)].reset_index(drop=True)
    for column in ("id", "joules_per_call", "ci_low_j", "ci_high_j", "calls", "measured_at"):
        assert kept[column].tolist() == before[column].tolist()


def test_profile_validates_and_is_labelled_simulated(calibrated):
    r = energyprof("profile", "validate", str(calibrated["out"]))
    assert r.returncode == 0, r.stderr
    assert "valid energyprof profile" in r.stdout and "SIMULATED" in r.stdout
    profile = load_profile(calibrated["out"])
    assert profile.simulated and profile.provenance.meter.backend == "sim"
    assert profile.provenance.meter_spec.startswith(SPEC) and profile.provenance.wall_time_s > 0
    assert profile.provenance.torch_version == torch.__version__
    assert profile.schema_version == 3 and "SIMULATED" in profile.provenance.method
    layers = profile.layer_costs("cnn")
    assert set(layers) == {n for n, _ in build_model("cnn").named_parameters()}
    for layer in layers.values():  # never 0, every layer priced
        assert layer.joules_per_update + layer.joules_per_line > 0 and layer.fixed_j > 0
        assert layer.method == "measured" or layer.reason


def test_dram_sized_layers_cost_more_per_kept_entry_as_the_truth_says(calibrated):
    profile = load_profile(calibrated["out"])
    layers = profile.layer_costs("cnn")
    dram, cache = layers["fc1.weight"], layers["fc2.weight"]  # 12 MiB and 384 KiB working sets; L2 1 MiB
    assert dram.method == "measured"
    g = torch.Generator().manual_seed(0)

    def per_entry(layer, truth):
        k = round(0.01 * layer.numel)
        positions = torch.randperm(layer.numel, generator=g)[:k]
        if not truth:
            return (layer.joules(k, lines_touched(positions, 4)) - layer.fixed_j) / k
        # from one kept entry (the layer touched at all: its launches are index kernels) to k
        return (true_joules(layer.numel, positions) - true_joules(layer.numel, positions[:1])) / (k - 1)

    assert per_entry(dram, True) > 2 * per_entry(cache, True)  # the simulated device's truth
    assert per_entry(dram, False) > 2 * per_entry(cache, False)  # what the calibration found


def test_predictions_for_replays_agree_with_the_truth(calibrated):
    profile = load_profile(calibrated["out"])
    # the calibration divides by the drift relative to its mean: compare at the device's mean temperature
    # over a busy run (the truth of a cold device is up to dynamic_rise lower)
    g = torch.Generator().manual_seed(0)
    errors, covered = [], []
    for layer in profile.models["cnn"].layers:
        for d in (0.003, 0.02, 0.1):
            k = max(1, round(d * layer.numel))
            positions = torch.randperm(layer.numel, generator=g)[:k]
            lines = lines_touched(positions, 4)
            true_j = true_joules(layer.numel, positions, temperature=0.5)
            errors.append(abs(layer.joules(k, lines) - true_j) / true_j)
            low = layer.fixed_ci_low + layer.ci_low * k + layer.line_ci_low * lines + layer.density_ci_low * k * k / layer.numel
            high = (layer.fixed_ci_high + layer.ci_high * k + layer.line_ci_high * lines
                    + layer.density_ci_high * k * k / layer.numel)
            covered.append(low <= true_j <= high)
    # the device's launches depend on the kernel (index kernels cost more) where the model has one cost
    # per launch: small layers, mostly launches, are where the model misses (docs/simulator.md); the
    # intervals say so (issue 19's goal: held-out coverage >= 90 %)
    assert max(errors) < 0.25
    assert sum(errors) / len(errors) < 0.08
    assert sum(covered) / len(covered) >= 0.9, (sum(covered), len(covered))


def test_the_compensation_is_measured_on_its_own_and_never_charged_to_a_mask(calibrated):
    """Issue 21: error feedback's dense add runs every round on every tensor whatever the mask keeps,
    so calibration replays it on its own (one measurement per measured layer), the profile carries
    it as compensation_j, and the masked update phase no longer contains it: keeping nothing costs
    nothing beyond the floor, and a large layer's set-up is a few launches, not a pass over it."""
    after = calibrated["after"]
    comp = after[after.kind == "compensation"]
    profile = load_profile(calibrated["out"])
    layers = profile.layer_costs("cnn")
    measured = [layer for layer in layers.values() if layer.compensation_method == "measured"]
    assert len(comp) >= 1 and len(measured) >= len(comp)
    device = PRESETS["rpi4"].device  # the simulated device's truth, at the run's mean temperature
    fc1 = layers["fc1.weight"]
    assert fc1.compensation_method == "measured"
    true_comp = device.price(Compensation.counts_for(fc1.numel, 4), 0.5)
    assert fc1.compensation_j == pytest.approx(true_comp, rel=0.05)
    # the old schema charged the add to fixed_j (98 % of it for fc1); the set-up is now far below the add
    true_setup = device.price(UpdatePhase.counts_for(fc1.numel, 1, 1, 4), 0.5)
    assert fc1.fixed_j < 0.05 * fc1.compensation_j and true_setup < 0.05 * true_comp
    assert fc1.joules(0, 0) == 0.0
    for layer in layers.values():
        assert layer.compensation_ci_low <= layer.compensation_j <= layer.compensation_ci_high
        assert layer.compensation_j > 0
    # the tensors too small for their own replay are measured together (one launch each), not
    # extrapolated from the sweep, whose one cost per launch mixes scattering and compute kernels
    small = [layer for layer in layers.values() if layer.compensation_method == "measured-together"]
    assert len(after[after.kind == "compensation-group"]) == 1
    assert small and all(layer.method == "predicted" for layer in small)
    true_small = sum(device.price(Compensation.counts_for(layer.numel, 4), 0.5) for layer in small)
    assert sum(layer.compensation_j for layer in small) == pytest.approx(true_small, rel=0.05)


def test_a_second_run_without_force_refuses_and_leaves_the_file_unchanged(calibrated):
    out = calibrated["out"]
    before = out.read_bytes()
    r = energyprof(*calibrated["args"])
    assert r.returncode != 0 and "already exists" in r.stderr and "--force" in r.stderr
    assert out.read_bytes() == before


def test_a_corrupted_value_fails_validation_naming_the_field_and_line(calibrated, tmp_path):
    text = calibrated["out"].read_text()
    data = yaml.safe_load(text)
    data["models"]["cnn"]["layers"][4]["joules_per_update"] = -1.0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data, sort_keys=False))
    r = energyprof("profile", "validate", str(bad))
    assert r.returncode == 1
    assert "models.cnn.layers.4.joules_per_update" in r.stderr
    line = next(i for i, l in enumerate(bad.read_text().splitlines(), 1) if "joules_per_update: -1.0" in l)
    assert f"(line {line})" in r.stderr


def test_resume_refuses_another_meter_or_model(calibrated):
    args = list(calibrated["args"])
    other = args.copy()
    other[other.index(SPEC)] = "sim:preset=h100"
    r = energyprof(*other, "--resume", "--force")
    assert r.returncode == 1 and "cannot resume" in r.stderr and "meter" in r.stderr
    other = args.copy()
    other[other.index("cnn")] = "mlp"
    r = energyprof(*other, "--resume", "--force")
    assert r.returncode == 1 and "cannot resume" in r.stderr and "models" in r.stderr


def test_profile_diff_and_export(calibrated, tmp_path):
    r = energyprof("profile", "diff", str(calibrated["out"]), "sim-rpi4")
    assert r.returncode == 0, r.stderr
    assert "j_per_call" in r.stdout and "intervals" in r.stdout and "model cnn" in r.stdout
    dest = tmp_path / "x.yaml"
    assert energyprof("profile", "export", "sim-rpi4", "--out", str(dest)).returncode == 0
    assert load_profile(dest) == load_profile("sim-rpi4")
    r = energyprof("profile", "export", "sim-rpi4", "--out", str(dest))
    assert r.returncode == 1 and "already exists" in r.stderr


def test_auto_without_a_real_meter_says_how_to_calibrate_the_simulator(tmp_path):
    r = energyprof("calibrate", "--meter", "auto", "--model", "mlp", "--quick", "--out", str(tmp_path / "p.yaml"))
    if r.returncode == 0:
        pytest.skip("this machine has a real meter")
    assert "no real energy meter" in r.stderr and "sim:preset=" in r.stderr
    assert not (tmp_path / "p.yaml").exists()


def test_an_old_schema_says_how_to_recalibrate(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("schema_version: 1\nname: old\n")
    with pytest.raises(ProfileError, match="schema_version 1.*energyprof calibrate"):
        load_profile(old)


def test_a_schema_2_profile_is_refused_with_the_command_that_regenerates_it(tmp_path):
    """Schema 2 charged the compensation to fixed_j: refused, with its own meter and models in the command."""
    old = tmp_path / "dev.yaml"
    old.write_text("schema_version: 2\nname: dev\nprovenance:\n  meter_spec: nvml:index=0\n"
                   "  method: energyprof calibrate --quick\nmodels:\n  cnn: {}\n  mlp: {}\n")
    with pytest.raises(ProfileError) as exc:
        load_profile(old)
    msg = str(exc.value)
    assert "schema_version 2" in msg and "compensation" in msg
    assert f"energyprof calibrate --meter nvml:index=0 --model cnn --model mlp --quick --out {old} --force" in msg


def test_a_meter_failing_mid_run_keeps_what_was_measured(tmp_path, monkeypatch):
    """A meter that dies after a few measurements: the calibration stops with a clear error, the
    finished measurements stay in the CSV, and --resume continues from there."""
    import calibrate.plan as plan_module
    from energyprof.errors import MeterFailure
    from energyprof.protocol import MeasurementProtocol

    monkeypatch.setattr(plan_module, "SWEEP_SIZES", {"quick": (4**5, 4**7)})
    monkeypatch.setattr(plan_module, "SPARSE_SIZES", {"quick": (4**5, 4**7)})
    real = MeasurementProtocol.measure
    count = {"n": 0}

    def failing(self, workload, meter, idle=None):
        count["n"] += 1
        if count["n"] == 6:
            raise MeterFailure("the simulated meter stopped answering")
        return real(self, workload, meter, idle)

    monkeypatch.setattr(MeasurementProtocol, "measure", failing)
    out = tmp_path / "p.yaml"
    # the reference kernel comes first: 5 measurements saved, 4 of them the plan's
    with pytest.raises(CalibrationError, match=r"5 finished measurements are saved.*--resume"):
        calibrate(SPEC, models=["mlp"], out=out, quick=True, progress=False, say=lambda s: None)
    saved = pd.read_csv(out.with_name(out.name + ".measurements.csv"))
    assert len(saved) == 5 and (saved.kind == "reference").sum() == 1
    assert not out.exists()
    count["n"] = 100
    profile = calibrate(SPEC, models=["mlp"], out=out, quick=True, resume=True, progress=False, say=lambda s: None)
    plan = build_plan({"mlp": build_model("mlp")}, True)[0]
    assert count["n"] >= 100 + len(plan) - 4  # the rest of the plan (and the reference kernel again)
    after = pd.read_csv(out.with_name(out.name + ".measurements.csv"))
    assert sorted(after[after.kind != "reference"].id) == sorted(i.id for i in plan)
    assert profile.models["mlp"].layers and out.exists()


def test_order_is_randomised_drift_is_corrected_and_the_fit_says_what_it_cannot_explain(calibrated):
    """Every effect of the simulated device is on: the reference kernel sees it drift, the profile
    records the drift, the fit's residuals by feature and a verdict."""
    after = calibrated["after"]
    plan_order = [i.id for i in calibrated["items"]]
    run_order = after[after.kind != "reference"].id.tolist()
    assert sorted(run_order) == sorted(plan_order) and run_order != plan_order  # randomised
    profile = load_profile(calibrated["out"])
    reference = profile.provenance.protocol["reference"]
    assert reference["corrected"] and reference["measurements"] >= 4
    assert 0.005 < reference["drift"] < 0.15  # the rpi4 preset warms by a few % over a busy run
    assert "seed 0" in profile.provenance.protocol["order"]
    assert profile.quality == "ok" and profile.quality_reason is None
    for feature in ("working_set_bytes", "density", "layer_numel"):
        bins = profile.fit_residuals[feature]
        assert bins and all(b.ci_low <= b.mean <= b.ci_high for b in bins)


def test_a_profile_with_a_quarter_of_the_cache_fails_validation_and_its_residuals_point_at_the_working_set(
        calibrated, tmp_path):
    from calibrate.profile import save_profile
    from cwmp.apps.validate import shrunk_cache, validate

    fast = dict(min_window_s=0.5, min_periods=5, trials=3, idle_windows=3, warmup_s=0.05)
    wrong = save_profile(shrunk_cache(load_profile(calibrated["out"]), 4), tmp_path / "cache-div4.yaml")
    result = validate(str(wrong), SPEC, model="cnn", ratios=(0.01, 0.1), progress=False, protocol_kwargs=fast,
                      say=lambda s: None)
    assert result.summary["mape"] > 0.05  # fails validate --max-mape 0.05
    assert result.summary["bias_features"][:1] == ["working_set_bytes"], result.bias
    assert any(w.startswith("systematic bias with working-set size") for w in result.warnings)
