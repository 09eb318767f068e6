"""INA219/226/260/228 drivers against emulated register maps behind a fake SMBus.

The fakes are built from the TI datasheets (INA219 SBOS448, INA226 SBOS547, INA260 SBOS656,
INA228 at ti.com/lit/ds/symlink/ina228.pdf), not from the driver:

* every register starts at the chip's reset value; a write changes only the bits the datasheet
  makes writable (reserved bits keep their reset value: INA219 config bit 14 reads 0, INA226
  config bits 14-12 read 100b, INA260 110b, INA226 calibration bit 15 and INA219 calibration bit 0
  read 0); writes to read-only registers are acknowledged and ignored, as on the bus;
* setting bit 15 of the configuration register resets every register;
* conversions run on the chip's own clock: one cycle is the sum of the enabled conversion times
  times the averaging count set in the configuration; the measurement registers hold the last
  completed conversion (0 until the first one) and the conversion-ready flag is set when a cycle
  completes and cleared as the datasheet says (INA219: reading the power register; INA226/260:
  reading Mask/Enable; any: writing the configuration);
* the measurement registers are computed from the physical state (bus volts, load amps, the real
  shunt) with the chip's integer arithmetic and the calibration written: INA219 current =
  trunc(shunt x CAL / 4096), power = trunc(current x bus / 5000); INA226 current = trunc(shunt x
  CAL / 2048), power = trunc(current x bus / 20000); the overflow flag is set when the current
  does not fit its signed 16-bit register; INA260 current LSB 1.25 mA, power = trunc(I x V / 6400)
  (10 mW from 1.25 mA x 1.25 mV); INA228 current = trunc(VSHUNT x 4096 / SHUNT_CAL) (what the
  datasheet's SHUNT_CAL and LSB equations imply), power = trunc(current x VBUS / 16384), energy
  accumulates power x conversion time / 16 in a 40-bit register, MATHOF on overflow;
* registers are big-endian; the fake SMBus swaps bytes on word transfers as real SMBus
  hardware does (the chip sends the MSB first, an SMBus word read puts the first byte low), and
  block reads come MSB first.

Everything above the fake bus is the shipped driver.
"""

import math
import threading
import time
from fractions import Fraction

import pytest

from energyprof.errors import MeterFailure, MeterPermissionError, MeterSpecError, MeterUnavailable
from energyprof.meters import open_meter, parse_spec
from energyprof.meters import ina2xx


def swap16(v):
    return ((v & 0xFF) << 8) | (v >> 8)


def to_u(value, bits):
    return value & ((1 << bits) - 1)


def clamp(value, low, high):
    return max(low, min(high, value))


class FakeChip:
    """Physical state plus a register file with the chip's reset values and writable bits."""

    RESET: dict = {}  # register -> power-on value
    WRITABLE: dict = {}  # register -> bits the host can change
    READ_BYTES: dict = {}  # registers wider than 16 bits -> their width in bytes

    def __init__(self, volts=5.0, amps=0.8, shunt_ohms=0.1):
        self.volts, self.amps, self.shunt_ohms = volts, amps, shunt_ohms
        self.unplugged = False
        self.frozen = False  # True: the ADC never completes a conversion (e.g. no supply on VS)
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        self.regs = dict(self.RESET)
        self._restart()

    def _restart(self):
        self.t0 = time.perf_counter()
        self.cycles = 0

    def cycle_s(self):
        """Seconds per conversion cycle from the configuration, None when not converting."""
        raise NotImplementedError

    def convert(self, cycles, cycle_s):
        """Latch the measurement registers from the physical state (``cycles`` cycles completed)."""
        raise NotImplementedError

    def after_read(self, reg):
        """Side effects of reading a register (flags cleared on read)."""

    def config_written(self):
        self._restart()

    def _advance(self):
        cycle = self.cycle_s()
        if cycle is None or self.frozen:
            return
        done = int((time.perf_counter() - self.t0) / cycle)
        if done > self.cycles:
            self.convert(done - self.cycles, cycle)
            self.cycles = done

    def convert_now(self):
        """Complete one conversion at once (for arithmetic checks that need no waiting)."""
        with self.lock:
            self.convert(1, self.cycle_s())

    def write(self, reg, value):
        with self.lock:
            self._advance()
            if reg == 0x00 and value & 0x8000:
                self.reset()  # RST: every register back to its reset value; the bit self-clears
                return
            mask = self.WRITABLE.get(reg, 0)
            self.regs[reg] = (self.regs.get(reg, 0) & ~mask) | (value & mask)
            if reg == 0x00:
                self.config_written()

    def read(self, reg, nbytes):
        with self.lock:
            self._advance()
            value = self.regs.get(reg, 0)
            self.after_read(reg)
            return value


