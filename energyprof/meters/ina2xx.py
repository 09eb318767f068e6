"""TI INA219 / INA226 / INA260 / INA228 power monitors over I2C (``smbus2``), register level.

``ina219:bus=1,address=0x40,shunt_ohms=0.1,max_amps=3.2``, ``ina226:...``, ``ina260:bus=1``,
``ina228:bus=1,shunt_ohms=0.015,max_amps=10``. Keys: ``bus`` (default 1), ``address`` (0x40..0x4F,
default 0x40), ``shunt_ohms`` and ``max_amps`` (not for the INA260, whose 2 mOhm shunt is inside;
``max_amps`` defaults to the shunt ADC's full scale over ``shunt_ohms``), ``rate_hz`` (default
100), and the sampled-meter keys ``max_gap_s``, ``startup_s``, ``scope``.

INA219/226/260 are sampled meters: the chip multiplies current and bus voltage into its power
register after each conversion cycle and a background thread polls it. The ADC is configured so
that one conversion cycle (averaging included) fits in one poll period with the longest possible
shunt (current) conversion, so each reading averages most of its period; ``averaging_window_s``
says how much. The INA228 accumulates energy on chip: it is read as a 40-bit counter at the window
edges (no polling).

Registers are big-endian; SMBus word transfers are little-endian, so 16-bit words are byte-swapped
here. 24- and 40-bit INA228 registers are read as I2C blocks (MSB first). Formulas: TI datasheets
(INA219 SBOS448, INA226 SBOS547, INA260 SBOS656, INA228 at ti.com/lit/ds/symlink/ina228.pdf); see
docs/power-meters.md.

Configuration registers are written read-modify-write: only the fields energyprof sets change, and
reserved bits keep the value the chip gives them (the INA260 reads 110b in bits 14-12, the INA226
1 in bit 14). Read-back checks compare only the fields written. Calibrations are integers computed
exactly from the spec's decimal values, with headroom so that the current register cannot reach
32768 (math overflow) at ``max_amps``.
"""

from __future__ import annotations

import errno
import math
import os
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable

from energyprof.errors import MeterFailure, MeterPermissionError, MeterSpecError, MeterUnavailable
from energyprof.meters.base import DEVICE_CALL_TIMEOUT_S, CounterMeter, DeviceCaller, MeterInfo, Probe, WrapTracker
from energyprof.meters.sampled import PolledSource, SampledMeter, SampledOptions
from energyprof.meters.spec import MeterSpec

__all__ = ["Ina219", "Ina226", "Ina260", "Ina228", "Ina228Meter", "open_from_spec", "probe"]

TI_MANUFACTURER_ID = 0x5449  # "TI"
DEFAULT_RATE_HZ = 100.0
_NO_ANSWER = (errno.EREMOTEIO, errno.ENXIO, errno.EIO)


def _default_smbus(bus: int) -> Any:
    import smbus2

    return smbus2.SMBus(bus)


def _open_bus(bus: int, factory: Callable[[int], Any]) -> Any:
    try:
        return factory(bus)
    except FileNotFoundError as exc:
        raise MeterUnavailable(
            f"no /dev/i2c-{bus}: I2C bus {bus} is not enabled. On a Raspberry Pi run "
            "'sudo raspi-config nonint do_i2c 0' (or add dtparam=i2c_arm=on to /boot/firmware/config.txt) "
            "and reboot; elsewhere load the i2c-dev module and give bus=N"
        ) from exc
    except PermissionError as exc:
        raise MeterPermissionError(
            f"/dev/i2c-{bus} exists but this user may not open it: add the user to the i2c group "
            "(sudo usermod -aG i2c $USER, then log in again)"
        ) from exc


class _Registers:
    """The big-endian registers of one device on an SMBus."""

    def __init__(self, bus: Any, bus_number: int, address: int) -> None:
        self.bus = bus
        self.address = address
        self.where = f"address 0x{address:02X} on I2C bus {bus_number}"

    def read16(self, reg: int) -> int:
        word = self.bus.read_word_data(self.address, reg)
        return ((word & 0xFF) << 8) | (word >> 8)

    def write16(self, reg: int, value: int) -> None:
        self.bus.write_word_data(self.address, reg, ((value & 0xFF) << 8) | (value >> 8))

    def read(self, reg: int, nbytes: int) -> int:
        return int.from_bytes(bytes(self.bus.read_i2c_block_data(self.address, reg, nbytes)), "big")


