"""Property tests for everything that parses input from outside the program: meter spec strings,
stream lines, USB-meter records, PMIC output and YAML device profiles. Whatever the input, only the
project's own errors (EnergyprofError subclasses) escape, and their messages name the problem.

Example counts are modest so that the suite stays fast; hypothesis keeps the failing examples it
finds in its database, so a regression shows up again on the next run."""

from __future__ import annotations

import math
import struct

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from calibrate.profile import ProfileError, load_profile
from energyprof.errors import BadReading, EnergyprofError, MeterFailure, MeterSpecError
from energyprof.meters import open_meter
from energyprof.meters.pmic import parse_pmic_output
from energyprof.meters.spec import format_spec, parse_spec
from energyprof.meters.stream import parse_line
from energyprof.meters.umxx import MODELS, RECORD_BYTES, parse_record

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

keys = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
values = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters=","), max_size=12).map(str.strip)


# ------------------------------------------------------------------------------ meter specs
@FAST
@given(st.text(max_size=60))
def test_any_spec_text_parses_or_raises_a_spec_error_naming_it(text):
    try:
        spec = parse_spec(text)
    except MeterSpecError as exc:
        msg = str(exc)
        assert "meter spec" in msg or "empty meter spec" in msg
        assert "BACKEND" in msg or "key" in msg or "backend" in msg
        return
    assert spec.backend and spec.backend == spec.backend.lower()
    for key in spec.params:  # typed getters only raise the spec error, naming key and value
        for getter in (spec.get_int, spec.get_float, spec.get_bool, spec.get_list, spec.get_str):
            try:
                getter(key)
            except MeterSpecError as exc:
                assert key in str(exc)


@FAST
@given(st.from_regex(r"[a-z][a-z0-9_-]{0,8}", fullmatch=True), st.dictionaries(keys, values, max_size=4))
def test_specs_round_trip_through_format_spec(backend, params):
    assume(all(v == v.strip() for v in params.values()))
    spec = parse_spec(format_spec(backend, params))
    assert spec.backend == backend and spec.params == params


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["sim", "rapl", "nvml", "ina219", "um25c", "stream", "pmic", "nope", "auto"]),
       st.dictionaries(keys, values, max_size=3))
def test_opening_a_meter_from_any_parameters_fails_only_with_project_errors(backend, params):
    """Arbitrary keys and values for real backends: a clear project error (unknown key, bad value,
    device absent here), never a traceback from deeper down."""
    if backend == "sim":
        params = {k: v for k, v in params.items() if k != "clock"}
        params["clock"] = "virtual"
    if backend == "rapl":
        params["root"] = "/nonexistent/powercap"
    if backend == "stream":  # do not connect anywhere or start programs
        params = {k: v for k, v in params.items() if k not in ("tcp", "serial", "exec", "file")}
    if backend in ("ina219",):
        params["bus"] = "99999"
    if backend.startswith("um"):
        params["port"] = "/nonexistent/tty"
    if backend == "pmic":
        params["command"] = "/nonexistent/vcgencmd"
    try:
        meter = open_meter(format_spec(backend, params))
    except EnergyprofError as exc:
        assert str(exc)
        return
    meter.close()


# ------------------------------------------------------------------------------ stream lines
@FAST
@given(st.binary(max_size=80))
def test_any_stream_line_bytes_give_a_reading_none_or_a_bad_reading(raw):
    try:
        parsed = parse_line(raw)
    except BadReading as exc:
        assert isinstance(exc, ValueError) and str(exc)
        return
    if parsed is not None:
        stamp, watts = parsed
        assert math.isfinite(watts) and (stamp is None or math.isfinite(stamp))


@FAST
@given(st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.tuples(st.floats(), st.floats()).map(lambda t: f"{t[0]!r},{t[1]!r}"),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=40),
))
def test_stream_text_lines_are_numbers_or_named_problems(line):
    try:
        parsed = parse_line(line)
    except BadReading as exc:
        assert any(w in str(exc) for w in ("not a number", "fields", "finite", "UTF-8"))
        return
    assert parsed is None or math.isfinite(parsed[1])


