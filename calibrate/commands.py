"""Handlers of ``energyprof calibrate`` and ``energyprof profile ...`` (the parser lives in
:mod:`energyprof.cli`, which imports this module only when one of them runs)."""

from __future__ import annotations

import sys
from typing import Any, Iterator

from calibrate.profile import DeviceProfile, Estimate, ProfileError, available_profiles, load_profile, save_profile


def _fail(message: str, code: int = 1) -> int:
    print(f"energyprof: {message}", file=sys.stderr)
    return code


def cmd_calibrate(args: Any) -> int:
    from calibrate.calibration import calibrate
    from energyprof.models import model_names

    # errors (ours, and OSError) reach the command line's guard: one line, the exit status they carry
    models = model_names(args.model, default="resnet18")
    if args.dry_run:
        return _dry_run(args, models)
    profile = calibrate(
        args.meter, models=models, out=args.out, device=args.device, quick=args.quick, force=args.force,
        resume=args.resume, min_layer_numel=args.min_layer_numel, progress=not args.no_progress,
        say=lambda line: print(line, file=sys.stderr), allow_device_mismatch=args.allow_device_mismatch,
        seed=getattr(args, "seed", 0), cooldown_s=getattr(args, "cooldown", 0.0),
    )
    print(profile.summary())
    print(f"\nprofile written to {args.out}")
    wall = profile.provenance.wall_time_s
    if wall is not None:
        print(f"wall time {wall:.1f} s" + ("  [SIMULATED meter]" if profile.simulated else ""))
    return 0


def _dry_run(args: Any, models: list[str]) -> int:
    from calibrate.calibration import resolve_meter_spec
    from calibrate.plan import REFERENCE_EVERY, build_plan, estimate_seconds, extra_seconds, protocol_settings
    from energyprof.devices import describe, kernel_device
    from energyprof.errors import EnergyprofError
    from energyprof.meters import open_meter
    from energyprof.models import load_model

    modules = {m: load_model(m) for m in models}
    spec = resolve_meter_spec(args.meter)
    try:
        with open_meter(spec) as meter:
            info = meter.info
    except EnergyprofError as exc:
        return _fail(f"cannot open meter {spec!r}: {exc}")
    dev = kernel_device(info, args.device, args.allow_device_mismatch)
    items, plans = build_plan(modules, args.quick, args.min_layer_numel)
    print(describe(info, dev, args.device))
    sweep = sum(i.kind == "sweep" for i in items)
    print(f"plan: {len(items)} measurements: {sweep} workload-sweep points, {len(items) - sweep} layer replays")
    for label, plan in plans.items():
        print(f"  {label}: {len(plan.shapes)} tensors in {len(plan.groups)} distinct (numel, dtype); "
              f"{len(plan.measured)} replayed at several densities, {len(plan.too_small)} too small for their own "
              "(update phase predicted; compensation measured together)")
    settings = protocol_settings(args.quick)
    period = info.update_period_s
    seconds = estimate_seconds(items, settings, period)
    clock = (info.details or {}).get("clock")
    note = " of simulated-device time (the virtual clock runs faster)" if clock == "virtual" else " of wall time"
    cooldown = max(0.0, float(getattr(args, "cooldown", 0.0) or 0.0))
    extra = extra_seconds(len(items), settings, period, cooldown)
    print(f"protocol: {settings}; meter update period {period} s")
    print(f"order: randomised (seed {getattr(args, 'seed', 0)}); reference kernel measured {extra['references']} "
          f"times (first, every {REFERENCE_EVERY} measurements, last): +{extra['reference_s'] / 60:.1f} min; "
          f"cool-down {cooldown:g} s before each measurement: +{extra['cooldown_s'] / 60:.1f} min")
    total = seconds + extra["reference_s"] + extra["cooldown_s"]
    print(f"estimate: {total / 60:.1f} min{note} ({seconds / 60:.1f} min of plan measurements)")
    return 0


