"""Raspberry Pi 5 PMIC rails through ``vcgencmd pmic_read_adc`` (``pmic``, ``pmic:rate_hz=5``).

The Pi 5's PMIC measures the current and voltage of each rail it generates; ``vcgencmd
pmic_read_adc`` prints them as lines such as ``VDD_CORE_A current(7)=0.77044000A`` and
``VDD_CORE_V volt(15)=0.72000000V``. The meter polls the command and takes the sum of
volts x amps over every rail that has both. That is the power *after* the PMIC: it leaves out
the PMIC's conversion losses and whatever the 5 V input feeds directly (USB ports, fan, HATs),
so its scope is ``pmic_rails``, not the board; an INA219/INA260 in the supply line measures the
whole board. Keys: ``rate_hz`` (default 5; each call takes tens of milliseconds of CPU),
``command`` (default ``vcgencmd``), and the sampled-meter keys ``max_gap_s``, ``startup_s``.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from typing import Any

from energyprof.errors import MeterFailure, MeterUnavailable
from energyprof.meters.base import MeterInfo, Probe
from energyprof.meters.sampled import PolledSource, SampledMeter, SampledOptions
from energyprof.meters.spec import MeterSpec

__all__ = ["parse_pmic_output", "open_from_spec", "probe"]

DEFAULT_RATE_HZ = 5.0
_LINE = re.compile(r"^\s*(?P<rail>\w+?)_(?P<unit>[AV])\s+(?:current|volt)\(\d+\)=(?P<value>[-+0-9.eE]+)[AV]\s*$")


def parse_pmic_output(text: str) -> dict[str, tuple[float, float]]:
    """Rail name -> (volts, amps) for every rail reported with both."""
    volts: dict[str, float] = {}
    amps: dict[str, float] = {}
    for line in text.splitlines():
        match = _LINE.match(line)
        if match:
            table = amps if match["unit"] == "A" else volts
            table[match["rail"]] = float(match["value"])
    return {rail: (volts[rail], amps[rail]) for rail in amps if rail in volts}


class _PmicReader:
    def __init__(self, argv: list[str]) -> None:
        self.argv = argv

    def rails(self) -> dict[str, tuple[float, float]]:
        try:
            done = subprocess.run(self.argv, capture_output=True, text=True, timeout=2.0, check=False)
        except subprocess.TimeoutExpired as exc:
            raise MeterFailure(f"{shlex.join(self.argv)} did not answer within 2 s") from exc
        rails = parse_pmic_output(done.stdout)
        if done.returncode != 0 or not rails:
            said = (done.stderr or done.stdout).strip()[:200]
            raise MeterFailure(
                f"{shlex.join(self.argv)} gave no rail readings (status {done.returncode}: {said!r}); "
                "PMIC ADC readings exist on the Raspberry Pi 5 only"
            )
        return rails

    def read_watts(self) -> float:
        return sum(v * a for v, a in self.rails().values())


def _argv(spec: MeterSpec) -> list[str]:
    return [spec.get_str("command", "vcgencmd") or "vcgencmd", "pmic_read_adc"]


def open_from_spec(spec: MeterSpec, **kwargs: Any) -> SampledMeter:
    argv = _argv(spec)
    options = SampledOptions.from_spec(spec, default_rate_hz=DEFAULT_RATE_HZ, default_scope="pmic_rails")
    spec.check_unused()
    if shutil.which(argv[0]) is None:
        raise MeterUnavailable(f"{argv[0]} not found: the pmic meter needs Raspberry Pi OS on a Raspberry Pi 5")
    reader = _PmicReader(argv)
    try:
        rails = reader.rails()
    except MeterFailure as exc:
        raise MeterUnavailable(str(exc)) from exc
    period_s = 1.0 / options.rate_hz
    info = MeterInfo(
        backend="pmic",
        scope=options.scope,
        kind="sampled",
        update_period_s=period_s,
        resolution_j=None,
        simulated=False,
        domains=(options.scope,),
        details={"rails": sorted(rails), "excludes": "PMIC conversion losses and loads fed from the 5 V input"},
    )
    source = PolledSource(
        shlex.join(argv), reader.read_watts, period_s, give_up_s=options.max_gap_for(period_s)
    )
    return SampledMeter(source, info, options, **kwargs)


def probe(spec: MeterSpec) -> Any:

    argv = _argv(spec)
    if shutil.which(argv[0]) is None:
        return Probe("pmic", False, f"{argv[0]} not found (the PMIC rails are read on a Raspberry Pi 5 with Raspberry Pi OS)")
    try:
        rails = _PmicReader(argv).rails()
    except MeterFailure as exc:
        return Probe("pmic", False, str(exc))
    return Probe("pmic", True, f"{len(rails)} PMIC rails readable (their sum excludes conversion losses)")