class FakeIna219(FakeChip):
    RESET = {0x00: 0x399F, 0x01: 0, 0x02: 0, 0x03: 0, 0x04: 0, 0x05: 0}
    WRITABLE = {0x00: 0x3FFF, 0x05: 0xFFFE}  # config bit 14 unused; calibration bit 0 is void
    ADC_S = {0: 84e-6, 1: 148e-6, 2: 276e-6, 3: 532e-6, 8: 532e-6, 9: 1.06e-3, 10: 2.13e-3, 11: 4.26e-3,
             12: 8.51e-3, 13: 17.02e-3, 14: 34.05e-3, 15: 68.10e-3}

    def _adc_s(self, code):
        return self.ADC_S[code if code & 0x8 else code & 0x3]

    def cycle_s(self):
        config = self.regs[0x00]
        mode = config & 0b111
        if mode < 0b101:  # power-down, triggered or ADC off: nothing converts on its own
            return None
        bus = self._adc_s((config >> 7) & 0xF) if mode & 0b010 else 0.0
        shunt = self._adc_s((config >> 3) & 0xF) if mode & 0b001 else 0.0
        return bus + shunt

    def convert(self, cycles, cycle_s):
        pga = (self.regs[0x00] >> 11) & 3
        limit = 4000 * 2**pga  # +-40 mV x 2^PGA in 10 uV steps
        shunt = clamp(round(self.amps * self.shunt_ohms / 10e-6), -limit, limit)
        bus = clamp(int(self.volts / 4e-3), 0, 0x1FFF)
        current = math.trunc(shunt * self.regs[0x05] / 4096)  # datasheet eq. 4
        overflow = not -32768 <= current <= 32767
        current = clamp(current, -32768, 32767)
        self.regs[0x01] = to_u(shunt, 16)
        self.regs[0x02] = (bus << 3) | 0b10 | int(overflow)  # CNVR set, OVF
        self.regs[0x03] = min(0xFFFF, math.trunc(abs(current) * bus / 5000))  # eq. 5
        self.regs[0x04] = to_u(current, 16)

    def after_read(self, reg):
        if reg == 0x03:
            self.regs[0x02] &= ~0b10  # reading the power register clears CNVR

    def config_written(self):
        super().config_written()
        self.regs[0x02] &= ~0b10


