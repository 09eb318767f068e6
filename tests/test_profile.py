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
from calibrate.simulated import profile_from_sim_preset

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_profiles_load_by_name_and_are_labelled_simulated():
    names = available_profiles()
    assert {"sim-h100", "sim-desktop-cpu", "sim-rpi4"} <= set(names)
    p = load_profile("sim-h100")
    assert p.simulated and p.provenance.meter.simulated and p.provenance.meter.backend == "sim"
    assert "not a measurement" in p.provenance.method


def test_shipped_profiles_match_the_simulator():
    # the YAML in profiles/ is what calibrate.simulated generates today (regenerate if this fails)
    for name in ("h100", "desktop-cpu", "rpi4"):
        shipped = load_profile(f"sim-{name}")
        fresh = profile_from_sim_preset(name, created=shipped.provenance.created)
        assert shipped == fresh


def test_round_trip_and_no_overwrite(tmp_path):
    p = profile_from_sim_preset("rpi4")
    path = save_profile(p, tmp_path / "dev.yaml")
    assert load_profile(path) == p
    before = path.read_text()
    with pytest.raises(ProfileError, match="already exists.*overwrite"):
        save_profile(profile_from_sim_preset("h100"), path)
    assert path.read_text() == before
    assert [f.name for f in tmp_path.iterdir()] == ["dev.yaml"]  # no temp file left behind
    save_profile(profile_from_sim_preset("h100"), path, overwrite=True)
    assert load_profile(path).name == "sim-h100"


def test_validation_error_names_the_field(tmp_path):
    data = profile_from_sim_preset("h100").model_dump(mode="json")
    data["coefficients"]["j_per_flop"]["value"] = "lots"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ProfileError, match=r"coefficients\.j_per_flop\.value"):
        load_profile(bad)


def test_simulated_meter_forces_simulated_profile():
    data = profile_from_sim_preset("h100").model_dump(mode="json")
    data["simulated"] = False
    with pytest.raises(ValueError, match="must say simulated: true"):
        DeviceProfile.model_validate(data)


def test_unknown_name_lists_known_ones():
    with pytest.raises(ProfileError, match="no profile named 'x'.*sim-h100"):
        load_profile("x")


def test_user_path_env_wins(tmp_path, monkeypatch):
    p = profile_from_sim_preset("rpi4").model_copy(update={"name": "sim-h100"})
    save_profile(p, tmp_path / "sim-h100.yaml")
    monkeypatch.setenv("ENERGYPROF_PROFILE_PATH", str(tmp_path))
    assert load_profile("sim-h100").coefficients.static_power_w.value == pytest.approx(2.7)


def test_layer_costs_and_prediction():
    base = profile_from_sim_preset("h100")
    layer = LayerCost(name="fc.weight", shape=[10, 64], dtype="float32", joules_per_update=1e-9,
                      ci_low=0.9e-9, ci_high=1.1e-9)
    p = base.model_copy(update={"models": {"mlp": ModelCosts(layers=[layer])}})
    assert p.layer_costs("mlp")["fc.weight"].numel == 640
    with pytest.raises(ProfileError, match="no per-layer table for model 'cnn'.*mlp"):
        p.layer_costs("cnn")
    small = p.predict_joules_per_update(1000, "float32")
    big = p.predict_joules_per_update(10**8, "float32")
    c = p.coefficients
    assert small == pytest.approx(16 * c.j_per_byte_written["cache"].value + 4 * c.j_per_byte_read["cache"].value
                                  + 2 * c.j_per_flop.value)
    assert big > small  # DRAM-sized layers cost more per entry
    with pytest.raises(ProfileError, match="dtype 'int3'"):
        p.predict_joules_per_update(10, "int3")


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
