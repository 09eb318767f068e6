import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from calibrate.profile import (
    DeviceProfile,
    LayerCost,
    ModelCosts,
    ProfileError,
    available_profiles,
    load_profile,
    save_profile,
)

ROOT = Path(__file__).resolve().parent.parent


def shipped(name="sim-rpi4"):
    return load_profile(name)


def test_shipped_profiles_load_by_name_and_are_labelled_simulated():
    names = available_profiles()
    assert {"sim-h100", "sim-desktop-cpu", "sim-rpi4"} <= set(names)
    for name in ("sim-h100", "sim-desktop-cpu", "sim-rpi4"):
        p = load_profile(name)
        assert p.simulated and p.provenance.meter.simulated and p.provenance.meter.backend == "sim"
        assert p.provenance.method.startswith("SIMULATED")
        assert {"mlp", "cnn", "resnet18"} <= set(p.models)


def test_shipped_profiles_were_fitted_from_their_own_measurements():
    """Each shipped profile is the calibration's fit of the measurements saved beside it (not the
    simulator's parameters): refitting the CSV gives the same coefficients."""
    import pandas as pd

    from calibrate.fit import GlobalCostFit

    for name in ("sim-h100", "sim-desktop-cpu", "sim-rpi4"):
        path = available_profiles()[name]
        table = pd.read_csv(path.with_name(path.name + ".measurements.csv"))
        assert (table["backend"] == "sim").all() and table["simulated"].all()
        # the fit sees the measurements divided by the reference kernel's drift, as the calibration did
        from calibrate.calibration import _drift_corrected

        plan = table[table.kind != "reference"].reset_index(drop=True)
        plan, _ = _drift_corrected(plan, table[table.kind == "reference"].reset_index(drop=True))
        fit = GlobalCostFit().fit(plan[plan.kind == "sweep"].reset_index(drop=True))
        c = load_profile(name).coefficients
        assert c.j_per_call.value == pytest.approx(fit.coef_[0], rel=1e-9)
        assert c.j_per_flop.value == pytest.approx(fit.coef_[-1], rel=1e-9)
        assert c.cache_bytes == round(fit.cache_bytes_)


def test_round_trip_and_no_overwrite(tmp_path):
    p = shipped()
    path = save_profile(p, tmp_path / "dev.yaml")
    assert load_profile(path) == p
    before = path.read_text()
    with pytest.raises(ProfileError, match="already exists.*overwrite"):
        save_profile(shipped("sim-h100"), path)
    assert path.read_text() == before
    assert [f.name for f in tmp_path.iterdir()] == ["dev.yaml"]  # no temp file left behind
    save_profile(shipped("sim-h100"), path, overwrite=True)
    assert load_profile(path).name == "sim-h100"


def test_validation_error_names_the_field_and_its_line(tmp_path):
    data = shipped("sim-h100").model_dump(mode="json")
    data["coefficients"]["j_per_flop"]["value"] = "lots"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data, sort_keys=False))
    line = next(i for i, text in enumerate(bad.read_text().splitlines(), 1) if "value: lots" in text)
    with pytest.raises(ProfileError, match=rf"coefficients\.j_per_flop\.value \(line {line}\)"):
        load_profile(bad)


def test_simulated_meter_forces_simulated_profile():
    data = shipped("sim-h100").model_dump(mode="json")
    data["simulated"] = False
    with pytest.raises(ValueError, match="must say simulated: true"):
        DeviceProfile.model_validate(data)


def test_unknown_name_lists_known_ones():
    with pytest.raises(ProfileError, match="no profile named 'x'.*sim-h100"):
        load_profile("x")


def test_user_path_env_wins(tmp_path, monkeypatch):
    p = shipped("sim-rpi4").model_copy(update={"name": "sim-h100"})
    save_profile(p, tmp_path / "sim-h100.yaml")
    monkeypatch.setenv("ENERGYPROF_PROFILE_PATH", str(tmp_path))
    assert load_profile("sim-h100").coefficients.static_power_w.value == pytest.approx(2.7, rel=0.01)


