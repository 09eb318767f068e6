"""The battery backend against power_supply trees written in a temporary folder
(tests/fakes_power_supply.py: Documentation/ABI/testing/sysfs-class-power, include/linux/power_supply.h,
Documentation/power/power_supply_class.rst, drivers/acpi/battery.c). Everything above the files is the
shipped code."""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from energyprof import cli
from energyprof.errors import MeterFailure, MeterPermissionError, MeterSpecError, MeterUnavailable
from energyprof.meters import battery, open_meter, probe_backend
from fakes_power_supply import FakePowerSupply

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def laptop(tmp_path):
    tree = FakePowerSupply(tmp_path / "laptop")
    tree.add_acpi_laptop(watts=9.0, volts=11.4)
    return tree


@pytest.fixture
def phone(tmp_path):
    tree = FakePowerSupply(tmp_path / "phone")
    tree.add_android_phone(watts=9.0, volts=3.85, sign=-1)
    return tree


def window(meter, seconds):
    meter.begin("w")
    time.sleep(seconds)
    return meter.end("w")


class Gauge(threading.Thread):
    """The embedded controller / fuel gauge: refreshes the battery's files every ``every`` s."""

    def __init__(self, tree, name, every=1.0):
        super().__init__(daemon=True)
        self.tree, self.name, self.every = tree, name, every
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(self.every):
            self.tree.refresh(self.name, self.every)