class FakeIna226(FakeChip):
    RESET = {0x00: 0x4127, 0x01: 0, 0x02: 0, 0x03: 0, 0x04: 0, 0x05: 0, 0x06: 0, 0x07: 0,
             0xFE: 0x5449, 0xFF: 0x2260}
    # config bits 14-12 reserved; calibration bit 15 reserved; Mask/Enable: alert enables, APOL, LEN
    WRITABLE = {0x00: 0x0FFF, 0x05: 0x7FFF, 0x06: 0xFC03, 0x07: 0xFFFF}
    CT_S = (140e-6, 204e-6, 332e-6, 588e-6, 1.1e-3, 2.116e-3, 4.156e-3, 8.244e-3)
    AVG = (1, 4, 16, 64, 128, 256, 512, 1024)
    SHUNT_LSB_V, BUS_LSB_V = 2.5e-6, 1.25e-3

    def cycle_s(self):
        config = self.regs[0x00]
        mode = config & 0b111
        if mode < 0b101:
            return None
        bus = self.CT_S[(config >> 6) & 7] if mode & 0b010 else 0.0
        shunt = self.CT_S[(config >> 3) & 7] if mode & 0b001 else 0.0
        return (bus + shunt) * self.AVG[(config >> 9) & 7]

    def _current(self):
        """The current register before clamping, and the shunt register."""
        shunt = clamp(round(self.amps * self.shunt_ohms / self.SHUNT_LSB_V), -32768, 32767)
        return math.trunc(shunt * self.regs[0x05] / 2048), shunt  # datasheet eq. 3

    def convert(self, cycles, cycle_s):
        current, shunt = self._current()
        bus = clamp(int(self.volts / self.BUS_LSB_V), 0, 0x7FFF)
        overflow = not -32768 <= current <= 32767
        current = clamp(current, -32768, 32767)
        self.regs[0x01] = to_u(shunt, 16)
        self.regs[0x02] = bus
        self.regs[0x03] = min(0xFFFF, math.trunc(abs(current) * bus / 20000))  # eq. 4
        self.regs[0x04] = to_u(current, 16)
        self.regs[0x06] = (self.regs[0x06] & ~0x0004) | 0x0008 | (0x0004 if overflow else 0)  # CVRF, OVF

    def after_read(self, reg):
        if reg == 0x06:
            self.regs[0x06] &= ~0x0008  # reading Mask/Enable clears CVRF

    def config_written(self):
        super().config_written()
        self.regs[0x06] &= ~0x0008


class FakeIna260(FakeIna226):
    RESET = {0x00: 0x6127, 0x01: 0, 0x02: 0, 0x03: 0, 0x06: 0, 0x07: 0, 0xFE: 0x5449, 0xFF: 0x2270}
    WRITABLE = {0x00: 0x0FFF, 0x06: 0xFC03, 0x07: 0xFFFF}  # config bits 14-12 read 110b

    def convert(self, cycles, cycle_s):
        current = clamp(round(self.amps / 1.25e-3), -32768, 32767)
        bus = clamp(int(self.volts / 1.25e-3), 0, 0x7FFF)
        power = math.trunc(abs(current) * bus / 6400)  # 1.25 mA x 1.25 mV = 1.5625 uW; LSB 10 mW
        self.regs[0x01] = to_u(current, 16)
        self.regs[0x02] = bus
        self.regs[0x03] = min(0xFFFF, power)
        self.regs[0x06] = (self.regs[0x06] & ~0x0004) | 0x0008 | (0x0004 if power > 0xFFFF else 0)


class FakeIna228(FakeChip):
    """20-bit conversions; energy accumulates the power register over each conversion time."""

    RESET = {0x00: 0x0000, 0x01: 0xFB68, 0x02: 0x1000, 0x03: 0, 0x04: 0, 0x05: 0, 0x06: 0, 0x07: 0,
             0x08: 0, 0x09: 0, 0x0A: 0, 0x0B: 0x0001, 0x3E: 0x5449, 0x3F: 0x2281}
    # CONFIG: CONVDLY, TEMPCOMP, ADCRANGE (bit 14 RSTACC self-clears; bits 3-0 reserved);
    # SHUNT_CAL bit 15 reserved; DIAG_ALRT: ALATCH, CNVR, SLOWALERT, APOL (the rest are flags)
    WRITABLE = {0x00: 0x3FF0, 0x01: 0xFFFF, 0x02: 0x7FFF, 0x03: 0x3FFF, 0x0B: 0xF000}
    CT_S = (50e-6, 84e-6, 150e-6, 280e-6, 540e-6, 1052e-6, 2074e-6, 4120e-6)
    AVG = (1, 4, 16, 64, 128, 256, 512, 1024)

    def reset(self):
        super().reset()
        self.energy = 0.0  # the accumulator keeps more bits than it shows

    def write(self, reg, value):
        super().write(reg, value)
        if reg == 0x00 and value & 0x4000 and not value & 0x8000:  # RSTACC
            with self.lock:
                self.energy = 0.0

    def cycle_s(self):
        adc = self.regs[0x01]
        mode = adc >> 12
        if mode < 0x9:  # shutdown or triggered modes
            return None
        total = sum(self.CT_S[(adc >> shift) & 7] for bit, shift in ((1, 9), (2, 6), (4, 3)) if mode & bit)
        return total * self.AVG[adc & 7]

    def convert(self, cycles, cycle_s):
        low_range = bool(self.regs[0x00] & 0x10)
        vshunt = clamp(round(self.amps * self.shunt_ohms / (78.125e-9 if low_range else 312.5e-9)),
                       -(2**19), 2**19 - 1)
        vbus = clamp(int(self.volts / 195.3125e-6), 0, 2**19 - 1)
        cal = self.regs[0x02]
        current = math.trunc(vshunt * 4096 / cal) if cal else 0
        power = math.trunc(abs(current) * vbus / 16384)
        mathof = not -(2**19) <= current < 2**19 or power >= 2**24
        self.regs[0x04] = to_u(vshunt, 20) << 4
        self.regs[0x05] = vbus << 4
        self.regs[0x07] = to_u(clamp(current, -(2**19), 2**19 - 1), 20) << 4
        self.regs[0x08] = min(power, 2**24 - 1)
        self.energy += cycles * power * cycle_s / 16  # energy LSB = 16 x power LSB x 1 s
        energyof = self.energy >= 2**40
        self.energy %= 2**40
        self.regs[0x09] = int(self.energy)
        flags = (1 << 9 if mathof else 0) | (1 << 11 if energyof else 0) | 0b10  # MATHOF, ENERGYOF, CNVRF
        self.regs[0x0B] = (self.regs[0x0B] & ~((1 << 9) | 0b10)) | flags

    def after_read(self, reg):
        if reg == 0x0B:
            self.regs[0x0B] &= ~((1 << 11) | 0b10)  # flags clear when DIAG_ALRT is read


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
        return swap16(self._chip(address).read(reg, 2) & 0xFFFF)

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


