"""The amdsmi backend against a stand-in ``amdsmi`` module (tests/fake_amdsmi.py) that follows the
package's documented API and return shapes (ROCm/amdsmi py-interface/README.md, amdsmi_interface.py,
amd_smi/amdsmi.h). Everything above the module is the shipped code."""

import ctypes
import sys
import time

import pytest

from energyprof import cli
from energyprof.errors import MeterFailure, MeterNotSupported, MeterPermissionError, MeterSpecError, MeterUnavailable
from energyprof.meters import amdsmi as backend
from energyprof.meters import open_meter, probe_backend
from energyprof.meters.spec import parse_spec
from fake_amdsmi import AMDSMI_STATUS_DRIVER_NOT_LOADED, AMDSMI_STATUS_NO_PERM, FakeAmdGpu, make_module

RES = ctypes.c_float(15.3).value  # counter_resolution as the wrapper returns it (a C float, uJ)


def open_amd(spec="amdsmi", gpus=None, env=None, **kw):
    mod = make_module(gpus or [FakeAmdGpu()], **kw)
    return backend.open_from_spec(parse_spec(spec), amdsmi=mod, environ=env or {}), mod


# ------------------------------------------------------------------------------ the counter
@pytest.mark.parametrize("rocm", [(6, 2), (6, 3)])
def test_the_accumulator_times_its_resolution(rocm):
    """ROCm <= 6.2 names the accumulator 'power', 6.3 and later 'energy_accumulator' (both kept)."""
    gpu = FakeAmdGpu(counts=123_456)
    meter, mod = open_amd(gpus=[gpu], rocm=rocm)
    with meter:
        meter.begin("w")
        gpu.counts += 1_000_000  # 15.3 J
        m = meter.end("w")
        info = meter.info
    assert m.energy_j == pytest.approx(1_000_000 * RES * 1e-6, rel=1e-12)
    assert info.kind == "counter" and info.scope == "gpu" and info.torch_device == "cuda:0"
    assert info.resolution_j == pytest.approx(RES * 1e-6)
    assert info.details["gpus"][0]["accumulator_key"] == ("power" if rocm == (6, 2) else "energy_accumulator")
    assert mod.state["init"] == 0  # shut down on close


@pytest.mark.parametrize("wrap_bits", [64, 32])
def test_a_counter_that_wraps_mid_window_is_exact(wrap_bits):
    """Goal: the uint64 accumulator (or a 32-bit one, wrap_bits=32) wraps inside the window; no count
    is lost or added."""
    top = 2 ** wrap_bits
    gpu = FakeAmdGpu(counts=top - 300)
    meter, _ = open_amd(f"amdsmi:wrap_bits={wrap_bits}", gpus=[gpu])
    with meter:
        meter.begin("w")
        gpu.counts = top - 10
        meter.begin("inner")
        gpu.counts = top + 700  # wrapped: the register now reads 700
        inner = meter.end("inner")
        m = meter.end("w")
    assert m.energy_j == pytest.approx(1000 * RES * 1e-6, rel=1e-12)
    assert inner.energy_j == pytest.approx(710 * RES * 1e-6, rel=1e-12)


def test_a_64_bit_counter_going_backwards_is_a_reset_not_a_wrap():
    gpu = FakeAmdGpu(counts=5_000_000)
    meter, _ = open_amd(gpus=[gpu])
    with meter:
        meter.begin("w")
        gpu.counts = 1000  # GPU reset: the accumulator restarted
        with pytest.raises(MeterFailure, match="went backwards .* GPU was reset"):
            meter.end("w")


def test_a_live_counter_follows_the_power():
    gpu = FakeAmdGpu(watts=300.0)
    meter, _ = open_amd(gpus=[gpu])
    with meter:
        meter.begin("w")
        time.sleep(0.3)
        m = meter.end("w")
    # the counter moves every 1 ms in 15.3 uJ counts; the edges are read within the window's clock
    assert m.energy_j == pytest.approx(300.0 * m.seconds, rel=0.03)


# ------------------------------------------------------------------------------ power fallback
def test_no_counter_falls_back_to_polled_power():
    gpu = FakeAmdGpu(energy=False, watts=120.0, current_socket_power=None, average_socket_power=120)
    meter, _ = open_amd("amdsmi:rate_hz=50", gpus=[gpu])
    with meter:
        assert meter.info.kind == "sampled" and meter.info.torch_device == "cuda:0"
        assert meter.info.details["gpus"][0]["power_key"] == "average_socket_power"  # current is N/A here
        meter.begin("w")
        time.sleep(0.3)
        m = meter.end("w")
    assert m.energy_j == pytest.approx(120.0 * m.seconds, rel=1e-3)
    with pytest.raises(MeterNotSupported, match="no energy counter .*mode=sampled"):
        open_amd("amdsmi:mode=counter", gpus=[FakeAmdGpu(energy=False)])