def measure_cli(spec, seconds):
    run = subprocess.run(
        [sys.executable, "-m", "energyprof", "measure", "--meter", spec, "--json", "--", "sleep", str(seconds)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


# ------------------------------------------------------------------------------ the goals: 9 W over 8 s
@pytest.mark.parametrize("kind", ["laptop", "android"])
def test_a_constant_9_w_discharge_is_measured_within_3_percent_over_8_s(tmp_path, kind):
    """Goal: `energyprof measure --meter battery:root=DIR -- sleep 8` on a laptop-style (ACPI BAT0,
    power_now positive) and an Android-style tree (fuel gauge, current_now negative in uA,
    voltage_now in uV) that discharge at 9 W, with the gauge refreshing its files every second."""
    tree = FakePowerSupply(tmp_path)
    if kind == "laptop":
        tree.add_acpi_laptop(watts=9.0, volts=11.4)
        name, source = "BAT0", "power"
    else:
        tree.add_android_phone(watts=9.0, volts=3.85, sign=-1)
        name, source = "battery", "current"
    gauge = Gauge(tree, name)
    gauge.start()
    try:
        r = measure_cli(f"battery:root={tree.root}", 8)
    finally:
        gauge.stop.set()
    print(json.dumps({k: r[k] for k in ("energy_j", "duration_s")}), r["details"]["battery_source"])
    assert r["meter"]["backend"] == "battery" and r["meter"]["scope"] == "battery" and not r["simulated"]
    assert r["meter"]["details"]["battery_source"] == r["details"]["battery_source"] == source and r["meter"]["torch_device"] is None
    assert abs(r["energy_j"] - 9.0 * r["duration_s"]) <= 0.03 * 9.0 * r["duration_s"], r
    assert r["duration_s"] >= 8.0 and abs(r["energy_j"] - 72.0) <= 0.03 * 72.0 + 9.0 * (r["duration_s"] - 8.0), r


# ------------------------------------------------------------------------------ charging is refused
@pytest.mark.parametrize("status", ["Charging", "Full", "Not charging"])
def test_a_battery_that_does_not_discharge_is_refused(laptop, status):
    laptop.set("BAT0", status=status)
    with pytest.raises(battery.BatteryCharging, match=rf"the battery is charging: unplug the charger to measure \(BAT0 reports status '{status}'\)"):
        open_meter(f"battery:root={laptop.root}")


def test_a_charger_online_is_refused_even_when_the_status_says_discharging(laptop, phone):
    laptop.set_online("AC", True)
    with pytest.raises(battery.BatteryCharging, match=r"unplug the charger to measure \(external supply online: AC\)"):
        open_meter(f"battery:root={laptop.root}")
    phone.set_online("usb", True)  # a phone on a USB cable (adb over USB)
    with pytest.raises(battery.BatteryCharging, match=r"external supply online: usb"):
        open_meter(f"battery:root={phone.root}")


def test_cli_says_charging_in_one_line_and_exits_non_zero(laptop):
    laptop.set("BAT0", status="Charging")
    run = subprocess.run([sys.executable, "-m", "energyprof", "measure", "--meter", f"battery:root={laptop.root}",
                          "--", "true"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "Traceback" not in run.stderr
    assert "the battery is charging: unplug the charger to measure" in run.stderr


def test_plugging_the_charger_in_mid_window_fails_the_window(phone):
    with open_meter(f"battery:root={phone.root},rate_hz=20") as meter:
        meter.begin("w")
        time.sleep(0.2)
        phone.set_online("usb", True)
        phone.set("battery", status="Charging", watts=-12.0)
        time.sleep(0.3)
        with pytest.raises(MeterFailure, match="the battery is charging: unplug the charger to measure"):
            meter.end("w")


# ------------------------------------------------------------------------------ sign and unit quirks
def test_the_sign_is_read_from_a_discharging_battery_and_recorded(tmp_path):
    abi, vendor = FakePowerSupply(tmp_path / "abi"), FakePowerSupply(tmp_path / "vendor")
    abi.add_android_phone(watts=4.0, volts=3.9, sign=-1)
    vendor.add_android_phone(watts=4.0, volts=3.9, sign=+1)  # positive while discharging
    for tree, sign in ((abi, "negative"), (vendor, "positive")):
        with open_meter(f"battery:root={tree.root}") as meter:
            m = window(meter, 0.3)
        b = m.meter.details["batteries"][0]
        assert b["discharge_sign"] == sign and "Discharging" in b["sign_basis"]
        assert m.energy_j == pytest.approx(4.0 * m.seconds, rel=1e-3)


def test_an_acpi_laptop_reports_power_now_unsigned(laptop):
    with open_meter(f"battery:root={laptop.root}") as meter:
        m = window(meter, 0.3)
    b = m.meter.details["batteries"][0]
    assert b["source"] == "power" and b["discharge_sign"] == "positive" and "ACPI" in b["sign_basis"]
    assert m.energy_j == pytest.approx(9.0 * m.seconds, rel=1e-3)


def test_an_unknown_status_needs_the_sign_stated(phone):
    phone.set("battery", status="Unknown")
    with pytest.raises(battery.QuirkUnresolved, match="give current_sign=negative"):
        open_meter(f"battery:root={phone.root}")
    with open_meter(f"battery:root={phone.root},current_sign=negative") as meter:
        m = window(meter, 0.2)
    assert m.meter.details["batteries"][0]["sign_basis"] == "given: current_sign=negative"
    assert m.energy_j == pytest.approx(9.0 * m.seconds, rel=1e-3)


def test_a_gauge_that_writes_milliamps_is_refused_with_the_fix(tmp_path):
    tree = FakePowerSupply(tmp_path)
    tree.add_android_phone(watts=2.0, volts=3.8, sign=-1, current_unit="mA")  # current_now = -526
    with pytest.raises(battery.QuirkUnresolved, match=r"current_now gives 2 mW.*give current_unit=mA"):
        open_meter(f"battery:root={tree.root}")
    with open_meter(f"battery:root={tree.root},current_unit=mA") as meter:
        m = window(meter, 0.2)
    assert m.energy_j == pytest.approx(526e-3 * 3.8 * m.seconds, rel=1e-3)  # the file's mA x V


def test_a_gauge_that_writes_millivolts_is_refused_with_the_fix(tmp_path):
    tree = FakePowerSupply(tmp_path)
    tree.add_android_phone(watts=3.0, volts=3.9, sign=-1, voltage_unit="mV")
    with pytest.raises(battery.QuirkUnresolved, match=r"voltage_now reads 3900, .*give voltage_unit=mV"):
        open_meter(f"battery:root={tree.root}")
    with open_meter(f"battery:root={tree.root},voltage_unit=mV") as meter:
        m = window(meter, 0.2)
    assert m.energy_j == pytest.approx(3.0 * m.seconds, rel=1e-3)


# ------------------------------------------------------------------------------ counters (slow refresh)
def test_energy_now_is_read_as_a_slow_counter(tmp_path):
    """source=energy: the window is the fall of energy_now (uWh) between its edges, exact to the
    EC's step; the declared refresh period is what the protocol sizes and aligns windows by."""
    tree = FakePowerSupply(tmp_path)
    tree.add_acpi_laptop(watts=9.0, volts=11.4)
    with open_meter(f"battery:root={tree.root},source=energy,period=2") as meter:
        info = meter.info
        meter.begin("w")
        tree.refresh("BAT0", 2.0)
        tree.refresh("BAT0", 2.0)  # two EC updates at 9 W: 36 J
        m = meter.end("w")
        meter.begin("x")
        tree.set("BAT0", energy_uwh=tree.gauges["BAT0"].energy_uwh + 100)  # charge flowed in
        with pytest.raises(MeterFailure, match="the battery is charging"):
            meter.end("x")
    assert info.kind == "counter" and info.update_period_s == 2.0 and info.resolution_j == pytest.approx(3.6e-3)
    assert m.energy_j == pytest.approx(36.0, abs=3.6e-3)  # one uWh step
    assert m.domains == {"BAT0": m.energy_j}


def test_auto_falls_back_to_energy_now_and_says_why(tmp_path):
    tree = FakePowerSupply(tmp_path)
    tree.add_acpi_laptop(watts=9.0, power_now=False)  # firmware without a present rate
    (tree.root / "BAT0" / "voltage_now").unlink()
    with open_meter(f"battery:root={tree.root}") as meter:
        b = meter.info.details["batteries"][0]
        assert meter.info.details["battery_source"] == "energy" and meter.info.kind == "counter"
        assert any("power_now" in note for note in b["notes"])
        assert "assumed" in meter.info.details["refresh_period_basis"] and meter.info.update_period_s == 5.0


def test_charge_counter_times_voltage(phone):
    with open_meter(f"battery:root={phone.root},source=charge_counter") as meter:
        meter.begin("w")
        phone.refresh("battery", 3.0)
        m = meter.end("w")
    # the gauge's counter fell by 9 W / 3.85 V x 3 s (rounded to 1 uAh), times 3.85 V
    assert m.energy_j == pytest.approx(27.0, abs=2 * 3.6e-3 * 3.85)


def test_the_refresh_period_is_seen_on_a_polled_reading(laptop):
    """The readings change only when the gauge refreshes: the meter reports that period
    (update_period_s) once it has seen it, which the protocol sizes its windows by."""
    with open_meter(f"battery:root={laptop.root},rate_hz=50") as meter:
        assert "assumed" in meter.info.details["refresh_period_basis"]
        stop = threading.Event()

        def gauge():
            w = 9.0
            while not stop.wait(0.25):
                w = 18.0 - w + 1.0  # 9, 10, 9, 10 W
                laptop.set("BAT0", watts=w)

        t = threading.Thread(target=gauge, daemon=True)
        t.start()
        deadline = time.monotonic() + 20
        while "seen" not in meter.info.details["refresh_period_basis"] and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()
        t.join()
        info = meter.info
    assert "seen" in info.details["refresh_period_basis"]
    assert 0.2 <= info.update_period_s <= 5.0  # at least the gauge's 0.25 s (less a poll), late writes only lengthen it


# ------------------------------------------------------------------------------ detect, selection
def test_detect_names_the_supply_and_its_status(laptop, monkeypatch, capsys):
    monkeypatch.setattr(battery, "DEFAULT_ROOT", str(laptop.root))
    assert cli.main(["detect"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("battery"))
    assert "yes" in line and "BAT0 (Battery, Discharging" in line and "AC (Mains, offline)" in line
    laptop.set("BAT0", status="Charging")
    p = probe_backend(f"battery:root={laptop.root}")
    assert not p.available and "the battery is charging" in p.reason and "BAT0 (Battery, Charging" in p.reason


def test_no_battery_and_bad_keys_are_said(tmp_path, phone):
    tree = FakePowerSupply(tmp_path / "desktop")
    tree.add_external("AC", "Mains", True)
    p = probe_backend(f"battery:root={tree.root}")
    assert not p.available and "no system battery" in p.reason
    with pytest.raises(MeterUnavailable, match="no power supply named 'BAT1'.*battery \\(Battery\\)"):
        open_meter(f"battery:root={phone.root},name=BAT1")
    with pytest.raises(MeterSpecError, match="usb is a USB supply, not a battery"):
        open_meter(f"battery:root={phone.root},name=usb")
    with pytest.raises(MeterSpecError, match="current_sign='minus'"):
        open_meter(f"battery:root={phone.root},current_sign=minus")
    with pytest.raises(MeterSpecError, match="unknown key"):
        open_meter(f"battery:root={phone.root},sorce=energy")


def test_two_laptop_batteries_are_summed(tmp_path):
    tree = FakePowerSupply(tmp_path)
    tree.add_acpi_laptop(watts=6.0, name="BAT0")
    tree.add_acpi_laptop(watts=3.0, name="BAT1")
    with open_meter(f"battery:root={tree.root}") as meter:
        m = window(meter, 0.3)
    assert [b["name"] for b in m.meter.details["batteries"]] == ["BAT0", "BAT1"]
    assert m.energy_j == pytest.approx(9.0 * m.seconds, rel=1e-3)


# ------------------------------------------------------------------------------ over adb
@pytest.fixture
def fake_adb(tmp_path):
    """A stand-in for Android's adb client: `adb -s SERIAL exec-out COMMAND` runs COMMAND with the
    device's shell and prints its output; an unknown serial gives adb's "device 'X' not found"."""
    exe = tmp_path / "adb"
    exe.write_text(
        f"#!{sys.executable}\n"
        "import subprocess, sys\n"
        "args = sys.argv[1:]\n"
        "if args[:1] != ['-s'] or args[2:3] != ['exec-out']:\n"
        "    sys.exit('adb: usage')\n"
        "if args[1] != 'R58M123ABC':\n"
        "    sys.stderr.write(f\"adb: device '{args[1]}' not found\\n\"); sys.exit(1)\n"
        "done = subprocess.run(['sh', '-c', ' '.join(args[3:])])\n"
        "sys.exit(done.returncode)\n")
    exe.chmod(0o755)
    return exe


def test_an_android_phone_over_wireless_adb(phone, fake_adb):
    spec = f"battery:adb=R58M123ABC,adb_path={fake_adb},root={phone.root},rate_hz=5"
    with open_meter(spec) as meter:
        m = window(meter, 1.0)
        assert meter.info.details["read_on"] == "adb device R58M123ABC"
    assert m.details["battery_source"] == "current" and m.details["samples"] >= 2
    assert m.energy_j == pytest.approx(9.0 * m.seconds, rel=0.03)
    phone.set_online("usb", True)  # the phone plugged into the computer's USB port: it charges
    with pytest.raises(battery.BatteryCharging, match="unplug the charger.*usb"):
        open_meter(spec)
    with pytest.raises(MeterUnavailable, match="device 'emulator-5554' not found.*adb devices"):
        open_meter(f"battery:adb=emulator-5554,adb_path={fake_adb},root={phone.root}")


def test_the_protocol_aligns_its_windows_to_a_slow_battery_counter(laptop):
    """energy_now moves only when the embedded controller refreshes it (here every 0.25 s, in the
    tree's files, by the actual time elapsed since the last refresh). The meter declares that
    period; the measurement protocol then opens and closes its windows right after the counter
    moves, so each window holds whole refreshes: the 9 W come out within 3 % although one refresh
    is an eighth of a window."""
    from energyprof.protocol import MeasurementProtocol

    stop = threading.Event()

    def controller():
        last = time.perf_counter()
        while not stop.wait(0.25):
            now = time.perf_counter()
            laptop.refresh("BAT0", now - last)  # what was drawn since the last refresh, at 9 W
            last = now

    ec = threading.Thread(target=controller, daemon=True)
    ec.start()
    try:
        with open_meter(f"battery:root={laptop.root},source=energy,period=0.25") as meter:
            protocol = MeasurementProtocol(min_window_s=2.0, min_periods=4, idle_windows=2, random_state=0)
            idle = protocol.measure_idle(meter)
    finally:
        stop.set()
        ec.join()
    assert idle.windows == 2
    assert idle.power_w == pytest.approx(9.0, rel=0.03), idle


def test_a_file_this_user_may_not_read_is_said_with_the_fix(phone, monkeypatch):
    """As on a phone whose SELinux policy denies an app (Termux) the fuel gauge's files: the
    read fails with EACCES (monkeypatched at the file read, the hardware boundary; root reads
    everything, so chmod cannot show it here)."""
    real = battery.Files.read

    def read(self, path):
        if path.endswith("current_now"):
            raise PermissionError(13, "Permission denied", path)
        return real(self, path)

    monkeypatch.setattr(battery.Files, "read", read)
    with pytest.raises(MeterPermissionError, match=r"cannot read .*battery/current_now .*permission denied.*adb"):
        open_meter(f"battery:root={phone.root}")
