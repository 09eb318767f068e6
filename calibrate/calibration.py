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
import platform
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
import torch

from calibrate.fit import COUNT_COLUMNS, GlobalCostFit, LayerCostFit
from calibrate.profile import (
    Coefficients,
    DeviceProfile,
    Estimate,
    FitQuality,
    LayerCost,
    MeterRecord,
    ModelCosts,
    ProfileError,
    Provenance,
    save_profile,
)
from energyprof import __version__
from energyprof.costmodel import FEATURES, layer_costs_from_global, lines_touched
from energyprof.costmodel import LAYER_DENSITIES as LAYER_DENSITIES_ALL
from energyprof.errors import EnergyprofError
from energyprof.meters.spec import parse_spec
from energyprof.workloads import CompensationGroup, UpdatePhase, itemsize_of, make_workload
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

LAYER_DENSITIES = {"quick": LAYER_DENSITIES_ALL, "full": LAYER_DENSITIES_ALL}
SWEEP_SIZES = {"quick": (4**6, 4**8, 4**10, 4**12), "full": (4**7, 4**8, 4**9, 4**10, 4**11, 4**12, 4**13)}
SPARSE_SIZES = {"quick": (4**6, 4**8, 4**10, 4**12), "full": (4**7, 4**9, 4**11, 4**13)}
SPARSE_DENSITIES = (0.01, 0.2)
MIN_LAYER_NUMEL = {"quick": 16384, "full": 4096}
SPARSE_KERNELS = ("scatter", "pack", "residual", "runs", "update")
COMPUTE_KERNELS = ("sgd", "momentum", "adam", "fma", "compensation")


IDLE_EVERY_S = 120.0  # the shared idle baseline is re-measured after this much meter time
REFERENCE_EVERY = 10  # the reference kernel is re-measured after this many measurements
MEASURE_ATTEMPTS = 3  # a measurement whose row is not finite (NaN, inf) is taken again, at most this often
log = logging.getLogger(__name__)


def protocol_settings(quick: bool) -> dict[str, Any]:
    """The measurement protocol's parameters for a calibration (recorded in the profile). The idle
    baseline is shared: measured at the start and again every ``IDLE_EVERY_S`` of meter time."""
    if quick:  # fewer measurements (see the plan), each with longer windows
        return dict(min_window_s=0.5, min_periods=5, min_calls=32, trials=3, idle_windows=10, warmup_s=0.05)
    return dict(min_window_s=0.3, min_periods=3, min_calls=32, trials=3, idle_windows=10, warmup_s=0.05)


# ---------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class PlanItem:
    """One measurement: a workload sweep point or a layer replay at one density."""

    id: str
    kind: str  # "sweep" or "layer"
    workload: str
    size: int
    dtype: str = "float32"
    density: float | None = None
    model: str | None = None
    tensors: tuple[str, ...] = field(default=())  # the tensors this replay prices (same numel, dtype)
    sizes: tuple[int, ...] = field(default=())  # a compensation group: each tensor's entries (same order)

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode()) & 0x7FFFFFFF


@dataclass
class ModelPlan:
    label: str
    shapes: dict[str, tuple[list[int], str]]  # tensor -> (shape, dtype)
    groups: dict[tuple[int, str], list[str]]  # (numel, dtype) -> tensors
    measured: dict[tuple[int, str], list[PlanItem]]  # groups that are replayed
    too_small: list[tuple[int, str]]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def build_plan(models: dict[str, torch.nn.Module], quick: bool = False,
               min_layer_numel: int | None = None) -> tuple[list[PlanItem], dict[str, ModelPlan]]:
    mode = "quick" if quick else "full"
    items: list[PlanItem] = []
    for size in SWEEP_SIZES[mode]:
        for name in COMPUTE_KERNELS:
            items.append(PlanItem(f"sweep/{name}/n={size}", "sweep", name, size))
    for size in SPARSE_SIZES[mode]:
        for name in SPARSE_KERNELS:
            for d in SPARSE_DENSITIES:
                items.append(PlanItem(f"sweep/{name}/n={size}/d={d:g}", "sweep", name, size, density=d))
    min_numel = MIN_LAYER_NUMEL[mode] if min_layer_numel is None else min_layer_numel
    model_plans: dict[str, ModelPlan] = {}
    for label, module in models.items():
        shapes = {n: (list(p.shape), _dtype_name(p.dtype)) for n, p in module.named_parameters()}
        groups: dict[tuple[int, str], list[str]] = {}
        for n, p in module.named_parameters():
            groups.setdefault((p.numel(), _dtype_name(p.dtype)), []).append(n)
        measured, too_small = {}, []
        for (numel, dtype), tensors in groups.items():
            if numel < min_numel:
                too_small.append((numel, dtype))
                continue
            measured[(numel, dtype)] = [
                PlanItem(f"layer/{label}/{tensors[0]}/d={d:g}", "layer", "update", numel, dtype, d, label, tuple(tensors))
                for d in LAYER_DENSITIES[mode]
            ] + [PlanItem(f"layer/{label}/{tensors[0]}/compensation", "compensation", "compensation", numel, dtype,
                          None, label, tuple(tensors))]
            items.extend(measured[(numel, dtype)])
        small: dict[str, list[str]] = {}
        for numel, dtype in too_small:
            small.setdefault(dtype, []).extend(groups[(numel, dtype)])
        for dtype, tensors in small.items():  # measured together: one replay, one launch per tensor
            sizes = tuple(math.prod(shapes[n][0]) for n in tensors)
            items.append(PlanItem(f"layer/{label}/small-{dtype}/compensation", "compensation-group", "compensation-group",
                                  sum(sizes), dtype, None, label, tuple(tensors), sizes))
        model_plans[label] = ModelPlan(label, shapes, groups, measured, too_small)
    return items, model_plans


