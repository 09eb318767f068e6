"""The ``energyprof`` command line. One parser, one function per subcommand; everything heavy
(meters, torch, calibrate, cwmp) is imported inside the handler that needs it."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from typing import Any, Sequence

from energyprof import __version__

EXIT_METER = 2  # a meter that cannot start or failed
EXIT_NOT_FOUND = 127  # the measured command does not exist (as a shell says)


def _fail(message: str, code: int = EXIT_METER) -> int:
    print(f"energyprof: {message}", file=sys.stderr)
    return code


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


# ---------------------------------------------------------------------------- detect
def cmd_detect(args: argparse.Namespace) -> int:
    from energyprof.meters import auto_choice, probe_all

    probes = probe_all()
    if args.json:
        print(json.dumps([p.to_dict() for p in probes], indent=2))
        return 0
    width = max(len(p.backend) for p in probes)
    for p in probes:
        mark = "yes" if p.available else "no "
        print(f"{p.backend:<{width}}  {mark}  {p.reason}")
    usable = [p.backend for p in probes if p.available and p.backend != "sim"]
    print()
    if usable:
        pick = auto_choice(probes)
        print(f"real meters available: {', '.join(usable)}"
              + (f" ('--meter auto' picks {pick})" if pick else " (none of them is one '--meter auto' tries: name one)"))
    else:
        print("no real meter is available here; 'sim' gives simulated numbers (labelled simulated)")
    return 0


# ---------------------------------------------------------------------------- measure
def cmd_measure(args: argparse.Namespace) -> int:
    from energyprof.errors import EnergyprofError
    from energyprof.meters import open_meter
    from energyprof.outputs import check_output_file
    from energyprof.wrapper import CommandError, HeldSignals, run_measured

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        return _fail("no command to measure; usage: energyprof measure --meter SPEC -- COMMAND [ARGS...]")
    if args.output:
        check_output_file(args.output, "--output")
    # --json on stdout: the command's own output goes to stderr, so that stdout is one JSON object
    child_stdout = 2 if args.json and not args.output else None
    with HeldSignals() as held:  # before the meter opens: its threads inherit the blocked signals
        try:
            meter = open_meter(args.meter)
        except EnergyprofError as exc:
            return _fail(f"cannot start meter {args.meter!r}: {exc}")
        try:
            with meter:
                outcome = run_measured(command, meter, held, stdout=child_stdout)
        except CommandError:
            raise
        except EnergyprofError as exc:
            return _fail(f"measurement failed: {exc}")
    measurement = outcome.measurement
    result: dict[str, Any] = measurement.to_dict()
    result["command"] = command
    result["returncode"] = outcome.exit_status  # as a shell says: 128+N when killed by signal N
    result["signal"] = outcome.signal
    if outcome.forwarded:
        result["forwarded_signals"] = outcome.forwarded
    if measurement.energy_j == 0.0:
        period = measurement.meter.update_period_s
        result["warning"] = (
            "the meter's counter did not move during this window"
            + (f" ({measurement.seconds:.3g} s against an update period of {period:.3g} s)" if period else "")
            + ": the energy is below what this meter resolves, not zero; measure a longer run "
            "or use 'energyprof bench-kernel', which repeats a kernel until the meter sees it"
        )
        print(f"energyprof: warning: {result['warning']}", file=sys.stderr)
    if args.output:
        with open(args.output, "w") as out:
            if args.json:
                print(json.dumps(result), file=out)
            else:
                _print_perf_stat(result, out)
    elif args.json:
        print(json.dumps(result))
    else:
        _print_perf_stat(result, sys.stderr if args.stderr else sys.stdout)
    return outcome.exit_status  # like perf stat: the measured command's status


def _print_perf_stat(r: dict[str, Any], out) -> None:
    meter = r["meter"]
    label = " -- SIMULATED, not a physical measurement" if r["simulated"] else ""
    print(f"\n Energy stats for '{shlex.join(r['command'])}' "
          f"(meter: {meter['backend']}, scope: {meter['scope']}){label}:\n", file=out)
    for name, joules in sorted(r["domains"].items()):
        print(f"{joules:>16.3f} J  {name}", file=out)
    print(f"{r['energy_j']:>16.3f} J  total", file=out)
    print(f"{r['duration_s']:>16.3f} s  elapsed", file=out)
    if r["duration_s"] > 0:
        print(f"{r['energy_j'] / r['duration_s']:>16.3f} W  average", file=out)
    period = meter.get("update_period_s")
    if period and r["duration_s"] < 10 * period:
        print(f"\n meter updates every {meter['update_period_s'] * 1e3:.3g} ms; a command much shorter than "
              "that is not resolved (use 'energyprof bench-kernel' for short kernels)", file=out)
    if r.get("signal"):
        print(f"\n command was killed by {r['signal']} (status {r['returncode']})", file=out)
    elif r["returncode"]:
        print(f"\n command exited with status {r['returncode']}", file=out)
    print(file=out)


# ---------------------------------------------------------------------------- calibrate, profile
def cmd_calibrate(args: argparse.Namespace) -> int:
    from calibrate.commands import cmd_calibrate as run

    return run(args)


def cmd_profile(args: argparse.Namespace) -> int:
    from calibrate.commands import cmd_profile as run

    return run(args)


# ---------------------------------------------------------------------------- bench-kernel
def cmd_bench_kernel(args: argparse.Namespace) -> int:
    from energyprof.devices import kernel_device
    from energyprof.errors import EnergyprofError
    from energyprof.meters import open_meter
    from energyprof.protocol import MeasurementProtocol
    from energyprof.workloads import make_workload

    try:
        workload = make_workload(args.workload, size=args.size, density=args.density, dtype=args.dtype)
    except (ValueError, RuntimeError) as exc:
        return _fail(f"cannot set up workload {args.workload!r}: {exc}", 1)
    try:
        meter = open_meter(args.meter)
    except EnergyprofError as exc:
        return _fail(f"cannot start meter {args.meter!r}: {exc}")
    protocol = MeasurementProtocol(min_window_s=args.min_window_s, trials=args.trials)
    with meter:
        device = kernel_device(meter.info, args.device, args.allow_device_mismatch)
        try:
            workload.setup(device)
        except (ValueError, RuntimeError) as exc:
            return _fail(f"cannot set up workload {args.workload!r} on {device}: {exc}", 1)
        try:
            result = protocol.measure(workload, meter)
        except EnergyprofError as exc:
            return _fail(f"measurement failed: {exc}")
    print(json.dumps(result.to_dict()) if args.json else result.summary())
    return 0


# ---------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from cwmp.apps.demo import run

    result = run(meter_spec=args.meter, device=args.device, keep_ratio=args.keep_ratio, out=args.out,
                 progress=not args.json, say=(lambda line: print(line, file=sys.stderr)) if args.json else print,
                 allow_device_mismatch=args.allow_device_mismatch)
    if args.json:
        print(json.dumps(result, default=str))
    return 0


# ---------------------------------------------------------------------------- validate
def cmd_validate(args: argparse.Namespace) -> int:
    from cwmp.apps.validate import DEFAULT_RATIOS, console_table, validate

    ratios = tuple(r for part in (args.ratios or []) for r in part) or DEFAULT_RATIOS
    result = validate(args.profile, args.meter, model=args.model, device=args.device, ratios=ratios,
                      updates=args.updates, report=args.report, progress=not args.json,
                      say=lambda line: print(line, file=sys.stderr), allow_device_mismatch=args.allow_device_mismatch)
    if args.json:
        print(json.dumps(result.summary))
    else:
        print(console_table(result))
        if result.report:
            print(f"report: {result.report}")
    if args.max_mape is not None and result.summary["mape"] > args.max_mape:
        print(f"energyprof: MAPE {result.summary['mape']:.2%} exceeds --max-mape {args.max_mape:.2%}", file=sys.stderr)
        return 3
    return 0


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


def cmd_fl(args: argparse.Namespace) -> int:
    import shlex as _shlex
    from pathlib import Path

    from calibrate.profile import ProfileError
    from cwmp.apps.federated.data import DataError, load_dataset
    from cwmp.apps.federated.experiment import FLConfig, Fleet, build_model_for, parse_ratios, runs_of
    from cwmp.apps.federated.report import summarize, summary_markdown, write_outputs
    from cwmp.errors import CostMapError

    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
        config = FLConfig(
            dataset=args.dataset, model=args.model, clients=args.clients, alpha=args.alpha, rounds=args.rounds,
            local_epochs=args.local_epochs, lr=args.lr, batch_size=args.batch_size, ratios=parse_ratios(args.ratios),
            sweep=() if args.sweep.strip().lower() in ("", "none") else parse_ratios(args.sweep),
            seeds=seeds, profiles=tuple(p.strip() for p in args.profile.split(",") if p.strip()),
            min_partition=args.min_partition,
        )
        dataset = load_dataset(config.dataset)
        fleet = Fleet(config, build_model_for(config, dataset, 0))
    except (ValueError, DataError, ProfileError, CostMapError) as exc:
        return _fail(str(exc), 1)
    from cwmp.apps.federated.report import OUTPUT_FILES
    from energyprof.outputs import check_output_folder

    out = check_output_folder(args.out)
    earlier = [name for name in OUTPUT_FILES if (out / name).exists()]
    if earlier and not args.force:
        return _fail(f"--out {out} already holds {', '.join(earlier)} of an earlier run; choose another --out, "
                     "or pass --force to replace them", 1)
    runs = len(list(runs_of(config)))
    total = runs * config.rounds
    if args.workers is not None and args.workers < 1:
        return _fail(f"--workers must be at least 1, got {args.workers}", 1)
    from cwmp.apps.federated.engine_local import default_workers

    workers = args.workers if args.workers is not None else default_workers(runs)
    command = "energyprof fl " + " ".join(_shlex.quote(str(a)) for a in (
        "--dataset", args.dataset, "--model", args.model, "--clients", args.clients, "--alpha", args.alpha,
        "--rounds", args.rounds, "--local-epochs", args.local_epochs, "--ratios", args.ratios, "--sweep", args.sweep, "--seeds", args.seeds,
        "--profile", args.profile, "--engine", args.engine))
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    label = " [SIMULATED energy]" if fleet.simulated else ""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=False,
                  redirect_stdout=False, redirect_stderr=False) as bar:
        task = bar.add_task(f"rounds{label}", total=total)

        def progress(n: int, what: str) -> None:
            bar.update(task, advance=n, description=f"{what}{label}")

        try:
            if args.engine == "flower":
                try:
                    from cwmp.apps.federated.flower_app import run_flower
                except ImportError as exc:
                    return _fail(f"the flower engine needs Flower: pip install 'energyprof[federated]' ({exc})", 1)
                records = run_flower(config, progress, ray_address=args.ray_address, verbose=args.verbose)
            else:
                from cwmp.apps.federated.engine_local import run_local

                records = run_local(config, dataset, progress, workers=workers)
        except (ValueError, DataError, CostMapError) as exc:
            return _fail(str(exc), 1)
    summary = summarize(records, config, fleet.describe(), args.engine, command)
    paths = write_outputs(records, summary, config, out, say=lambda line: print(line, file=sys.stderr))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(summary_markdown(summary))
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
                   "per run); the results do not depend on it")
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