def regs_of(chip, address=0x40, bus_number=1):
    return ina2xx._Registers(FakeSMBus((address, chip)), bus_number, address)


def close_to_power(m, watts, cycle_s, rel=0.005):
    """A counter read at window edges is off by at most one conversion cycle at each edge."""
    return abs(m.energy_j - watts * m.seconds) <= watts * (2 * cycle_s + rel * m.seconds)


# ------------------------------------------------------------------------- INA219
def test_ina219_calibration_and_configuration_registers():
    chip = FakeIna219()
    meter, bus = open_with("ina219:bus=1,address=0x40,shunt_ohms=0.1,max_amps=3.2", (0x40, chip))
    with meter:
        # 0.04096 / (3.2/32768 * 0.1) = 4194.3 -> 4194 (even, bit 0 unused)
        assert chip.regs[0x05] == 4194
        config = chip.regs[0x00]
        assert config >> 14 & 1 == 0  # unused bit, as the chip has it
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
        with chip.lock:
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


def test_a_chip_that_never_converts_does_not_open():
    chip = FakeIna219()
    chip.frozen = True  # e.g. VS unpowered: the registers answer, the ADC never completes a cycle
    with pytest.raises(MeterUnavailable, match="conversion-ready flag never set"):
        open_with("ina219", (0x40, chip))


# ------------------------------------------------------------------------- INA226 / INA260
def test_ina226_registers_and_energy():
    chip = FakeIna226(volts=12.0, amps=0.5, shunt_ohms=0.1)
    meter, bus = open_with("ina226:address=0x41,shunt_ohms=0.1,max_amps=0.8", (0x41, chip))
    with meter:
        assert chip.regs[0x05] == int(0.00512 / (0.8 / 32768 * 0.1))  # 2097
        avg, vbusct, vshct = chip.regs[0x00] >> 9 & 7, chip.regs[0x00] >> 6 & 7, chip.regs[0x00] >> 3 & 7
        assert (avg, vbusct, vshct) == (1, 2, 5)  # 4 x (332 us + 2.116 ms) = 9.79 ms <= 10 ms
        m = window(meter, 0.3)
    assert m.energy_j == pytest.approx(6.0 * m.seconds, rel=0.005)
    assert m.meter.averaging_window_s == pytest.approx(4 * 2.116e-3)
    # read-modify-write: the configuration written keeps bits 14-12 as the chip reads them (100b)
    config_words = [swap16(v) for reg, v in bus.words_written if reg == 0x00 and not swap16(v) & 0x8000]
    assert config_words and all(w >> 12 == 0b100 for w in config_words)


