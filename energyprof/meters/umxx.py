"""RDTech UM24C / UM25C / UM34C USB power meters over serial (Bluetooth RFCOMM or USB), pyserial.

``um25c:port=/dev/rfcomm0`` (also ``um24c:``, ``um34c:``; ``port`` may be a pyserial URL).
Keys: ``port`` (required), ``rate_hz`` (poll rate, default 10, as libsigrok), and the sampled-
meter keys ``max_gap_s``, ``startup_s``, ``scope``.

Protocol (sigrok wiki "RDTech UM series", libsigrok rdtech-um): 9600 8N1; the meter sends
nothing by itself, each request byte 0xF0 gets one 130-byte record. Integers are big-endian,
unsigned: offset 0 model id (0x0963 UM24C, 0x09C9 UM25C, 0x0D4C UM34C), 2 voltage (UM25C 1 mV,
others 10 mV), 4 current (UM25C 0.1 mA, others 1 mA), 6 u32 power in mW, 10 temperature in C.
A UM24C/UM25C record ends in ``FF F1``; a UM34C's last byte is the XOR of 32 fixed bytes.
A record that is short, from another model or fails its check is dropped and counted
(``read_errors``); a meter that stops answering fails the window after ``max_gap_s``.

The meter's own refresh rate is not published; ``update_period_s`` is the poll period and the
samples are stamped at the midpoint between the request and the record.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any, Callable

from energyprof.errors import MeterFailure, MeterUnavailable
from energyprof.meters.base import MeterInfo, Probe
from energyprof.meters.sampled import PolledSource, SampledMeter, SampledOptions
from energyprof.meters.spec import MeterSpec

__all__ = ["UmModel", "MODELS", "UmReading", "parse_record", "UmLink", "open_from_spec", "probe"]

RECORD_BYTES = 130
REQUEST = b"\xf0"
BAUD = 9600
DEFAULT_RATE_HZ = 10.0
_RECORD = struct.Struct(">HHHIH")  # offsets 0 model id, 2 voltage, 4 current, 6 power (mW), 10 temperature (C)
_UM34C_XOR_POSITIONS = (
    1, 3, 7, 9, 15, 17, 19, 23, 31, 39, 41, 45, 49, 53, 55, 57,
    59, 63, 67, 69, 73, 79, 83, 89, 97, 99, 109, 111, 113, 119, 121, 127,
)  # fmt: skip


def _ends_fff1(record: bytes) -> bool:
    return record[-2:] == b"\xff\xf1"


def _um34c_xor(record: bytes) -> bool:
    x = 0
    for i in _UM34C_XOR_POSITIONS:
        x ^= record[i]
    return x == record[-1]


@dataclass(frozen=True)
class UmModel:
    name: str
    model_id: int
    volts_lsb: float
    amps_lsb: float
    check: Callable[[bytes], bool]


MODELS: dict[str, UmModel] = {
    "um24c": UmModel("UM24C", 0x0963, 0.01, 0.001, _ends_fff1),
    "um25c": UmModel("UM25C", 0x09C9, 0.001, 0.0001, _ends_fff1),
    "um34c": UmModel("UM34C", 0x0D4C, 0.01, 0.001, _um34c_xor),
}


@dataclass(frozen=True)
class UmReading:
    volts: float
    amps: float
    watts: float
    temperature_c: int


def parse_record(model: UmModel, record: bytes) -> UmReading:
    """Decode one record of ``model``; MeterFailure when it is short, foreign or corrupt."""
    if len(record) != RECORD_BYTES:
        raise MeterFailure(f"incomplete {model.name} record: {len(record)} of {RECORD_BYTES} bytes")
    model_id, volts, amps, milliwatts, temperature = _RECORD.unpack_from(record)
    if model_id != model.model_id:
        raise MeterFailure(f"record with model id 0x{model_id:04X}, expected 0x{model.model_id:04X} ({model.name})")
    if not model.check(record):
        raise MeterFailure(f"{model.name} record fails its end marker / checksum")
    return UmReading(volts * model.volts_lsb, amps * model.amps_lsb, milliwatts / 1000.0, temperature)


class UmLink:
    """The request/record exchange on an open serial port."""

    def __init__(self, port: Any, model: UmModel) -> None:
        self.port = port
        self.model = model

    def exchange(self) -> bytes:
        self.port.reset_input_buffer()  # a late record from a timed-out request must not misalign us
        self.port.write(REQUEST)
        record = self.port.read(RECORD_BYTES)
        if len(record) < RECORD_BYTES:
            raise MeterFailure(
                f"no complete record within {self.port.timeout:g} s ({len(record)} of {RECORD_BYTES} bytes)"
            )
        return record

    def read(self) -> UmReading:
        return parse_record(self.model, self.exchange())

    def read_watts(self) -> float:
        return self.read().watts

    def identify(self, attempts: int = 3) -> UmReading:
        """First contact: a good record, or MeterUnavailable naming what answered instead."""
        problem = "no answer"
        for _ in range(attempts):
            try:
                record = self.exchange()
            except (OSError, MeterFailure) as exc:
                problem = str(exc)
                continue
            other = _model_of(record)
            if other is not None and other is not self.model and other.check(record):
                raise MeterUnavailable(
                    f"the meter on {self.port.port} is a {other.name} (model id 0x{other.model_id:04X}), "
                    f"not a {self.model.name}: use '{other.name.lower()}:port={self.port.port}'"
                )
            try:
                return parse_record(self.model, record)
            except MeterFailure as exc:
                problem = str(exc)
        raise MeterUnavailable(
            f"no valid {self.model.name} record from {self.port.port} ({problem}). Is the meter on, paired and "
            "bound (Bluetooth: 'sudo rfcomm bind 0 MAC'), and not held by another program?"
        )


def _model_of(record: bytes) -> UmModel | None:
    model_id = int.from_bytes(record[:2], "big")
    return next((m for m in MODELS.values() if m.model_id == model_id), None)


def _open_port(port: str, timeout_s: float) -> Any:
    import serial  # pyserial

    try:
        return serial.serial_for_url(port, baudrate=BAUD, timeout=timeout_s, write_timeout=timeout_s)
    except (serial.SerialException, ValueError) as exc:
        hint = ""
        if "ermission" in str(exc):
            hint = " (add the user to the dialout group: sudo usermod -aG dialout $USER)"
        elif "rfcomm" in port:
            hint = " (bind the meter first: sudo rfcomm bind 0 XX:XX:XX:XX:XX:XX)"
        raise MeterUnavailable(f"cannot open {port}: {exc}{hint}") from exc


def open_from_spec(spec: MeterSpec, **kwargs: Any) -> SampledMeter:
    model = MODELS[spec.backend]
    port_name = spec.require("port", f"{spec.backend}:port=/dev/rfcomm0")
    options = SampledOptions.from_spec(spec, default_rate_hz=DEFAULT_RATE_HZ)
    spec.check_unused()
    period_s = 1.0 / options.rate_hz
    give_up_s = options.max_gap_for(period_s)
    port = _open_port(port_name, timeout_s=min(1.0, give_up_s / 2))
    link = UmLink(port, model)
    try:
        first = link.identify()
    except BaseException:
        port.close()
        raise
    info = MeterInfo(
        backend=spec.backend,
        scope=options.scope,
        kind="sampled",
        update_period_s=period_s,
        resolution_j=None,
        simulated=False,
        domains=(options.scope,),
        details={"device": model.name, "port": port_name, "first_reading": {
            "volts": first.volts, "amps": first.amps, "watts": first.watts, "temperature_c": first.temperature_c}},
    )
    source = PolledSource(f"{model.name} on {port_name}", link.read_watts, period_s, give_up_s, release=port.close)
    return SampledMeter(source, info, options, resolution_w=0.001, **kwargs)


def probe(spec: MeterSpec) -> Any:

    port = spec.params.get("port")
    if not port:
        return Probe(spec.backend, False, f"no port given; use {spec.backend}:port=/dev/rfcomm0 (Bluetooth) or the USB serial device")
    if "://" in port:
        return Probe(spec.backend, True, f"{port} is a pyserial URL (checked when opened)")
    if not os.path.exists(port):
        return Probe(spec.backend, False, f"{port} does not exist (Bluetooth: sudo rfcomm bind 0 MAC; USB: is it plugged in?)")
    if not os.access(port, os.R_OK | os.W_OK):
        return Probe(spec.backend, False, f"{port} exists but this user may not open it (group dialout)")
    return Probe(spec.backend, True, f"{port} exists (the meter is asked for a record when opened)")

