"""The sampled-power core: integration, edges, gaps, loud failure, pruning.

The hardware boundary here is the function a PolledSource reads (a power that is a known function
of time, or that fails/stalls on cue); the sampler, log and meter above it are the shipped code.
"""

import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from energyprof.errors import MeterFailure, MeterSpecError, MeterUnavailable
from energyprof.meters import MeterInfo, parse_spec
from energyprof.meters import sampled
from energyprof.meters.sampled import PolledSource, SampledMeter, SampledOptions, _SampleLog


def make_meter(read, period_s=0.005, max_gap_s=0.3, rate_hz=None, startup_s=2.0, give_up_s=None, update_period_s=None):
    source = PolledSource("test meter", read, period_s, give_up_s=give_up_s if give_up_s is not None else max_gap_s)
    info = MeterInfo("test", "board", "sampled", update_period_s, None, False, ("board",))
    options = SampledOptions(rate_hz=rate_hz, max_gap_s=max_gap_s, startup_s=startup_s, scope="board")
    return SampledMeter(source, info, options, resolution_w=0.001)


# ------------------------------------------------------------------------- the log
def test_log_integrates_trapezoids_and_interpolates_edges():
    log = _SampleLog(capacity=2)  # also exercises growth
    for t, w in [(0.0, 0.0), (1.0, 2.0), (3.0, 2.0), (4.0, 6.0)]:
        assert log.append(t, w)
    assert log.energy_at(0.0) == 0.0
    assert log.energy_at(1.0) == pytest.approx(1.0)
    assert log.energy_at(3.0) == pytest.approx(5.0)
    assert log.energy_at(4.0) == pytest.approx(9.0)
    # half-way into the first interval the power is 1 W: 0.5 * (0 + 1) / 2
    assert log.energy_at(0.5) == pytest.approx(0.25)
    # 3.5 s: power 4 W, 0.5 s at mean 3 W after 5 J
    assert log.energy_at(3.5) == pytest.approx(6.5)


def test_log_rejects_samples_out_of_order_and_prunes_keeping_the_bracket():
    log = _SampleLog()
    for t in range(10):
        log.append(float(t), 1.0)
    assert not log.append(9.0, 5.0) and not log.append(3.0, 5.0)
    before = log.energy_at(8.5) - log.energy_at(4.5)
    log.drop_before(4.5)
    assert log.first_t == 4.0  # the sample at or before 4.5 stays for interpolation
    assert log.energy_at(8.5) - log.energy_at(4.5) == pytest.approx(before) == pytest.approx(4.0)
    assert list(log.times_around(5.5, 7.2)) == [5.0, 6.0, 7.0, 8.0]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0.001, 2.0), st.floats(-5.0, 50.0)), min_size=2, max_size=40),
    st.floats(0.0, 1.0),
    st.floats(0.0, 1.0),
)
def test_log_matches_an_independent_trapezoid(steps, fa, fb):
    times = np.cumsum([dt for dt, _ in steps])
    watts = np.array([w for _, w in steps])
    log = _SampleLog(capacity=4)
    for t, w in zip(times, watts):
        log.append(float(t), float(w))
    a, b = sorted((times[0] + fa * (times[-1] - times[0]), times[0] + fb * (times[-1] - times[0])))
    grid = np.unique(np.concatenate([[a, b], times[(times > a) & (times < b)]]))
    expected = np.trapezoid(np.interp(grid, times, watts), grid)
    assert log.energy_at(b) - log.energy_at(a) == pytest.approx(expected, rel=1e-9, abs=1e-9)


# ------------------------------------------------------------------------- the meter
def test_ramp_power_is_integrated_exactly_with_interpolated_edges():
    t0 = time.perf_counter()
    ramp = lambda t: 2.0 + 3.0 * (t - t0)  # noqa: E731  linear: the trapezoid rule is exact
    with make_meter(lambda: ramp(time.perf_counter()), period_s=0.01) as meter:
        meter.begin("w")
        a = time.perf_counter()
        time.sleep(0.25)
        b = time.perf_counter()
        m = meter.end("w")
    # the meter's edges are taken a few microseconds outside [a, b]
    assert m.energy_j == pytest.approx((ramp(a) + ramp(b)) / 2 * (b - a), rel=2e-3)
    assert m.domains == {"board": m.energy_j}
    # polls are 10 ms apart at the fastest: at most ~26 in 0.25 s; a busy machine gives fewer
    assert 1 <= m.details["samples"] <= 30
    assert m.meter.kind == "sampled" and not m.simulated


