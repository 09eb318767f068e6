import pytest

from energyprof.errors import WindowError
from energyprof.meters import CounterMeter, MeterInfo, WrapTracker


class StepCounter(CounterMeter):
    """A meter whose counter advances by 1 J on every read: the windows' bookkeeping is under test."""

    def __init__(self):
        super().__init__()
        self.value = 0.0
        self._info = MeterInfo("test", "gpu", "counter", None, None, False, ("a", "b"))

    @property
    def info(self):
        return self._info

    def read_counters(self):
        self.value += 1.0
        return {"a": self.value, "b": 2 * self.value}


def test_overlapping_windows_measure_independently():
    m = StepCounter()
    m.begin("outer")  # a=1
    m.begin("inner")  # a=2
    inner = m.end("inner")  # a=3
    outer = m.end("outer")  # a=4
    assert inner.domains == {"a": 1.0, "b": 2.0}
    assert outer.domains == {"a": 3.0, "b": 6.0}
    assert outer.energy_j == 9.0
    assert outer.seconds >= inner.seconds >= 0


def test_window_misuse_is_an_error():
    m = StepCounter()
    with pytest.raises(WindowError, match="no open window named 'x'"):
        m.end("x")
    m.begin("x")
    with pytest.raises(WindowError, match="already open"):
        m.begin("x")


def test_context_manager_sets_measurement_and_discards_on_error():
    m = StepCounter()
    with m.window("step") as w:
        pass
    assert w.measurement is not None and w.measurement.name == "step"
    with pytest.raises(RuntimeError):
        with m.window("boom"):
            raise RuntimeError("user code failed")
    assert m.open_windows == ()


def test_closed_meter_refuses_windows():
    m = StepCounter()
    with m:
        pass
    with pytest.raises(WindowError, match="closed"):
        m.begin()


def test_measurement_json_carries_simulated_flag():
    m = StepCounter()
    m.begin()
    d = m.end().to_dict()
    assert d["simulated"] is False and d["meter"]["backend"] == "test"
    assert set(d) >= {"energy_j", "duration_s", "domains", "meter"}


def test_wrap_tracker_unwraps_several_wraps():
    t = WrapTracker(wrap=100.0)
    raw = 0.0
    t.update(raw)
    for _ in range(37):  # 37 steps of 30: total 1110, eleven wraps
        raw = (raw + 30.0) % 100.0
        t.update(raw)
    assert t.total == pytest.approx(1110.0)
    assert t.wraps == 11


def test_wrap_tracker_without_range_refuses_backwards_counter():
    t = WrapTracker(wrap=None)
    t.update(10.0)
    with pytest.raises(ValueError, match="went backwards"):
        t.update(5.0)



# ------------------------------------------------------------------------------ failures release windows
class FailingCounter(StepCounter):
    """The counter read raises on the reads listed in ``fail_on`` (1-based), as a lost device does."""

    def __init__(self, fail_on):
        super().__init__()
        self.reads = 0
        self.fail_on = set(fail_on)

    def read_counters(self):
        self.reads += 1
        if self.reads in self.fail_on:
            from energyprof.errors import MeterFailure

            raise MeterFailure(f"read {self.reads} failed")
        return super().read_counters()


@pytest.mark.parametrize("fail_on, where", [({1}, "begin"), ({2}, "end")])
def test_a_read_failing_at_either_edge_leaves_the_name_free(fail_on, where):
    from energyprof.errors import MeterFailure

    m = FailingCounter(fail_on)
    if where == "begin":
        with pytest.raises(MeterFailure, match="read 1 failed"):
            m.begin("w")
    else:
        m.begin("w")
        with pytest.raises(MeterFailure, match="read 2 failed"):
            m.end("w")
    assert m.open_windows == ()
    m.begin("w")  # the same name works again
    assert m.end("w").domains["a"] == 1.0


def test_a_window_that_fails_in_between_is_released_by_end():
    """A failure found when the energy is computed (a gap, a starved poller) also frees the name."""
    from energyprof.errors import MeterFailure

    class VoidsWindows(StepCounter):
        def _energy_between(self, start, end):
            raise MeterFailure("the samples stopped in the middle of the window")

    m = VoidsWindows()
    m.begin("w")
    with pytest.raises(MeterFailure, match="middle"):
        m.end("w")
    assert m.open_windows == ()


def test_probe_lives_with_the_meter_base_and_is_reexported():
    from energyprof import meters
    from energyprof.meters import base

    assert meters.Probe is base.Probe
    assert base.Probe("x", False, "why").to_dict() == {"backend": "x", "available": False, "reason": "why", "details": {}}


def test_device_caller_bounds_a_call_that_never_returns():
    import threading
    import time

    from energyprof.errors import MeterFailure
    from energyprof.meters.base import DeviceCaller

    caller = DeviceCaller("test device", timeout_s=0.2)
    assert caller.call(lambda x: x + 1, 1, what="a quick read") == 2
    with pytest.raises(OSError, match="bus error"):  # a call's own exception comes back as is
        caller.call(lambda: (_ for _ in ()).throw(OSError(5, "bus error")), what="a failing read")
    never = threading.Event()
    t = time.perf_counter()
    with pytest.raises(MeterFailure, match="a stuck read did not return within 0.2 s"):
        caller.call(never.wait, what="a stuck read")
    assert time.perf_counter() - t < 10.0  # bounded (loosely, for a busy machine)
    with pytest.raises(MeterFailure, match="a stuck read"):  # wedged: later calls fail at once
        caller.call(lambda: 1, what="another read")
    assert caller.wedged is not None
    never.set()
