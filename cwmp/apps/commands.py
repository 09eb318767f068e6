"""The bodies of ``energyprof demo``, ``validate`` and ``fl`` (the parser is :mod:`energyprof.cli`)."""

from __future__ import annotations

import argparse
import json
import sys

from energyprof.commands import fail as _fail


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


# ---------------------------------------------------------------------------- fl (federated benchmark)
def cmd_fl(args: argparse.Namespace) -> int:
    import shlex as _shlex

    from calibrate.profile import ProfileError
    from cwmp.apps.federated.data import DataError, load_dataset
    from cwmp.apps.federated.experiment import FLConfig, Fleet, build_model_for, parse_ratios, runs_of
    from cwmp.apps.federated.report import summarize, summary_markdown, write_outputs
    from cwmp.errors import CostMapError

    if args.workers is not None and args.workers < 1:
        return _fail(f"--workers must be at least 1, got {args.workers}", 1)
    if args.workers is not None and args.engine == "flower":
        return _fail("--workers is for the local engine; the flower engine gives each simulated client one CPU "
                     "and Ray shares the machine's CPUs among them: leave --workers out", 1)
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
