import json
import subprocess
import sys

import pytest

from energyprof.cli import main


def run_cli(*args, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "energyprof", *args], capture_output=True, text=True, timeout=timeout
    )


def test_detect_explains_every_backend(capsys):
    assert main(["detect", "--json"]) == 0
    probes = json.loads(capsys.readouterr().out)
    by_name = {p["backend"]: p for p in probes}
    assert by_name["sim"]["available"] is True
    for p in probes:
        assert p["reason"]


def test_detect_human_output_runs_as_a_module():
    r = run_cli("detect")
    assert r.returncode == 0
    assert "sim" in r.stdout and "nvml" in r.stdout and "rapl" in r.stdout


def test_measure_json_contract_and_returncode_passthrough():
    r = run_cli("measure", "--meter", "sim:preset=rpi4,noise_w=0", "--json", "--", sys.executable, "-c",
                "import time, sys; time.sleep(0.4); sys.exit(3)")
    assert r.returncode == 3, r.stderr
    out = json.loads(r.stdout)
    assert out["returncode"] == 3
    assert out["meter"]["backend"] == "sim" and out["meter"]["simulated"] is True
    assert isinstance(out["energy_j"], float) and out["duration_s"] >= 0.4
    assert out["energy_j"] == pytest.approx(2.7 * out["duration_s"], rel=0.1)
    assert set(out["domains"]) == {"board"}


def test_measure_human_output_says_simulated(capsys):
    assert main(["measure", "--meter", "sim", "--", "true"]) == 0
    assert "SIMULATED" in capsys.readouterr().out


def test_meter_that_cannot_start_gives_one_line_and_nonzero_exit():
    r = run_cli("measure", "--meter", "sim:preset=nope", "--json", "--", "true")
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot start meter" in lines[0] and "nope" in lines[0]


def test_missing_command():
    r = run_cli("measure", "--meter", "sim", "--", "no-such-command-xyz")
    assert r.returncode == 127 and "command not found" in r.stderr
    r = run_cli("measure", "--meter", "sim")
    assert r.returncode == 2 and "no command" in r.stderr


def test_profile_list_show_and_validate(capsys):
    assert main(["profile", "list"]) == 0
    out = capsys.readouterr().out
    assert "sim-h100" in out and "SIMULATED" in out and "resnet18" in out
    assert main(["profile", "show", "sim-h100", "--layers"]) == 0
    out = capsys.readouterr().out
    assert "SIMULATED" in out and "layer4.1.conv2.weight" in out
    assert main(["profile", "show", "no-such-profile"]) == 1
    assert main(["profile", "validate", "sim-rpi4"]) == 0
    assert "valid energyprof profile" in capsys.readouterr().out


def test_window_shorter_than_the_update_period_warns_instead_of_claiming_zero():
    # a 1 s update period, and a command far shorter: the counter cannot move
    r = run_cli("measure", "--meter", "sim:update_period_s=1,averaging_window_s=1", "--json", "--", "true")
    out = json.loads(r.stdout)
    assert out["energy_j"] == 0.0
    assert "did not move" in out["warning"] and "not zero" in out["warning"]
    assert "warning" in r.stderr


def test_verbose_flag_shows_what_the_meter_does(capsys):
    """-v: info lines (the meter opened); -vv: debug lines (each window); nothing extra without it."""
    from energyprof.cli import main as cli_main

    assert cli_main(["measure", "--meter", "sim", "--json", "--", "true"]) == 0
    assert "INFO" not in capsys.readouterr().err
    assert cli_main(["-v", "measure", "--meter", "sim", "--json", "--", "true"]) == 0
    err = capsys.readouterr().err
    assert "INFO energyprof.meters: opened meter 'sim'" in err and "SIMULATED" in err and "DEBUG" not in err
    assert cli_main(["-vv", "measure", "--meter", "sim", "--json", "--", "true"]) == 0
    err = capsys.readouterr().err
    assert "window 'command' begun" in err and "window 'command' ended" in err
    assert cli_main(["measure", "--meter", "sim", "--json", "--", "true"]) == 0  # back to quiet
    assert "DEBUG" not in capsys.readouterr().err


@pytest.fixture(autouse=True)
def _drop_cli_log_handlers():
    """main() installs stderr handlers on the package loggers; later tests get clean loggers."""
    import logging

    yield
    for name in ("energyprof", "calibrate", "cwmp"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if getattr(handler, "_energyprof_cli", False):
                logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
        logger.propagate = True
