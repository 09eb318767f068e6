"""The bodies of ``energyprof detect``, ``measure`` and ``bench-kernel`` (the parser is
:mod:`energyprof.cli`): meters and the measurement protocol, imported when a command runs."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Any

EXIT_METER = 2  # a meter that cannot start or failed


def fail(message: str, code: int = EXIT_METER) -> int:
    """One line on stderr, and the exit status to return."""
    print(f"energyprof: {message}", file=sys.stderr)
    return code


_fail = fail


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