# ------------------------------------------------------------------------------ USB meter records
def _record(model, volts_raw, amps_raw, mw, temperature, fill):
    body = bytearray(fill.ljust(RECORD_BYTES, b"\0")[:RECORD_BYTES])
    struct.pack_into(">HHHIH", body, 0, model.model_id, volts_raw, amps_raw, mw, temperature)
    if model.name == "UM34C":
        x = 0
        from energyprof.meters.umxx import _UM34C_XOR_POSITIONS

        for i in _UM34C_XOR_POSITIONS:
            x ^= body[i]
        body[-1] = x
    else:
        body[-2:] = b"\xff\xf1"
    return bytes(body)


@FAST
@given(st.sampled_from(sorted(MODELS)), st.binary(max_size=2 * RECORD_BYTES))
def test_any_bytes_as_a_usb_meter_record_decode_or_fail_with_the_reason(name, raw):
    model = MODELS[name]
    try:
        reading = parse_record(model, raw)
    except MeterFailure as exc:
        assert any(w in str(exc) for w in ("incomplete", "model id", "checksum", "end marker"))
        return
    assert len(raw) == RECORD_BYTES and reading.watts >= 0


@FAST
@given(st.sampled_from(sorted(MODELS)), st.integers(0, 2**16 - 1), st.integers(0, 2**16 - 1),
       st.integers(0, 2**32 - 1), st.integers(0, 2**16 - 1), st.binary(max_size=RECORD_BYTES))
def test_well_formed_records_decode_to_their_fields(name, v, a, mw, temp, fill):
    model = MODELS[name]
    reading = parse_record(model, _record(model, v, a, mw, temp, fill))
    assert reading.watts == mw / 1000.0 and reading.volts == pytest.approx(v * model.volts_lsb)
    assert reading.temperature_c == temp


# ------------------------------------------------------------------------------ PMIC output
@FAST
@given(st.text(max_size=200))
def test_pmic_output_of_any_text_gives_rails_with_both_readings(text):
    rails = parse_pmic_output(text)  # lines it does not know are skipped, never an exception
    for volts, amps in rails.values():
        assert isinstance(volts, float) and isinstance(amps, float)


# ------------------------------------------------------------------------------ YAML profiles
yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                         st.text(max_size=12))
yaml_trees = st.recursive(
    yaml_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=20,
)


def _check_profile_text(tmp_path_factory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("profile") / "device.yaml"
    path.write_bytes(data)
    try:
        load_profile(path)
    except ProfileError as exc:
        msg = str(exc)
        assert str(path) in msg  # names the file
        assert any(w in msg for w in ("YAML", "mapping", "invalid", "UTF-8", "read")), msg


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200))
def test_any_bytes_as_a_profile_raise_only_profile_errors(tmp_path_factory, data):
    _check_profile_text(tmp_path_factory, data)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(yaml_trees)
def test_any_yaml_document_as_a_profile_raises_only_profile_errors(tmp_path_factory, tree):
    _check_profile_text(tmp_path_factory, yaml.safe_dump(tree).encode())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["schema_version", "device", "meter", "protocol", "coefficients", "layers",
                        "radio", "provenance"]), yaml_trees)
def test_a_shipped_profile_with_one_field_replaced_names_what_is_wrong(tmp_path_factory, key, value):
    from calibrate.profile import available_profiles

    profiles = available_profiles()
    assume(profiles)
    base = yaml.safe_load(next(iter(sorted(profiles.values()))).read_text())
    assume(isinstance(base, dict))
    if isinstance(base.get("models"), dict) and "mlp" in base["models"]:  # one small table keeps it fast
        base["models"] = {"mlp": base["models"]["mlp"]}
    base[key] = value
    _check_profile_text(tmp_path_factory, yaml.safe_dump(base).encode())


@pytest.mark.parametrize("text", [
    "a: 2001-13-45\n",  # a YAML timestamp that is not a date
    "a: !!python/object:os.system 'true'\n",  # unsafe tag
    "[" * 5000,  # very deep nesting
    "a: &x [*x]\n",  # self-referencing alias
])
def test_hostile_yaml_profiles_raise_profile_errors(tmp_path_factory, text):
    _check_profile_text(tmp_path_factory, text.encode())
