"""INA219/226/260/228 drivers against emulated register maps behind a fake SMBus.

The fakes follow the datasheets' on-chip arithmetic from the *physical* state (bus volts, load
amps, the real shunt) and from what the driver wrote (configuration, calibration), with the
chip's integer truncation. Registers are big-endian; the fake SMBus swaps bytes on word
transfers as real SMBus hardware does. Everything above the fake bus is the shipped driver.
"""

import math
import threading
import time

import pytest

from energyprof.errors import MeterFailure, MeterPermissionError, MeterSpecError, MeterUnavailable
from energyprof.meters import open_meter, parse_spec
from energyprof.meters import ina2xx


def swap16(v):
    return ((v & 0xFF) << 8) | (v >> 8)


def to_u(value, bits):
    return value & ((1 << bits) - 1)


class FakeChip:
    """Physical state plus a register file; subclasses compute the measurement registers."""

    config_after_reset = 0
    writable = {0x00}
    ids = {}

    def __init__(self, volts=5.0, amps=0.8, shunt_ohms=0.1):
        self.volts, self.amps, self.shunt_ohms = volts, amps, shunt_ohms
        self.unplugged = False
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        self.regs = {0x00: self.config_after_reset, **self.ids}

    def write(self, reg, value):
        if reg not in self.writable:
            raise OSError(5, f"register 0x{reg:02X} is read-only")
        if reg == 0x00 and value & 0x8000:
            self.reset()
        else:
            self.regs[reg] = value

    def read(self, reg, nbytes):
        with self.lock:
            value = self.measure(reg) if reg in self.measured else self.regs.get(reg, 0)
        return value


class FakeIna219(FakeChip):
    config_after_reset = 0x399F
    writable = {0x00, 0x05}
    measured = {0x01, 0x02, 0x03, 0x04}

    def reset(self):
        super().reset()
        self.regs[0x05] = 0

    def _shunt_raw(self):
        pga = (self.regs[0x00] >> 11) & 3
        limit = int(0.04 * 2**pga / 10e-6)
        return max(-limit, min(limit, round(self.amps * self.shunt_ohms / 10e-6)))

    def _current_raw(self):
        return math.trunc(self._shunt_raw() * self.regs[0x05] / 4096)  # datasheet eq. 4

    def measure(self, reg):
        current = self._current_raw()
        bus = int(self.volts / 4e-3)
        if reg == 0x01:
            return to_u(self._shunt_raw(), 16)
        if reg == 0x02:
            return (bus << 3) | 0b10 | (abs(current) > 32767)
        if reg == 0x04:
            return to_u(max(-32768, min(32767, current)), 16)
        return min(0xFFFF, math.trunc(abs(current) * bus / 5000))  # power, datasheet eq. 5


class FakeIna226(FakeChip):
    config_after_reset = 0x4127
    writable = {0x00, 0x05, 0x06}
    measured = {0x01, 0x02, 0x03, 0x04, 0x06}
    ids = {0xFE: 0x5449, 0xFF: 0x2260}
    shunt_lsb, bus_lsb = 2.5e-6, 1.25e-3

    def reset(self):
        super().reset()
        self.regs[0x05] = 0

    def _current_raw(self):
        shunt = max(-32768, min(32767, round(self.amps * self.shunt_ohms / self.shunt_lsb)))
        return math.trunc(shunt * self.regs[0x05] / 2048)

    def measure(self, reg):
        current = self._current_raw()
        bus = int(self.volts / self.bus_lsb)
        if reg == 0x06:
            return 0x0008 | (0x0004 if abs(current) > 32767 else 0)  # CVRF, OVF
        if reg == 0x02:
            return bus
        if reg == 0x04:
            return to_u(max(-32768, min(32767, current)), 16)
        if reg == 0x01:
            return to_u(round(self.amps * self.shunt_ohms / self.shunt_lsb), 16)
        return min(0xFFFF, math.trunc(abs(current) * bus / 20000))


class FakeIna260(FakeIna226):
    config_after_reset = 0x6127
    writable = {0x00, 0x06}
    ids = {0xFE: 0x5449, 0xFF: 0x2270}

    def _current_raw(self):
        return round(self.amps / 1.25e-3)

    def measure(self, reg):
        if reg == 0x03:  # 10 mW per LSB from the 1.25 mA and 1.25 mV results
            return math.trunc(abs(self._current_raw()) * int(self.volts / 1.25e-3) * 1.5625e-6 / 0.010)
        return super().measure(reg)