def test_layer_table_checks_and_prediction():
    base = shipped("sim-h100")
    with pytest.raises(ValueError, match="numel 10 is not the product"):
        LayerCost(name="w", shape=[10, 64], dtype="float32", numel=10, compensation_j=0, compensation_ci_low=0, compensation_ci_high=0, fixed_j=0, fixed_ci_low=0, fixed_ci_high=0,
                  joules_per_update=1e-9, ci_low=1e-9, ci_high=1e-9, method="measured")
    with pytest.raises(ValueError, match="interval of joules_per_update must contain it"):
        LayerCost(name="w", shape=[10, 64], dtype="float32", numel=640, compensation_j=0, compensation_ci_low=0, compensation_ci_high=0, fixed_j=0, fixed_ci_low=0, fixed_ci_high=0,
                  joules_per_update=1e-9, ci_low=2e-9, ci_high=3e-9, method="measured")
    layer = LayerCost(name="fc.weight", shape=[10, 64], dtype="float32", numel=640, compensation_j=2e-6, compensation_ci_low=2e-6, compensation_ci_high=2e-6, fixed_j=1e-6, fixed_ci_low=1e-6,
                      fixed_ci_high=1e-6, joules_per_update=1e-9, ci_low=0.9e-9, ci_high=1.1e-9, method="measured")
    p = base.model_copy(update={"models": {"mlp": ModelCosts(layers=[layer])}})
    assert p.layer_costs("mlp")["fc.weight"].numel == 640
    assert layer.joules(0, 0) == 0 and layer.joules(10, 5) == pytest.approx(1e-6 + 1e-8)
    with pytest.raises(ProfileError, match="no per-layer table for model 'cnn'.*mlp"):
        p.layer_costs("cnn")
    small, big = p.predict_layer(1000, "float32"), p.predict_layer(10**8, "float32")
    assert big.joules(1000, 1000) - big.fixed_j > small.joules(1000, 63) - small.fixed_j  # DRAM-sized cost more
    with pytest.raises(ProfileError, match="dtype 'int3'"):
        p.predict_layer(10, "int3")


def _check_script(expect_under: Path) -> str:
    return textwrap.dedent(
        f"""
        import energyprof, calibrate.profile as cp
        from pathlib import Path
        found = cp.available_profiles()
        assert "sim-h100" in found, found
        assert Path(energyprof.__file__).resolve().is_relative_to(Path({str(expect_under)!r}).resolve()), energyprof.__file__
        assert found["sim-h100"].resolve().is_relative_to(Path({str(expect_under)!r}).resolve()), found
        print(cp.load_profile("sim-h100").name)
        """
    )


@pytest.mark.slow
def test_profiles_load_from_a_wheel_install(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir), str(ROOT)],
        check=True, timeout=300,
    )
    wheels = list(wheel_dir.glob("energyprof-*.whl"))
    assert len(wheels) == 1
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheels[0])],
        check=True, timeout=300,
    )
    assert not (target / "profiles").exists()  # no stray top-level package in site-packages
    assert not (target / "tests").exists()
    env = {**os.environ, "PYTHONPATH": str(target)}
    env.pop("ENERGYPROF_PROFILE_PATH", None)
    r = subprocess.run([sys.executable, "-c", _check_script(target)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "sim-h100"


@pytest.mark.slow
def test_profiles_load_from_an_editable_install(tmp_path):
    venv = tmp_path / "venv"
    # a venv without its own (old, bundled) pip and setuptools: it sees this interpreter's packages,
    # and this pip installs into it, so the test needs no network
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)],
                   check=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-build-isolation",
         "-e", str(ROOT)],
        check=True, timeout=300,
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ENERGYPROF_PROFILE_PATH")}
    r = subprocess.run([str(py), "-c", _check_script(ROOT)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "sim-h100"
