"""A wedged I2C bus or serial link: a transfer that never returns fails the window within its
bound, naming the read, instead of hanging the tool. The fakes are at the hardware boundary: an
smbus2.SMBus stand-in (tests/test_ina2xx.py) whose block reads stop returning on cue."""

from __future__ import annotations

import threading
import time

import pytest

from energyprof.errors import MeterFailure
from energyprof.meters import open_meter
from tests.test_ina2xx import FakeIna219, FakeIna228, FakeSMBus


class WedgingSMBus(FakeSMBus):
    """Block and word reads block until ``unblock`` once ``hang`` is set (clock stretching forever)."""

    def __init__(self, *chips_at):
        super().__init__(*chips_at)
        self.hang = threading.Event()
        self.unblock = threading.Event()

    def read_i2c_block_data(self, address, reg, length):
        if self.hang.is_set():
            self.unblock.wait()
        return super().read_i2c_block_data(address, reg, length)

    def read_word_data(self, address, reg):
        if self.hang.is_set():
            self.unblock.wait()
        return super().read_word_data(address, reg)


def test_ina228_energy_read_that_never_returns_fails_the_window():
    bus = WedgingSMBus((0x40, FakeIna228()))
    meter = open_meter("ina228:call_timeout=0.5", smbus_factory=lambda n: bus)
    try:
        meter.begin("w")
        bus.hang.set()
        t = time.perf_counter()
        with pytest.raises(MeterFailure, match="ENERGY register read did not return within 0.5 s"):
            meter.end("w")
        assert time.perf_counter() - t < 10.0  # bounded (the read itself never returns)
        assert meter.open_windows == ()
        meter.close()
        assert not bus.closed  # a wedged bus is not touched again
    finally:
        bus.unblock.set()


def test_a_polled_ina219_whose_bus_wedges_fails_the_window_naming_the_read():
    """The sampled path: the poller's read hangs; the window's end fails within max_gap_s."""
    bus = WedgingSMBus((0x40, FakeIna219(volts=5.0, amps=1.0)))
    meter = open_meter("ina219:shunt_ohms=0.1,max_amps=3.2,max_gap_s=0.5", smbus_factory=lambda n: bus)
    try:
        meter.begin("w")
        bus.hang.set()
        time.sleep(0.1)
        t = time.perf_counter()
        with pytest.raises(MeterFailure, match="the power read did not return within 0.5 s|no power sample"):
            meter.end("w")
        assert time.perf_counter() - t < 10.0
        assert meter.open_windows == ()
        meter.close()
    finally:
        bus.unblock.set()