def estimate_seconds(items: list[PlanItem], settings: dict[str, Any], update_period_s: float | None) -> float:
    """Wall time of a plan on a real meter, from the protocol's settings (kernel windows, idle
    windows, warm-up, one update period per window for alignment): the plan the README states."""
    period = update_period_s or 0.0
    window = max(settings["min_window_s"], settings["min_periods"] * period)
    per = settings["warmup_s"] + settings["trials"] * (window + 2 * period)
    total = len(items) * per
    return total + (1 + total // IDLE_EVERY_S) * settings["idle_windows"] * window


def reference_count(n_items: int) -> int:
    """How many times a plan of ``n_items`` measures the reference kernel (first, every
    :data:`REFERENCE_EVERY`, last)."""
    return 0 if n_items == 0 else 2 + (n_items - 1) // REFERENCE_EVERY


def extra_seconds(n_items: int, settings: dict[str, Any], update_period_s: float | None,
                  cooldown_s: float = 0.0) -> dict[str, float]:
    """What the reference kernel and the cool-downs add to a plan's time (seconds)."""
    refs = reference_count(n_items)
    period = update_period_s or 0.0
    window = max(settings["min_window_s"], settings["min_periods"] * period)
    per = settings["warmup_s"] + settings["trials"] * (window + 2 * period)
    return {"references": refs, "reference_s": refs * per, "cooldown_s": (n_items + refs) * cooldown_s}


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


def _device_name(device: torch.device, info: Any) -> str:
    if info.simulated:
        return f"simulated: {info.details.get('preset', '?')} preset (kernels ran on {device})"
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
        profile = _fit_profile(table, items, model_plans, out, spec, info, dev, settings, quick, fit_started)
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
    return (f"cannot open meter {spec!r}: {exc}\nTo calibrate without hardware, calibrate the simulator "
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


# ---------------------------------------------------------------------------- the fit
def _estimate(value: float, low: float, high: float) -> Estimate:
    return Estimate(value=float(value), ci_low=float(min(low, value)), ci_high=float(max(high, value)))


def _fit_profile(table: pd.DataFrame, items: list[PlanItem], model_plans: dict[str, ModelPlan], out: Path,
                 spec: str, info: Any, dev: torch.device, settings: dict[str, Any], quick: bool,
                 fit_started: float) -> DeviceProfile:
    sweep = table[table.kind == "sweep"].reset_index(drop=True)
    glob = GlobalCostFit().fit(sweep)
    glob.sweep_working_sets_ = sweep["working_set_bytes"].to_numpy(float)
    iv = glob.intervals()
    e = {f: _estimate(*iv[f]) for f in FEATURES}
    coefficients = Coefficients(
        static_power_w=_estimate(glob.static_power_w_, *glob.static_power_ci_),
        j_per_call=e["calls"],
        j_per_byte_read={"cache": e["read_cache"], "dram": e["read_dram"]},
        j_per_byte_written={"cache": e["write_cache"], "dram": e["write_dram"]},
        j_per_line_written={"cache": e["lines_cache"], "dram": e["lines_dram"]},
        j_per_flop=e["flops"],
        cache_bytes=max(1, round(glob.cache_bytes_)),
        transition_octaves=glob.transition_octaves_,
        fit=FitQuality(r2=glob.r2_, cv_mape=glob.cv_mape_, n_measurements=glob.n_measurements_),
    )
    layer_rows = table[table.kind == "layer"]
    compensation_rows = table[table.kind.isin(["compensation", "compensation-group"])]
    models: dict[str, ModelCosts] = {}
    for label, plan in model_plans.items():
        costs: dict[str, LayerCost] = {}
        for (numel, dtype), tensors in plan.groups.items():
            entry = _layer_entry(glob, layer_rows, plan, numel, dtype, tensors)
            entry.update(_compensation_entry(glob, compensation_rows, plan, numel, dtype))
            for name in tensors:
                shape, _ = plan.shapes[name]
                costs[name] = LayerCost(name=name, shape=shape, dtype=dtype, numel=numel, **entry)
        models[label] = ModelCosts(
            description=(f"{label}: per tensor, the compensation every round pays (energyprof.workloads.Compensation) "
                         "and the masked update phase a non-empty mask adds (energyprof.workloads.UpdatePhase)"),
            layers=[costs[name] for name in plan.shapes],
        )
    quality, reason, residuals = _judge(table, sweep, glob, coefficients, models, model_plans, settings)
    record = MeterRecord(backend=info.backend, scope=info.scope, kind=info.kind,
                         update_period_s=info.update_period_s, averaging_window_s=info.averaging_window_s,
                         resolution_j=info.resolution_j, simulated=info.simulated, details=dict(info.details))
    driver = info.details.get("driver_version") if isinstance(info.details, dict) else None
    label = "SIMULATED: " if info.simulated else ""
    method = (f"{label}energyprof calibrate{' --quick' if quick else ''}: {len(table)} protocol measurements, "
              "global coefficients by non-negative least squares (scikit-learn) over a workload sweep, per-layer "
              "costs from update-phase replays at several densities and compensation replays (a model's small tensors "
              "together)")
    return DeviceProfile(
        name=_profile_name(out),
        simulated=bool(info.simulated),
        provenance=Provenance(
            device=_device_name(dev, info), driver=str(driver) if driver else None, host=platform.node() or "?",
            toolkit_version=__version__, torch_version=torch.__version__, meter_spec=spec, meter=record,
            protocol=dict(settings, plan="quick" if quick else "full"),
            created=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0),
            # measuring (every row's own wall time, across resumed runs) plus this fit
            wall_time_s=round(float(pd.to_numeric(table.get("wall_s"), errors="coerce").fillna(0).sum())
                              + time.monotonic() - fit_started, 1), method=method,
        ),
        coefficients=coefficients,
        models=models,
        quality=quality,
        quality_reason=reason,
        fit_residuals=residuals,
    )


def _judge(table: pd.DataFrame, sweep: pd.DataFrame, glob: GlobalCostFit, coefficients: Coefficients,
           models: dict[str, ModelCosts], model_plans: dict[str, ModelPlan],
           settings: dict[str, Any]) -> tuple[str, str | None, dict[str, Any]]:
    """The fit's residuals by feature, and the calibration's quality (:mod:`calibrate.quality`)."""
    from calibrate.quality import assess, residual_bins

    y = table["joules_per_call"].to_numpy(float)
    se_rel = _standard_error(table) / np.where(y != 0, np.abs(y), 1.0)
    residual = np.full(len(table), np.nan)
    is_sweep = (table["kind"] == "sweep").to_numpy()
    is_layer = (table["kind"] == "layer").to_numpy()
    residual[is_sweep] = glob.residuals_rel_
    for i in np.flatnonzero(is_layer):
        row = table.iloc[i]
        costs = {layer.name: layer for layer in models[row["model"]].layers}
        layer = costs[str(row["tensors"]).split(";")[0]]
        residual[i] = layer.joules(int(row["kept"]), int(row["lines"])) / row["joules_per_call"] - 1
    points = pd.DataFrame({"residual": residual, "se": se_rel,
                           "working_set_bytes": table["working_set_bytes"].to_numpy(float),
                           "density": pd.to_numeric(table["density"], errors="coerce").to_numpy(float),
                           "layer_numel": np.where(is_layer, table["size"].to_numpy(float), np.nan)})
    bins = residual_bins(points)
    counts = {}
    for label, plan in model_plans.items():
        measured = {(layer.numel, layer.dtype) for layer in models[label].layers if layer.method == "measured"}
        counts[label] = (len(measured), len(plan.measured))
    dram_zero = []
    if float(sweep["working_set_bytes"].max()) > 2 * coefficients.cache_bytes:
        for name, est in (("j_per_byte_read.dram", coefficients.j_per_byte_read["dram"]),
                          ("j_per_byte_written.dram", coefficients.j_per_byte_written["dram"])):
            if est.value <= 0:
                dram_zero.append(name)
    spread = float(np.nanmedian(1.96 * se_rel))
    drift = (settings.get("reference") or {}).get("drift")
    window = max(settings["min_window_s"], 0.0)
    quality, reason = assess(glob.cv_mape_, counts, dram_zero, spread, drift, window)
    return quality, reason, bins


def _profile_name(out: Path) -> str:
    stem = out.name.split(".")[0] or "profile"
    clean = "".join(c if c.isalnum() or c in "._-" else "-" for c in stem).lstrip("._-")
    return clean or "profile"


def _layer_entry(glob: GlobalCostFit, rows: pd.DataFrame, plan: ModelPlan, numel: int, dtype: str,
                 tensors: list[str]) -> dict[str, Any]:
    if (numel, dtype) in plan.too_small:
        return _predicted_entry(glob, numel, dtype, f"{numel} entries: too small to resolve in reasonable time; "
                                "predicted from the global coefficients")
    group = rows[(rows["model"] == plan.label) & (rows["size"] == numel) & (rows["dtype"] == dtype)]
    if len(group) < 5:
        return _predicted_entry(glob, numel, dtype, "fewer than five replays measured; predicted from the "
                                "global coefficients")
    fit = LayerCostFit(model_error=_model_error(glob, 2 * numel * itemsize_of(dtype))).fit(group["kept"], group["lines"], group["joules_per_call"],
                                                      _standard_error(group), numel)
    if not fit.resolved():
        why = ("the meter did not resolve its cost curve" if fit.band_ > 0.10 else
               "the per-layer curve cannot follow its replays (the device does what the cost model does not)")
        return _predicted_entry(glob, numel, dtype, (
            f"{why} (95 % band +-{fit.band_:.1%}, fit error {fit.rmse_rel_:.1%}; at most 10 % each); predicted "
            "from the global coefficients"))
    if fit.joules_per_update_ + fit.joules_per_line_ <= 0:  # a kept entry may be priced by its lines alone
        return _predicted_entry(glob, numel, dtype, "the fit found no per-entry or per-line cost; predicted from "
                                "the global coefficients")
    lo, hi = fit.coef_low_, fit.coef_high_
    return dict(
        fixed_j=fit.fixed_j_, fixed_ci_low=lo[0], fixed_ci_high=hi[0],
        joules_per_update=fit.joules_per_update_, ci_low=lo[1], ci_high=hi[1],
        joules_per_line=fit.joules_per_line_, line_ci_low=lo[2], line_ci_high=hi[2],
        joules_per_update_density=fit.joules_per_update_density_, density_ci_low=lo[3], density_ci_high=hi[3],
        method="measured", r2=fit.r2_, rmse_rel=fit.rmse_rel_, n_windows=int(group["windows"].sum()),
        densities=sorted(float(d) for d in group["density"]),
        measured_as=str(group["tensors"].iloc[0]).split(";")[0],
    )


def _compensation_entry(glob: GlobalCostFit, rows: pd.DataFrame, plan: ModelPlan, numel: int,
                        dtype: str) -> dict[str, Any]:
    """The layer's compensation: its own replay's joules per call and interval where it was measured;
    for a tensor too small for its own, its share of the small tensors' replay (measured together,
    shared in proportion to the global coefficients' prediction of each); else predicted from the
    global coefficients (with the bootstrap's interval)."""
    if (numel, dtype) in plan.too_small:
        together = _compensation_together(glob, rows, plan, numel, dtype)
        if together is not None:
            return together
    rows = rows[rows["kind"] == "compensation"]
    group = rows[(rows["model"] == plan.label) & (rows["size"] == numel) & (rows["dtype"] == dtype)]
    values = pd.to_numeric(group.get("joules_per_call"), errors="coerce") if len(group) else pd.Series([], dtype=float)
    if len(group) and np.isfinite(values.iloc[0]) and values.iloc[0] > 0:
        row = group.iloc[0]
        j = float(row["joules_per_call"])
        return dict(compensation_j=j, compensation_ci_low=min(j, max(0.0, float(row["ci_low_j"]))),
                    compensation_ci_high=max(j, float(row["ci_high_j"])), compensation_method="measured")
    point = layer_costs_from_global(glob.coefficients(), numel, dtype).compensation_j
    samples = [layer_costs_from_global(glob.coefficients(v), numel, dtype).compensation_j
               for v in glob.bootstrap_coef_[:100]]
    lo, hi = np.quantile(samples, [0.025, 0.975]) if samples else (point, point)
    return dict(compensation_j=point, compensation_ci_low=min(point, float(lo)),
                compensation_ci_high=max(point, float(hi)), compensation_method="predicted")


def _compensation_together(glob: GlobalCostFit, rows: pd.DataFrame, plan: ModelPlan, numel: int,
                           dtype: str) -> dict[str, Any] | None:
    row = rows[(rows["kind"] == "compensation-group") & (rows["model"] == plan.label) & (rows["dtype"] == dtype)]
    if not len(row):
        return None
    row = row.iloc[0]
    total = float(row["joules_per_call"])
    if not (np.isfinite(total) and total > 0):
        return None
    sizes = [n for (n, d) in plan.too_small if d == dtype for _ in plan.groups[(n, d)]]
    coefficients = glob.coefficients()
    predicted = {n: layer_costs_from_global(coefficients, n, dtype).compensation_j for n in set(sizes)}
    share = predicted[numel] / sum(predicted[n] for n in sizes)
    lo, hi = max(0.0, float(row["ci_low_j"])), float(row["ci_high_j"])
    return dict(compensation_j=total * share, compensation_ci_low=min(total, lo) * share,
                compensation_ci_high=max(total, hi) * share, compensation_method="measured-together")


def _standard_error(rows: pd.DataFrame) -> np.ndarray:
    """Each replay's standard error: the protocol's 95 % interval read as +-1.96 sigma (it already
    holds the t quantile of few trials and the idle baseline's share), or the trials' own spread."""
    from_ci = (rows["ci_high_j"] - rows["ci_low_j"]).to_numpy(float) / (2 * 1.96)
    return np.maximum(from_ci, rows["se_j"].to_numpy(float))


def _model_error(glob: GlobalCostFit, working_set_bytes: float) -> float:
    """How wrong the cost model is near ``working_set_bytes``: the global fit's cross-validated error,
    or the RMS of its relative residuals over the sweep points within a factor 4 of that working set
    (small kernels, mostly launches, are where a device's kernel-dependent launches show)."""
    ws = getattr(glob, "sweep_working_sets_", None)
    if ws is None or not len(ws):
        return glob.cv_mape_
    near = np.abs(np.log2(ws / max(working_set_bytes, 1.0))) <= 2.0
    local = float(np.sqrt(np.mean(glob.residuals_rel_[near] ** 2))) if near.any() else 0.0
    return max(glob.cv_mape_, local)


def _predicted_entry(glob: GlobalCostFit, numel: int, dtype: str, reason: str) -> dict[str, Any]:
    point = layer_costs_from_global(glob.coefficients(), numel, dtype)
    samples = np.array([
        [c.fixed_j, c.joules_per_update, c.joules_per_line, c.joules_per_update_density]
        for c in (layer_costs_from_global(glob.coefficients(v), numel, dtype) for v in glob.bootstrap_coef_[:100])
    ])
    lo, hi = np.quantile(samples, 0.025, axis=0), np.quantile(samples, 0.975, axis=0)
    jpu = point.joules_per_update
    values = (point.fixed_j, jpu, point.joules_per_line, point.joules_per_update_density)
    # and what the cost model cannot represent on this device: the global fit's cross-validated error, or
    # its residuals' RMS among the sweep's kernels of similar working sets (within a factor 4) if larger
    error = min(_model_error(glob, 2 * numel * itemsize_of(dtype)), 0.5)
    lo, hi = np.minimum(lo, values) * (1 - error), np.maximum(hi, values) * (1 + error)
    return dict(
        fixed_j=values[0], fixed_ci_low=lo[0], fixed_ci_high=hi[0],
        joules_per_update=values[1], ci_low=lo[1], ci_high=hi[1],
        joules_per_line=values[2], line_ci_low=lo[2], line_ci_high=hi[2],
        joules_per_update_density=values[3], density_ci_low=lo[3], density_ci_high=hi[3],
        method="predicted", reason=reason,
    )
