"""A wedged NVML driver: device calls that never return must fail the window and the command
within the documented bound (``call_timeout``, 5 s by default), never hang the tool.

In-process against the fake function table of test_nvml (a hang switch per call), and end to end:
``python -m energyprof measure --meter nvml`` with a stand-in ``pynvml`` module first on PYTHONPATH."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pynvml
import pytest

from energyprof.errors import MeterFailure
from energyprof.meters.nvml import NvmlMeter
from tests.test_nvml import NO_CVD, FakeNvml, h100, p100

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("gpu, call", [
    (h100, "nvmlDeviceGetTotalEnergyConsumption"),  # counter path (Volta and newer)
    (p100, "nvmlDeviceGetPowerUsage"),  # power path (pre-Volta): the background sampler hangs too
])
def test_a_read_that_never_returns_fails_the_window_within_the_bound(gpu, call):
    fake = FakeNvml([gpu()])
    try:
        m = NvmlMeter(nvml=fake, environ=NO_CVD, period="table", call_timeout_s=0.5)
        m.begin("w")
        fake.hang.add(call)
        t = time.perf_counter()
        with pytest.raises(MeterFailure, match=call):
            m.end("w")
        # bounded by the call timeout (at most twice: a read may first wait for the hung one); the
        # hung read never returns, so finishing at all is the point; the bound is loose for a busy CI
        assert time.perf_counter() - t < 10.0
        assert m.open_windows == ()  # the failing end released the window
        with pytest.raises(MeterFailure):
            m.begin("again")
        m.close()  # does not hang on nvmlShutdown either
        assert fake.shutdowns == 0  # a wedged driver is not called again
    finally:
        fake.unblock.set()


def test_a_read_failing_at_begin_or_end_leaves_no_window_behind():
    fake = FakeNvml([h100()])
    with NvmlMeter(nvml=fake, environ=NO_CVD, period="table") as m:
        fake.fail["nvmlDeviceGetTotalEnergyConsumption"] = pynvml.NVML_ERROR_UNKNOWN
        with pytest.raises(MeterFailure):
            m.begin("w")
        assert m.open_windows == ()
        del fake.fail["nvmlDeviceGetTotalEnergyConsumption"]
        m.begin("w")
        fake.fail["nvmlDeviceGetTotalEnergyConsumption"] = pynvml.NVML_ERROR_UNKNOWN
        with pytest.raises(MeterFailure):
            m.end("w")
        assert m.open_windows == ()
        del fake.fail["nvmlDeviceGetTotalEnergyConsumption"]
        m.begin("w")  # the name is free again
        assert m.end("w").seconds >= 0


def write_fake_pynvml(folder: Path) -> None:
    """Copy the stand-in module as ``folder/pynvml.py`` with pynvml's own codes written in."""
    names = sorted(n for n in dir(pynvml) if n.startswith(("NVML_ERROR_", "NVML_DEVICE_ARCH_"))
                   and isinstance(getattr(pynvml, n), int))
    constants = "\n".join(f"{n} = {getattr(pynvml, n)}" for n in names)
    source = (ROOT / "tests" / "fakes" / "pynvml_wedged.py").read_text()
    (folder / "pynvml.py").write_text(source.replace("# @CONSTANTS@", constants))


@pytest.mark.parametrize("arch, hung", [
    ("HOPPER", "nvmlDeviceGetTotalEnergyConsumption"),
    ("PASCAL", "nvmlDeviceGetPowerUsage"),
])
def test_energyprof_measure_exits_with_a_clear_message_when_nvml_hangs(tmp_path, arch, hung):
    """As a user meets it: the command fails with the hung call named, instead of blocking."""
    write_fake_pynvml(tmp_path)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
    env["FAKE_NVML_ARCH"] = str(getattr(pynvml, f"NVML_DEVICE_ARCH_{arch}"))
    env["FAKE_NVML_HANG_AFTER_S"] = "1"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    done = subprocess.run(
        [sys.executable, "-m", "energyprof", "measure", "--meter", "nvml:period=table,call_timeout=1", "--json",
         "--", sys.executable, "-c", "import time; time.sleep(2)"],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    assert "measurement failed" in done.stderr and hung in done.stderr, done.stderr
    assert "did not return within 1 s" in done.stderr or "no reading" in done.stderr, done.stderr
    assert done.stdout == ""
