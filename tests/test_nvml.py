"""NVML backend against a fake pynvml function table (the hardware boundary): GPUs whose energy
counter and power readings advance in real time and update only every ``period_s``, with the real
``pynvml.NVMLError`` codes for unsupported calls, pre-Volta parts and failures."""

from __future__ import annotations

import math
import threading
import time
from types import SimpleNamespace

import pynvml
import pytest

from energyprof.errors import (
    MeterFailure,
    MeterNotSupported,
    MeterPermissionError,
    MeterUnavailable,
)
from energyprof.meters import open_meter, probe_backend
from energyprof.meters import nvml as nvml_backend
from energyprof.meters.nvml import NvmlMeter, infer_update_period
from energyprof.meters.spec import parse_spec

E = pynvml.NVMLError


class FakeGpu:
    """A GPU whose power is piecewise constant (``steps``: (seconds after start, watts)); its sensor
    updates every ``period_s``: the energy counter (mJ) and the power reading (mW) hold the value
    of the last update."""

    def __init__(self, name, arch, uuid, steps=((0.0, 100.0),), period_s=0.02, counter=True, power=True,
                 bus="00000000:01:00.0", jitter_w=0.3):
        self.name, self.arch, self.uuid, self.bus = name, arch, uuid, bus
        self.steps = list(steps)
        self.period_s = period_s
        self.counter, self.power = counter, power
        self.t0 = time.perf_counter()
        self.offset_mj = 123_456_789  # energy since the driver loaded, before the test
        self.frozen_at: float | None = None
        self.jitter_w = jitter_w  # readings alternate +-jitter around the true power, as real ones wobble

    def power_at(self, rel: float) -> float:
        w = self.steps[0][1]
        for start, watts in self.steps:
            if rel >= start:
                w = watts
        return w

    def energy_until(self, rel: float) -> float:
        """Exact joules from t0 to t0 + rel."""
        total = 0.0
        for i, (start, watts) in enumerate(self.steps):
            end = self.steps[i + 1][0] if i + 1 < len(self.steps) else math.inf
            if rel > start:
                total += watts * (min(rel, end) - start)
        return total

    def truth(self, t_a: float, t_b: float) -> float:
        return self.energy_until(t_b - self.t0) - self.energy_until(t_a - self.t0)

    def _last_update(self) -> float:
        now = self.frozen_at if self.frozen_at is not None else time.perf_counter()
        return math.floor((now - self.t0) / self.period_s) * self.period_s

    def energy_mj(self) -> int:
        return self.offset_mj + int(1000 * self.energy_until(self._last_update()))

    def power_mw(self) -> int:
        last = self._last_update()
        sign = 1 if round(last / self.period_s) % 2 == 0 else -1
        return int(1000 * (self.power_at(last) + sign * self.jitter_w))


