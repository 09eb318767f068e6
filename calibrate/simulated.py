"""Profiles that state the simulator's ground truth, for CI, demos and tests of the pruner.

They are labelled simulated (``simulated: true``, ``meter.backend: sim``) and their method says that
the numbers are the simulator's preset parameters, not a measurement of anything. Regenerate the
shipped ones with ``python -m calibrate.simulated profiles/``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path

from calibrate.profile import (
    Coefficients,
    DeviceProfile,
    Estimate,
    MeterRecord,
    ProfileError,
    Provenance,
    save_profile,
)

from energyprof import __version__
from energyprof.meters.sim import PRESETS, SimMeter


def profile_from_sim_preset(preset: str, created: _dt.datetime | None = None) -> DeviceProfile:
    meter = SimMeter(preset=preset, clock="virtual")
    p, info = meter.preset, meter.info
    return DeviceProfile(
        name=f"sim-{p.name}",
        simulated=True,
        provenance=Provenance(
            device=f"simulated: {p.description}",
            host="simulator",
            toolkit_version=__version__,
            meter=MeterRecord(
                backend=info.backend,
                scope=info.scope,
                kind=info.kind,
                update_period_s=info.update_period_s,
                averaging_window_s=info.averaging_window_s,
                resolution_j=info.resolution_j,
                simulated=True,
                details=dict(info.details),
            ),
            created=created or _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0),
            method="simulator preset ground truth (SIMULATED: parameters of energyprof's simulator, not a measurement)",
        ),
        coefficients=Coefficients(
            static_power_w=Estimate.exact(p.static_power_w),
            j_per_byte_written={
                "cache": Estimate.exact(p.j_per_byte_written_cache),
                "dram": Estimate.exact(p.j_per_byte_written_dram),
            },
            j_per_byte_read={
                "cache": Estimate.exact(p.j_per_byte_read_cache),
                "dram": Estimate.exact(p.j_per_byte_read_dram),
            },
            j_per_flop=Estimate.exact(p.j_per_flop),
            cache_bytes=p.cache_bytes,
        ),
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m calibrate.simulated", description=__doc__)
    parser.add_argument("folder", nargs="?", default="profiles", type=Path)
    parser.add_argument("--force", action="store_true", help="replace existing files")
    args = parser.parse_args(argv)
    for name in sorted(PRESETS):
        try:
            path = save_profile(profile_from_sim_preset(name), args.folder / f"sim-{name}.yaml", overwrite=args.force)
        except ProfileError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