def test_ina226_current_register_cannot_overflow_at_max_amps():
    """Finding 2: with CAL = trunc(0.00512 / (max_amps / 2^15 x R)) the current register reaches
    32768 at exactly max_amps for 1 mOhm at 10.24 A, the chip sets OVF and the meter never gives a
    reading at a current the user allowed."""
    chip = FakeIna226(volts=12.0, amps=10.24, shunt_ohms=0.001)
    meter, _ = open_with("ina226:shunt_ohms=0.001,max_amps=10.24,startup_s=2", (0x40, chip))
    with meter:
        m = window(meter, 0.3)
        assert chip.regs[0x06] & 0x0004 == 0  # no overflow flag
    assert m.energy_j == pytest.approx(12.0 * 10.24 * m.seconds, rel=0.005)
    assert m.details["read_errors"] == 0


def test_ina226_calibration_has_headroom_over_a_grid_of_shunts_and_currents():
    """Every shunt/current pair: at max_amps plus one shunt LSB (ADC rounding) the chip's current
    register still fits (no OVF) and reads the current within 0.1 %."""
    checked = 0
    for ohms in (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1):
        for amps in [0.32 * k for k in range(1, 40)] + [10.24, 20.48, 40.96, 0.8192, 1.6384]:
            amps = round(amps, 6)
            if ohms * amps > 0.08192:
                continue
            chip = FakeIna226(volts=5.0, amps=amps + 2.5e-6 / ohms, shunt_ohms=ohms)
            part = ina2xx.Ina226(regs_of(chip), ohms, amps, period_s=1e-3)
            chip.convert_now()
            assert chip.regs[0x06] & 0x0004 == 0, (ohms, amps, part.calibration)
            reading = ina2xx._signed(chip.regs[0x04], 16) * part.current_lsb_a
            assert reading == pytest.approx(chip.amps, rel=1e-3), (ohms, amps)
            checked += 1
    assert checked > 200


def test_ina226_spec_checks_the_shunt_range():
    with pytest.raises(MeterSpecError, match=r"100 mV exceeds the 81.92 mV shunt range.*max_amps <= 0.8192"):
        open_with("ina226:shunt_ohms=0.1,max_amps=1.0", (0x40, FakeIna226()))


def test_ina260_opens_although_its_reserved_bits_read_110b():
    """Finding 1: the INA260's configuration resets to 0x6127 and bits 14-12 read 110b whatever is
    written. Writing 0x4000 | mode and comparing the whole word failed on every INA260 ("wrote
    0x42AF, read back 0x62AF"). Now the write keeps the reserved bits and the check compares only
    the fields written."""
    chip = FakeIna260(volts=5.0, amps=2.0)
    meter, bus = open_with("ina260:bus=1", (0x40, chip))
    with meter:
        assert chip.regs[0x00] >> 12 == 0b110
        m = window(meter, 0.3)
    config_words = [swap16(v) for reg, v in bus.words_written if reg == 0x00 and not swap16(v) & 0x8000]
    assert config_words and all(w >> 12 == 0b110 for w in config_words)  # read-modify-write
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


def test_a_configuration_field_that_does_not_stick_is_reported():
    chip = FakeIna226()
    chip.WRITABLE = {**FakeIna226.WRITABLE, 0x00: 0x0E00}  # a part whose conversion-time bits are stuck
    with pytest.raises(MeterUnavailable, match=r"register 0x00 of the INA226 .*fields 0x0FFF differ"):
        open_with("ina226", (0x40, chip))


