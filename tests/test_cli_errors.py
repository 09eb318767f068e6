"""Every user error is one line and a non-zero exit, checked before any work; a job's summary is
written before its plot; the smaller items of issue 18 (rows 5, 6 and 10)."""

from __future__ import annotations

import builtins
import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from calibrate.profile import load_profile, save_profile
from cwmp.errors import CostMapError
from energyprof.cli import main

ROOT = Path(__file__).resolve().parent.parent
FAST = dict(min_window_s=0.5, min_periods=5, trials=3, idle_windows=3, warmup_s=0.05)


def energyprof(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "energyprof", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture
def a_file(tmp_path):
    """A regular file: any output path below it cannot be written, for root as for anyone."""
    f = tmp_path / "a-file"
    f.write_text("x")
    return f


def one_error_line(capsys, *texts):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    for text in texts:
        assert text in err[0], err
    return err[0]


# ------------------------------------------------------------------------------ row 5
def test_unwritable_outputs_are_refused_before_any_work(a_file, capsys, monkeypatch):
    import cwmp.apps.validate as validate_module
    from energyprof.protocol import MeasurementProtocol

    def no_measuring(*a, **k):
        raise AssertionError("measured before the output path was checked")

    monkeypatch.setattr(MeasurementProtocol, "measure", no_measuring)
    monkeypatch.setattr(MeasurementProtocol, "measure_idle", no_measuring)
    monkeypatch.setattr(validate_module, "model_updates", no_measuring)
    bad = str(a_file / "out")
    assert main(["validate", "--profile", "sim-rpi4", "--meter", "sim:preset=rpi4", "--report", bad]) == 1
    one_error_line(capsys, "--report", "is a file, not a folder")
    assert main(["demo", "--meter", "sim:preset=rpi4", "--out", bad]) == 1
    one_error_line(capsys, "--out", "is a file, not a folder")
    assert main(["calibrate", "--meter", "sim:preset=rpi4", "--model", "mlp", "--quick", "--out", bad + "/p.yaml"]) == 1
    one_error_line(capsys, "is a file, not a folder")
    assert main(["fl", "--rounds", "1", "--out", bad]) == 1
    one_error_line(capsys, "is a file, not a folder")
    assert main(["profile", "export", "sim-rpi4", "--out", bad + "/p.yaml"]) == 1
    one_error_line(capsys, "is a file, not a folder")
    assert a_file.read_text() == "x"


def test_bad_arguments_are_refused_by_the_parser(capsys):
    for args, text in (
        (["validate", "--profile", "sim-rpi4", "--meter", "sim", "--ratios", "abc"], "'abc' is not a number"),
        (["validate", "--profile", "sim-rpi4", "--meter", "sim", "--ratios", "0.1,2"], "not a fraction"),
        (["validate", "--profile", "sim-rpi4", "--meter", "sim", "--max-mape", "-0.1"], "below 0"),
        (["bench-kernel", "--meter", "sim", "--workload", "sgd", "--trials", "1"], "below 2"),
        (["demo", "--keep-ratio", "5"], "not a fraction in (0, 1]"),
        (["calibrate", "--min-layer-numel", "-5"], "below 0"),
        (["calibrate", "--model", ""], "an empty name"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert text in err and "Traceback" not in err, (args, err)
        assert len(err.strip().splitlines()) == 1 and f"energyprof {args[0]} --help" in err, err  # no usage block


def test_a_users_model_whose_factory_raises_is_one_line(capsys):
    assert main(["validate", "--profile", "sim-rpi4", "--meter", "sim:preset=rpi4", "--model",
                 "tests.test_cli_errors:broken_model"]) == 1
    one_error_line(capsys, "calling broken_model() raised ValueError: checkpoint missing")


def broken_model():
    raise ValueError("checkpoint missing")


def test_the_guard_keeps_the_traceback_for_vv():
    """An OSError the checks cannot foresee (/proc takes no new files, even from root): one line, and
    the traceback with -vv."""
    args = ["profile", "export", "sim-rpi4", "--out", "/proc/energyprof-test.yaml"]
    quiet = energyprof(*args)
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr
    lines = quiet.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("energyprof: /proc/") and "No such file or directory" in lines[0]
    loud = energyprof("-vv", *args)
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "FileNotFoundError" in loud.stderr
    assert loud.stderr.strip().splitlines()[-1].startswith("energyprof: /proc/")


def test_bench_kernel_on_a_device_that_does_not_exist_is_one_line(capsys):
    assert main(["bench-kernel", "--meter", "sim", "--workload", "sgd", "--device", "gpu7"]) == 1
    one_error_line(capsys, "'gpu7' is not a torch device")


# ------------------------------------------------------------------------------ row 6
def test_validate_refuses_a_table_of_another_models_layers(tmp_path):
    from cwmp.apps.validate import validate

    data = load_profile("sim-rpi4").model_dump()
    data["models"]["cnn"] = data["models"]["mlp"]  # the cnn table holds the mlp's layers
    wrong = save_profile(type(load_profile("sim-rpi4")).model_validate(data), tmp_path / "wrong.yaml")
    with pytest.raises(CostMapError, match=r"prices no layer conv1.weight.* of model 'cnn'"):
        validate(str(wrong), "sim:preset=rpi4", model="cnn", progress=False, protocol_kwargs=FAST, say=lambda s: None)
    r = energyprof("validate", "--profile", str(wrong), "--meter", "sim:preset=rpi4", "--model", "cnn")
    assert r.returncode == 1 and "prices no layer" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------ row 8
def test_validate_refuses_a_model_without_parameters(capsys):
    assert main(["validate", "--profile", "sim-rpi4", "--meter", "sim:preset=rpi4", "--model",
                 "tests.test_calibrate_runs:no_parameters"]) == 1
    one_error_line(capsys, "has no parameters")


# ------------------------------------------------------------------------------ summaries before plots
@pytest.fixture
def no_matplotlib(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kw):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ModuleNotFoundError("No module named 'matplotlib'")
        return real_import(name, *args, **kw)

    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_validate_writes_its_summary_when_the_plot_fails(tmp_path, no_matplotlib):
    from cwmp.apps.validate import validate

    said = []
    report = tmp_path / "report"
    result = validate("sim-rpi4", "sim:preset=rpi4,seed=3", model="mlp", ratios=(0.1,), updates="random",
                      report=report, progress=False, protocol_kwargs=FAST, say=said.append)
    names = sorted(p.name for p in report.iterdir())
    assert names == ["SIMULATED-layers.csv", "SIMULATED-summary.json", "SIMULATED-summary.md",
                     "SIMULATED-validation.csv"]  # the data (with the per-layer residuals), no image
    assert "MAPE" in (report / "SIMULATED-summary.md").read_text() and result.summary["n"] == 3
    assert any("no plots" in line and "matplotlib" in line for line in said)


def test_fl_writes_its_summary_when_the_plot_fails(tmp_path, capsys, no_matplotlib):
    out = tmp_path / "fl"
    assert main(["fl", "--model", "mlp", "--clients", "3", "--rounds", "1", "--seeds", "0", "--ratios", "5%",
                 "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["layers.csv", "rounds.csv", "summary.json", "summary.md"]
    assert "no plot" in capsys.readouterr().err


# ------------------------------------------------------------------------------ row 10
def test_fl_does_not_overwrite_an_earlier_run_without_force(tmp_path, capsys):
    out = tmp_path / "fl"
    out.mkdir()
    (out / "summary.md").write_text("an earlier run\n")
    args = ["fl", "--model", "mlp", "--clients", "3", "--rounds", "1", "--seeds", "0", "--ratios", "5%",
            "--out", str(out)]
    assert main(args) == 1
    one_error_line(capsys, "already holds summary.md", "--force")
    assert (out / "summary.md").read_text() == "an earlier run\n"
    assert main([*args, "--force"]) == 0
    assert (out / "summary.md").read_text() != "an earlier run\n"


def test_fl_refuses_workers_with_the_flower_engine_before_any_work(tmp_path, capsys):
    # --workers shares the local engine's runs among processes; Flower's simulation gives each
    # client one CPU through Ray, so the option would be silently ignored there
    out = tmp_path / "fl"
    args = ["fl", "--model", "mlp", "--clients", "3", "--rounds", "1", "--seeds", "0", "--ratios", "5%",
            "--engine", "flower", "--workers", "2", "--out", str(out)]
    assert main(args) == 1
    one_error_line(capsys, "--workers is for the local engine", "leave --workers out")
    assert not any(out.iterdir()) if out.exists() else True


def test_a_profile_is_written_with_the_usual_file_mode(tmp_path):
    umask = os.umask(0o022)
    try:
        path = save_profile(load_profile("sim-rpi4"), tmp_path / "p.yaml")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_cifar_batch_re_pickled_by_python3_loads(tmp_path):
    """Python 3's pickle (protocol 2) writes bytes as _codecs.encode(str, 'latin1'): allowed for
    latin-1 only, and the batch reads as the original."""
    from cwmp.apps.federated.data import CIFAR_TEST, CIFAR_TRAIN, DataError, load_dataset, restricted_load
    from tests.test_federated_data import write_cifar_folder

    root = write_cifar_folder(tmp_path / "cifar-10-batches-py", per_batch=4)
    for name in (*CIFAR_TRAIN, CIFAR_TEST):
        with open(root / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        raw = pickle.dumps(batch, protocol=2)
        assert b"_codecs\nencode" in raw
        (root / name).write_bytes(raw)
    ds = load_dataset(f"cifar10:{root}")
    assert ds.x_train.shape == (20, 3, 32, 32)
    again = restricted_load(root / CIFAR_TEST)
    assert isinstance(again[b"data"], np.ndarray) and again[b"data"].dtype == np.uint8
    evil = tmp_path / "evil"
    evil.write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x06\x00\x00\x00base64\x86R.")
    with pytest.raises(DataError, match="refused _codecs.encode"):
        restricted_load(evil)
