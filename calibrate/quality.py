"""What a calibration cannot explain, and whether it is good enough to use.

* :func:`drift_factors`: the reference kernel re-measured through a calibration gives the device's
  drift (thermal, DVFS) as a ratio to its mean; each measurement is divided by the ratio
  interpolated at its time (within one session of the meter's clock), and the drift is reported.
* :func:`residual_bins`: the fit's relative residuals binned against working-set size, density and
  layer size, each bin with its mean and 95 % interval (recorded in the profile).
* :func:`assess`: ``ok`` or ``poor`` with the reason, the likely cause and the remedy.

Thresholds (documented in docs/calibration.md): a cross-validated MAPE above
:data:`MAX_CV_MAPE`, a model none of whose replayed layers was resolved, or a main-memory
coefficient fitted to zero although the sweep reached beyond the cache make a calibration poor.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["MAX_CV_MAPE", "REFERENCE", "drift_factors", "correct_drift", "residual_bins", "assess"]

MAX_CV_MAPE = 0.15  # above this the global fit explains the sweep too poorly to price layers with
REFERENCE = {"workload": "sgd", "size": 4**10}  # the re-measured reference kernel (dense, DRAM-sized on small parts)
FEATURES = ("working_set_bytes", "density", "layer_numel")


def _smooth(values: np.ndarray) -> np.ndarray:
    """Running median of three: one reference hit by an interference burst does not move the drift."""
    if len(values) < 3:
        return values
    padded = np.concatenate([values[:1], values, values[-1:]])
    return np.median(np.lib.stride_tricks.sliding_window_view(padded, 3), axis=1)


def drift_factors(rows: pd.DataFrame, references: pd.DataFrame) -> tuple[np.ndarray, dict[str, Any]]:
    """Per row of ``rows``, the reference kernel's ratio to its mean at that row's time (1 where
    unknown), and a report: how many references, their range and spread."""
    factors = np.ones(len(rows))
    report: dict[str, Any] = {"workload": f"{REFERENCE['workload']} n={REFERENCE['size']}",
                              "measurements": int(len(references))}
    if len(references) < 2 or "t_meter" not in rows or "t_meter" not in references:
        report["corrected"] = False
        return factors, report
    mean = float(references["joules_per_call"].mean())
    ratios = []
    for session, ref in references.groupby("session", sort=False):
        ref = ref.sort_values("t_meter")
        smooth = _smooth(ref["joules_per_call"].to_numpy(float)) / mean
        ratios.extend(smooth)
        mask = (rows["session"] == session).to_numpy()
        if mask.any() and len(ref) >= 2:
            factors[mask] = np.interp(rows.loc[mask, "t_meter"].to_numpy(float), ref["t_meter"].to_numpy(float), smooth)
    ratios = np.asarray(ratios)
    report.update(corrected=True, drift=float(ratios.max() / ratios.min() - 1.0),
                  first_to_last=float(ratios[-1] / ratios[0] - 1.0))
    return factors, report


def correct_drift(table: pd.DataFrame, factors: np.ndarray) -> pd.DataFrame:
    """``table`` with each measurement divided by its drift factor."""
    out = table.copy()
    for column in ("joules_per_call", "ci_low_j", "ci_high_j", "se_j"):
        if column in out:
            out[column] = out[column].to_numpy(float) / factors
    out["drift_factor"] = factors
    return out


def _bins(x: np.ndarray, r: np.ndarray, se: np.ndarray, log_base: float | None) -> list[dict[str, Any]]:
    keep = np.isfinite(x) & np.isfinite(r) & (x > 0)
    x, r, se = x[keep], r[keep], se[keep]
    if not len(x):
        return []
    keys = np.floor(np.log(x) / math.log(log_base) + 1e-9) if log_base else x
    out = []
    for key in np.unique(keys):
        m = keys == key
        n = int(m.sum())
        mean = float(r[m].mean())
        spread = float(r[m].std(ddof=1)) / math.sqrt(n) if n > 1 else 0.0
        noise = float(np.sqrt((se[m] ** 2).sum())) / n
        half = 1.96 * max(spread, noise)
        centre = float(np.exp(np.log(x[m]).mean()))
        out.append({"x": centre, "n": n, "mean": mean, "ci_low": mean - half, "ci_high": mean + half})
    return out


def residual_bins(points: pd.DataFrame) -> dict[str, list[dict[str, Any]]]:
    """``points`` has ``residual`` (relative: predicted / measured - 1), ``se`` (its standard error)
    and the feature columns; returns per feature its bins (factor-4 bins of working set and layer
    size, one bin per density)."""
    r, se = points["residual"].to_numpy(float), points["se"].to_numpy(float)
    out = {}
    for feature, base in (("working_set_bytes", 4.0), ("density", None), ("layer_numel", 4.0)):
        if feature in points:
            bins = _bins(points[feature].to_numpy(float), r, se, base)
            if bins:
                out[feature] = bins
    return out


def assess(cv_mape: float, models: dict[str, tuple[int, int]], dram_zero: list[str],
           measurement_spread: float, drift: float | None, windows_s: float) -> tuple[str, str | None]:
    """``ok`` or ``poor`` and why. ``models``: label -> (layers measured, layers replayed);
    ``dram_zero``: main-memory coefficients fitted to zero; ``measurement_spread``: the median
    relative half-width of the measurements' intervals; ``drift``: the reference's range."""
    problems = []
    if cv_mape > MAX_CV_MAPE:
        problems.append(f"cross-validated MAPE {cv_mape:.1%} exceeds {MAX_CV_MAPE:.0%}")
    for label, (measured, replayed) in models.items():
        if replayed and not measured:
            problems.append(f"0 of {replayed} replayed layers of {label} were resolved (all predicted)")
    if dram_zero:
        problems.append(f"{', '.join(dram_zero)} fitted to zero although the sweep reached main memory")
    if not problems:
        return "ok", None
    if drift is not None and drift > 0.05:
        cause = (f"drift or interference (the reference kernel moved {drift:.0%} during the run); remedy: "
                 "--cooldown SECONDS between measurements, a quieter device, or a longer run")
    elif measurement_spread > 0.05:
        cause = (f"meter noise or windows too short (measurement intervals +-{measurement_spread:.0%}); remedy: "
                 "a full (not --quick) plan, longer windows, or a meter with finer resolution; on the simulator "
                 "use its virtual clock (the default; clock=real on a busy machine times the host, not the device)")
    else:
        cause = ("interference or a device the cost model cannot describe well; remedy: recalibrate on an idle "
                 "device, and check the fit's residuals (energyprof validate --report) for a trend")
    return "poor", "; ".join(problems) + f". Likely cause: {cause}"
