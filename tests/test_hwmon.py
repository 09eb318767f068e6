"""The hwmon backend against sysfs trees written in a temporary folder (tests/fakes_hwmon.py),
laid out as the kernel lays them out. Everything above the files is the shipped code."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from energyprof import cli
from energyprof.errors import MeterFailure, MeterSpecError, MeterUnavailable
from energyprof.meters import open_meter, probe_backend
from energyprof.meters import hwmon
from fakes_hwmon import FakeHwmon, Rail, jetson_agx_orin_rails, jetson_orin_nx_rails

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def orin_nx(tmp_path):
    """An Orin NX-style tree: a thermal zone, then the INA3221 with VDD_IN at 7.2 W."""
    tree = FakeHwmon(tmp_path)
    tree.add_thermal("cpu_thermal")
    tree.ina = tree.add_ina3221(jetson_orin_nx_rails(vdd_in_w=7.2))
    return tree


def window(meter, seconds):
    meter.begin("w")
    time.sleep(seconds)
    return meter.end("w")


# ------------------------------------------------------------------------------ discovery
def test_discovery_follows_the_class_links_and_reads_the_labels(orin_nx):
    channels, chips = hwmon.discover(str(orin_nx.root))
    assert [c.label for c in channels] == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]
    vdd_in = channels[0]
    assert vdd_in.chip == "ina3221" and vdd_in.hwmon == "hwmon1" and vdd_in.device == "1-0040"
    assert vdd_in.kind == "volts_amps"
    assert [os.path.basename(f) for f in vdd_in.files] == ["in1_input", "curr1_input"]
    # shunt voltages (in4-6), the sums (in7, curr4) are not rails; the thermal chip is listed apart
    assert {c.index for c in channels} == {1, 2, 3}
    assert {c["chip"] for c in chips} == {"cpu_thermal", "ina3221"}
    assert hwmon.channel_watts(vdd_in) == pytest.approx(orin_nx.rail_watts(orin_nx.ina, 1)) == pytest.approx(7.2)


def test_probe_lists_every_sensor_and_label(orin_nx):
    orin_nx.add_ina2xx("ina219", address=0x41, volts=5.1, amps=0.8)
    p = probe_backend(f"hwmon:root={orin_nx.root}")
    assert p.available
    for text in ("VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC", "ina219", "power1", "default: ina3221 VDD_IN", "cpu_thermal"):
        assert text in p.reason, text
    assert len(p.details["channels"]) == 4 and p.details["readings"][0] == "7.2 W"


def test_detect_prints_the_sensors(orin_nx, monkeypatch, capsys):
    monkeypatch.setattr(hwmon, "DEFAULT_ROOT", str(orin_nx.root))
    assert cli.main(["detect"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("hwmon"))
    assert "yes" in line and "VDD_IN" in line and "VDD_SOC" in line


def test_no_tree_or_no_power_sensor_is_said(tmp_path):
    p = probe_backend(f"hwmon:root={tmp_path / 'absent'}")
    assert not p.available and "does not exist" in p.reason
    tree = FakeHwmon(tmp_path)
    tree.add_thermal("k10temp")
    p = probe_backend(f"hwmon:root={tree.root}")
    assert not p.available and "no hwmon power sensors" in p.reason and "k10temp" in p.reason
    with pytest.raises(MeterUnavailable, match="hwmon: no power sensor named 'ina3221'"):
        open_meter(f"hwmon:root={tree.root},name=ina3221")


# ------------------------------------------------------------------------------ Jetson
def test_jetson_default_is_the_total_input_rail(orin_nx):
    with open_meter(f"hwmon:root={orin_nx.root}") as meter:
        info = meter.info
        m = window(meter, 0.3)
    assert info.backend == "hwmon" and info.kind == "sampled" and info.scope == "board" and not info.simulated
    assert info.details["total_input"] and info.details["channels"][0]["label"] == "VDD_IN"
    assert info.details["sensor_update_interval_s"] == 0.005
    assert m.energy_j == pytest.approx(7.2 * m.seconds, rel=1e-3)  # static files: constant power (edges differ from `seconds` by microseconds)


def test_a_named_rail_is_its_own_scope_and_rails_can_be_added(orin_nx):
    with open_meter(f"hwmon:root={orin_nx.root},channel=VDD_SOC") as meter:
        m = window(meter, 0.2)
    assert m.meter.scope == "VDD_SOC" and not m.meter.details["total_input"]
    soc = orin_nx.rail_watts(orin_nx.ina, 3)
    assert m.energy_j == pytest.approx(soc * m.seconds, rel=1e-3)
    with open_meter(f"hwmon:root={orin_nx.root},channel=VDD_CPU_GPU_CV+VDD_SOC") as meter:
        m = window(meter, 0.2)
    both = orin_nx.rail_watts(orin_nx.ina, 2) + soc
    assert m.energy_j == pytest.approx(both * m.seconds, rel=1e-3)


def test_cli_measure_sleep_5_on_a_jetson_tree_is_right_within_1_percent(orin_nx):
    """Done-when: `energyprof measure --meter hwmon:root=DIR,name=ina3221,channel=VDD_IN -- sleep 5`
    on a kernel-faithful Orin NX tree whose VDD_IN draws 7.2 W."""
    spec = f"hwmon:root={orin_nx.root},name=ina3221,channel=VDD_IN"
    run = subprocess.run(
        [sys.executable, "-m", "energyprof", "measure", "--meter", spec, "--json", "--", "sleep", "5"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 0, run.stderr
    r = json.loads(run.stdout)
    print(json.dumps({k: r[k] for k in ("energy_j", "duration_s", "domains")}), r["details"])
    assert r["meter"]["backend"] == "hwmon" and r["meter"]["simulated"] is False
    assert abs(r["energy_j"] - 7.2 * r["duration_s"]) <= 0.01 * 7.2 * r["duration_s"], r
    assert abs(r["energy_j"] - 36.0) <= 0.01 * 36.0 + 7.2 * (r["duration_s"] - 5.0), r  # sleep 5 lasts >= 5 s
    assert r["domains"] == {"board": r["energy_j"]}


def test_changing_power_is_integrated(orin_nx):
    """A thread steps VDD_IN from 7.2 W to 12 W mid-window, as a load starting would."""
    with open_meter(f"hwmon:root={orin_nx.root},rate_hz=100") as meter:
        meter.begin("w")
        t_begin = meter.clock()
        stepped = {}

        def step():
            time.sleep(0.3)
            before = meter.clock()
            orin_nx.set_rail(orin_nx.ina, 1, amps=2.4)  # 5 V x 2.4 A = 12 W
            after = meter.clock()
            stepped["t"], stepped["spread"] = (before + after) / 2, after - before

        writer = threading.Thread(target=step)
        writer.start()
        writer.join()
        time.sleep(0.3)
        m = meter.end("w")
        t_end = t_begin + m.seconds
    expected = 7.2 * (stepped["t"] - t_begin) + 12.0 * (t_end - stepped["t"])
    # the step falls between two samples: the trapezoid spreads it over at most a couple of intervals
    # (plus the time the writer took: the files of one rail are not rewritten in one instant)
    bound = 4.8 * (2 * m.details["longest_interval_s"] + stepped["spread"])
    assert abs(m.energy_j - expected) <= bound, (m.energy_j, expected, bound)


def test_a_sensor_that_disappears_mid_window_fails_the_window_naming_the_file(orin_nx):
    with open_meter(f"hwmon:root={orin_nx.root},name=ina3221,channel=VDD_IN") as meter:
        meter.begin("w")
        time.sleep(0.1)
        orin_nx.unbind(orin_nx.ina)  # echo 1-0040 > /sys/bus/i2c/drivers/ina3221/unbind
        time.sleep(0.1)
        with pytest.raises(MeterFailure, match=r"sensor file .*hwmon1/in1_input is gone .*driver was unbound"):
            meter.end("w")
        with pytest.raises(MeterFailure, match="in1_input is gone"):
            meter.begin("next")


def test_agx_orin_has_no_total_rail_and_says_so(tmp_path):
    tree = FakeHwmon(tmp_path)
    first, second = jetson_agx_orin_rails()
    tree.add_ina3221(first, address=0x40)
    tree.add_ina3221(second, address=0x41)
    with pytest.raises(MeterSpecError, match=r"none is a total-input rail .*VDD_GPU_SOC.*VIN_SYS_5V0.*channel=LABEL"):
        open_meter(f"hwmon:root={tree.root}")
    with pytest.raises(MeterSpecError, match=r"channel 'NC' is on several chips"):
        open_meter(f"hwmon:root={tree.root},channel=NC")
    with pytest.raises(MeterUnavailable, match=r"no channel 'VDD_IN'; found: ina3221 hwmon0 \(1-0040\): VDD_GPU_SOC"):
        open_meter(f"hwmon:root={tree.root},channel=VDD_IN")
    spec = f"hwmon:root={tree.root},channel=VDD_GPU_SOC+VDD_CPU_CV+VIN_SYS_5V0"
    with open_meter(spec) as meter:
        m = window(meter, 0.2)
    assert m.energy_j == pytest.approx(sum(tree.rail_watts(0, ch) for ch in (1, 2, 3)) * m.seconds, rel=1e-3)
    with open_meter(f"hwmon:root={tree.root},device=1-0041,channel=VDDQ_VDD2_1V8AO") as meter:
        assert meter.info.details["channels"][0]["hwmon"] == "hwmon1"


def test_unlabelled_ina3221_channels_are_numbered(tmp_path):
    tree = FakeHwmon(tmp_path)
    idx = tree.add_ina3221([Rail(None, 12.0, 1.0), Rail(None, 3.3, 0.5)])
    channels, _ = hwmon.discover(str(tree.root))
    assert [c.title for c in channels] == ["power1", "power2"]
    with open_meter(f"hwmon:root={tree.root},channel=2") as meter:
        m = window(meter, 0.2)
    assert m.energy_j == pytest.approx(tree.rail_watts(idx, 2) * m.seconds, rel=1e-3)


# ------------------------------------------------------------------------------ Raspberry Pi (kernel ina2xx)
@pytest.mark.parametrize("legacy", [False, True])
def test_pi_with_the_kernel_ina219_driver(tmp_path, legacy):
    tree = FakeHwmon(tmp_path)
    tree.add_thermal("cpu_thermal")
    tree.add_ina2xx("ina219", volts=5.1, amps=0.8, legacy=legacy)  # attributes under device/ when legacy
    with open_meter(f"hwmon:root={tree.root},name=ina219") as meter:
        m = window(meter, 0.3)
    assert m.meter.scope == "board" and m.meter.details["channels"][0]["kind"] == "power"
    assert m.energy_j == pytest.approx(5.1 * 0.8 * m.seconds, rel=1e-3)


# ------------------------------------------------------------------------------ energy counters
def test_an_energy_counter_is_read_as_a_counter(tmp_path):
    """The window's energy is the counter's rise between its edges (microjoules to joules),
    whatever the power file says; the chip (here: the test) advances the counter."""
    tree = FakeHwmon(tmp_path)
    idx = tree.add_energy_chip("ina238", microjoules=10**12)  # ~11.6 days at 1 W
    with open_meter(f"hwmon:root={tree.root}") as meter:
        assert meter.info.kind == "counter" and meter.info.resolution_j == 1e-6
        meter.begin("w")
        tree.set_energy(idx, 10**12 + 2_500_000, power_uw=20_000_000)
        tree.set_energy(idx, 10**12 + 8_000_123, power_uw=20_000_000)
        m = meter.end("w")
    assert m.energy_j == pytest.approx(8.000123, abs=1e-9)
    assert m.domains == {"energy1": m.energy_j} and m.meter.scope == "board"


def test_an_energy_counter_going_backwards_fails(tmp_path):
    tree = FakeHwmon(tmp_path)
    idx = tree.add_energy_chip("ina238", microjoules=5_000_000, label="VIN")
    with open_meter(f"hwmon:root={tree.root},channel=VIN") as meter:
        meter.begin("w")
        tree.set_energy(idx, 1000, power_uw=0)  # driver reloaded: the counter restarted
        with pytest.raises(MeterFailure, match="went backwards"):
            meter.end("w")


def test_spec_typos_and_garbage_are_named(orin_nx):
    with pytest.raises(MeterSpecError, match="unknown key"):
        open_meter(f"hwmon:root={orin_nx.root},chanel=VDD_IN")
    (orin_nx.nodes[orin_nx.ina].folder / "curr1_input").write_text("n/a\n")
    with pytest.raises(MeterFailure, match=r"curr1_input holds 'n/a', not an integer"):
        open_meter(f"hwmon:root={orin_nx.root}")


def test_an_energy_channel_beside_power_channels_is_read_as_power(tmp_path):
    tree = FakeHwmon(tmp_path)
    idx = tree.add_energy_chip("ina238", microjoules=0, label="VIN")
    tree.set_energy(idx, 0, power_uw=3_000_000)
    pi = tree.add_ina2xx("ina219", volts=5.0, amps=1.0, address=0x41)
    with open_meter(f"hwmon:root={tree.root},channel=VIN+power1") as meter:
        assert meter.info.kind == "sampled"
        m = window(meter, 0.2)
    assert m.energy_j == pytest.approx((3.0 + 5.0) * m.seconds, rel=1e-3)
    assert pi == 1