# ------------------------------------------------------------------------- INA228
def test_ina228_counter_registers_and_energy():
    chip = FakeIna228(volts=20.0, amps=2.0, shunt_ohms=0.015)
    meter, _ = open_with("ina228:shunt_ohms=0.015,max_amps=10", (0x40, chip))
    with meter:
        # 0.015 ohm x 10 A = 150 mV: the +-163.84 mV range (ADCRANGE=0), SHUNT_CAL = ceil(13107.2e6 x 10/2^19 x 0.015)
        assert chip.regs[0x00] & 0x10 == 0
        assert chip.regs[0x02] == 3750
        assert chip.regs[0x01] >> 12 == 0xB  # continuous shunt and bus
        assert chip.regs[0x01] >> 3 & 7 == 0xFB68 >> 3 & 7  # temperature conversion time kept
        m = window(meter, 0.3)
        info = meter.info
    assert info.kind == "counter" and info.update_period_s <= 0.01
    assert info.resolution_j == pytest.approx(16 * 3.2 * 3750 / (13107.2e6 * 0.015))
    assert close_to_power(m, 40.0, info.update_period_s), (m.energy_j, m.seconds)


def test_ina228_shunt_cal_is_exact_integer_arithmetic():
    """Finding 3: 13107.2e6 x 4.03 / 2^19 x 0.01 x 4 is exactly 4030, but in floats it is
    4030.0000000000005 and rounding up wrote 4031."""
    chip = FakeIna228(volts=5.0, amps=3.0, shunt_ohms=0.01)
    meter, _ = open_with("ina228:shunt_ohms=0.01,max_amps=4.03", (0x40, chip))
    with meter:
        assert chip.regs[0x00] & 0x10  # 40.3 mV fits the +-40.96 mV range
        exact = Fraction(131072 * 10**5) * Fraction("0.01") * 4 * Fraction("4.03") / 2**19
        assert exact == 4030 and chip.regs[0x02] == 4030
        m = window(meter, 0.3)
        info = meter.info
    assert info.resolution_j == float(16 * Fraction(32, 10) * 4030 / (Fraction(131072 * 10**5) * Fraction("0.01") * 4))
    assert close_to_power(m, 15.0, info.update_period_s), (m.energy_j, m.seconds)


def test_ina228_low_range_uses_four_times_the_shunt_cal():
    chip = FakeIna228(volts=5.0, amps=1.0, shunt_ohms=0.01)
    meter, _ = open_with("ina228:shunt_ohms=0.01,max_amps=4", (0x40, chip))  # 40 mV: ADCRANGE=1
    with meter:
        assert chip.regs[0x00] & 0x10
        assert chip.regs[0x02] == math.ceil(4 * 13107.2e6 * 4 / 2**19 * 0.01)
        m = window(meter, 0.3)
        period = meter.info.update_period_s
    assert close_to_power(m, 5.0, period), (m.energy_j, m.seconds)


def test_ina228_accumulator_wrap_is_unwrapped():
    chip = FakeIna228(volts=20.0, amps=8.0, shunt_ohms=0.015)
    meter, _ = open_with("ina228", (0x40, chip))
    with meter:
        with chip.lock:
            chip.energy = 2**40 - 40000.0  # the accumulator near its top (days of running)
        time.sleep(0.03)  # a few conversions: the register shows the high value
        meter.read_counters()  # one reading up there, as the meter's regular reads would have
        m = window(meter, 0.4)  # 160 W x 0.4 s = 64 J = ~60000 LSB: wraps once
        assert meter._tracker.wraps == 1
        period = meter.info.update_period_s
    assert close_to_power(m, 160.0, period), (m.energy_j, m.seconds)


@pytest.mark.parametrize("fault, message", [("reset", "was reset"), ("unplug", "Remote I/O error")])
def test_ina228_reset_or_disconnect_fails_loudly(fault, message):
    chip = FakeIna228()
    meter, _ = open_with("ina228", (0x40, chip))
    with meter:
        meter.begin("w")
        if fault == "reset":
            with chip.lock:
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


def test_a_chip_owned_by_the_kernel_driver_points_to_hwmon():
    class OwnedBus(FakeSMBus):
        def read_word_data(self, address, reg):  # smbus2's I2C_SLAVE ioctl fails when a driver owns the address
            raise OSError(16, "Device or resource busy")

    bus = OwnedBus((0x40, FakeIna219()))
    with pytest.raises(MeterUnavailable, match=r"kernel driver owns .*'hwmon:name=ina219'"):
        open_meter("ina219", smbus_factory=lambda n: bus)
