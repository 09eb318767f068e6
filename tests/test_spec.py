import pytest

from energyprof.errors import MeterSpecError, MeterUnavailable
from energyprof.meters import open_meter, parse_spec, probe_all


def test_backend_only():
    s = parse_spec("rapl")
    assert s.backend == "rapl" and s.params == {}


def test_values_keep_colons_and_commas_not_followed_by_keys():
    s = parse_spec('stream:exec=python -c "print(1, 2)",baud=9600')
    assert s.params == {"exec": 'python -c "print(1, 2)"', "baud": "9600"}
    assert parse_spec("stream:tcp=127.0.0.1:9100").params == {"tcp": "127.0.0.1:9100"}


def test_typed_getters_and_lists():
    s = parse_spec("ina219:bus=1,address=0x40,shunt_ohms=0.1,domains=package-0+dram,verbose=yes")
    assert s.get_int("bus") == 1
    assert s.get_int("address") == 0x40
    assert s.get_float("shunt_ohms") == pytest.approx(0.1)
    assert s.get_list("domains") == ["package-0", "dram"]
    assert s.get_bool("verbose") is True
    assert s.get_float("missing", 3.0) == 3.0
    s.check_unused()


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty meter spec"),
        ("9x", "not a backend name"),
        ("rapl:root", "not key=value"),
        ("rapl:root=/a,root=/b", "given twice"),
    ],
)
def test_malformed_specs_are_named(text, fragment):
    with pytest.raises(MeterSpecError, match=fragment):
        parse_spec(text)


def test_bad_value_names_the_key():
    s = parse_spec("sim:seed=abc")
    with pytest.raises(MeterSpecError, match="seed='abc' is not an integer"):
        s.get_int("seed")


def test_unknown_key_is_rejected_with_the_known_ones():
    with pytest.raises(MeterSpecError, match=r"unknown key\(s\) sed .*known keys: .*seed"):
        open_meter("sim:sed=1")


def test_unknown_backend():
    with pytest.raises(MeterSpecError, match="unknown meter backend 'nope'.*known backends"):
        open_meter("nope")


def test_probe_all_covers_every_backend_once():
    probes = probe_all()
    names = [p.backend for p in probes]
    assert len(names) == len(set(names))
    assert {"nvml", "rapl", "sim"} <= set(names)
    for p in probes:
        assert p.reason, f"{p.backend} gives no reason"


def test_auto_without_real_meters_lists_every_reason(monkeypatch):
    import energyprof.meters as meters
    from energyprof.meters import Probe

    monkeypatch.setattr(meters, "probe_backend", lambda s: Probe(s.backend, False, f"{s.backend} absent here"))
    with pytest.raises(MeterUnavailable) as info:
        open_meter("auto")
    text = str(info.value)
    for name in meters.AUTO_ORDER:
        assert f"{parse_spec(name).backend} absent here" in text