class FakeIna228(FakeChip):
    """Energy accumulates in real time from the physical power, scaled by the SHUNT_CAL written."""

    config_after_reset = 0x0000
    writable = {0x00, 0x01, 0x02, 0x0B}
    measured = {0x09}
    ids = {0x3E: 0x5449, 0x3F: 0x2281}

    def __init__(self, *args, energy_start=0, **kwargs):
        self.energy_start = energy_start
        super().__init__(*args, **kwargs)

    def reset(self):
        super().reset()
        self.regs.update({0x01: 0xFB68, 0x02: 0x1000, 0x0B: 0x0001})
        self.energy_units = float(self.energy_start)
        self.last = time.perf_counter()

    def _advance(self):
        now = time.perf_counter()
        mode = self.regs[0x01] >> 12
        if mode >= 0x9 and mode & 0b11 == 0b11:  # continuous, shunt and bus
            k = 4 if self.regs[0x00] & 0x10 else 1
            current_lsb = self.regs[0x02] / (13107.2e6 * self.shunt_ohms * k)
            self.energy_units += self.volts * self.amps * (now - self.last) / (16 * 3.2 * current_lsb)
        self.last = now

    def measure(self, reg):
        self._advance()
        return int(self.energy_units) % 2**40


class FakeSMBus:
    """smbus2.SMBus stand-in: word transfers are little-endian on the wire, blocks MSB first."""

    def __init__(self, *chips_at):
        self.chips = dict(chips_at)
        self.closed = False
        self.words_written = []

    def _chip(self, address):
        chip = self.chips.get(address)
        if self.closed:
            raise ValueError("I/O operation on closed bus")
        if chip is None or chip.unplugged:
            raise OSError(121, "Remote I/O error")
        return chip

    def read_word_data(self, address, reg):
        return swap16(self._chip(address).read(reg, 2))

    def write_word_data(self, address, reg, value):
        self.words_written.append((reg, value))
        self._chip(address).write(reg, swap16(value))

    def read_i2c_block_data(self, address, reg, length):
        return list(self._chip(address).read(reg, length).to_bytes(length, "big"))

    def close(self):
        self.closed = True


def open_with(spec, *chips_at):
    bus = FakeSMBus(*chips_at)
    return open_meter(spec, smbus_factory=lambda n: bus), bus


def window(meter, seconds):
    meter.begin("w")
    time.sleep(seconds)
    return meter.end("w")


# ------------------------------------------------------------------------- INA219
def test_ina219_calibration_and_configuration_registers():
    chip = FakeIna219()
    meter, bus = open_with("ina219:bus=1,address=0x40,shunt_ohms=0.1,max_amps=3.2", (0x40, chip))
    with meter:
        # 0.04096 / (3.2/32768 * 0.1) = 4194.3 -> 4194 (even, bit 0 unused)
        assert chip.regs[0x05] == 4194
        config = chip.regs[0x00]
        assert config >> 13 & 1 == 1  # 32 V bus range
        assert config >> 11 & 3 == 3  # PGA /8: 320 mV for 0.1 ohm x 3.2 A
        assert config & 0b111 == 0b111  # continuous shunt and bus
        assert (config >> 3) & 0xF == 0b1100  # 12-bit shunt x16 + bus: 17 x 532 us fits 10 ms (100 Hz)
        # the wire carries little-endian words: 4194 = 0x1062 goes out as 0x6210
        assert (0x05, 0x6210) in bus.words_written
        info = meter.info
    assert info.kind == "sampled" and info.backend == "ina219" and not info.simulated
    assert info.update_period_s == pytest.approx(0.01)
    assert info.averaging_window_s == pytest.approx(16 * 532e-6)
    assert info.details["power_lsb_w"] == pytest.approx(20 * 0.04096 / (4194 * 0.1))
    assert info.details["address"] == "0x40" and info.details["bus"] == 1


def test_ina219_energy_matches_the_physical_power():
    chip = FakeIna219(volts=5.1, amps=0.8)
    meter, bus = open_with("ina219:shunt_ohms=0.1,max_amps=3.2", (0x40, chip))
    with meter:
        m = window(meter, 0.3)
    assert m.energy_j == pytest.approx(5.1 * 0.8 * m.seconds, rel=0.005)
    assert m.details["samples"] >= 1 and m.details["read_errors"] == 0  # ~30 at 100 Hz; fewer under load
    assert bus.closed  # closing the meter releases the bus