def test_info_reports_period_and_resolution():
    with make_meter(lambda: 1.0, period_s=0.01, update_period_s=0.01) as meter:
        info = meter.info
    assert info.update_period_s == 0.01
    assert info.resolution_j == pytest.approx(0.001 * 0.01)
    assert info.details["source"] == "test meter" and info.details["max_gap_s"] == 0.3


def test_update_period_is_measured_when_not_declared():
    with make_meter(lambda: 1.0, period_s=0.01) as meter:
        time.sleep(0.1)
        # measured from the samples: never shorter than the 10 ms poll period (up to the read
        # midpoints' jitter), longer on a busy machine, never past the 0.3 s gap limit
        assert 0.008 <= meter.info.update_period_s <= 0.3


def test_a_meter_that_disconnects_mid_window_fails_loudly():
    start = time.perf_counter()

    def read():
        if time.perf_counter() - start > 0.15:
            raise OSError(121, "Remote I/O error")
        return 4.0

    with make_meter(read, max_gap_s=0.1) as meter:
        meter.begin("w")
        time.sleep(0.4)
        with pytest.raises(MeterFailure, match="Remote I/O error"):
            meter.end("w")
        # and a new window cannot start on a dead meter
        with pytest.raises(MeterFailure, match="stopped"):
            meter.begin("again")


def test_a_meter_that_stalls_fails_at_the_window_end():
    stall, release = threading.Event(), threading.Event()

    def read():
        if stall.is_set():
            release.wait(5.0)  # a read that hangs, as a wedged serial link does
        return 4.0

    with make_meter(read, max_gap_s=0.2) as meter:
        meter.begin("w")
        stall.set()
        time.sleep(0.05)
        t = time.perf_counter()
        # the message names the read that hung (or, if the end comes first, the silence)
        with pytest.raises(MeterFailure, match=r"the power read did not return within 0.2 s|no power sample .* for 0.2 s"):
            meter.end("w")
        # bounded, not forever: the hung read only returns after 5 s (a loose bound a busy machine meets)
        assert time.perf_counter() - t < 4.0
        assert meter.open_windows == ()
        release.set()


def test_a_long_gap_inside_the_window_fails_even_when_samples_resume():
    start = time.perf_counter()

    def read():
        now = time.perf_counter() - start
        if 0.1 < now < 0.5:
            raise OSError("link dropped")
        return 4.0

    with make_meter(read, max_gap_s=0.2, give_up_s=5.0) as meter:
        meter.begin("w")
        time.sleep(0.7)
        with pytest.raises(MeterFailure, match=r"stopped for 0\.[3-5]\d s"):
            meter.end("w")


def test_short_gaps_are_bridged_and_reported():
    start = time.perf_counter()

    def read():
        if 0.1 < time.perf_counter() - start < 0.16:
            raise OSError("one lost reply")
        return 4.0

    with make_meter(read, period_s=0.005, max_gap_s=0.5) as meter:
        meter.begin("w")
        time.sleep(0.3)
        with pytest.warns(RuntimeWarning, match="gap"):
            m = meter.end("w")
    assert m.energy_j == pytest.approx(4.0 * m.seconds, rel=2e-4)
    # the lost replies make one gap; a busy machine may add late polls of its own
    assert m.details["gaps"] >= 1 and m.details["read_errors"] >= 1
    assert m.details["longest_interval_s"] > 0.05


