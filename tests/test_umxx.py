"""UM24C/UM25C/UM34C meters against an emulated meter on the far end of a pseudo-terminal.

The emulator answers each 0xF0 byte with a 130-byte record laid out as published (sigrok wiki,
libsigrok rdtech-um); pyserial opens the pty's slave side like a real /dev/rfcomm0. Everything
above the pty is the shipped driver.
"""

import os
import select
import struct
import threading
import time

import pytest

from energyprof.errors import MeterFailure, MeterSpecError, MeterUnavailable
from energyprof.meters import open_meter, parse_spec, probe_backend
from energyprof.meters.umxx import MODELS, parse_record

# model id, volts per LSB, amps per LSB, checksum style (from REFERENCE.md / the sigrok wiki)
LAYOUT = {
    "um24c": (0x0963, 0.01, 0.001, "fff1"),
    "um25c": (0x09C9, 0.001, 0.0001, "fff1"),
    "um34c": (0x0D4C, 0.01, 0.001, "xor"),
}
XOR_POSITIONS = [1, 3, 7, 9, 15, 17, 19, 23, 31, 39, 41, 45, 49, 53, 55, 57, 59, 63, 67, 69, 73, 79, 83, 89, 97,
                 99, 109, 111, 113, 119, 121, 127]


def build_record(model, volts, amps, temperature_c=31):
    model_id, v_lsb, a_lsb, check = LAYOUT[model]
    rec = bytearray(130)
    struct.pack_into(">HHHI", rec, 0, model_id, round(volts / v_lsb), round(amps / a_lsb), round(volts * amps * 1000))
    struct.pack_into(">HH", rec, 10, temperature_c, round(temperature_c * 9 / 5 + 32))
    struct.pack_into(">I", rec, 112, 1234)  # recording seconds: filler that the checksum covers
    rec[16:96] = bytes(range(80))  # data groups (mAh/mWh), also filler
    if check == "fff1":
        rec[128:130] = b"\xff\xf1"
    else:
        x = 0
        for i in XOR_POSITIONS:
            x ^= rec[i]
        rec[129] = x
    return bytes(rec)


class EmulatedMeter:
    """The meter's side of a pty: a record per 0xF0, with faults on request."""

    def __init__(self, model="um25c", volts=5.08, amps=0.4321):
        self.model, self.volts, self.amps = model, volts, amps
        self.master, self.slave = os.openpty()
        self.port = os.ttyname(self.slave)
        self.silent = False  # stop answering (out of Bluetooth range)
        self.corrupt_every = 0  # every Nth record with a broken end marker / checksum
        self.reply_delay_s = 0.0
        self.requests = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            ready, _, _ = select.select([self.master], [], [], 0.05)
            if not ready:
                continue
            try:
                data = os.read(self.master, 64)
            except OSError:
                return
            for byte in data:
                if byte != 0xF0:
                    continue  # other commands get no reply
                self.requests += 1
                if self.silent:
                    continue
                rec = bytearray(build_record(self.model, self.volts, self.amps))
                if self.corrupt_every and self.requests % self.corrupt_every == 0:
                    rec[-1] ^= 0x55
                time.sleep(self.reply_delay_s)
                os.write(self.master, bytes(rec[:65]))  # arrives in two pieces, like RFCOMM frames
                os.write(self.master, bytes(rec[65:]))

    def close(self):
        self.stop.set()
        self.thread.join()
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def emulated():
    meters = []

    def make(*args, **kwargs):
        meters.append(EmulatedMeter(*args, **kwargs))
        return meters[-1]

    yield make
    for m in meters:
        m.close()


def window(meter, seconds):
    meter.begin("w")
    time.sleep(seconds)
    return meter.end("w")


@pytest.mark.parametrize("model", ["um24c", "um25c", "um34c"])
def test_records_decode_per_the_published_layout(model):
    reading = parse_record(MODELS[model], build_record(model, 5.12, 1.234))
    assert reading.volts == pytest.approx(5.12, abs=0.01)
    assert reading.amps == pytest.approx(1.234, abs=0.001)
    assert reading.watts == pytest.approx(5.12 * 1.234, abs=0.001)
    assert reading.temperature_c == 31