def test_ina219_overflow_is_never_a_reading():
    chip = FakeIna219(volts=5.0, amps=0.5)
    meter, _ = open_with("ina219:shunt_ohms=0.1,max_amps=1.0,max_gap_s=0.2", (0x40, chip))
    with meter:
        meter.begin("w")
        chip.amps = 2.0  # beyond max_amps: the chip sets OVF and its power register is garbage
        time.sleep(0.4)
        with pytest.raises(MeterFailure, match="INA219 math overflow"):
            meter.end("w")


def test_ina219_that_disconnects_mid_window_fails_loudly():
    chip = FakeIna219()
    meter, _ = open_with("ina219:max_gap_s=0.2", (0x40, chip))
    with meter:
        meter.begin("w")
        time.sleep(0.05)
        chip.unplugged = True
        time.sleep(0.4)
        with pytest.raises(MeterFailure, match="Remote I/O error"):
            meter.end("w")


def test_ina219_reset_mid_run_is_detected():
    chip = FakeIna219()
    meter, _ = open_with("ina219:max_gap_s=0.2", (0x40, chip))
    with meter:
        meter.begin("w")
        chip.reset()  # brown-out: calibration back to 0, power reads 0 W from now on
        time.sleep(0.4)
        with pytest.raises(MeterFailure, match="lost its calibration"):
            meter.end("w")


def test_ina219_slow_bus_reports_a_rate_far_below_the_one_asked():
    chip = FakeIna219()
    original = chip.read

    def slow_read(reg, nbytes):
        time.sleep(0.01)  # 10 ms per transfer: a bus clocked far too low
        return original(reg, nbytes)

    chip.read = slow_read
    meter, _ = open_with("ina219:rate_hz=200,max_gap_s=1", (0x40, chip))
    with meter:
        meter.begin("w")
        time.sleep(0.4)
        with pytest.warns(RuntimeWarning, match="far below the 200 asked"):
            m = meter.end("w")
    assert m.details["sample_rate_hz"] < 50
    assert m.energy_j == pytest.approx(4.0 * m.seconds, rel=0.01)


# ------------------------------------------------------------------------- INA226 / INA260
def test_ina226_registers_and_energy():
    chip = FakeIna226(volts=12.0, amps=0.5, shunt_ohms=0.1)
    meter, _ = open_with("ina226:address=0x41,shunt_ohms=0.1,max_amps=0.8", (0x41, chip))
    with meter:
        assert chip.regs[0x05] == int(0.00512 / (0.8 / 32768 * 0.1))  # 2097
        avg, vbusct, vshct = chip.regs[0x00] >> 9 & 7, chip.regs[0x00] >> 6 & 7, chip.regs[0x00] >> 3 & 7
        assert (avg, vbusct, vshct) == (1, 2, 5)  # 4 x (332 us + 2.116 ms) = 9.79 ms <= 10 ms
        m = window(meter, 0.3)
    assert m.energy_j == pytest.approx(6.0 * m.seconds, rel=0.005)
    assert m.meter.averaging_window_s == pytest.approx(4 * 2.116e-3)


def test_ina226_spec_checks_the_shunt_range():
    with pytest.raises(MeterSpecError, match=r"100 mV exceeds the 81.92 mV shunt range.*max_amps <= 0.8192"):
        open_with("ina226:shunt_ohms=0.1,max_amps=1.0", (0x40, FakeIna226()))


def test_ina260_has_no_calibration_and_measures():
    chip = FakeIna260(volts=5.0, amps=2.0)
    meter, bus = open_with("ina260:bus=1", (0x40, chip))
    with meter:
        m = window(meter, 0.3)
    assert {reg for reg, _ in bus.words_written} == {0x00}  # reset and configuration only
    assert m.energy_j == pytest.approx(10.0 * m.seconds, rel=0.005)
    assert m.meter.details["power_lsb_w"] == 0.010
    with pytest.raises(MeterSpecError, match="INA260 has its 2 mOhm shunt inside"):
        open_with("ina260:shunt_ohms=0.1", (0x40, FakeIna260()))


def test_the_wrong_part_is_named():
    with pytest.raises(MeterUnavailable, match=r"not an INA226 .*looks like an INA260: use 'ina260:"):
        open_with("ina226", (0x40, FakeIna260()))
    with pytest.raises(MeterUnavailable, match=r"reads 0x4127; an INA219 reads 0x399F"):
        open_with("ina219", (0x40, FakeIna226()))