def test_sample_rate_far_below_what_was_asked_is_reported():
    def slow_read():
        time.sleep(0.04)  # a bus that takes 40 ms per reading
        return 3.0

    with make_meter(slow_read, period_s=0.005, rate_hz=200, max_gap_s=0.5) as meter:
        meter.begin("w")
        time.sleep(0.3)
        with pytest.warns(RuntimeWarning, match="far below the 200 asked"):
            m = meter.end("w")
    assert m.details["sample_rate_hz"] < 40
    assert m.details["requested_rate_hz"] == 200
    assert m.energy_j == pytest.approx(3.0 * m.seconds, rel=2e-4)


def test_a_meter_without_samples_does_not_open():
    def dead():
        raise OSError(2, "No such device")

    t = time.perf_counter()
    with pytest.raises(MeterUnavailable, match="No such device"):
        make_meter(dead, max_gap_s=0.1, startup_s=60.0)
    assert time.perf_counter() - t < 30.0  # the source gave up after max_gap_s, not after startup_s


def test_old_samples_are_pruned_but_an_open_window_keeps_its_start(monkeypatch):
    monkeypatch.setattr(sampled, "_PRUNE_EVERY", 16)
    monkeypatch.setattr(sampled, "_KEEP_S", 0.0)
    # samples are kept 4 x max_gap_s = 0.4 s back; max_gap_s is generous enough that a busy
    # machine's late polls do not void the window
    with make_meter(lambda: 2.0, period_s=0.002, max_gap_s=0.1) as meter:
        meter.begin("long")
        time.sleep(0.3)
        with meter._cond:
            first_kept = meter._log.first_t
        m = meter.end("long")
        assert m.energy_j == pytest.approx(2.0 * m.seconds, rel=2e-4)
        time.sleep(0.6)
        with meter._cond:
            assert meter._log.first_t > first_kept  # the window's end released its samples
            assert meter._log.n < 300  # about 0.4 s of 2 ms samples (+ up to 16 between prunes) of ~450


def test_close_stops_the_sampler():
    meter = make_meter(lambda: 1.0)
    meter.close()
    assert not meter._reader.alive
    meter.close()  # idempotent


def test_options_from_spec_validate():
    spec = parse_spec("x:rate_hz=50,max_gap_s=2,scope=usb")
    opts = SampledOptions.from_spec(spec, default_rate_hz=10)
    assert (opts.rate_hz, opts.max_gap_s, opts.scope, opts.period_s) == (50.0, 2.0, "usb", 0.02)
    with pytest.raises(MeterSpecError, match="rate_hz must be a positive number"):
        SampledOptions.from_spec(parse_spec("x:rate_hz=0"), default_rate_hz=10)


def test_a_windows_seconds_span_exactly_the_interval_its_energy_integrates(monkeypatch):
    """The edge's time is the one its energy is read at, even when reading the source's counters
    at the window's end is slow (a busy machine): constant power times seconds is the energy."""
    with make_meter(lambda: 2.5, period_s=0.002) as meter:
        counters = meter._source.counters
        slow = {"on": False}

        def counters_slowly():
            if slow["on"]:
                time.sleep(0.05)  # after the edge's clock was read: the midpoint would be 25 ms late
            return counters()

        monkeypatch.setattr(meter._source, "counters", counters_slowly)
        meter.begin("w")
        time.sleep(0.1)
        slow["on"] = True
        m = meter.end("w")
    assert m.energy_j == pytest.approx(2.5 * m.seconds, rel=1e-9)


def test_a_silent_meter_names_the_error_of_the_reads_that_failed():
    """The meter's end gives up after max_gap_s; the source may still be retrying (its own give-up
    is later, or it was held up): the failure names the reads' error all the same."""
    state = {"broken": False}

    def read():
        if state["broken"]:
            raise OSError(121, "Remote I/O error (chip overflow)")
        return 1.0

    with make_meter(read, period_s=0.005, max_gap_s=0.15, give_up_s=30.0) as meter:
        meter.begin("w")
        state["broken"] = True
        time.sleep(0.3)
        with pytest.raises(MeterFailure, match=r"for 0.15 s .*OSError: \[Errno 121\] Remote I/O error \(chip overflow\)"):
            meter.end("w")
