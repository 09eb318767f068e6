"""`energyprof demo`: the chain of the real commands (calibrate -> profile -> validate -> prune) on the
simulator when no real meter is present (SIMULATED numbers)."""

from pathlib import Path

import pytest

from calibrate.profile import load_profile
from cwmp.apps.demo import run


def test_demo_runs_the_real_chain_and_keeps_the_budget(tmp_path):
    lines = []
    result = run(meter_spec="sim:preset=rpi4,seed=4", out=tmp_path, progress=False, say=lines.append)
    text = "\n".join(lines)
    assert "energyprof calibrate" in text and "energyprof validate" in text
    profile = load_profile(result["profile"])  # a fitted profile, written where the demo says
    assert profile.simulated and "mlp" in profile.models and result["simulated"]
    assert Path(result["report"], "SIMULATED-summary.md").exists()
    report_line = next(line for line in text.splitlines() if line.startswith("report:"))
    assert "(SIMULATED-summary.md, CSV, plots)" in report_line  # the file that is there, by its name
    assert result["validation"]["mape"] < 0.05
    # equal predicted energy: the budget is Top-K's whole round (the floor every round pays plus Top-K's
    # masks); CWMP's round spends no more, and both pay the same floor
    assert result["cwmp"]["predicted_j"] <= result["topk"]["budget_j"] * (1 + 1e-9)
    assert result["topk"]["predicted_j"] == pytest.approx(result["topk"]["budget_j"])
    assert result["cwmp"]["floor_j"] == result["topk"]["floor_j"] > 0
    for method in ("topk", "cwmp"):
        assert result[method]["predicted_j"] == pytest.approx(result[method]["floor_j"] + result[method]["mask_j"])
    assert all("SIMULATED" in line for line in lines if " J" in line and ("kept" in line or "MAPE" in line))


def test_two_demos_started_in_one_second_get_two_folders(tmp_path):
    from cwmp.apps.demo import _new_folder

    first, second = _new_folder(tmp_path / "out", "demo-x"), _new_folder(tmp_path / "out", "demo-x")
    assert first != second and first.is_dir() and second.is_dir() and second.name == "demo-x-2"


def test_a_meter_that_does_not_open_leaves_no_demo_folder(tmp_path):
    from energyprof.errors import EnergyprofError

    with pytest.raises(EnergyprofError, match="cannot open meter 'bogus'.*; to calibrate without hardware") as exc:
        run(meter_spec="bogus", out=tmp_path, progress=False, say=lambda line: None)
    assert "\n" not in str(exc.value)  # one line: the problem and the fix
    assert not list(tmp_path.iterdir())