# ------------------------------------------------------------------------- INA228
def test_ina228_counter_registers_and_energy():
    chip = FakeIna228(volts=20.0, amps=2.0, shunt_ohms=0.015)
    meter, _ = open_with("ina228:shunt_ohms=0.015,max_amps=10", (0x40, chip))
    with meter:
        # 0.015 ohm x 10 A = 150 mV: the +-163.84 mV range (ADCRANGE=0), SHUNT_CAL = ceil(13107.2e6 x 10/2^19 x 0.015)
        assert chip.regs[0x00] & 0x10 == 0
        assert chip.regs[0x02] == math.ceil(13107.2e6 * 10 / 2**19 * 0.015) == 3750
        assert chip.regs[0x01] >> 12 == 0xB  # continuous shunt and bus
        m = window(meter, 0.2)
        info = meter.info
    assert info.kind == "counter" and info.update_period_s <= 0.01
    assert info.resolution_j == pytest.approx(16 * 3.2 * 3750 / (13107.2e6 * 0.015))
    assert m.energy_j == pytest.approx(40.0 * m.seconds, rel=0.01)


def test_ina228_low_range_uses_four_times_the_shunt_cal():
    chip = FakeIna228(volts=5.0, amps=1.0, shunt_ohms=0.01)
    meter, _ = open_with("ina228:shunt_ohms=0.01,max_amps=4", (0x40, chip))  # 40 mV: ADCRANGE=1
    with meter:
        assert chip.regs[0x00] & 0x10
        assert chip.regs[0x02] == math.ceil(4 * 13107.2e6 * 4 / 2**19 * 0.01)
        m = window(meter, 0.2)
    assert m.energy_j == pytest.approx(5.0 * m.seconds, rel=0.01)


def test_ina228_accumulator_wrap_is_unwrapped():
    chip = FakeIna228(volts=20.0, amps=8.0, shunt_ohms=0.015, energy_start=2**40 - 5000)
    meter, _ = open_with("ina228", (0x40, chip))
    with meter:
        m = window(meter, 0.2)  # 160 W x 0.2 s = 32 J = ~27000 LSB: wraps once
        assert meter._tracker.wraps == 1
    assert m.energy_j == pytest.approx(160.0 * m.seconds, rel=0.01)


@pytest.mark.parametrize("fault, message", [("reset", "was reset"), ("unplug", "Remote I/O error")])
def test_ina228_reset_or_disconnect_fails_loudly(fault, message):
    chip = FakeIna228()
    meter, _ = open_with("ina228", (0x40, chip))
    with meter:
        meter.begin("w")
        if fault == "reset":
            chip.reset()  # power loss: SHUNT_CAL and ADC_CONFIG back to defaults, accumulator at 0
        else:
            chip.unplugged = True
        with pytest.raises(MeterFailure, match=message):
            meter.end("w")


# ------------------------------------------------------------------------- bus and probe
def test_nothing_at_the_address():
    with pytest.raises(MeterUnavailable, match=r"nothing answers at address 0x44 on I2C bus 1.*i2cdetect"):
        open_with("ina226:address=0x44", (0x40, FakeIna226()))


def test_address_outside_the_ina_range():
    with pytest.raises(MeterSpecError, match="outside the INA2xx range"):
        open_with("ina219:address=0x76", (0x40, FakeIna219()))


def test_missing_bus_device_and_permission():
    def missing(n):
        raise FileNotFoundError(2, "No such file or directory", f"/dev/i2c-{n}")

    def denied(n):
        raise PermissionError(13, "Permission denied", f"/dev/i2c-{n}")

    with pytest.raises(MeterUnavailable, match=r"no /dev/i2c-7: .*raspi-config"):
        open_meter("ina219:bus=7", smbus_factory=missing)
    with pytest.raises(MeterPermissionError, match="i2c group"):
        open_meter("ina219:bus=1", smbus_factory=denied)


def test_probe_reports_what_is_missing():
    p = ina2xx.probe(parse_spec("ina219:bus=97"))
    assert not p.available and "no /dev/i2c-97" in p.reason
    chip = FakeIna219()
    assert ina2xx.probe(parse_spec("ina219"), smbus_factory=lambda n: FakeSMBus((0x40, chip))).available
    p = ina2xx.probe(parse_spec("ina219:address=0x41"), smbus_factory=lambda n: FakeSMBus((0x40, chip)))
    assert not p.available and "nothing answers at 0x41" in p.reason


def test_pick_timing_prefers_the_longest_current_averaging():
    t = ina2xx.pick_timing(ina2xx.Ina219.TIMINGS, 0.010)
    assert t.cycle_s <= 0.010 and t.shunt_s == pytest.approx(16 * 532e-6)
    fastest = ina2xx.pick_timing(ina2xx.Ina219.TIMINGS, 1e-4)  # nothing fits: the fastest setting
    assert fastest.cycle_s == pytest.approx(2 * 532e-6)
