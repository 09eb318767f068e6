"""Regenerate the shipped simulated profiles by running the calibration on the simulator.

``python -m calibrate.simulated profiles/ --force`` runs ``energyprof calibrate`` on each preset of
the simulated meter (``sim:preset=NAME,seed=0``, virtual clock) for the built-in models and writes
``profiles/sim-NAME.yaml`` with its raw measurements beside it. The profiles are fitted from those
measurements exactly as a real device's would be; they are labelled simulated everywhere
(``simulated: true``, ``meter.backend: sim``), because the simulator is not hardware.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from calibrate.calibration import CalibrationError, calibrate
from calibrate.profile import ProfileError
from energyprof.meters.sim import PRESETS

MODELS = ("mlp", "cnn", "resnet18")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m calibrate.simulated", description=__doc__)
    parser.add_argument("folder", nargs="?", default="profiles", type=Path)
    parser.add_argument("--force", action="store_true", help="replace existing files")
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS), help="only these presets")
    parser.add_argument("--quick", action="store_true", help="the quick plan")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the measurements saved beside the profiles (refits; measures what is missing)")
    args = parser.parse_args(argv)
    for name in args.preset or sorted(PRESETS):
        try:
            profile = calibrate(f"sim:preset={name},seed=0", models=MODELS, out=args.folder / f"sim-{name}.yaml",
                                quick=args.quick, force=args.force, resume=args.resume, progress=False,
                                say=lambda line: print(line, file=sys.stderr))
        except (CalibrationError, ProfileError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"{args.folder / f'sim-{name}.yaml'}: {profile.provenance.wall_time_s} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
