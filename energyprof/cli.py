"""The ``energyprof`` command line: it parses arguments. Each subcommand's body lives beside its
code (``energyprof.commands``, ``calibrate.commands``, ``cwmp.apps.commands``) and is imported when
the subcommand runs, so that nothing heavy (meters, torch, calibrate, cwmp) loads for ``--help``."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

from energyprof import __version__


# ---------------------------------------------------------------------------- argument types (checked before any work)
def _number(text: str, kind: type = float) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and value != value:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    return value


def _at_least(low: float, kind: type = float):
    def check(text: str) -> Any:
        value = _number(text, kind)
        if value < low:
            raise argparse.ArgumentTypeError(f"{text} is below {low:g}")
        return value
    return check


def _fraction(text: str) -> float:
    """A keep ratio: 0 < r <= 1."""
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in (0, 1]; 10 % is 0.1")
    return value


def _fractions(text: str) -> list[float]:
    return [_fraction(part.strip()) for part in text.split(",") if part.strip()] or [_fraction(text)]


def _name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty name")
    return text


# ---------------------------------------------------------------------------- handlers: each command's body lives beside its code
def cmd_detect(args: argparse.Namespace) -> int:
    from energyprof.commands import cmd_detect as run

    return run(args)


def cmd_measure(args: argparse.Namespace) -> int:
    from energyprof.commands import cmd_measure as run

    return run(args)


def cmd_bench_kernel(args: argparse.Namespace) -> int:
    from energyprof.commands import cmd_bench_kernel as run

    return run(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from cwmp.apps.commands import cmd_demo as run

    return run(args)


def cmd_validate(args: argparse.Namespace) -> int:
    from cwmp.apps.commands import cmd_validate as run

    return run(args)


def cmd_fl(args: argparse.Namespace) -> int:
    from cwmp.apps.commands import cmd_fl as run

    return run(args)


# ---------------------------------------------------------------------------- calibrate, profile
def cmd_calibrate(args: argparse.Namespace) -> int:
    from calibrate.commands import cmd_calibrate as run

    return run(args)


def cmd_profile(args: argparse.Namespace) -> int:
    from calibrate.commands import cmd_profile as run

    return run(args)


# ---------------------------------------------------------------------------- logging (-v)
_LOG_PACKAGES = ("energyprof", "calibrate", "cwmp")


def setup_logging(verbosity: int) -> None:
    """Module loggers of energyprof, calibrate and cwmp to stderr: warnings only by default, info
    with -v, debug with -vv. Calling it again replaces the handler (no duplicated lines)."""
    import logging

    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    for name in _LOG_PACKAGES:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if getattr(handler, "_energyprof_cli", False):
                logger.removeHandler(handler)
        handler = logging.StreamHandler(sys.stderr)
        handler._energyprof_cli = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter("energyprof: %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False


# ---------------------------------------------------------------------------- fl (federated benchmark)
_FL_DEFAULT_ROUNDS = 30  # = cwmp.apps.federated.experiment.DEFAULT_ROUNDS (a test keeps them equal)


# ---------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """argparse, with a bad argument said in one line (argparse prints its usage block first): the
    problem and where the options are listed. Exit status 2, as argparse's. The subcommands' parsers
    are of this class too (``add_subparsers`` makes them of the parent's class)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (options: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="energyprof",
        description="Measure joules on real hardware, calibrate per-layer update costs, prune with CWMP.",
    )
    parser.add_argument("--version", action="version", version=f"energyprof {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="say what meters and the protocol do, on stderr (-v: info, -vv: debug); "
                        "give it before the subcommand: energyprof -v measure ...")
    sub = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    sub.required = True

    p = sub.add_parser("detect", help="probe every meter backend and say why each is (un)available")
    p.add_argument("--json", action="store_true", help="print a JSON list of probes")
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser(
        "measure",
        help="run a command and report its energy, like perf stat",
        description="Run COMMAND and report the energy the meter saw while it ran; exits with the "
        "command's status (also in the JSON as returncode), 128+N when it died of signal N. SIGTERM, SIGINT, "
        "SIGHUP and SIGQUIT sent to energyprof are passed on to the command, which is never left running. "
        "A meter that cannot start exits 2 with a one-line reason. "
        "Example: energyprof measure --meter rapl -- python train.py",
    )
    p.add_argument("--meter", default="auto", help="meter spec BACKEND[:key=value,...] (default: auto)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout (the command's own stdout then goes to stderr)")
    p.add_argument("--stderr", action="store_true", help="print the human-readable report on stderr")
    p.add_argument("-o", "--output", default=None, metavar="FILE",
                   help="write the report (JSON with --json) to FILE; stdout stays the command's")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    p.set_defaults(func=cmd_measure)

    p = sub.add_parser(
        "calibrate",
        help="measure a device's update costs and write its YAML profile",
        description="Plan a workload sweep (global coefficients) and update-phase replays of each model's "
        "layers at several densities, run each through the measurement protocol, save each to "
        "OUT.measurements.csv as it finishes, fit the cost model (scikit-learn) and write the profile. "
        "Example: energyprof calibrate --meter nvml --device cuda:0 --model resnet18 --out h100.yaml",
    )
    p.add_argument("--meter", default="auto", help="meter spec (default: auto; 'sim:preset=...' for the simulator)")
    p.add_argument("--device", default=None,
                   help="torch device the kernels run on (default: the meter's: cuda:N for nvml:index=N, else cpu)")
    p.add_argument("--allow-device-mismatch", action="store_true",
                   help="run the kernels on --device even where the meter does not look")
    p.add_argument("--model", action="append", default=[], type=_name,
                   help="mlp, cnn, resnet18 or module:attr; repeat or comma-separate (default: resnet18)")
    p.add_argument("--out", default="profile.yaml", help="profile path (default: profile.yaml)")
    p.add_argument("--quick", action="store_true", help="a shorter plan and shorter windows (CI, first look)")
    p.add_argument("--force", action="store_true", help="replace an existing profile (and restart its measurements)")
    p.add_argument("--resume", action="store_true", help="continue a run: skip what OUT.measurements.csv holds")
    p.add_argument("--min-layer-numel", type=_at_least(0, int), default=None,
                   help="tensors smaller than this are predicted, not replayed (default: 16384 quick, 4096 full)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and its time estimate; measure nothing")
    p.add_argument("--cooldown", type=float, default=0.0, metavar="SECONDS",
                   help="idle the device this long before each measurement (drift; default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the randomised measurement order (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("profile", help="list, show, validate, diff or export device profiles")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    a = actions.add_parser("list", help="the profiles found by name (shipped, $ENERGYPROF_PROFILE_PATH)")
    a = actions.add_parser("show", help="summary of one profile")
    a.add_argument("target", help="profile name or YAML path")
    a.add_argument("--layers", action="store_true", help="also every layer of every model table")
    a.add_argument("--json", action="store_true")
    a = actions.add_parser("validate", help="check a profile file; exits 1 naming the field and line")
    a.add_argument("target", help="YAML path or profile name")
    a.add_argument("--strict", action="store_true", help="also fail (exit 1) a profile whose calibration was poor")
    a = actions.add_parser("diff", help="relative change of every coefficient and layer, and interval overlap")
    a.add_argument("target", help="profile A (name or path)")
    a.add_argument("other", help="profile B (name or path)")
    a = actions.add_parser("export", help="write a profile (e.g. a shipped one) to a path")
    a.add_argument("target", help="profile name or path")
    a.add_argument("--out", required=True, help="destination YAML path")
    a.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser(
        "bench-kernel",
        help="measure one post-backprop update kernel's joules per call with the measurement protocol",
        description="Run an update workload under the measurement protocol (idle baseline, warm-up, long "
        "windows, phase-shifted trials) and print joules per call above idle with a 95 %% interval. "
        "Workloads: scatter, runs, pack, residual (take --density), sgd, momentum, adam, fma. Example: "
        "energyprof bench-kernel --meter nvml --workload scatter --size 16777216 --density 0.01 --device cuda:0",
    )
    p.add_argument("--meter", default="auto", help="meter spec BACKEND[:key=value,...] (default: auto)")
    p.add_argument("--workload", required=True, help="workload name (see above)")
    p.add_argument("--size", type=_at_least(1, int), default=2**20, help="elements of the updated tensor (default: 2^20)")
    p.add_argument("--density", type=float, help="fraction of entries kept, 0.001..1 (sparse workloads)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default=None,
                   help="torch device the kernels run on (default: the meter's: cuda:N for nvml:index=N, else cpu)")
    p.add_argument("--allow-device-mismatch", action="store_true",
                   help="run the kernels on --device even where the meter does not look")
    p.add_argument("--min-window-s", type=_at_least(0.0), default=1.0, help="shortest measurement window (default: 1)")
    p.add_argument("--trials", type=_at_least(2, int), default=4, help="kernel windows, >= 2 (default: 4)")
    p.add_argument("--json", action="store_true", help="print one JSON object, every window included")
    p.set_defaults(func=cmd_bench_kernel)

    p = sub.add_parser(
        "demo",
        help="the whole chain: calibrate mlp quickly, validate the profile, prune one update with Top-K and CWMP",
        description="Runs the real commands in a row on the best real meter (the simulator, labelled SIMULATED, when "
        "there is none): energyprof calibrate --model mlp --quick, energyprof validate with that profile, and one "
        "real update pruned with Top-K and CWMP at equal predicted energy. Prints where the profile and report are.",
    )
    p.add_argument("--meter", default=None, help="meter spec (default: auto, else the simulator)")
    p.add_argument("--device", default=None,
                   help="torch device the kernels run on (default: the meter's: cuda:N for nvml:index=N, else cpu)")
    p.add_argument("--allow-device-mismatch", action="store_true",
                   help="run the kernels on --device even where the meter does not look")
    p.add_argument("--keep-ratio", type=_fraction, default=0.1, help="Top-K keep ratio that sets the budget, in (0, 1]")
    p.add_argument("--out", default="out", help="folder for the demo's profile and report (default: out)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout (progress on stderr)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "validate",
        help="predicted vs measured joules of the masks the pruner makes, for a profile on a meter",
        description="Builds Top-K masks at each keep ratio and CWMP masks (p = 1 and 2) at Top-K's energy for "
        "realistic updates of the model, measures each mask's update phase through the protocol, and compares "
        "with the profile's prediction. Exit status 3 when the MAPE exceeds --max-mape.",
    )
    p.add_argument("--profile", required=True, help="profile name or YAML path")
    p.add_argument("--meter", required=True, help="meter spec (the same meter the profile was calibrated with)")
    p.add_argument("--model", default="mlp", type=_name, help="mlp, cnn, resnet18 or module:attr (default: mlp)")
    p.add_argument("--device", default=None,
                   help="torch device the kernels run on (default: the meter's: cuda:N for nvml:index=N, else cpu)")
    p.add_argument("--allow-device-mismatch", action="store_true",
                   help="run the kernels on --device even where the meter does not look")
    p.add_argument("--ratios", action="append", type=_fractions,
                   help="Top-K keep ratios, comma-separated (default: 0.001,0.01,0.05,0.1,0.2)")
    p.add_argument("--updates", choices=["train", "random"], default="train",
                   help="updates from a short training run on digits, or heavy-tailed random ones (default: train)")
    p.add_argument("--report", default=None, help="folder for the CSV, plots and Markdown summary")
    p.add_argument("--max-mape", type=_at_least(0.0), default=None, help="fail (exit 3) when the MAPE exceeds this fraction")
    p.add_argument("--json", action="store_true", help="print the summary object (mape, n, worst, bias, simulated)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "fl",
        help="federated benchmark: FedAvg with Top-K vs CWMP client updates on non-IID data (accuracy vs energy)",
        description="FedAvg with sparsified client updates and error feedback on Dirichlet(alpha) label-skew "
        "partitions: Top-K at each keep ratio against CWMP (p=1, p=2) at the energy Top-K spends at that ratio, "
        "over several seeds. Writes rounds.csv, pareto.png, summary.md and summary.json to --out. "
        "Energy is each client's profile's prediction (SIMULATED with a simulated profile). See docs/federated.md.",
    )
    p.add_argument("--dataset", default="digits", help="digits (default) or cifar10:DIR (a cifar-10-batches-py folder)")
    p.add_argument("--model", default="cnn", choices=["mlp", "cnn", "resnet18"], help="built-in model (default: cnn)")
    p.add_argument("--clients", type=int, default=10, help="number of clients (default: 10)")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration; small = strong label skew (default: 0.5)")
    p.add_argument("--rounds", type=int, default=_FL_DEFAULT_ROUNDS, help=f"FedAvg rounds (default: {_FL_DEFAULT_ROUNDS})")
    p.add_argument("--local-epochs", type=int, default=1, help="local epochs per round (default: 1)")
    p.add_argument("--lr", type=float, default=0.2, help="client SGD learning rate (default: 0.2)")
    p.add_argument("--batch-size", type=int, default=32, help="client batch size (default: 32)")
    p.add_argument("--ratios", default="1%,5%,10%,20%", help="Top-K keep ratios, fractions or percents (default: 1%%,5%%,10%%,20%%)")
    p.add_argument("--sweep", default="0.5%,40%",
                   help="budget sweep: every method at fixed joules per round, the floor plus keeping this share of "
                   "every tensor; 'none' for no sweep (default: 0.5%%,40%%)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    p.add_argument("--profile", default="sim-rpi4",
                   help="device profile name or YAML path; A,B,... assigns them to clients round-robin (default: sim-rpi4)")
    p.add_argument("--min-partition", type=int, default=10, help="fewest training examples per client (default: 10)")
    p.add_argument("--engine", default="local", choices=["local", "flower"], help="local (in process) or flower (simulation on Ray)")
    p.add_argument("--workers", type=int, default=None,
                   help="local engine: processes that share the runs, one CPU each (default: one per CPU, at most one "
                   "per run); the results do not depend on it. The flower engine refuses it: Ray gives each simulated "
                   "client one CPU")
    p.add_argument("--ray-address", default=None, help="flower engine: join a running Ray cluster (auto or HOST:PORT)")
    p.add_argument("--verbose", action="store_true", help="flower engine: show Flower's and Ray's logs")
    p.add_argument("--out", default="fl-results", help="output folder (default: fl-results)")
    p.add_argument("--force", action="store_true", help="replace the outputs of an earlier run in --out")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_fl)

    # further subcommands register here (each imports its modules lazily in its handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 done; 1 a user error (bad input, a path that cannot be written, ...), said in one
    line (the traceback with -vv); 2 a meter that cannot start or failed; 3 validate's --max-mape
    gate; 126/127 a command measure cannot run / find; 128+N a command killed by signal N;
    130 interrupted (Ctrl-C)."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    setup_logging(args.verbose)
    from energyprof.errors import EnergyprofError

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # e.g. `energyprof detect | head`: not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (EnergyprofError, OSError) as exc:
        return _guarded(exc, args.verbose)


def _guarded(exc: BaseException, verbosity: int) -> int:
    """One line for an error of ours or of the system (OSError); the traceback with -vv."""
    if verbosity >= 2:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    from energyprof.errors import EnergyprofError

    if isinstance(exc, OSError) and not isinstance(exc, EnergyprofError):
        where = exc.filename if exc.filename is not None else ""
        message = f"{where}: {exc.strerror or exc}" if where else str(exc.strerror or exc)
        if exc.filename2 is not None:
            message += f" ({exc.filename2})"
    else:
        message = str(exc) or type(exc).__name__
    code = getattr(exc, "exit_code", 1)
    print(f"energyprof: {message}", file=sys.stderr)
    return code if isinstance(code, int) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
