"""GPU hwmon nodes (amdgpu, Intel xe and i915) against sysfs trees written in a temporary folder
(tests/fakes_hwmon.py, FakeHwmon.add_gpu: Documentation/gpu/amdgpu/thermal.rst,
Documentation/ABI/testing/sysfs-driver-intel-i915-hwmon and sysfs-driver-intel-xe-hwmon,
Documentation/hwmon/sysfs-interface.rst). Everything above the files is the shipped code."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from energyprof import cli
from energyprof.errors import MeterFailure, MeterUnavailable
from energyprof.meters import hwmon, open_meter, probe_backend
from fakes_hwmon import FakeHwmon

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def rocm_box(tmp_path, monkeypatch):
    """A workstation: an Intel iGPU (card0, no hwmon node), two AMD GPUs (card1, card2), k10temp."""
    for var in ("ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)
    tree = FakeHwmon(tmp_path)
    tree.add_thermal("k10temp")
    tree.add_drm_card("0000:00:02.0", "0x8086", card=0)
    tree.amd0 = tree.add_gpu("amdgpu", "0000:03:00.0", card=1, watts=150.0)
    tree.amd1 = tree.add_gpu("amdgpu", "0000:43:00.0", card=2, watts=220.0, amd_power="power1_average")
    return tree


def window(meter, seconds):
    meter.begin("w")
    time.sleep(seconds)
    return meter.end("w")


def test_an_amdgpu_node_has_gpu_scope_and_names_its_gpu(rocm_box):
    with open_meter(f"hwmon:root={rocm_box.root},gpu=0000:03:00.0") as meter:
        m = window(meter, 0.3)
    info = m.meter
    assert info.scope == "gpu" and info.torch_device == "cuda:0" and info.kind == "sampled"
    assert info.details["gpu"]["pci"] == "0000:03:00.0" and info.details["gpu"]["card"] == "card1"
    assert m.domains.keys() == {"gpu"}
    assert m.energy_j == pytest.approx(150.0 * m.seconds, rel=1e-3)  # static files: constant power


def test_gpu_hwmon_within_1_percent_through_the_cli(rocm_box):
    """Goal: `energyprof measure --meter hwmon:root=DIR,gpu=cuda:1 -- sleep 2` on the second AMD GPU
    (power1_average, 220 W) is within 1 %."""
    run = subprocess.run(
        [sys.executable, "-m", "energyprof", "measure", "--meter", f"hwmon:root={rocm_box.root},gpu=cuda:1",
         "--json", "--", "sleep", "2"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    r = json.loads(run.stdout)
    assert r["meter"]["scope"] == "gpu" and r["meter"]["torch_device"] == "cuda:1"
    assert r["meter"]["details"]["gpu"]["pci"] == "0000:43:00.0"
    assert abs(r["energy_j"] - 220.0 * r["duration_s"]) <= 0.01 * 220.0 * r["duration_s"], r


def test_hip_visible_devices_maps_the_torch_device(rocm_box, monkeypatch):
    monkeypatch.setenv("HIP_VISIBLE_DEVICES", "1")  # only the second AMD GPU: it is cuda:0 now
    with open_meter(f"hwmon:root={rocm_box.root},gpu=cuda:0") as meter:
        assert meter.info.details["gpu"]["pci"] == "0000:43:00.0" and meter.info.torch_device == "cuda:0"
    with open_meter(f"hwmon:root={rocm_box.root},gpu=card1") as meter:
        assert meter.info.torch_device is None  # hidden from this process
        assert "hidden" in meter.info.details["gpu"]["torch_device_basis"]


def test_xe_reads_the_card_counter_exactly(tmp_path):
    tree = FakeHwmon(tmp_path)
    tree.add_drm_card("0000:00:02.0", "0x8086", card=0)  # the iGPU: xpu:0 in PCI order
    xe = tree.add_gpu("xe", "0000:03:00.0", card=1, microjoules=10**12)
    with open_meter(f"hwmon:root={tree.root},name=xe") as meter:
        info = meter.info
        meter.begin("w")
        tree.set_gpu_energy(xe, 10**12 + 45_000_000, package_uj=10**12 // 2 + 30_000_000)
        m = meter.end("w")
    assert info.kind == "counter" and info.scope == "gpu" and info.torch_device == "xpu:1"
    assert [c["label"] for c in info.details["channels"]] == ["card"]  # not pkg
    assert m.energy_j == pytest.approx(45.0, abs=1e-6) and m.domains == {"card": m.energy_j}
    with open_meter(f"hwmon:root={tree.root},name=xe,channel=pkg") as meter:
        assert meter.info.details["channels"][0]["label"] == "pkg" and meter.info.scope == "gpu"


def test_i915_counter_within_1_percent_and_a_reset_fails(tmp_path):
    tree = FakeHwmon(tmp_path)
    i915 = tree.add_gpu("i915", "0000:03:00.0", card=0, microjoules=5_000_000)
    with open_meter(f"hwmon:root={tree.root},gpu=any") as meter:
        assert meter.info.torch_device == "xpu:0" and meter.info.details["gpu"]["driver"] == "i915"
        t0 = time.perf_counter()
        meter.begin("w")
        # a 190 W card for the 0.4 s the test takes, written as the driver's counter would read
        time.sleep(0.4)
        elapsed = time.perf_counter() - t0
        tree.set_gpu_energy(i915, 5_000_000 + round(190.0 * elapsed * 1e6))
        m = meter.end("w")
        assert abs(m.energy_j - 190.0 * elapsed) <= 0.01 * 190.0 * elapsed
        meter.begin("x")
        tree.set_gpu_energy(i915, 1000)  # the driver reloaded
        with pytest.raises(MeterFailure, match="went backwards"):
            meter.end("x")


def test_detect_says_which_gpu_each_node_belongs_to(rocm_box, monkeypatch, capsys):
    monkeypatch.setattr(hwmon, "DEFAULT_ROOT", str(rocm_box.root))
    assert cli.main(["detect"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("hwmon"))
    if "  yes  " not in next(l for l in out.splitlines() if l.startswith(("nvml ", "amdsmi "))):
        assert "'--meter auto' picks hwmon:gpu=any" in out  # the order auto follows, not the listing's
    assert "amdgpu hwmon1 (GPU 0000:03:00.0, card1, cuda:0) PPT" in line
    assert "amdgpu hwmon2 (GPU 0000:43:00.0, card2, cuda:1) PPT" in line
    p = probe_backend(f"hwmon:root={rocm_box.root},gpu=any")
    assert p.available and "0000:03:00.0" in p.reason and "cuda:0" in p.reason


def test_auto_takes_a_gpu_node_before_rapl_and_battery(rocm_box, monkeypatch):
    import energyprof.meters as meters
    from energyprof.meters import Probe

    real_probe = meters.probe_backend
    monkeypatch.setattr(hwmon, "DEFAULT_ROOT", str(rocm_box.root))
    # no NVIDIA or AMD library here; RAPL and a battery would be usable
    fake = {"nvml": False, "amdsmi": False, "rapl": True, "battery": True}
    monkeypatch.setattr(meters, "probe_backend", lambda s: real_probe(s) if s.backend == "hwmon"
                        else Probe(s.backend, fake[s.backend], "stubbed"))
    with open_meter("auto") as meter:
        assert meter.info.backend == "hwmon" and meter.info.scope == "gpu" and meter.info.torch_device == "cuda:0"


def test_no_gpu_node_is_said(tmp_path):
    tree = FakeHwmon(tmp_path)
    tree.add_ina2xx("ina219")
    p = probe_backend(f"hwmon:root={tree.root},gpu=any")
    assert not p.available and "no GPU power sensor" in p.reason
    with pytest.raises(MeterUnavailable, match="no GPU power sensor"):
        open_meter(f"hwmon:root={tree.root},gpu=any")


# ------------------------------------------------------------------------------ the kernels' torch device
def test_a_gpu_torch_cannot_drive_is_refused_before_calibrating(tmp_path, rocm_box):
    """This torch is a CPU build: an Intel GPU's meter (xpu) and an AMD GPU's meter (cuda under ROCm)
    are refused in one line that says what to install, before any measurement."""
    import torch

    from energyprof.meters.base import torch_device_problem

    intel = FakeHwmon(tmp_path / "intel")
    intel.add_gpu("xe", "0000:03:00.0", card=0, microjoules=10)
    if torch.xpu.is_available() or torch.cuda.is_available():  # pragma: no cover - a GPU build of torch
        pytest.skip("this torch can drive a GPU")
    with open_meter(f"hwmon:root={intel.root},name=xe") as meter:
        assert "torch.xpu.is_available() is False" in torch_device_problem(meter.info)
    with open_meter(f"hwmon:root={rocm_box.root},gpu=cuda:0") as meter:
        assert "not a ROCm build" in torch_device_problem(meter.info)
    out = tmp_path / "p.yaml"
    run = subprocess.run(
        [sys.executable, "-m", "energyprof", "calibrate", "--meter", f"hwmon:root={intel.root},name=xe",
         "--model", "mlp", "--quick", "--out", str(out), "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("energyprof: the hwmon meter sees xpu:0, an Intel GPU") and "whl/xpu" in last
    assert not out.exists()