class FakeNvml:
    """The slice of pynvml's function table the backend uses. ``fail[name]`` or
    ``fail[(name, nvml_index)]`` makes that call raise the given NVML error code."""

    def __init__(self, gpus, init_error=None, driver="550.54.15"):
        self.gpus = list(gpus)
        self.init_error = init_error
        self.driver = driver
        self.refs = 0
        self.inits = self.shutdowns = 0
        self.fail: dict = {}
        self.calls: dict[str, int] = {}
        self.hang: set[str] = set()  # calls that block until ``unblock`` is set (a wedged driver)
        self.unblock = threading.Event()

    def _enter(self, name, gpu=None):
        self.calls[name] = self.calls.get(name, 0) + 1
        if name in self.hang:
            self.unblock.wait()
        if name != "nvmlInit" and self.refs <= 0:
            raise E(pynvml.NVML_ERROR_UNINITIALIZED)
        code = self.fail.get(name)
        if code is None and gpu is not None:
            code = self.fail.get((name, self.gpus.index(gpu)))
        if code is not None:
            raise E(code)

    def nvmlInit(self):
        self._enter("nvmlInit")
        if self.init_error is not None:
            raise E(self.init_error)
        self.refs += 1
        self.inits += 1

    def nvmlShutdown(self):
        self._enter("nvmlShutdown")
        self.refs -= 1
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self):
        self._enter("nvmlSystemGetDriverVersion")
        return self.driver

    def nvmlDeviceGetCount(self):
        self._enter("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= i < len(self.gpus):
            raise E(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self.gpus[i]

    def nvmlDeviceGetName(self, h):
        self._enter("nvmlDeviceGetName", h)
        return h.name

    def nvmlDeviceGetUUID(self, h):
        self._enter("nvmlDeviceGetUUID", h)
        return h.uuid

    def nvmlDeviceGetPciInfo(self, h):
        self._enter("nvmlDeviceGetPciInfo", h)
        return SimpleNamespace(busId=h.bus.encode())

    def nvmlDeviceGetArchitecture(self, h):
        self._enter("nvmlDeviceGetArchitecture", h)
        if h.arch is None:
            raise E(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return h.arch

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        self._enter("nvmlDeviceGetTotalEnergyConsumption", h)
        if not h.counter or (h.arch is not None and h.arch < pynvml.NVML_DEVICE_ARCH_VOLTA):
            raise E(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return h.energy_mj()

    def nvmlDeviceGetPowerUsage(self, h):
        self._enter("nvmlDeviceGetPowerUsage", h)
        if not h.power:
            raise E(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return h.power_mw()


def h100(i=0, watts=300.0, period_s=0.02, **kw):
    return FakeGpu("NVIDIA H100 80GB HBM3", pynvml.NVML_DEVICE_ARCH_HOPPER, f"GPU-{'abc'[i % 3] * 8}-{i:04d}",
                   steps=((0.0, watts),), period_s=period_s, bus=f"00000000:{i + 1:02x}:00.0", **kw)


def p100(steps=((0.0, 50.0),), period_s=0.02):
    return FakeGpu("Tesla P100-PCIE-16GB", pynvml.NVML_DEVICE_ARCH_PASCAL, "GPU-pascal00-0000",
                   steps=steps, period_s=period_s)


NO_CVD: dict[str, str] = {}


# ------------------------------------------------------------------------------ this machine
def _nvml_loads() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


@pytest.mark.skipif(_nvml_loads(), reason="this machine has a working NVIDIA driver")
def test_this_machine_explains_why_nvml_is_unavailable():
    p = probe_backend("nvml")
    assert not p.available
    assert "libnvidia-ml.so" in p.reason and "Install the NVIDIA driver" in p.reason
    with pytest.raises(MeterUnavailable, match="libnvidia-ml.so.1 was not found"):
        open_meter("nvml")


# ------------------------------------------------------------------------------ Volta and newer
def test_counter_on_hopper_measures_period_and_energy():
    fake = FakeNvml([h100(0, 300.0), h100(1, 200.0)])
    with NvmlMeter(nvml=fake, environ=NO_CVD) as m:
        info = m.info
        assert info.kind == "counter" and info.scope == "gpu" and info.resolution_j == 1e-3
        assert info.domains == ("gpu0", "gpu1") and not info.simulated
        # measured, not assumed: the fake's 20 ms, or a multiple when a busy machine polls late
        assert 0.015 <= info.update_period_s <= 0.2
        assert info.averaging_window_s == 0.025  # Hopper: published, polling cannot see it
        g0 = info.details["gpus"][0]
        assert g0["update_period_source"].startswith("measured") and g0["architecture"] == "Hopper"
        assert g0["uuid"] == fake.gpus[0].uuid and g0["pci_bus_id"] == "00000000:01:00.0"
        assert info.details["driver_version"] == "550.54.15"
        t_a = time.perf_counter()
        m.begin("w")
        time.sleep(0.4)
        r = m.end("w")
        t_b = time.perf_counter()
    for d, gpu in zip(("gpu0", "gpu1"), fake.gpus):
        truth = gpu.truth(t_a, t_b)
        # a counter that updates every 20 ms is off by at most one update at each edge
        assert abs(r.domains[d] - truth) <= gpu.steps[0][1] * (2 * gpu.period_s) + 0.01, (d, r.domains[d], truth)
    assert r.energy_j == pytest.approx(r.domains["gpu0"] + r.domains["gpu1"])
    assert fake.inits == fake.shutdowns == 1  # close() shuts NVML down


def test_spec_index_and_given_period_through_the_registry():
    fake = FakeNvml([h100(0), h100(1), h100(2)])
    with open_meter("nvml:index=1+2,period=0.1", nvml=fake, environ=NO_CVD) as m:
        assert m.info.domains == ("gpu1", "gpu2")
        assert m.info.update_period_s == 0.1
        assert m.info.details["gpus"][0]["update_period_source"] == "given in the meter spec"
    with open_meter("nvml:period=table", nvml=fake, environ=NO_CVD) as m:
        assert m.info.update_period_s == 0.1  # Hopper's published period
    with pytest.raises(MeterUnavailable, match=r"no GPU with index 5: this process sees 3 GPU\(s\)"):
        open_meter("nvml:index=5,period=0.1", nvml=fake, environ=NO_CVD)
    with pytest.raises(Exception, match="unknown key"):
        open_meter("nvml:indx=0", nvml=fake, environ=NO_CVD)
    assert fake.inits == fake.shutdowns


def test_window_inside_one_update_reads_zero_and_says_so():
    fake = FakeNvml([h100(0)])
    with NvmlMeter(nvml=fake, environ=NO_CVD, period="table") as m:
        fake.gpus[0].frozen_at = time.perf_counter()  # the window falls inside one update period
        m.begin("short")
        r = m.end("short")
        assert r.energy_j == 0.0 and r.details["counter_moved"] is False  # the protocol raises on this
        fake.gpus[0].frozen_at = None
        m.begin("long")
        time.sleep(0.1)
        r = m.end("long")
        assert r.energy_j > 0 and r.details["counter_moved"] is True


# ------------------------------------------------------------------------------ older GPUs
def test_pre_volta_integrates_power_at_the_measured_update_rate():
    gpu = p100(steps=((0.0, 50.0), (0.45, 150.0)), period_s=0.02)
    fake = FakeNvml([gpu])
    with NvmlMeter(nvml=fake, environ=NO_CVD) as m:
        assert m.gpus[0].mode == "sampled" and m.info.kind == "sampled"
        assert 0.015 <= m.info.update_period_s <= 0.2  # 20 ms, or a multiple on a busy machine
        assert m.info.details["gpus"][0]["update_period_source"].startswith("measured")
        assert m.sample_interval_s == pytest.approx(m.info.update_period_s / 2)
        t_a = time.perf_counter()
        m.begin("w")
        time.sleep(0.6)
        r = m.end("w")
        t_b = time.perf_counter()
    truth = gpu.truth(t_a, t_b)
    assert truth > 40
    assert r.domains["gpu0"] == pytest.approx(truth, rel=0.04)
    assert r.details["power_samples"]["gpu0"] >= 2  # the background sampler ran (its pace depends on the load)
    # a Pascal part has no energy counter: the backend must not have relied on one
    assert fake.calls.get("nvmlDeviceGetTotalEnergyConsumption", 0) == 0
    assert fake.inits == fake.shutdowns == 1


def test_counter_not_supported_falls_back_or_refuses():
    t4 = FakeGpu("Tesla T4", pynvml.NVML_DEVICE_ARCH_TURING, "GPU-t4t4t4t4-0000", counter=False)
    fake = FakeNvml([t4])
    with NvmlMeter(nvml=fake, environ=NO_CVD, period="table") as m:
        assert m.gpus[0].mode == "sampled" and "not supported" in m.gpus[0].notes[0]
    with pytest.raises(MeterNotSupported, match="mode=sampled"):
        NvmlMeter(mode="counter", nvml=fake, environ=NO_CVD)
    t4.power = False
    with pytest.raises(MeterNotSupported, match="neither an energy counter nor power"):
        NvmlMeter(nvml=fake, environ=NO_CVD)
    assert fake.inits == fake.shutdowns


# ------------------------------------------------------------------------------ CUDA_VISIBLE_DEVICES
def test_cuda_visible_devices_maps_ordinals_to_nvml_indices(monkeypatch):
    fake = FakeNvml([h100(0), h100(1), h100(2)])
    with NvmlMeter(nvml=fake, environ={"CUDA_VISIBLE_DEVICES": "2,0"}, period="table") as m:
        assert [(g.domain, g.nvml_index) for g in m.gpus] == [("gpu0", 2), ("gpu1", 0)]
        assert m.info.details["cuda_visible_devices"] == "2,0"
    with NvmlMeter(indices=[1], nvml=fake, environ={"CUDA_VISIBLE_DEVICES": "2,0"}, period="table") as m:
        assert [(g.domain, g.nvml_index) for g in m.gpus] == [("gpu1", 0)]
    uuid2 = fake.gpus[2].uuid
    with NvmlMeter(nvml=fake, environ={"CUDA_VISIBLE_DEVICES": uuid2[:12]}, period="table") as m:
        assert [(g.domain, g.nvml_index, g.uuid) for g in m.gpus] == [("gpu0", 2, uuid2)]
    with NvmlMeter(nvml=fake, environ={"CUDA_VISIBLE_DEVICES": "1,7,0"}, period="table") as m:
        assert [g.nvml_index for g in m.gpus] == [1]  # CUDA stops at the first invalid entry
    with pytest.raises(MeterUnavailable, match="CUDA_VISIBLE_DEVICES=''"):
        NvmlMeter(nvml=fake, environ={"CUDA_VISIBLE_DEVICES": ""})
    with pytest.raises(MeterNotSupported, match="MIG"):
        NvmlMeter(nvml=fake, environ={"CUDA_VISIBLE_DEVICES": "MIG-4b3a-11ee"})
    # the default environment is the process's own
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with open_meter("nvml:period=table", nvml=fake) as m:
        assert [(g.domain, g.nvml_index) for g in m.gpus] == [("gpu0", 1)]
        assert m.info.details["cuda_visible_devices"] == "1"
    assert fake.inits == fake.shutdowns


def test_mixed_models_without_pci_order_warn():
    fake = FakeNvml([h100(0), p100()])
    with pytest.warns(UserWarning, match="CUDA_DEVICE_ORDER=PCI_BUS_ID"):
        NvmlMeter(nvml=fake, environ={}, period="table").close()
    with NvmlMeter(nvml=fake, environ={"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, period="table") as m:
        assert [g.mode for g in m.gpus] == ["counter", "sampled"] and m.info.kind == "sampled"


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "code, exc, text",
    [
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, MeterUnavailable, "Install the NVIDIA driver"),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, MeterUnavailable, "kernel driver is not loaded"),
        (pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH, MeterUnavailable, "reboot"),
        (pynvml.NVML_ERROR_NO_PERMISSION, MeterPermissionError, "/dev/nvidia"),
    ],
)
def test_init_errors_become_project_exceptions(code, exc, text):
    fake = FakeNvml([h100(0)], init_error=code)
    with pytest.raises(exc, match=text):
        NvmlMeter(nvml=fake, environ=NO_CVD)
    p = nvml_backend.probe(parse_spec("nvml"), nvml=fake, environ=NO_CVD)
    assert not p.available and text in p.reason


def test_no_permission_on_the_counter():
    fake = FakeNvml([h100(0)])
    fake.fail["nvmlDeviceGetTotalEnergyConsumption"] = pynvml.NVML_ERROR_NO_PERMISSION
    with pytest.raises(MeterPermissionError, match="gpu0.*no permission"):
        NvmlMeter(nvml=fake, environ=NO_CVD, period="table")
    assert fake.inits == fake.shutdowns == 1


def test_gpu_lost_during_a_window_voids_it():
    fake = FakeNvml([h100(0), h100(1)])
    with NvmlMeter(nvml=fake, environ=NO_CVD, period="table") as m:
        m.begin("w")
        time.sleep(0.05)
        fake.fail[("nvmlDeviceGetTotalEnergyConsumption", 1)] = pynvml.NVML_ERROR_GPU_IS_LOST
        with pytest.raises(MeterFailure, match=r"GPU lost on gpu1.*void.*Xid"):
            m.end("w")
    assert fake.inits == fake.shutdowns == 1


def test_nvml_shut_down_under_the_meter_is_a_failure():
    fake = FakeNvml([h100(0)])
    with NvmlMeter(nvml=fake, environ=NO_CVD, period="table") as m:
        m.begin("w")
        fake.nvmlShutdown()  # some other library shuts NVML down
        with pytest.raises(MeterFailure, match="shut down"):
            m.end("w")
        fake.nvmlInit()


def test_counter_going_backwards_is_a_failure():
    fake = FakeNvml([h100(0)])
    with NvmlMeter(nvml=fake, environ=NO_CVD, period="table") as m:
        m.begin("w")
        time.sleep(0.05)
        fake.gpus[0].offset_mj = 0  # driver reloaded: counter restarts
        with pytest.raises(MeterFailure, match="went backwards"):
            m.end("w")


def test_sampler_that_loses_the_gpu_briefly_voids_the_window():
    fake = FakeNvml([p100()])
    with NvmlMeter(nvml=fake, environ=NO_CVD, period="table") as m:
        m.begin("w")
        fake.fail["nvmlDeviceGetPowerUsage"] = pynvml.NVML_ERROR_GPU_IS_LOST
        time.sleep(0.1)  # the background sampler hits the error
        del fake.fail["nvmlDeviceGetPowerUsage"]  # ... and the GPU answers again at the window's end
        with pytest.raises(MeterFailure, match="GPU lost"):
            m.end("w")
        assert m._reader is not None and not m._reader.alive
    assert fake.inits == fake.shutdowns == 1


def test_probe_with_gpus_describes_them():
    fake = FakeNvml([h100(0), p100()])
    p = nvml_backend.probe(parse_spec("nvml"), nvml=fake, environ={"CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    assert p.available
    assert "gpu0: NVIDIA H100 80GB HBM3 (Hopper, energy counter)" in p.reason
    assert "gpu1: Tesla P100-PCIE-16GB (Pascal, integrated power)" in p.reason
    assert fake.inits == fake.shutdowns == 1


def test_infer_update_period_on_a_stepping_reader():
    t0 = time.perf_counter()
    steady = infer_update_period({
        "a": lambda: math.floor((time.perf_counter() - t0) / 0.015),
        "flat": lambda: 7,
    }, max_s=0.3)
    # 15 ms steps, or a multiple when a busy machine polls late; never shorter
    assert 0.012 <= steady["a"] <= 0.15
    assert steady["flat"] is None


def test_windows_from_several_threads_overlap():
    fake = FakeNvml([h100(0, 250.0)])
    results = {}
    with NvmlMeter(nvml=fake, environ=NO_CVD, period="table") as m:
        def work(name, secs):
            with m.window(name) as w:
                time.sleep(secs)
            results[name] = w.measurement

        threads = [threading.Thread(target=work, args=(f"t{i}", 0.2 + 0.1 * i)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for name, r in results.items():
        assert abs(r.energy_j - 250.0 * r.seconds) <= 250.0 * 0.04 + 0.01, (name, r.energy_j, r.seconds)
