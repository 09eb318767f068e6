"""``energyprof calibrate``: plan the measurements, run each through the protocol, save each the
moment it finishes, fit, and write the device profile.

The plan (:func:`build_plan`) has two parts:

* a **workload sweep** for the global coefficients: the memory-write kernels (``scatter``,
  ``pack``, ``residual``, ``runs``, ``update``) at two densities and the compute kernels (``sgd``,
  ``momentum``, ``adam``, ``fma``) over sizes from cache-resident to DRAM/HBM-sized;
* **layer replays** for each model: the masked update phase (:class:`~energyprof.workloads.UpdatePhase`)
  of each parameter tensor at five densities from 0.1 % to 100 % (CWMP may keep much of a cheap
  layer, so its cost curve is measured over the whole range), and the tensor's compensation
  (:class:`~energyprof.workloads.Compensation`, error feedback's dense ``residual += update``),
  replayed on its own: every round pays it whatever the mask keeps, so it is measured, never
  extrapolated from the update phase to k = 0. Tensors with the same number
  of entries and dtype have the same update phase, so one replay serves them all (the profile says
  which tensor was replayed: ``measured_as``). Tensors below ``min_layer_numel`` entries are not
  measured: their costs are predicted from the global coefficients and marked ``predicted``, as
  are layers whose marginal cost the meter did not resolve.

The plan runs in a **randomised order** (seeded: ``seed``), so that a slow drift of the device or a
burst of interference lands on a random mix of kernels and sizes rather than on one part of the
sweep. A **reference kernel** (:data:`calibrate.quality.REFERENCE`) is measured first, after every
:data:`REFERENCE_EVERY` measurements and last; every measurement is divided by the reference's
drift (its ratio to its mean, interpolated at the measurement's time) and the drift is reported
and recorded (``provenance.protocol.reference``). A measurement whose trials disagree (one more than 15 % from their median: a burst of interference)
is measured again, up to twice, and the steadiest kept (``retries`` in the CSV). An optional
**cool-down** (``cooldown_s``) lets
the device relax before each measurement. The fit's residuals against working-set size, density
and layer size are recorded in the profile, and a fit beyond the documented quality thresholds
(:mod:`calibrate.quality`) prints a warning naming the likely cause and the remedy and records
``quality: poor`` with the reason.

Every finished measurement is appended to ``<out>.measurements.csv`` (flushed and synced), with
``<out>.calibration.json`` holding what the run was (meter, device, models, plan). Ctrl-C, a meter
failure or a crash loses only the measurement in flight; ``--resume`` checks every row of the CSV
(a bad one is named by ``file:line`` and never fitted), skips what it holds and refuses if the
meter, device or models differ. One run at a time writes a given ``--out`` (an advisory lock; see
:mod:`calibrate.runfiles`), and nothing is written before the models, the output folder, the meter
and the kernel device (the meter's unless ``--device`` is given) are known good. The profile is
written atomically, and an existing one only with ``force``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
import torch

from calibrate.profile import DeviceProfile, save_profile
from energyprof import __version__
from energyprof.costmodel import lines_touched
from energyprof.errors import EnergyprofError
from energyprof.meters.spec import parse_spec
from energyprof.workloads import CompensationGroup, itemsize_of, make_workload
from calibrate.plan import IDLE_EVERY_S, REFERENCE_EVERY, PlanItem, build_plan, protocol_settings
from calibrate.profile_fit import fit_profile
from calibrate.runfiles import (
    CalibrationError,
    CalibrationInterrupted,
    CsvAppender,
    RunLock,
    check_output_path,
    read_rows,
    replace_text,
    resume_command,
    row_problem,
    write_new,
)

__all__ = ["PlanItem", "CalibrationError", "build_plan", "calibrate", "protocol_settings", "resolve_meter_spec"]

MEASURE_ATTEMPTS = 3  # a measurement whose row is not finite (NaN, inf) is taken again, at most this often
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- meter spec
def resolve_meter_spec(spec: str) -> str:
    """The simulator calibrates on its virtual clock (the simulated device's time) unless asked."""
    parsed = parse_spec(spec)
    if parsed.backend == "sim" and "clock" not in parsed.params:
        return spec + ("," if ":" in spec else ":") + "clock=virtual"
    return spec


# ---------------------------------------------------------------------------- the run
def _row(item: PlanItem, workload: Any, result: Any, kept: int, lines: int, wall_s: float,
         idle: Any = None) -> dict[str, Any]:
    kern = result.table[result.table.role == "kernel"]
    per_trial = kern.joules_per_call.to_numpy(float)
    se = float(per_trial.std(ddof=1) / math.sqrt(len(per_trial))) if len(per_trial) > 1 else 0.0
    row: dict[str, Any] = {
        "id": item.id, "kind": item.kind, "workload": item.workload, "size": item.size, "dtype": item.dtype,
        "density": item.density, "model": item.model, "tensors": ";".join(item.tensors),
        "kept": kept, "lines": lines,
    }
    row.update(workload.counts_.to_dict())
    row.update({
        "joules_per_call": result.joules_per_call, "ci_low_j": result.ci_low_j, "ci_high_j": result.ci_high_j,
        "se_j": se, "total_joules_per_call": result.total_joules_per_call,
        "seconds_per_call": result.seconds_per_call, "idle_power_w": result.idle_power_w,
        "idle_se_w": idle.se_w if idle is not None else math.nan,
        "idle_windows": idle.windows if idle is not None else result.idle_windows, "calls": result.calls,
        "windows": result.windows, "backend": result.meter.backend, "simulated": result.simulated,
        "measured_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "wall_s": round(wall_s, 3),
    })
    return row


def _drop_torn_line(csv_path: Path) -> None:
    """A process killed while appending may leave a last line without its newline: drop it (that
    measurement is re-measured; every finished one ends with a newline)."""
    data = csv_path.read_bytes()
    if data and not data.endswith(b"\n"):
        csv_path.write_bytes(data[: data.rfind(b"\n") + 1])


def _append(csv_path: Any, row: dict[str, Any]) -> None:
    if hasattr(csv_path, "append_row"):  # the run's open CSV (runfiles.CsvAppender)
        csv_path.append_row(row)
        return
    frame = pd.DataFrame([row])
    new = not csv_path.exists() or csv_path.stat().st_size == 0
    with open(csv_path, "a", newline="") as f:
        frame.to_csv(f, header=new, index=False)
        f.flush()
        os.fsync(f.fileno())


def calibrate(
    meter_spec: str,
    models: Iterable[str] = ("resnet18",),
    out: str | os.PathLike[str] = "profile.yaml",
    device: str | None = None,
    quick: bool = False,
    force: bool = False,
    resume: bool = False,
    min_layer_numel: int | None = None,
    progress: bool = True,
    say: Callable[[str], None] = print,
    model_shape: dict[str, int] | None = None,
    allow_device_mismatch: bool = False,
    seed: int = 0,
    cooldown_s: float = 0.0,
) -> DeviceProfile:
    """Run a calibration and write its profile; returns the profile (see the module docstring).

    Nothing is written before the inputs are known good: the models, the output folder, the meter
    (opened) and the kernel device (``device``, or the meter's: :func:`energyprof.devices.kernel_device`).
    Then the run takes ``<out>.lock`` (:mod:`calibrate.runfiles`) for as long as it writes."""
    from energyprof.devices import kernel_device
    from energyprof.meters import open_meter
    from energyprof.models import load_model
    from energyprof.protocol import MeasurementProtocol

    out = Path(out)
    csv_path = out.with_name(out.name + ".measurements.csv")
    meta_path = out.with_name(out.name + ".calibration.json")
    if min_layer_numel is not None and min_layer_numel < 0:
        raise CalibrationError(f"min_layer_numel={min_layer_numel}: give a number of entries >= 0")
    labels = list(models)
    if not labels:
        raise CalibrationError("no model to calibrate; give --model mlp, cnn, resnet18 or module:attribute")
    modules = {label: load_model(label, **(model_shape or {})) for label in labels}
    items, model_plans = build_plan(modules, quick, min_layer_numel)
    check_output_path(out)
    if cooldown_s < 0 or not math.isfinite(cooldown_s):
        raise CalibrationError(f"--cooldown must be a number of seconds >= 0, got {cooldown_s}")
    if out.exists() and not force:
        raise CalibrationError(f"{out} already exists; choose another --out, or pass --force to replace it")
    if resume and not meta_path.exists():
        raise CalibrationError(f"nothing to resume: {meta_path} does not exist; start without --resume")
    if not resume and (csv_path.exists() or meta_path.exists()) and not force:
        raise CalibrationError(
            f"measurements of an earlier run exist ({csv_path if csv_path.exists() else meta_path}); continue it "
            "with --resume, or pass --force to start over (the old files are kept with a timestamp)"
        )
    spec = resolve_meter_spec(meter_spec)
    again = resume_command(meter_spec, labels, out, device, quick, min_layer_numel, allow_device_mismatch)
    try:
        meter = open_meter(spec)
    except EnergyprofError as exc:
        raise CalibrationError(_no_meter_message(spec, exc)) from None
    with contextlib.ExitStack() as stack:
        stack.enter_context(meter)
        info = meter.info
        dev = kernel_device(info, device, allow_device_mismatch)
        from energyprof.meters.base import torch_device_problem

        problem = torch_device_problem(info)
        if problem:  # the meter sees a GPU this torch cannot run kernels on
            raise CalibrationError(problem)
        meta = {"meter": spec, "device": str(dev), "models": labels, "quick": quick,
                "min_layer_numel": min_layer_numel, "plan": [i.id for i in items], "toolkit_version": __version__}
        # the inputs are good: from here on this run writes, holding the lock
        out.parent.mkdir(parents=True, exist_ok=True)
        stack.enter_context(RunLock(out))
        done, references = _open_run(meta, meta_path, csv_path, items, resume, force, again, say)
        sink = stack.enter_context(contextlib.closing(CsvAppender(csv_path, exclusive=not resume)))
        settings = dict(protocol_settings(quick), cooldown_s=float(cooldown_s))
        pending = [i for i in items if i.id not in done]
        pending = [pending[j] for j in np.random.default_rng(seed).permutation(len(pending))]
        say(f"calibration plan: {len(items)} measurements ({len(items) - len(pending)} already in {csv_path.name})"
            f", meter {spec}, kernels on {dev}")
        if info.simulated:
            say("the meter is SIMULATED: every number of this profile is simulated, not a measurement")
        protocol = MeasurementProtocol(random_state=0, **{k: v for k, v in settings.items() if k != "cooldown_s"})
        _run_items(pending, meter, protocol, dev, sink, done, progress, references, cooldown_s)
        meter.close()
        table = pd.DataFrame([done[i.id] for i in items])
        fit_started = time.monotonic()
        table, drift = _drift_corrected(table, pd.DataFrame(references))
        if drift.get("corrected"):
            say(f"reference kernel ({drift['workload']}, {drift['measurements']} measurements): the device drifted "
                f"{drift['drift']:.1%} over the run (first to last {drift['first_to_last']:+.1%}); every measurement "
                "is divided by the drift at its time")
        settings = dict(settings, reference=drift, order=f"randomised (seed {seed})")
        profile = fit_profile(table, items, model_plans, out, spec, info, dev, settings, quick, fit_started)
        if profile.quality == "poor":
            say(f"WARNING: this calibration is poor: {profile.quality_reason}")
        save_profile(profile, out, overwrite=force)
    return profile


def _open_run(meta: dict[str, Any], meta_path: Path, csv_path: Path, items: list[PlanItem], resume: bool,
              force: bool, again: str, say: Callable[[str], None]
              ) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Under the lock: check a resumed run's saved description and every row of its CSV (the rows it
    returns are finished measurements), or move an old run aside (``force``) and create this run's
    description exclusively."""
    done: dict[str, dict[str, Any]] = {}
    references: list[dict[str, Any]] = []
    if resume:
        try:
            before = json.loads(meta_path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise CalibrationError(f"{meta_path} is not this toolkit's run description ({exc}); start over with "
                                   f"{again.replace(' --resume', ' --force')}") from None
        for key in ("meter", "device", "models", "quick", "min_layer_numel"):
            if before.get(key) != meta[key]:
                raise CalibrationError(
                    f"cannot resume: the saved run has {key}={before.get(key)!r}, this one {meta[key]!r}; "
                    "resume with the same --meter, --device, --model and --quick, or start a new --out"
                )
        if csv_path.exists() and csv_path.stat().st_size:
            plan = {i.id: i for i in items}
            _good, torn = read_rows(csv_path, plan, again)
            if torn:
                say(f"the last line of {csv_path.name} was cut off (a run stopped while writing it): it is measured "
                    "again")
                _drop_torn_line(csv_path)
            for row in pd.read_csv(csv_path).to_dict("records"):
                if row.get("kind") == "reference":
                    references.append(row)
                else:
                    done[row["id"]] = row
        replace_text(meta_path, json.dumps(meta, indent=1))
        return done, references
    if force:
        stamp = _dt.datetime.now().strftime("%Y%m%dT%H%M%S")
        for p in (csv_path, meta_path):
            if p.exists():
                p.rename(p.with_name(f"{p.name}.{stamp}"))
    try:
        write_new(meta_path, json.dumps(meta, indent=1))
    except FileExistsError:
        raise CalibrationError(f"{meta_path} appeared while this run started; another run is using this --out") from None
    if csv_path.exists():
        raise CalibrationError(f"{csv_path} appeared while this run started; another run is using this --out")
    return done, references


def _drift_corrected(table: pd.DataFrame, references: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any]]:
    from calibrate.quality import correct_drift, drift_factors

    factors, report = drift_factors(table, references)
    return (correct_drift(table, factors) if report.get("corrected") else table), report


def _no_meter_message(spec: str, exc: Exception) -> str:
    return (f"cannot open meter {spec!r}: {exc}; to calibrate without hardware, calibrate the simulator "
            "(labelled simulated everywhere): energyprof calibrate --meter sim:preset=desktop-cpu ...")


def _run_items(pending: list[PlanItem], meter: Any, protocol: Any, dev: torch.device, csv_path: Path,
               done: dict[str, dict[str, Any]], progress: bool, references: list[dict[str, Any]] | None = None,
               cooldown_s: float = 0.0) -> None:
    from calibrate.quality import REFERENCE

    references = [] if references is None else references
    session = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%f")
    reference_at = set(range(0, len(pending), REFERENCE_EVERY)) | {len(pending)} if pending else set()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    current = None
    idle = None
    try:
        with Progress(*columns, disable=not progress, transient=False) as bar:
            task = bar.add_task("calibrating", total=len(pending))
            for position, item in enumerate([*pending, None]):
                if position in reference_at:
                    ref = PlanItem(f"reference/{len(references)}", "reference", REFERENCE["workload"],
                                   REFERENCE["size"])
                    current = ref
                    bar.update(task, description="reference kernel")
                    if idle is None or meter.clock() - idle.measured_at > IDLE_EVERY_S:
                        idle = protocol.measure_idle(meter)
                    meter.sleep(cooldown_s)
                    row = _measure(ref, meter, protocol, dev, idle, session, time.monotonic())
                    _append(csv_path, row)
                    references.append(row)
                if item is None:
                    break
                current = item
                t0 = time.monotonic()
                if idle is None or meter.clock() - idle.measured_at > IDLE_EVERY_S:
                    bar.update(task, description="idle baseline")
                    idle = protocol.measure_idle(meter)
                meter.sleep(cooldown_s)
                bar.update(task, description=f"{item.id[:48]:<48}")
                for attempt in range(1, MEASURE_ATTEMPTS + 1):
                    row = _measure(item, meter, protocol, dev, idle, session, t0)
                    problem = row_problem(row)
                    if problem is None:
                        break
                    log.warning("measurement %s gave a row that cannot be fitted (%s); measuring it again (%d of %d)",
                                item.id, problem, attempt, MEASURE_ATTEMPTS)
                else:
                    raise CalibrationError(
                        f"measurement {item.id} gave a row that cannot be fitted {MEASURE_ATTEMPTS} times ({problem}); "
                        f"{len(done) + len(references)} finished measurements are saved in {csv_path}: give the meter longer windows "
                        "or a quieter machine, and continue with the same command and --resume")
                _append(csv_path, row)
                done[item.id] = row
                bar.advance(task)
    except KeyboardInterrupt:
        raise CalibrationInterrupted(
            f"interrupted during {current.id if current else '?'}; {len(done) + len(references)} finished measurements are saved "
            f"in {csv_path}: continue with the same command and --resume"
        ) from None
    except EnergyprofError as exc:
        raise CalibrationError(
            f"measurement {current.id if current else '?'} failed: {exc}\n{len(done) + len(references)} finished measurements are "
            f"saved in {csv_path}: fix the meter and continue with the same command and --resume"
        ) from None


def _measure(item: PlanItem, meter: Any, protocol: Any, dev: torch.device, idle: Any, session: str,
             t0: float) -> dict[str, Any]:
    if item.kind == "compensation-group":
        workload = CompensationGroup(item.sizes, dtype=item.dtype, seed=item.seed).setup(dev)
    else:
        workload = make_workload(item.workload, size=item.size, density=item.density, dtype=item.dtype,
                                 seed=item.seed).setup(dev)
    positions = workload.tensors_.get("positions")
    kept = int(positions.numel()) if positions is not None else 0
    lines = lines_touched(positions, itemsize_of(item.dtype)) if positions is not None else 0
    run = meter.simulate(workload) if hasattr(meter, "simulate") else workload
    result = protocol.measure(run, meter, idle=idle)
    retries = 0
    while retries < MAX_RETRIES and _disturbed(result):
        # one trial far from the others: a burst of foreign power (interference), not the kernel
        retries += 1
        again = protocol.measure(run, meter, idle=idle)
        if _trial_spread(again) < _trial_spread(result):
            result = again
    row = _row(item, workload, result, kept, lines, time.monotonic() - t0, idle)
    row.update(t_meter=float(meter.clock()), session=session, retries=retries)
    return row


MAX_RETRIES = 2  # re-measurements of a measurement whose trials disagree (interference)
DISTURBED = 0.15  # a trial this far (relative) from the median of its measurement's trials


def _trial_spread(result: Any) -> float:
    trials = result.table[result.table.role == "kernel"]["joules_per_call"].to_numpy(float)
    median = float(np.median(trials))
    return float(np.max(np.abs(trials - median)) / abs(median)) if len(trials) and median else math.inf


def _disturbed(result: Any) -> bool:
    """Does one trial stand far from the others (more than :data:`DISTURBED` from their median)?"""
    return len(result.table[result.table.role == "kernel"]) >= 3 and _trial_spread(result) > DISTURBED
