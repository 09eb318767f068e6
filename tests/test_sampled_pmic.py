"""The Raspberry Pi 5 PMIC meter against a stand-in ``vcgencmd`` executable (the hardware boundary is
the command's output; the polling, parsing and integration above it are the shipped code)."""

import stat
import sys
import textwrap
import time

import pytest

from energyprof.errors import MeterFailure, MeterUnavailable
from energyprof.meters import open_meter, parse_spec, probe_backend
from energyprof.meters.pmic import parse_pmic_output

# the layout printed by Pi 5 firmware (names padded to the right, index in brackets)
SAMPLE = """\
 3V7_WL_SW_A current(0)=0.00390372A
   3V3_SYS_A current(1)=0.05172044A
  VDD_CORE_A current(7)={core_amps:.8f}A
 3V7_WL_SW_V volt(8)=3.74414400V
   3V3_SYS_V volt(9)=3.30692000V
  VDD_CORE_V volt(15)=0.72000000V
     EXT5V_V volt(24)=5.14663000V
"""


def rails_watts(core_amps):
    return 0.00390372 * 3.744144 + 0.05172044 * 3.30692 + core_amps * 0.72


@pytest.fixture
def fake_vcgencmd(tmp_path):
    """An executable that prints SAMPLE with VDD_CORE's current read from a state file."""
    state = tmp_path / "core_amps"
    state.write_text("2.0")
    exe = tmp_path / "vcgencmd"
    exe.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import sys
        if sys.argv[1:] != ["pmic_read_adc"]:
            sys.exit("bad command")
        text = open({str(state)!r}).read()
        if text == "broken":
            sys.exit("VCHI initialization failed")
        sys.stdout.write({SAMPLE!r}.format(core_amps=float(text)))
        """))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe, state


def test_parse_pairs_volts_and_amps_per_rail():
    rails = parse_pmic_output(SAMPLE.format(core_amps=1.5) + "garbage line\n")
    assert set(rails) == {"3V7_WL_SW", "3V3_SYS", "VDD_CORE"}  # EXT5V has no current: left out
    assert rails["VDD_CORE"] == (0.72, 1.5)


def test_pmic_meter_integrates_the_rail_sum(fake_vcgencmd):
    exe, _ = fake_vcgencmd
    with open_meter(f"pmic:command={exe},rate_hz=20") as meter:
        meter.begin("w")
        time.sleep(0.4)
        m = meter.end("w")
    assert m.energy_j == pytest.approx(rails_watts(2.0) * m.seconds, rel=1e-3)
    assert m.domains.keys() == {"pmic_rails"}
    assert "conversion losses" in m.meter.details["excludes"]


def test_pmic_meter_that_stops_answering_fails(fake_vcgencmd):
    exe, state = fake_vcgencmd
    with open_meter(f"pmic:command={exe},rate_hz=20,max_gap_s=0.3") as meter:
        meter.begin("w")
        state.write_text("broken")
        time.sleep(0.6)
        with pytest.raises(MeterFailure, match="VCHI initialization failed"):
            meter.end("w")


def test_pmic_absent_here_says_why(fake_vcgencmd):
    exe, state = fake_vcgencmd
    assert "not found" in probe_backend(parse_spec("pmic:command=/nonexistent/vcgencmd")).reason
    with pytest.raises(MeterUnavailable, match="not found"):
        open_meter("pmic:command=/nonexistent/vcgencmd")
    state.write_text("broken")
    with pytest.raises(MeterUnavailable, match="Raspberry Pi 5 only"):
        open_meter(f"pmic:command={exe}")
    assert probe_backend(parse_spec(f"pmic:command={exe}")).available is False
