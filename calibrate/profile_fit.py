"""From a calibration's measurements to a device profile: the global fit, its quality, and each
model's per-layer table (measured curves, compensation replays, or predictions from the global
coefficients where a layer was not measured or not resolved). Called by
:func:`calibrate.calibration.calibrate` once every measurement is in.
"""


from __future__ import annotations

import datetime as _dt
import logging
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from calibrate.fit import GlobalCostFit, LayerCostFit
from calibrate.plan import ModelPlan, PlanItem
from calibrate.profile import (
    Coefficients,
    DeviceProfile,
    Estimate,
    FitQuality,
    LayerCost,
    MeterRecord,
    ModelCosts,
    Provenance,
)
from energyprof import __version__
from energyprof.costmodel import FEATURES, layer_costs_from_global
from energyprof.workloads import itemsize_of

__all__ = ["fit_profile"]


log = logging.getLogger(__name__)
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



def _estimate(value: float, low: float, high: float) -> Estimate:
    return Estimate(value=float(value), ci_low=float(min(low, value)), ci_high=float(max(high, value)))


def fit_profile(table: pd.DataFrame, items: list[PlanItem], model_plans: dict[str, ModelPlan], out: Path,
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