def test_corrupt_or_foreign_records_are_rejected():
    good = build_record("um34c", 5.0, 1.0)
    with pytest.raises(MeterFailure, match="checksum"):
        parse_record(MODELS["um34c"], good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(MeterFailure, match="expected 0x09C9"):
        parse_record(MODELS["um25c"], build_record("um24c", 5.0, 1.0))
    with pytest.raises(MeterFailure, match="129 of 130"):
        parse_record(MODELS["um25c"], build_record("um25c", 5.0, 1.0)[:-1])


def test_um25c_over_a_pty_measures_energy(emulated):
    dev = emulated("um25c", volts=5.08, amps=0.4321)
    with open_meter(f"um25c:port={dev.port},rate_hz=20") as meter:
        m = window(meter, 0.5)
        info = meter.info
    assert m.energy_j == pytest.approx(5.08 * 0.4321 * m.seconds, rel=0.002)
    assert m.details["samples"] >= 1  # up to 10 at 20 Hz in 0.5 s; a busy machine polls fewer
    assert info.details["device"] == "UM25C" and info.details["first_reading"]["volts"] == pytest.approx(5.08)
    assert info.update_period_s == pytest.approx(0.05) and info.kind == "sampled"


def test_um34c_checksum_records_over_a_pty(emulated):
    dev = emulated("um34c", volts=9.0, amps=2.0)
    with open_meter(f"um34c:port={dev.port},rate_hz=20") as meter:
        m = window(meter, 0.3)
    assert m.energy_j == pytest.approx(18.0 * m.seconds, rel=0.002)


def test_corrupt_records_are_dropped_and_counted(emulated):
    dev = emulated("um25c", volts=5.0, amps=1.0)
    dev.corrupt_every = 3
    with open_meter(f"um25c:port={dev.port},rate_hz=20") as meter:
        m = window(meter, 0.5)
    assert m.details["read_errors"] >= 2
    assert m.energy_j == pytest.approx(5.0 * m.seconds, rel=0.002)


def test_the_wrong_model_is_named(emulated):
    dev = emulated("um24c")
    with pytest.raises(MeterUnavailable, match=rf"is a UM24C .*use 'um24c:port={dev.port}'"):
        open_meter(f"um25c:port={dev.port}")


def test_a_meter_that_goes_out_of_range_fails_the_window(emulated):
    dev = emulated("um25c")
    with open_meter(f"um25c:port={dev.port},rate_hz=20,max_gap_s=0.4") as meter:
        meter.begin("w")
        time.sleep(0.1)
        dev.silent = True
        time.sleep(0.6)
        with pytest.raises(MeterFailure, match=r"no good reading .*no complete record"):
            meter.end("w")


def test_a_slow_link_is_reported_far_below_the_rate_asked(emulated):
    dev = emulated("um25c", volts=5.0, amps=0.5)
    dev.reply_delay_s = 0.15  # a congested Bluetooth link
    with open_meter(f"um25c:port={dev.port},rate_hz=50,max_gap_s=1") as meter:
        meter.begin("w")
        time.sleep(0.8)
        with pytest.warns(RuntimeWarning, match="far below the 50 asked"):
            m = meter.end("w")
    assert m.details["sample_rate_hz"] < 10
    assert m.energy_j == pytest.approx(2.5 * m.seconds, rel=0.002)


def test_a_meter_that_never_answers_does_not_open(emulated):
    dev = emulated("um25c")
    dev.silent = True
    with pytest.raises(MeterUnavailable, match=r"no valid UM25C record .*no complete record.*rfcomm bind"):
        open_meter(f"um25c:port={dev.port},max_gap_s=0.2")


def test_spec_and_probe_messages():
    with pytest.raises(MeterSpecError, match=r"needs port=\.\.\., for example 'um25c:port=/dev/rfcomm0'"):
        open_meter("um25c")
    with pytest.raises(MeterUnavailable, match="cannot open /dev/rfcomm97.*rfcomm bind"):
        open_meter("um25c:port=/dev/rfcomm97")
    assert "no port given" in probe_backend(parse_spec("um24c")).reason
    assert "does not exist" in probe_backend(parse_spec("um34c:port=/dev/rfcomm97")).reason
