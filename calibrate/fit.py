"""The fit: scikit-learn estimators that turn measurement tables into cost coefficients.

:class:`GlobalCostFit` fits the device's global coefficients (joules per launch, per byte read and
written and per scattered-written line at each memory level, per FLOP) to a sweep of workloads, and
finds the cache-to-DRAM transition (its centre and width) from the data. :class:`LayerCostFit` fits
one layer's ``fixed_j``, ``joules_per_update`` and ``joules_per_line`` to replays of its update
phase at several densities. Both follow scikit-learn's conventions (``__init__`` stores parameters,
``fit`` returns self, fitted attributes end in ``_``), use non-negative least squares
(``LinearRegression(positive=True)``) weighted for relative error, and give 95 % intervals.

The features and the prediction come from :mod:`energyprof.costmodel`; nothing here prices work.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from scipy.optimize import minimize_scalar
from sklearn.linear_model import LinearRegression
from sklearn.model_selection import KFold

from energyprof.costmodel import FEATURES, CostCoefficients, feature_matrix, layer_design, layer_joules, predict_joules
from energyprof.counts import WorkCounts

__all__ = ["GlobalCostFit", "LayerCostFit", "counts_of_rows", "COUNT_COLUMNS"]

COUNT_COLUMNS = tuple(WorkCounts.__dataclass_fields__)


OPTIONAL_COUNT_COLUMNS = ("pages_written", "line_runs_written")  # newer; the cost model does not use them


def counts_of_rows(table: pd.DataFrame) -> list[WorkCounts]:
    """The per-call :class:`WorkCounts` of each row of a measurement table (tables written before
    the optional columns existed read them as 0: not known)."""
    missing = [c for c in COUNT_COLUMNS if c not in table.columns and c not in OPTIONAL_COUNT_COLUMNS]
    if missing:
        raise ValueError(f"the measurement table lacks the count columns {', '.join(missing)}")
    present = [c for c in COUNT_COLUMNS if c in table.columns]
    return [WorkCounts(**{c: int(row[c]) for c in present}) for _, row in table.iterrows()]


def _nnls(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted non-negative least squares with column scaling (features span 1 .. 1e10)."""
    scale = np.sqrt((x**2).mean(axis=0))
    scale[scale == 0] = 1.0
    reg = LinearRegression(positive=True, fit_intercept=False).fit(x / scale, y, sample_weight=w)
    return reg.coef_ / scale


def _weights(y: np.ndarray) -> np.ndarray:
    """Relative-error weights: energies span orders of magnitude, and so do their errors."""
    floor = max(float(np.median(np.abs(y))) * 1e-3, 1e-300)
    return 1.0 / np.maximum(np.abs(y), floor) ** 2