# ------------------------------------------------------------------------------ GPU selection
def three_gpus():
    # amdsmi lists them in another order than KFD's nodes (HIP enumerates by KFD node)
    return [FakeAmdGpu(name="B", bdf="0000:83:00.0", node_id=3, counts=0),
            FakeAmdGpu(name="A", bdf="0000:03:00.0", node_id=2, counts=0),
            FakeAmdGpu(name="C", bdf="0000:c3:00.0", node_id=4, counts=0)]


@pytest.mark.parametrize("env, index, name", [
    ({}, 0, "A"),
    ({}, 2, "C"),
    ({"HIP_VISIBLE_DEVICES": "2"}, 0, "C"),
    ({"ROCR_VISIBLE_DEVICES": "1,2", "HIP_VISIBLE_DEVICES": "1"}, 0, "C"),
    ({"CUDA_VISIBLE_DEVICES": "1,0"}, 1, "A"),  # HIP honours CUDA_VISIBLE_DEVICES when HIP_... is unset
    ({"HIP_VISIBLE_DEVICES": "1", "CUDA_VISIBLE_DEVICES": "2"}, 0, "B"),
])
def test_index_is_the_hip_ordinal(env, index, name):
    meter, _ = open_amd(f"amdsmi:index={index}", gpus=three_gpus(), env=env)
    with meter:
        g = meter.info.details["gpus"][0]
    assert g["name"] == name and meter.info.torch_device == f"cuda:{index}" and g["domain"] == f"gpu{index}"
    assert meter.info.details["order"].startswith("KFD node order")


def test_selection_errors_are_said():
    with pytest.raises(MeterUnavailable, match=r"no GPU with index 1: this process sees 1 AMD GPU.*HIP_VISIBLE_DEVICES"):
        open_amd("amdsmi:index=1", gpus=three_gpus(), env={"HIP_VISIBLE_DEVICES": "0"})
    with pytest.raises(MeterSpecError, match="names a GPU by UUID"):
        open_amd("amdsmi", gpus=three_gpus(), env={"ROCR_VISIBLE_DEVICES": "GPU-4e1a2b"})
    with pytest.raises(MeterUnavailable, match="hides every GPU"):
        open_amd("amdsmi", gpus=three_gpus(), env={"HIP_VISIBLE_DEVICES": ""})
    without_kfd, _ = open_amd("amdsmi:index=0", gpus=three_gpus(), has_kfd=False)
    with without_kfd:
        assert without_kfd.info.details["order"].startswith("PCI order")
        assert without_kfd.info.details["gpus"][0]["pci_bdf"] == "0000:03:00.0"


# ------------------------------------------------------------------------------ failure policy (as NVML's)
def test_errors_become_energyprof_errors_with_the_fix():
    with pytest.raises(MeterPermissionError, match="/dev/kfd .*'render' and 'video' groups"):
        open_amd(init_error=AMDSMI_STATUS_NO_PERM)
    with pytest.raises(MeterUnavailable, match="amdgpu kernel driver is not loaded"):
        open_amd(init_error=AMDSMI_STATUS_DRIVER_NOT_LOADED)
    gpu = FakeAmdGpu(counts=0)
    meter, mod = open_amd(gpus=[gpu])
    with meter:
        meter.begin("w")
        mod.fail["amdsmi_get_energy_count"] = 12  # AMDSMI_STATUS_IO while measuring
        with pytest.raises(MeterFailure, match="stopped answering on gpu0 .*status 12.*window is void"):
            meter.end("w")


def test_a_call_that_never_returns_fails_within_the_bound():
    gpu = FakeAmdGpu(counts=0)
    meter, mod = open_amd("amdsmi:call_timeout=0.3", gpus=[gpu])
    try:
        meter.begin("w")
        mod.hang.add("amdsmi_get_energy_count")
        t0 = time.monotonic()
        with pytest.raises(MeterFailure, match=r"amdsmi_get_energy_count\(\) .* did not return within 0.3 s"):
            meter.end("w")
        assert time.monotonic() - t0 < 30  # bounded (generous for a loaded machine)
        with pytest.raises(MeterFailure, match="wedged"):
            meter.begin("next")
    finally:
        mod.unblock.set()
        meter.close()


def test_missing_package_and_detect(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "amdsmi", None)  # import amdsmi -> ImportError
    p = probe_backend("amdsmi")
    assert not p.available and "pip install 'energyprof[amd]'" in p.reason
    monkeypatch.setitem(sys.modules, "amdsmi", make_module(three_gpus()))
    assert cli.main(["detect"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("amdsmi"))
    assert "yes" in line and "gpu0 = cuda:0: A (0000:03:00.0, energy counter)" in line
    with open_meter("amdsmi:index=2") as meter:
        assert meter.info.details["gpus"][0]["name"] == "C"