def _signed(value: int, bits: int) -> int:
    return value - (1 << bits) if value & (1 << (bits - 1)) else value


def _exact(x: float) -> Fraction:
    """A spec number as the exact decimal the user wrote (0.015 -> 15/1000), not its binary float."""
    return Fraction(repr(float(x)))


def _calibration_with_headroom(
    shunt_ohms: float, max_amps: float, shunt_lsb_v: Fraction, divisor: int, recipe: Fraction, largest: int
) -> int:
    """INA219/INA226 calibration: the datasheet recipe ``trunc(recipe / (I_LSB x R))`` with
    ``I_LSB = max_amps / 2^15``, lowered when needed so that the chip's current register,
    ``trunc(shunt_raw x CAL / divisor)``, stays at most 32767 for a shunt reading of
    ``max_amps x R`` rounded up plus one LSB of noise. Without the headroom the register reaches exactly 32768 at
    ``max_amps`` for many shunt/current pairs (1 mOhm at 10.24 A on an INA226) and the chip raises
    its overflow flag at a current the user said is allowed. Exact integer arithmetic throughout."""
    r, amps = _exact(shunt_ohms), _exact(max_amps)
    cal = math.floor(recipe * 2**15 / (amps * r))
    worst_raw = math.floor(amps * r / shunt_lsb_v) + 2
    cal = min(cal, (32768 * divisor - 1) // worst_raw, largest)
    if cal < 1:
        raise MeterSpecError(f"shunt_ohms={shunt_ohms:g} x max_amps={max_amps:g} leaves no valid calibration")
    return cal


@dataclass(frozen=True)
class AdcTiming:
    """One ADC setting: bits for the configuration register, the conversion cycle (how often the
    results update) and how much of it the shunt (current) conversion averages."""

    code: int
    cycle_s: float
    shunt_s: float


def pick_timing(options: list[AdcTiming], period_s: float) -> AdcTiming:
    """The setting whose cycle fits in ``period_s`` with the longest current averaging (the
    fastest one when none fits)."""
    fitting = [o for o in options if o.cycle_s <= period_s * (1 + 1e-9)]
    if not fitting:
        return min(options, key=lambda o: o.cycle_s)
    return max(fitting, key=lambda o: (o.shunt_s, -o.cycle_s))


def _averaging_timings(conversion_s: tuple[float, ...], bus_index: int, code: Callable[[int, int], int]) -> list[AdcTiming]:
    """INA226/INA260/INA228: bus and shunt conversions alternate, each averaged over the count."""
    counts = (1, 4, 16, 64, 128, 256, 512, 1024)
    return [
        AdcTiming(code(avg_i, sh_i), (conversion_s[bus_index] + sh) * n, sh * n)
        for avg_i, n in enumerate(counts)
        for sh_i, sh in enumerate(conversion_s)
    ]


class _Ina2xx:
    """Identity check, reset, and configuration registers written read-modify-write and read back."""

    NAME = "INA2xx"
    DIE_ID: int | None = None  # expected die-ID register >> 4; None: the part has no ID registers
    ID_REGS = (0xFE, 0xFF)
    CONFIG = 0x00
    RESET = 0x8000
    CONFIG_AFTER_RESET: int  # what the configuration register reads right after a reset
    CONFIG_FIELDS: int  # the configuration bits energyprof sets; the others stay as the chip has them
    SHUNT_RANGE_V: float | None = None  # shunt ADC full scale; None: the shunt is inside the chip
    current_lsb_a: float
    config: int
    timing: AdcTiming

    def __init__(self, regs: _Registers) -> None:
        self.regs = regs

    def details(self) -> dict[str, Any]:
        return {
            "device": self.NAME,
            "address": f"0x{self.regs.address:02X}",
            "config": f"0x{self.config:04X}",
            "current_lsb_a": self.current_lsb_a,
            "conversion_cycle_s": self.timing.cycle_s,
        }

    def _start(self) -> None:
        """Reset the part after checking that it is the part named in the spec."""
        try:
            if self.DIE_ID is not None:
                manufacturer = self.regs.read16(self.ID_REGS[0])
                die = self.regs.read16(self.ID_REGS[1]) >> 4
                if manufacturer != TI_MANUFACTURER_ID or die != self.DIE_ID:
                    known = {0x226: "ina226", 0x227: "ina260", 0x228: "ina228"}.get(die) if manufacturer == TI_MANUFACTURER_ID else None
                    hint = f"; it looks like an {known.upper()}: use '{known}:...'" if known else ""
                    raise MeterUnavailable(
                        f"the device at {self.regs.where} is not an {self.NAME} (manufacturer id "
                        f"0x{manufacturer:04X}, die id 0x{die:03X}){hint}"
                    )
            self.regs.write16(self.CONFIG, self.RESET)
            after = self.regs.read16(self.CONFIG)
        except OSError as exc:
            raise self._io_error(exc) from exc
        if after != self.CONFIG_AFTER_RESET:
            raise MeterUnavailable(
                f"after a reset the configuration register of the device at {self.regs.where} reads "
                f"0x{after:04X}; an {self.NAME} reads 0x{self.CONFIG_AFTER_RESET:04X}: wrong part or address"
            )

    def _io_error(self, exc: OSError) -> MeterUnavailable:
        if exc.errno in _NO_ANSWER:
            return MeterUnavailable(
                f"nothing answers at {self.regs.where} ({exc}): check the wiring (SDA, SCL, 3.3 V, GND), "
                f"the address jumpers, and 'i2cdetect -y N'"
            )
        if exc.errno == errno.EBUSY:
            return MeterUnavailable(
                f"a kernel driver owns {self.regs.where} ({exc}): the i2c-sensor overlay bound the chip to "
                f"the ina2xx driver. Read it through that driver with 'hwmon:name={self.NAME.lower()}', or "
                "remove the dtoverlay line to use this register-level meter"
            )
        return MeterUnavailable(f"I2C error talking to the {self.NAME} at {self.regs.where}: {exc}")

    def _set_fields(self, reg: int, fields: int, value: int) -> int:
        """Read-modify-write: set the bits in ``fields`` to ``value``'s, keep every other bit as the
        chip has it (reserved bits, fields energyprof does not use), read back and compare the
        fields written. Returns the full register value written."""
        try:
            current = self.regs.read16(reg)
            word = (current & ~fields & 0xFFFF) | (value & fields)
            self.regs.write16(reg, word)
            back = self.regs.read16(reg)
        except OSError as exc:
            raise self._io_error(exc) from exc
        if back & fields != value & fields:
            raise MeterUnavailable(
                f"wrote 0x{word:04X} to register 0x{reg:02X} of the {self.NAME} at {self.regs.where} "
                f"and read back 0x{back:04X} (fields 0x{fields:04X} differ): the device does not behave "
                f"like an {self.NAME}"
            )
        return word

    @classmethod
    def check_shunt(cls, shunt_ohms: float, max_amps: float) -> None:
        if not (shunt_ohms > 0 and max_amps > 0):
            raise MeterSpecError(f"{cls.NAME}: shunt_ohms and max_amps must be > 0")
        if shunt_ohms * max_amps > cls.SHUNT_RANGE_V * (1 + 1e-9):
            raise MeterSpecError(
                f"{cls.NAME}: shunt_ohms x max_amps = {shunt_ohms * max_amps * 1e3:.4g} mV exceeds the "
                f"{cls.SHUNT_RANGE_V * 1e3:g} mV shunt range; at {shunt_ohms:g} ohm use max_amps <= "
                f"{cls.SHUNT_RANGE_V / shunt_ohms:.4g}, or a smaller shunt"
            )


class _PowerRegisterChip(_Ina2xx):
    """INA219/226/260: poll the power register; each reading also checks the overflow flag and
    that the calibration survived (a chip reset would silently read 0 W)."""

    POWER = 0x03
    CALIBRATION: int | None = 0x05
    CAL_FIELDS = 0xFFFF  # calibration bits that exist (INA219: bit 0 reads 0; INA226: bit 15 reads 0)
    power_lsb_w: float
    calibration: int | None

    def read_watts(self) -> float:
        if self._overflowed():
            raise MeterFailure(
                f"{self.NAME} math overflow: the current is beyond max_amps or the shunt range"
            )
        watts = self.regs.read16(self.POWER) * self.power_lsb_w
        if self.CALIBRATION is not None and self.regs.read16(self.CALIBRATION) & self.CAL_FIELDS != self.calibration:
            raise MeterFailure(f"{self.NAME} lost its calibration (chip reset or brown-out?)")
        return watts

    def _overflowed(self) -> bool:
        return bool(self.regs.read16(0x06) & 0x0004)  # Mask/Enable register, OVF bit

    def _converted(self) -> bool:
        return bool(self.regs.read16(0x06) & 0x0008)  # Mask/Enable register, CVRF bit

    def _configure(self, config: int) -> None:
        """Reset, write the configuration (and calibration), then wait for the first conversion:
        until it completes the measurement registers hold no reading (the power register reads 0)."""
        self._start()
        self.config = self._set_fields(self.CONFIG, self.CONFIG_FIELDS, config)
        if self.CALIBRATION is not None:
            self._set_fields(self.CALIBRATION, self.CAL_FIELDS, self.calibration)
        timeout_s = max(0.2, 3 * self.timing.cycle_s)
        deadline = time.perf_counter() + timeout_s
        try:
            while not self._converted():
                if time.perf_counter() > deadline and not self._converted():  # asked again: this thread may have slept
                    raise MeterUnavailable(
                        f"the {self.NAME} at {self.regs.where} did not finish a conversion within "
                        f"{timeout_s:.3g} s of being configured (conversion-ready flag never set)"
                    )
                time.sleep(self.timing.cycle_s / 4)
        except OSError as exc:
            raise self._io_error(exc) from exc

    def details(self) -> dict[str, Any]:
        return {**super().details(), "calibration": self.calibration, "power_lsb_w": self.power_lsb_w}


class Ina219(_PowerRegisterChip):
    """INA219: calibration = trunc(0.04096 / (current_LSB x R)) with overflow headroom, bit 0
    cleared; power LSB = 20 x current LSB; PGA chosen from shunt_ohms x max_amps, 32 V bus range,
    12-bit bus conversions and 12-bit shunt conversions averaged 1..128 times."""

    NAME = "INA219"
    CONFIG_AFTER_RESET = 0x399F
    CONFIG_FIELDS = 0x3FFF  # BRNG, PG, BADC, SADC, MODE; bit 14 is unused
    CAL_FIELDS = 0xFFFE  # bit 0 of the calibration register does not exist
    SHUNT_RANGE_V = 0.32
    TIMINGS = [
        AdcTiming((0b0011 << 7) | ((0b1000 | k) << 3), 532e-6 * (1 + 2**k), 532e-6 * 2**k) for k in range(8)
    ]

    def __init__(self, regs: _Registers, shunt_ohms: float, max_amps: float, period_s: float) -> None:
        super().__init__(regs)
        self.check_shunt(shunt_ohms, max_amps)
        pga = next(k for k in range(4) if shunt_ohms * max_amps <= 0.04 * 2**k * (1 + 1e-9))
        # a smaller (even) calibration only widens the range
        self.calibration = _calibration_with_headroom(
            shunt_ohms, max_amps, Fraction(1, 100_000), 4096, Fraction(4096, 100_000), 0xFFFE
        ) & 0xFFFE
        self.current_lsb_a = 0.04096 / (self.calibration * shunt_ohms)
        self.power_lsb_w = 20 * self.current_lsb_a
        self.timing = pick_timing(self.TIMINGS, period_s)
        self._configure((1 << 13) | (pga << 11) | self.timing.code | 0b111)  # 32 V, PGA, ADCs, continuous

    def _overflowed(self) -> bool:
        return bool(self.regs.read16(0x02) & 0x0001)  # bus voltage register, OVF bit

    def _converted(self) -> bool:
        return bool(self.regs.read16(0x02) & 0x0002)  # bus voltage register, CNVR bit


class _AveragingChip(_PowerRegisterChip):
    """INA226 and INA260: same configuration layout, conversion times and averaging counts."""

    CONFIG_FIELDS = 0x0FFF  # AVG, VBUSCT, VSHCT, MODE; bits 14-12 are reserved
    CONVERSION_S = (140e-6, 204e-6, 332e-6, 588e-6, 1.1e-3, 2.116e-3, 4.156e-3, 8.244e-3)
    TIMINGS = _averaging_timings(CONVERSION_S, 2, lambda avg, sh: (avg << 9) | (2 << 6) | (sh << 3))

    def _setup(self, period_s: float) -> None:
        self.timing = pick_timing(self.TIMINGS, period_s)
        self._configure(self.timing.code | 0b111)  # continuous shunt and bus


class Ina226(_AveragingChip):
    """INA226: calibration = trunc(0.00512 / (current_LSB x R)) with overflow headroom, power LSB
    = 25 x current LSB."""

    NAME = "INA226"
    DIE_ID = 0x226
    CONFIG_AFTER_RESET = 0x4127
    CAL_FIELDS = 0x7FFF  # bit 15 of the calibration register is reserved
    SHUNT_RANGE_V = 0.08192

    def __init__(self, regs: _Registers, shunt_ohms: float, max_amps: float, period_s: float) -> None:
        super().__init__(regs)
        self.check_shunt(shunt_ohms, max_amps)
        self.calibration = _calibration_with_headroom(
            shunt_ohms, max_amps, Fraction(25, 10_000_000), 2048, Fraction(512, 100_000), 0x7FFF
        )
        self.current_lsb_a = 0.00512 / (self.calibration * shunt_ohms)
        self.power_lsb_w = 25 * self.current_lsb_a
        self._setup(period_s)


class Ina260(_AveragingChip):
    """INA260: 2 mOhm shunt inside; current LSB 1.25 mA, power LSB 10 mW, no calibration."""

    NAME = "INA260"
    DIE_ID = 0x227
    CONFIG_AFTER_RESET = 0x6127
    CALIBRATION = None

    def __init__(self, regs: _Registers, period_s: float) -> None:
        super().__init__(regs)
        self.calibration = None
        self.current_lsb_a = 1.25e-3
        self.power_lsb_w = 10e-3
        self._setup(period_s)


# 13107.2e6 in the INA228's SHUNT_CAL equation, exactly
_INA228_CAL_SCALE = Fraction(131072 * 10**5)


class Ina228(_Ina2xx):
    """INA228: 20-bit ADC with an on-chip 40-bit energy accumulator.

    current_LSB = max_amps / 2**19; SHUNT_CAL = 13107.2e6 x current_LSB x R (x4 with ADCRANGE=1,
    the +-40.96 mV range, used when the shunt voltage fits), rounded up in exact integer
    arithmetic; the current LSB then follows from the SHUNT_CAL written. Energy J = 16 x 3.2 x
    current_LSB x ENERGY. The bus conversion is 150 us; shunt conversion time and averaging fill
    the cycle."""

    NAME = "INA228"
    DIE_ID = 0x228
    CONFIG_AFTER_RESET = 0x0000
    CONFIG_FIELDS = 0x0010  # ADCRANGE; CONVDLY, TEMPCOMP stay as the chip has them
    ADC_CONFIG_FIELDS = 0xFFC7  # MODE, VBUSCT, VSHCT, AVG; the temperature conversion time is kept
    SHUNT_CAL_FIELDS = 0x7FFF  # bit 15 is reserved
    ID_REGS = (0x3E, 0x3F)
    SHUNT_RANGE_V = 0.16384
    ADC_CONFIG, SHUNT_CAL, ENERGY, DIAG_ALRT = 0x01, 0x02, 0x09, 0x0B
    CONVERSION_S = (50e-6, 84e-6, 150e-6, 280e-6, 540e-6, 1052e-6, 2074e-6, 4120e-6)
    TIMINGS = _averaging_timings(CONVERSION_S, 2, lambda avg, sh: (0xB << 12) | (2 << 9) | (sh << 6) | avg)
    ENERGY_WRAP = 2**40

    def __init__(self, regs: _Registers, shunt_ohms: float, max_amps: float, period_s: float) -> None:
        super().__init__(regs)
        self.check_shunt(shunt_ohms, max_amps)
        low_range = shunt_ohms * max_amps <= 0.04096
        scale = _INA228_CAL_SCALE * _exact(shunt_ohms) * (4 if low_range else 1)
        # rounded up: the current LSB may only grow, so max_amps stays inside the 20-bit range
        self.shunt_cal = min(math.ceil(scale * _exact(max_amps) / 2**19), 0x7FFF)
        self.current_lsb_a = float(self.shunt_cal / scale)
        self.energy_lsb_j = float(16 * Fraction(32, 10) * self.shunt_cal / scale)
        self.timing = pick_timing(self.TIMINGS, period_s)
        self._start()
        self.config = self._set_fields(self.CONFIG, self.CONFIG_FIELDS, 0x0010 if low_range else 0x0000)
        self.adc_config = self._set_fields(self.ADC_CONFIG, self.ADC_CONFIG_FIELDS, self.timing.code)
        self._set_fields(self.SHUNT_CAL, self.SHUNT_CAL_FIELDS, self.shunt_cal)

    def read_energy_raw(self) -> int:
        """The ENERGY register, after checking that the chip kept its setup and did not overflow."""
        if (
            self.regs.read16(self.SHUNT_CAL) & self.SHUNT_CAL_FIELDS != self.shunt_cal
            or self.regs.read16(self.ADC_CONFIG) & self.ADC_CONFIG_FIELDS != self.adc_config & self.ADC_CONFIG_FIELDS
        ):
            raise MeterFailure(
                f"the INA228 at {self.regs.where} was reset (power loss?) and its energy accumulator restarted"
            )
        if self.regs.read16(self.DIAG_ALRT) & (1 << 9):
            raise MeterFailure("INA228 math overflow (MATHOF): the current is beyond max_amps")
        return self.regs.read(self.ENERGY, 5)

    def details(self) -> dict[str, Any]:
        return {
            **super().details(),
            "adc_config": f"0x{self.adc_config:04X}",
            "shunt_cal": self.shunt_cal,
            "energy_lsb_j": self.energy_lsb_j,
        }


class Ina228Meter(CounterMeter):
    """The INA228's energy accumulator as a counter meter (read at window edges, unwrapped)."""

    def __init__(self, chip: Ina228, info: MeterInfo, close_bus: Callable[[], None], sync_device: Any = None,
                 call_timeout_s: float = DEVICE_CALL_TIMEOUT_S) -> None:
        super().__init__(sync_device=sync_device)
        self.chip = chip
        self._info = info
        self._close_bus = close_bus
        self._tracker = WrapTracker(Ina228.ENERGY_WRAP)
        # an I2C transfer that never returns (a wedged bus) fails the window within call_timeout_s
        self._caller = DeviceCaller(f"INA228 at {chip.regs.where}", timeout_s=call_timeout_s)
        self.read_counters()

    @property
    def info(self) -> MeterInfo:
        return self._info

    def read_counters(self) -> dict[str, float]:
        try:
            raw = self._caller.call(self.chip.read_energy_raw, what="the ENERGY register read")
            if self._caller.last_span is not None:  # the window edge is when the register was read
                self._read_t = sum(self._caller.last_span) / 2
        except OSError as exc:
            raise MeterFailure(f"reading the INA228 at {self.chip.regs.where} failed: {exc}") from exc
        return {self._info.scope: self._tracker.update(raw) * self.chip.energy_lsb_j}

    def close(self) -> None:
        if not self._closed:
            super().close()
            if self._caller.wedged is None:  # closing a wedged bus would hang too
                self._close_bus()
            self._caller.close()


# --------------------------------------------------------------------------- spec
def _wiring(spec: MeterSpec) -> tuple[int, int]:
    bus = spec.get_int("bus", 1)
    address = spec.get_int("address", 0x40)
    if bus < 0:
        raise MeterSpecError(f"meter spec {spec.text!r}: bus must be >= 0 (the N of /dev/i2c-N)")
    if not 0x40 <= address <= 0x4F:
        raise MeterSpecError(
            f"meter spec {spec.text!r}: address=0x{address:02X} is outside the INA2xx range 0x40..0x4F "
            "(set by the A0/A1 pins; 'i2cdetect -y N' lists what answers)"
        )
    return bus, address


def _shunt(spec: MeterSpec, part: type[_Ina2xx], default_ohms: float) -> tuple[float, float]:
    ohms = spec.get_float("shunt_ohms", default_ohms)
    amps = spec.get_float("max_amps", part.SHUNT_RANGE_V / ohms if ohms and ohms > 0 else None)
    part.check_shunt(ohms, amps if amps is not None else 0.0)
    return ohms, amps


_PARTS: dict[str, tuple[type[_Ina2xx], float | None]] = {
    "ina219": (Ina219, 0.1),
    "ina226": (Ina226, 0.1),
    "ina260": (Ina260, None),
    "ina228": (Ina228, 0.015),
}


def open_from_spec(spec: MeterSpec, smbus_factory: Callable[[int], Any] = _default_smbus, **kwargs: Any):
    part, default_ohms = _PARTS[spec.backend]
    bus_number, address = _wiring(spec)
    call_timeout = spec.get_float("call_timeout", DEVICE_CALL_TIMEOUT_S) if part is Ina228 else None
    if call_timeout is not None and not (0 < call_timeout < math.inf):
        raise MeterSpecError(f"meter spec {spec.text!r}: call_timeout must be a positive number of seconds")
    if part is Ina228:
        rate_hz = spec.get_float("rate_hz", DEFAULT_RATE_HZ)
        scope = spec.get_str("scope", "board")
        if not rate_hz or rate_hz <= 0:
            raise MeterSpecError(f"meter spec {spec.text!r}: rate_hz must be > 0")
        options = None
    else:
        options = SampledOptions.from_spec(spec, default_rate_hz=DEFAULT_RATE_HZ)
        rate_hz, scope = options.rate_hz, options.scope
    if default_ohms is None:
        if "shunt_ohms" in spec.params or "max_amps" in spec.params:
            raise MeterSpecError(
                f"meter spec {spec.text!r}: the INA260 has its 2 mOhm shunt inside (15 A); drop shunt_ohms and max_amps"
            )
        shunt: tuple[float, float] | None = None
    else:
        shunt = _shunt(spec, part, default_ohms)
    spec.check_unused()

    bus = _open_bus(bus_number, smbus_factory)
    regs = _Registers(bus, bus_number, address)
    period_s = 1.0 / rate_hz
    try:
        chip = part(regs, *shunt, period_s) if shunt else part(regs, period_s)
    except BaseException:
        bus.close()
        raise
    details = {"bus": bus_number, **chip.details()}
    if shunt:
        details.update(shunt_ohms=shunt[0], max_amps=shunt[1])
    common = dict(scope=scope, simulated=False, domains=(scope,), averaging_window_s=chip.timing.shunt_s, details=details)
    if isinstance(chip, Ina228):
        info = MeterInfo(backend=spec.backend, kind="counter", update_period_s=chip.timing.cycle_s,
                         resolution_j=chip.energy_lsb_j, **common)
        return Ina228Meter(chip, info, bus.close, call_timeout_s=call_timeout, **kwargs)
    info = MeterInfo(backend=spec.backend, kind="sampled", update_period_s=max(period_s, chip.timing.cycle_s),
                     resolution_j=None, **common)
    source = PolledSource(
        f"{chip.NAME} at {regs.where}", chip.read_watts, period_s,
        give_up_s=options.max_gap_for(period_s), release=bus.close,
    )
    return SampledMeter(source, info, options, resolution_w=chip.power_lsb_w, **kwargs)


def probe(spec: MeterSpec, smbus_factory: Callable[[int], Any] = _default_smbus) -> Any:

    bus_number, address = _wiring(spec)
    device = f"/dev/i2c-{bus_number}"
    if smbus_factory is _default_smbus:
        if not os.path.exists(device):
            return Probe(spec.backend, False, f"no {device} (I2C bus {bus_number} not enabled, or give bus=N)")
        if not os.access(device, os.R_OK | os.W_OK):
            return Probe(spec.backend, False, f"{device} exists but this user may not open it (join group i2c)")
    try:
        bus = _open_bus(bus_number, smbus_factory)
    except MeterUnavailable as exc:
        return Probe(spec.backend, False, str(exc))
    try:
        _Registers(bus, bus_number, address).read16(0x00)
    except OSError as exc:
        return Probe(spec.backend, False, f"nothing answers at 0x{address:02X} on {device} ({exc})")
    finally:
        bus.close()
    return Probe(spec.backend, True, f"a device answers at 0x{address:02X} on {device} (checked as {spec.backend} when opened)")