def _interval(samples: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    a = (1 - confidence) / 2
    return np.quantile(samples, a, axis=0), np.quantile(samples, 1 - a, axis=0)


class GlobalCostFit:
    """Fit the cost model's global coefficients to a table of protocol results.

    ``table`` has one row per measured workload: the per-call count columns of
    :class:`~energyprof.counts.WorkCounts`, ``joules_per_call`` (above idle) and ``idle_power_w``.

    Parameters: ``transition_grid`` (candidate widths in octaves, 0 = step), ``centres_per_octave``
    (resolution of the search for the cache size between the smallest and largest working set),
    ``n_bootstrap`` (resamples of the rows, each row redrawn from its own interval when the table
    has ``ci_low_j``/``ci_high_j``, for the intervals), ``cv`` (folds for the
    cross-validated error), ``confidence`` and ``random_state``.
    """

    def __init__(
        self,
        transition_grid: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0),
        centres_per_octave: int = 4,
        n_bootstrap: int = 300,
        cv: int = 5,
        confidence: float = 0.95,
        random_state: int | None = 0,
    ) -> None:
        self.transition_grid = transition_grid
        self.centres_per_octave = centres_per_octave
        self.n_bootstrap = n_bootstrap
        self.cv = cv
        self.confidence = confidence
        self.random_state = random_state

    def fit(self, table: pd.DataFrame) -> "GlobalCostFit":
        if len(table) < len(FEATURES) + 2:
            raise ValueError(
                f"the global fit needs at least {len(FEATURES) + 2} measurements, got {len(table)}; "
                "run the calibration's workload sweep"
            )
        counts = counts_of_rows(table)
        y = table["joules_per_call"].to_numpy(float)
        w = _weights(y)
        ws = np.array([c.working_set_bytes for c in counts], float)
        lo, hi = math.log2(ws.min()), math.log2(ws.max())
        centres = 2.0 ** np.arange(lo, hi + 1e-9, 1.0 / self.centres_per_octave)
        best: tuple[float, float, float, np.ndarray] | None = None
        for width in self.transition_grid:
            for centre in centres:
                x = feature_matrix(counts, centre, width)
                coef = _nnls(x, y, w)
                sse = float((w * (x @ coef - y) ** 2).sum())
                if best is None or sse < best[0] * (1 - 1e-9):
                    best = (sse, float(centre), float(width), coef)
        assert best is not None
        _, centre, width, _ = best
        step = 1.0 / self.centres_per_octave

        def sse_at(log2_centre: float) -> float:
            x = feature_matrix(counts, 2.0**log2_centre, width)
            coef = _nnls(x, y, w)
            return float((w * (x @ coef - y) ** 2).sum())

        refined = minimize_scalar(sse_at, bounds=(math.log2(centre) - step, math.log2(centre) + step),
                                  method="bounded", options={"xatol": 1e-4})
        if refined.success and refined.fun <= best[0]:
            centre = 2.0 ** float(refined.x)
        self.cache_bytes_, self.transition_octaves_ = centre, width
        self.coef_ = _nnls(feature_matrix(counts, centre, width), y, w)
        x = feature_matrix(counts, self.cache_bytes_, self.transition_octaves_)
        pred = x @ self.coef_
        self.r2_ = float(1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum())
        self.residuals_rel_ = (pred - y) / y
        self.cv_mape_ = self._cross_validated_mape(x, y, w)
        rng = np.random.default_rng(self.random_state)
        # each measurement's own uncertainty (its protocol interval read as +-1.96 sigma), when known
        se = ((table["ci_high_j"] - table["ci_low_j"]).to_numpy(float) / (2 * 1.96)
              if {"ci_low_j", "ci_high_j"} <= set(table.columns) else np.zeros(len(y)))
        boots = np.empty((self.n_bootstrap, len(FEATURES)))
        for b in range(self.n_bootstrap):
            # resample the measurements, and redraw each from its own interval: the spread of the
            # fit over both is the interval (a pairs bootstrap alone misses the noise of few rows)
            idx = rng.integers(0, len(y), len(y))
            boots[b] = _nnls(x[idx], y[idx] + rng.normal(0.0, 1.0, len(y)) * se[idx], w[idx])
        self.bootstrap_coef_ = boots
        low, high = _interval(boots, self.confidence)
        # small-sample correction of the percentile interval: Student t with n - p degrees of freedom
        # and the n / (n - p) variance inflation of a fit with p parameters
        n, p = len(y), len(FEATURES)
        widen = float(stats.t.ppf(0.5 + self.confidence / 2, n - p) / stats.norm.ppf(0.5 + self.confidence / 2)
                      * math.sqrt(n / (n - p)))
        self.coef_low_ = np.maximum(0.0, np.minimum(self.coef_ - widen * (self.coef_ - low), self.coef_))
        self.coef_high_ = np.maximum(self.coef_ + widen * (high - self.coef_), self.coef_)
        # the idle baseline is shared by many measurements: one value per baseline, not per row
        baselines = table.drop_duplicates("idle_power_w")
        idle = baselines["idle_power_w"].to_numpy(float)
        self.static_power_w_ = float(np.mean(idle))
        z = float(stats.norm.ppf(0.5 + self.confidence / 2))
        if "idle_se_w" in baselines and baselines["idle_se_w"].notna().all():
            # each baseline's own standard error (its windows), for the mean of the baselines; Student t
            # with the windows' degrees of freedom (few windows estimate their spread poorly)
            dof = float((baselines["idle_windows"] - 1).sum()) if "idle_windows" in baselines else math.inf
            q = float(stats.t.ppf(0.5 + self.confidence / 2, dof)) if math.isfinite(dof) and dof > 0 else z
            half = q * float(np.sqrt((baselines["idle_se_w"].to_numpy(float) ** 2).sum())) / len(idle)
        elif len(idle) > 1:
            half = float(stats.t.ppf(0.5 + self.confidence / 2, len(idle) - 1)) * float(np.std(idle, ddof=1)) / math.sqrt(len(idle))
        else:
            half = 0.0
        self.static_power_ci_ = (self.static_power_w_ - half, self.static_power_w_ + half)
        self.n_measurements_ = len(y)
        return self

    def _cross_validated_mape(self, x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
        folds = KFold(n_splits=min(self.cv, len(y)), shuffle=True, random_state=self.random_state)
        errors = []
        for train, test in folds.split(x):
            coef = _nnls(x[train], y[train], w[train])
            errors.extend(np.abs(x[test] @ coef - y[test]) / np.abs(y[test]))
        return float(np.mean(errors))

    def coefficients(self, vector: Any = None) -> CostCoefficients:
        """The fitted coefficients (or another vector, e.g. a bootstrap sample) for the cost model."""
        return CostCoefficients.from_vector(
            self.coef_ if vector is None else vector, round(self.cache_bytes_), self.transition_octaves_,
            self.static_power_w_,
        )

    def predict(self, table: pd.DataFrame) -> np.ndarray:
        """Joules per call above idle of each row's counts, through the cost model."""
        coefficients = self.coefficients()
        return np.array([predict_joules(c, coefficients) for c in counts_of_rows(table)])

    def intervals(self) -> dict[str, tuple[float, float, float]]:
        """Feature name -> (value, low, high)."""
        return {f: (float(v), float(lo), float(hi))
                for f, v, lo, hi in zip(FEATURES, self.coef_, self.coef_low_, self.coef_high_)}


class LayerCostFit:
    """Fit one layer's ``fixed_j``, ``joules_per_update``, ``joules_per_line`` and
    ``joules_per_update_density`` (the per-layer model of :mod:`energyprof.costmodel`).

    ``fit(kept, lines, joules, se, numel)`` takes, per replay, the kept entries, the 64-byte lines
    they touch, the joules per call above idle and its standard error. Weighted non-negative least
    squares; 95 % intervals by parametric bootstrap from each replay's own uncertainty; ``r2_`` and
    ``rmse_rel_`` say how well the curve fits.

    ``model_error`` (relative, default 0) is how wrong the cost model itself is on this device, as
    the calibration estimates it (the global fit's cross-validated error): the coefficients'
    intervals are bootstrapped from each replay's noise and this error together, so that they
    cover what the model cannot represent; ``band_`` (whether the meter resolved the curve) comes
    from the noise alone."""

    def __init__(self, n_bootstrap: int = 300, confidence: float = 0.95, random_state: int | None = 0,
                 model_error: float = 0.0) -> None:
        self.n_bootstrap = n_bootstrap
        self.confidence = confidence
        self.random_state = random_state
        self.model_error = model_error

    def fit(self, kept: Any, lines: Any, joules: Any, se: Any, numel: int) -> "LayerCostFit":
        y = np.asarray(joules, float)
        s = np.asarray(se, float)
        if len(y) < 5:
            raise ValueError(f"a layer fit needs replays at five or more densities, got {len(y)}")
        self.numel_ = int(numel)
        x = layer_design(kept, lines, numel)
        sd = np.sqrt(s**2 + (1e-3 * np.abs(y)) ** 2)
        sd[sd == 0] = max(float(np.abs(y).max()) * 1e-6, 1e-300)
        w = 1.0 / sd**2
        self.coef_ = _nnls(x, y, w)
        pred = x @ self.coef_
        ss_tot = float(((y - y.mean()) ** 2).sum())
        self.r2_ = float(1 - ((y - pred) ** 2).sum() / ss_tot) if ss_tot > 0 else 1.0
        self.rmse_rel_ = float(np.sqrt(np.mean(((pred - y) / np.where(y != 0, y, 1)) ** 2)))
        rng = np.random.default_rng(self.random_state)
        boots = np.empty((self.n_bootstrap, x.shape[1]))
        for b in range(self.n_bootstrap):
            boots[b] = _nnls(x, y + rng.normal(0.0, 1.0, len(y)) * s, w)
        wide = boots
        if self.model_error > 0:
            s_model = np.sqrt(s**2 + (self.model_error * y) ** 2)
            wide = np.array([_nnls(x, y + rng.normal(0.0, 1.0, len(y)) * s_model, w) for _ in range(self.n_bootstrap)])
        low, high = _interval(wide, self.confidence)
        self.coef_low_ = np.minimum(low, self.coef_)
        self.coef_high_ = np.maximum(high, self.coef_)
        band_low, band_high = _interval(boots @ x.T, self.confidence)
        self.band_ = float(np.max((band_high - band_low) / 2 / np.maximum(np.abs(pred), 1e-300)))
        (self.fixed_j_, self.joules_per_update_, self.joules_per_line_,
         self.joules_per_update_density_) = (float(v) for v in self.coef_)
        return self

    def predict(self, kept: Any, lines: Any) -> np.ndarray:
        """Joules of each (kept, lines) pair, through the cost model."""
        return np.array([layer_joules(self.fixed_j_, self.joules_per_update_, self.joules_per_line_, int(k), int(n),
                                      self.joules_per_update_density_, self.numel_)
                         for k, n in zip(np.atleast_1d(kept), np.atleast_1d(lines))])

    def resolved(self, max_rel_error: float = 0.10) -> bool:
        """Does the fitted curve pin the layer's cost down: across the measured densities, is the
        95 % band of its prediction within ``max_rel_error`` of it, and does it fit the replays to
        ``max_rel_error``?"""
        return bool(self.rmse_rel_ <= max_rel_error and self.band_ <= max_rel_error)
