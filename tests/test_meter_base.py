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