def cmd_profile(args: Any) -> int:
    action = args.action
    try:
        if action == "list":
            for name, path in sorted(available_profiles().items()):
                try:
                    p = load_profile(path)
                    tag = "SIMULATED" if p.simulated else p.provenance.device
                    models = ",".join(sorted(p.models)) or "-"
                except ProfileError as exc:
                    tag, models = f"invalid: {str(exc)[:60]}", "-"
                print(f"{name:<24} {tag:<28} models: {models:<22} {path}")
            return 0
        if action == "show":
            profile = load_profile(args.target)
            print(profile.model_dump_json(indent=2) if args.json else profile.summary())
            if not args.json and args.layers:
                for model, costs in sorted(profile.models.items()):
                    print(f"\n  {model}")
                    for layer in costs.layers:
                        print(f"    {layer.name:<34} {layer.numel:>9}  fixed {layer.fixed_j:.3e} J  "
                              f"{layer.joules_per_update:.3e} J/entry  {layer.joules_per_line:.3e} J/line  "
                              f"{layer.method}")
            return 0
        if action == "validate":
            profile = load_profile(args.target)
            if getattr(args, "strict", False) and profile.quality == "poor":
                return _fail(f"{args.target}: the calibration that wrote this profile was poor (--strict): "
                             f"{profile.quality_reason}")
            quality = f", quality {profile.quality}" if profile.quality else ""
            print(f"{args.target}: valid energyprof profile (schema {profile.schema_version}), "
                  f"{len(profile.models)} model tables{quality}" + ("  [SIMULATED]" if profile.simulated else ""))
            return 0
        if action == "diff":
            a, b = load_profile(args.target), load_profile(args.other)
            for line in diff_lines(a, b):
                print(line)
            return 0
        if action == "export":
            from energyprof.outputs import check_output_file

            check_output_file(args.out)
            profile = load_profile(args.target)
            path = save_profile(profile, args.out, overwrite=args.force)
            print(f"exported {profile.name} to {path}")
            return 0
    except ProfileError as exc:
        return _fail(str(exc))
    return _fail(f"unknown profile action {action!r}")


def _estimates(profile: DeviceProfile) -> Iterator[tuple[str, Estimate]]:
    c = profile.coefficients
    yield "static_power_w", c.static_power_w
    yield "j_per_call", c.j_per_call
    for group in ("j_per_byte_read", "j_per_byte_written", "j_per_line_written"):
        for level, est in sorted(getattr(c, group).items()):
            yield f"{group}.{level}", est
    yield "j_per_flop", c.j_per_flop


def _rel(a: float, b: float) -> str:
    if a == 0:
        return "   n/a" if b != 0 else " +0.0%"
    return f"{(b - a) / abs(a):+6.1%}"


def _overlap(lo1: float, hi1: float, lo2: float, hi2: float) -> str:
    return "intervals overlap" if max(lo1, lo2) <= min(hi1, hi2) else "intervals DO NOT overlap"


def diff_lines(a: DeviceProfile, b: DeviceProfile) -> Iterator[str]:
    """Relative change of every coefficient and layer cost from ``a`` to ``b``, and whether their
    95 % intervals overlap."""
    yield f"{a.name} -> {b.name}" + ("  [SIMULATED]" if a.simulated or b.simulated else "")
    for (name, ea), (_, eb) in zip(_estimates(a), _estimates(b)):
        yield (f"  {name:<28} {ea.value:.4g} -> {eb.value:.4g}  {_rel(ea.value, eb.value)}  "
               f"{_overlap(ea.ci_low, ea.ci_high, eb.ci_low, eb.ci_high)}")
    ca, cb = a.coefficients, b.coefficients
    yield f"  {'cache_bytes':<28} {ca.cache_bytes} -> {cb.cache_bytes}  {_rel(ca.cache_bytes, cb.cache_bytes)}"
    yield (f"  {'transition_octaves':<28} {ca.transition_octaves:g} -> {cb.transition_octaves:g}")
    for model in sorted(set(a.models) | set(b.models)):
        if model not in a.models or model not in b.models:
            yield f"  model {model}: only in {a.name if model in a.models else b.name}"
            continue
        la, lb = a.layer_costs(model), b.layer_costs(model)
        yield f"  model {model}"
        for name in la:
            if name not in lb:
                yield f"    {name}: only in {a.name}"
                continue
            x, y = la[name], lb[name]
            yield (f"    {name:<32} fixed {_rel(x.fixed_j, y.fixed_j)} "
                   f"({_overlap(x.fixed_ci_low, x.fixed_ci_high, y.fixed_ci_low, y.fixed_ci_high)}), "
                   f"per entry {_rel(x.joules_per_update, y.joules_per_update)} "
                   f"({_overlap(x.ci_low, x.ci_high, y.ci_low, y.ci_high)}), "
                   f"per line {_rel(x.joules_per_line, y.joules_per_line)}  [{x.method} -> {y.method}]")
        for name in lb:
            if name not in la:
                yield f"    {name}: only in {b.name}"


