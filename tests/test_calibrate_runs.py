"""One calibration per --out, resumed rows checked, nothing written before the inputs are good
(issue 18, rows 1, 2, 3, 8, 9 and the SIGINT exit status of row 10), on the simulator (SIMULATED)."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import calibrate.plan as plan_module
from calibrate.calibration import CalibrationError, build_plan, calibrate
from calibrate.runfiles import RunLock, RunLocked
from energyprof.errors import MeterFailure
from energyprof.models import ModelError, build_model
from energyprof.protocol import MeasurementProtocol
from tests.sigint import sigint_default

ROOT = Path(__file__).resolve().parent.parent
SPEC = "sim:preset=rpi4,seed=5"
QUIET = dict(quick=True, progress=False, say=lambda s: None)


def energyprof(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "energyprof", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, **kw)


@pytest.fixture
def small_plan(monkeypatch):
    """A short sweep (two sizes), so that a whole mlp calibration takes seconds."""
    monkeypatch.setattr(plan_module, "SWEEP_SIZES", {"quick": (4**5, 4**7)})
    monkeypatch.setattr(plan_module, "SPARSE_SIZES", {"quick": (4**5, 4**7)})
    return build_plan({"mlp": build_model("mlp")}, True)[0]


def stop_after(monkeypatch, n):
    """The meter fails at measurement n+1: n rows are saved, as after a crash."""
    real = MeasurementProtocol.measure
    count = {"n": 0, "limit": n}

    def measure(self, workload, meter, idle=None):
        count["n"] += 1
        if count["n"] > count["limit"]:
            raise MeterFailure("the simulated meter stopped answering")
        return real(self, workload, meter, idle)

    monkeypatch.setattr(MeasurementProtocol, "measure", measure)
    return count


@pytest.fixture
def partial(tmp_path, monkeypatch, small_plan):
    """A run with 12 finished rows; returns (out, csv, counter)."""
    count = stop_after(monkeypatch, 12)
    out = tmp_path / "p.yaml"
    with pytest.raises(CalibrationError, match="12 finished measurements are saved"):
        calibrate(SPEC, models=["mlp"], out=out, **QUIET)
    count["limit"], count["n"] = 10**9, 0  # from here on: how many measurements a resumed run makes
    return out, out.with_name(out.name + ".measurements.csv"), count


# ------------------------------------------------------------------------------ row 2: --resume checks every row
def test_a_garbled_line_in_the_middle_is_named_and_refused_with_the_repair_command(partial):
    out, csv, count = partial
    lines = csv.read_text().splitlines(keepends=True)
    lines[5] = lines[5][: len(lines[5]) // 2] + "\n"  # torn in the middle of the file (line 6)
    lines[8] = lines[8].replace(",sim,", ",sim,garbage,")  # one field too many (line 9)
    csv.write_text("".join(lines))
    with pytest.raises(CalibrationError) as err:
        calibrate(SPEC, models=["mlp"], out=out, resume=True, **QUIET)
    message = str(err.value)
    assert f"{csv}:6:" in message and f"{csv}:9:" in message and "none is fitted" in message
    assert not out.exists() and count["n"] == 0  # nothing measured, nothing fitted
    # the exact command it gives repairs the file; the resumed run measures the two rows again
    repair = message.splitlines()[-1].strip().split(" && ")[0]
    assert repair.startswith("sed -i.bak '6d;9d' ")
    subprocess.run(repair, shell=True, check=True)
    profile = calibrate(SPEC, models=["mlp"], out=out, resume=True, **QUIET)
    table = pd.read_csv(csv)
    plan_rows = table[table.kind != "reference"]  # the periodic reference kernel (drift) is outside the plan
    assert table.id.is_unique and len(plan_rows) == len(plan_module.build_plan({"mlp": build_model("mlp")}, True)[0])
    assert out.exists() and profile.models["mlp"].layers


def test_a_garbled_header_and_non_finite_or_duplicated_rows_are_refused(partial):
    out, csv, _ = partial
    good = csv.read_text()
    csv.write_text("i#d" + good[2:])
    with pytest.raises(CalibrationError, match=rf"{csv}:1: the header lacks id.*--force"):
        calibrate(SPEC, models=["mlp"], out=out, resume=True, **QUIET)
    lines = good.splitlines(keepends=True)
    fields = lines[3].split(",")
    header = lines[0].strip().split(",")
    fields[header.index("joules_per_call")] = "inf"
    lines[3] = ",".join(fields)
    lines.append(lines[2])  # a row written twice (two runs on one file)
    csv.write_text("".join(lines))
    with pytest.raises(CalibrationError) as err:
        calibrate(SPEC, models=["mlp"], out=out, resume=True, **QUIET)
    assert f"{csv}:4: joules_per_call='inf' is not finite" in str(err.value)
    assert f"{csv}:{len(lines)}: id" in str(err.value) and "again (first on line 3)" in str(err.value)
    assert not out.exists()


def test_a_torn_last_line_is_measured_again(partial):
    out, csv, count = partial
    data = csv.read_bytes()
    csv.write_bytes(data[:-40])  # killed while appending the 12th row
    calibrate(SPEC, models=["mlp"], out=out, resume=True, **QUIET)
    table = pd.read_csv(csv)
    # the torn 12th row, and the rest (each measured once, plus the re-measurements of interference)
    assert table.id.is_unique and count["n"] == len(table) - 11 + int(table.retries.iloc[11:].sum())


# ------------------------------------------------------------------------------ row 9: NaN never reaches the fit
def test_a_measurement_that_comes_back_nan_is_taken_again(tmp_path, monkeypatch, small_plan):
    real = MeasurementProtocol.measure
    calls = {"n": 0}

    def measure(self, workload, meter, idle=None):
        calls["n"] += 1
        result = real(self, workload, meter, idle)
        if calls["n"] in (3, 7):  # what a loaded machine on a real clock gave once in two tries
            result = dataclasses.replace(result, joules_per_call=math.nan if calls["n"] == 3 else math.inf)
        return result

    monkeypatch.setattr(MeasurementProtocol, "measure", measure)
    out = tmp_path / "p.yaml"
    profile = calibrate(SPEC, models=["mlp"], out=out, **QUIET)
    table = pd.read_csv(out.with_name(out.name + ".measurements.csv"))
    plan_rows = table[table.kind != "reference"]  # the periodic reference kernel (drift) is outside the plan
    refs = len(table) - len(plan_rows)
    assert calls["n"] == len(small_plan) + 2 + refs + int(table.retries.sum()) and len(plan_rows) == len(small_plan)
    assert table.joules_per_call.map(math.isfinite).all() and profile.models["mlp"].layers


# ------------------------------------------------------------------------------ rows 3, 5, 8: nothing written first
def test_a_bad_meter_model_or_output_path_leaves_no_file_and_the_corrected_command_runs(tmp_path, small_plan):
    out = tmp_path / "p.yaml"
    with pytest.raises(CalibrationError, match="cannot open meter 'bogus:x=1'"):
        calibrate("bogus:x=1", models=["mlp"], out=out, **QUIET)
    with pytest.raises(ModelError, match="has no parameters"):
        calibrate(SPEC, models=["tests.test_calibrate_runs:no_parameters"], out=out, **QUIET)
    with pytest.raises(ModelError, match="calling broken_factory\\(\\) raised RuntimeError: no weights here"):
        calibrate(SPEC, models=["tests.test_calibrate_runs:broken_factory"], out=out, **QUIET)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(Exception, match="is a file, not a folder"):
        calibrate(SPEC, models=["mlp"], out=tmp_path / "a-file" / "p.yaml", **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    calibrate(SPEC, models=["mlp"], out=out, **QUIET)  # not refused over files of the failed tries
    assert out.exists()


def no_parameters():
    import torch

    return torch.nn.ReLU()


def broken_factory():
    raise RuntimeError("no weights here")


def test_the_command_line_says_each_in_one_line(tmp_path):
    for args, text in (
        (["--model", "tests.test_calibrate_runs:no_parameters"], "has no parameters"),
        (["--model", ""], "empty name"),
        (["--model", "mlp,"], "empty model name"),
        (["--meter", "bogus:x=1"], "cannot open meter"),
        (["--device", "gpu7"], "'gpu7' is not a torch device"),
        (["--min-layer-numel", "-1"], "below 0"),
    ):
        full = ["calibrate", "--meter", "sim:preset=rpi4", "--model", "mlp", "--quick", "--out",
                str(tmp_path / "p.yaml"), *args]
        r = energyprof(*full)
        assert r.returncode in (1, 2) and "Traceback" not in r.stderr, (args, r.stderr)
        assert text in r.stderr, (args, r.stderr)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ row 1: one run per --out
def test_the_lock_names_its_holder_and_is_released(tmp_path):
    out = tmp_path / "p.yaml"
    with RunLock(out) as held:
        assert held.path.read_text().strip() == str(os.getpid())
        with pytest.raises(RunLocked, match=rf"another calibration \(PID {os.getpid()}\) is writing"):
            RunLock(out).acquire()
    assert not held.path.exists()
    with RunLock(out):  # free again
        pass


def test_a_second_concurrent_calibration_is_refused_and_sigint_exits_130(tmp_path):
    """Run A measures on a real clock (slow on purpose); B with --force and with --resume on the same
    --out is refused with A's PID, and changes nothing; Ctrl-C stops A with status 130."""
    out = tmp_path / "p.yaml"
    csv = out.with_name(out.name + ".measurements.csv")
    meta = out.with_name(out.name + ".calibration.json")
    lock = out.with_name(out.name + ".lock")
    args = ["calibrate", "--meter", "sim:preset=rpi4,clock=real,seed=1", "--model", "mlp", "--quick", "--out",
            str(out), "--no-progress"]
    a = subprocess.Popen([sys.executable, "-m", "energyprof", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)
    try:
        deadline = time.monotonic() + 300
        while not (csv.exists() and csv.read_text().count("\n") >= 2):
            assert a.poll() is None and time.monotonic() < deadline, "run A stopped before its first row"
            time.sleep(0.2)
        meta_before = meta.read_bytes()
        for extra in ("--force", "--resume"):
            b = energyprof(*args, extra)
            assert b.returncode == 1, (extra, b.stderr)
            assert f"another calibration (PID {a.pid}) is writing {out}" in b.stderr, (extra, b.stderr)
            assert len(b.stderr.strip().splitlines()) == 1
        assert a.poll() is None, "run A was to be still measuring"
        assert meta.read_bytes() == meta_before
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([csv.name, meta.name, lock.name])
        a.send_signal(signal.SIGINT)
        _, err = a.communicate(timeout=120)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    assert a.returncode == 130, err
    assert "continue with the same command and --resume" in err
    assert pd.read_csv(csv).id.is_unique and not lock.exists()
