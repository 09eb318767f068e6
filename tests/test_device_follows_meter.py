"""The kernels run where the meter looks (issue 18, row 4): NVML index N means cuda:N, a host meter
means cpu; a --device the meter does not see is refused unless insisted on; nothing is written
before that is settled. The NVML side is the fake function table of tests/test_nvml.py (NVML's
documented calls; see that file)."""

from __future__ import annotations

import pytest
import torch

from calibrate.calibration import calibrate
from energyprof.cli import main
from energyprof.devices import DeviceError, kernel_device
from energyprof.meters.base import MeterInfo
from energyprof.meters.nvml import NvmlMeter
from tests.test_nvml import NO_CVD, FakeNvml, h100


def info(torch_device=None, simulated=False, backend="x", scope="gpu"):
    return MeterInfo(backend=backend, scope=scope, kind="counter", update_period_s=0.1, resolution_j=1e-3,
                     simulated=simulated, domains=("d",), torch_device=torch_device)


def test_nvml_meters_say_which_cuda_device_they_see():
    fake = FakeNvml([h100(0), h100(1), h100(2)])
    with NvmlMeter(nvml=fake, environ=NO_CVD) as m:
        assert m.info.torch_device == "cuda:0"
    with NvmlMeter(indices=[2], nvml=fake, environ=NO_CVD) as m:
        assert m.info.torch_device == "cuda:2"


def test_a_host_meter_runs_the_kernels_on_the_cpu_and_refuses_a_gpu():
    assert kernel_device(info(None, scope="package")) == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA"):
            kernel_device(info(None, scope="package"), "cuda:0")


def test_a_gpu_meter_never_falls_back_to_cpu_kernels_silently():
    gpu = info("cuda:0", backend="nvml")
    if torch.cuda.is_available():
        assert kernel_device(gpu) == torch.device("cuda:0")
    else:  # the meter sees a GPU this torch cannot use: refused, not measured on the CPU
        with pytest.raises(DeviceError, match=r"the nvml meter sees cuda:0, but torch.cuda.is_available\(\) is False"):
            kernel_device(gpu)
    with pytest.raises(DeviceError, match=r"--device cpu runs the kernels where meter nvml.*--allow-device-mismatch"):
        kernel_device(gpu, "cpu")
    assert kernel_device(gpu, "cpu", allow_mismatch=True) == torch.device("cpu")


def test_a_simulated_meter_takes_the_device_asked_for_and_bad_names_are_one_clear_error():
    assert kernel_device(info("cuda:0", simulated=True), "cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="'gpu7' is not a torch device"):
        kernel_device(info(None), "gpu7")


def test_calibrate_with_a_gpu_meter_and_no_device_writes_nothing_and_measures_nothing(tmp_path, monkeypatch):
    import energyprof.meters as meters

    fake = FakeNvml([h100(0)])
    monkeypatch.setattr(meters, "open_meter", lambda spec, **kw: NvmlMeter(nvml=fake, environ=NO_CVD))
    out = tmp_path / "gpu.yaml"
    with pytest.raises(DeviceError, match="--device cpu runs the kernels where meter nvml"):
        calibrate("nvml", models=["mlp"], out=out, device="cpu", quick=True, progress=False, say=lambda s: None)
    assert list(tmp_path.iterdir()) == []
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="sees cuda:0, but torch.cuda.is_available"):
            calibrate("nvml", models=["mlp"], out=out, quick=True, progress=False, say=lambda s: None)
        assert list(tmp_path.iterdir()) == []


def test_dry_run_says_where_the_kernels_run(capsys):
    assert main(["calibrate", "--dry-run", "--meter", "sim:preset=rpi4", "--model", "mlp", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "kernels on cpu (the meter's device; meter sim sees cpu)" in out
    assert main(["calibrate", "--dry-run", "--meter", "sim:preset=rpi4", "--model", "mlp", "--device", "gpu7"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'gpu7' is not a torch device" in err[0]
