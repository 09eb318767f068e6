"""What a validation cannot explain: per-layer residuals against working-set size, density and
layer size, a plot of them, and a flag when they trend with a feature beyond their intervals.

A whole-mask replay touches every layer at once, so its error cannot say which layers are wrong.
:func:`measure_layers` therefore measures each layer's update phase on its own (the same protocol)
at a few densities, the same in every layer (:func:`uniform_masks`, random positions), next to the
profile's prediction for that layer. The pruner's own masks give each layer its own density (large
layers sparse, small ones dense), which would tie density to layer size and working set; equal
densities keep the features apart.

:func:`bias_flags` bins the relative residuals of those layers by each feature (factor-4 bins of
working set and layer size, one bin per density decade). A feature is flagged when its bins differ
from one another beyond their 95 % intervals (a weighted chi-square test of the bin means against
their common mean) or the layers that depart from the rest lie apart in that feature (a rank test,
:func:`_off_points_p`), either at p < :data:`ALPHA`, and the largest bin departs from the mean by
more than :data:`MIN_BIAS`: then the residuals trend with that feature, and the report names it with the bin
that departs most. Working set and layer size move together within one model (a layer's update
phase touches three tensors of its size); when both are flagged the report says so.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["FEATURES", "MIN_BIAS", "measure_layers", "bias_flags", "plot_residuals"]

FEATURES = {"working_set_bytes": "working-set size", "density": "density", "layer_numel": "layer size"}
MIN_BIAS = 0.03  # a departure smaller than this is not worth a flag, whatever its significance
ALPHA = 0.005  # each of the two tests (binned chi-square, off layers' ranks); at most 1 % for both


def uniform_masks(module: Any, densities: tuple[float, ...], seed: int) -> list[dict[str, Any]]:
    """For each density, a random mask of every parameter keeping ``max(1, round(d * n))`` entries."""
    import torch

    g = torch.Generator().manual_seed(seed + 7919)
    out = []
    for d in densities:
        masks = {}
        for name, p in module.named_parameters():
            k = max(1, round(d * p.numel()))
            flat = torch.zeros(p.numel(), dtype=torch.bool)
            flat[torch.randperm(p.numel(), generator=g)[:k]] = True
            masks[name] = flat.view(p.shape)
        out.append({"mask": "random", "ratio": d, "masks": masks})
    return out


def measure_layers(module: Any, masks: list[dict[str, Any]], cost_map: Any, meter: Any, protocol: Any,
                   idle: Any, dev: Any, seed: int, simulated: bool) -> list[dict[str, Any]]:
    """Each layer of each mask in ``masks`` measured on its own: one row per (mask, layer)."""
    from energyprof.replays import LayerReplay

    rows = []
    for m in masks:
        for name, mask in m["masks"].items():
            if not bool(mask.any()):
                continue
            replay = LayerReplay(module, {name: mask}, kernel="update", seed=seed).setup(dev)
            run = meter.simulate(replay) if hasattr(meter, "simulate") else replay
            result = protocol.measure(run, meter, idle=idle)
            predicted = cost_map.mask_joules({name: mask})  # the layer's update phase (the floor aside)
            counts = replay.counts_
            measured = result.joules_per_call
            row = {"mask": m["mask"], "ratio": m["ratio"], "layer": name, "layer_numel": mask.numel(),
                   "kept": int(mask.sum()), "density": int(mask.sum()) / mask.numel(),
                   "working_set_bytes": counts.working_set_bytes, "predicted_j": predicted,
                   "measured_j": measured, "ci_low_j": result.ci_low_j, "ci_high_j": result.ci_high_j,
                   "residual": predicted / measured - 1,
                   "se": (result.ci_high_j - result.ci_low_j) / (2 * 1.96) / measured * (predicted / measured)}
            if simulated and hasattr(meter, "price_workload"):
                truth = meter.price_workload(replay)
                row.update(truth_j=truth, model_error=predicted / truth - 1)
            rows.append(row)
    return rows


def _binned(points: pd.DataFrame, feature: str) -> pd.DataFrame:
    x = points[feature].to_numpy(float)
    base = 10.0 if feature == "density" else 4.0
    key = np.floor(np.log(x) / math.log(base) + 1e-9)
    out = []
    for k in np.unique(key):
        sub = points[key == k]
        n = len(sub)
        mean = float(sub["residual"].mean())
        spread = float(sub["residual"].std(ddof=1)) / math.sqrt(n) if n > 1 else 0.0
        noise = float(np.sqrt((sub["se"] ** 2).sum())) / n
        se = max(spread, noise, 1e-4)
        out.append({"lo": base**k, "hi": base ** (k + 1), "x": float(np.exp(np.log(sub[feature]).mean())),
                    "n": n, "mean": mean, "se": se})
    return pd.DataFrame(out)


def _bin_keys(points: pd.DataFrame, feature: str) -> np.ndarray:
    base = 10.0 if feature == "density" else 4.0
    return np.floor(np.log(points[feature].to_numpy(float)) / math.log(base) + 1e-9)


def _chi2(points: pd.DataFrame, feature: str) -> float:
    bins = _binned(points, feature)
    if len(bins) < 2:
        return 0.0
    w = 1.0 / bins["se"].to_numpy() ** 2
    mean = float((w * bins["mean"]).sum() / w.sum())
    return float((w * (bins["mean"] - mean) ** 2).sum()) / (len(bins) - 1)


def _given(points: pd.DataFrame, other: str) -> pd.DataFrame:
    """The residuals with what ``other`` explains removed (each of its bins centred on the overall mean)."""
    keys = _bin_keys(points, other)
    r = points["residual"].to_numpy(float).copy()
    overall = float(r.mean())
    for k in np.unique(keys):
        r[keys == k] += overall - r[keys == k].mean()
    return points.assign(residual=r)


def _off_points_p(points: pd.DataFrame, feature: str) -> float:
    """Whether the layers that depart from the rest lie apart in ``feature``: the two-sided exact
    Mann-Whitney p of the feature's values, off layers against the others. A layer is off when its
    residual departs from the median by more than :data:`MIN_BIAS` beyond its own 95 % interval.
    The bin test misses a bias that varies within its bin (a cache boundary inside a factor-4 bin:
    +2 %, +39 %, +68 % and +240 % in one bin whose spread then swamps its mean); this one does not."""
    from scipy import stats

    r = points["residual"].to_numpy(float)
    off = np.abs(r - np.median(r)) > MIN_BIAS + 1.96 * points["se"].to_numpy(float)
    if off.sum() < 2 or (~off).sum() < 2:
        return 1.0
    x = np.log(points[feature].to_numpy(float))
    return float(stats.mannwhitneyu(x[off], x[~off], alternative="two-sided").pvalue)


# the feature each is judged against: what it explains beyond the other (working set and layer size are
# nearly collinear within a model, so each is judged against density, and density against working set)
_AGAINST = {"working_set_bytes": "density", "layer_numel": "density", "density": "working_set_bytes"}


def bias_flags(points: pd.DataFrame) -> list[dict[str, Any]]:
    """The features the residuals trend with (see the module docstring). Ranked by what each
    explains beyond the other features (its binned chi-square once the bins of :data:`_AGAINST`
    are taken out): a bias that follows the working set also shows by density when the pruner's
    densities differ between layers, and this ranking tells the two apart (ties: working set
    first, the feature the cost model's memory levels use)."""
    from scipy import stats

    flags = []
    if len(points) < 3:
        return flags
    for feature, words in FEATURES.items():
        bins = _binned(points, feature)
        if len(bins) < 2:
            continue
        w = 1.0 / bins["se"].to_numpy() ** 2
        mean = float((w * bins["mean"]).sum() / w.sum())
        chi2 = float((w * (bins["mean"] - mean) ** 2).sum())
        p = min(float(stats.chi2.sf(chi2, len(bins) - 1)), _off_points_p(points, feature))
        worst = bins.iloc[int(np.argmax(np.abs(bins["mean"] - mean)))]
        departure = float(worst["mean"] - mean)
        if p < ALPHA and abs(departure) > MIN_BIAS:
            flags.append({"feature": feature, "words": words, "p": p, "chi2": chi2, "bins": len(bins),
                          "beyond": _chi2(_given(points, _AGAINST[feature]), feature),
                          "bin_lo": float(worst["lo"]), "bin_hi": float(worst["hi"]), "bin_mean": float(worst["mean"]),
                          "departure": departure})
    flags.sort(key=lambda f: (-f["beyond"], list(FEATURES).index(f["feature"])))
    names = [f["feature"] for f in flags]
    if "working_set_bytes" in names and "layer_numel" in names and names.index("layer_numel") < names.index(
            "working_set_bytes"):  # collinear: name the one the cost model's memory levels use
        i, j = names.index("layer_numel"), names.index("working_set_bytes")
        flags[i], flags[j] = flags[j], flags[i]
    return flags


def _span(feature: str, lo: float, hi: float) -> str:
    if feature == "working_set_bytes":
        return f"{lo / 2**20:.3g}-{hi / 2**20:.3g} MiB"
    if feature == "density":
        return "density 1" if lo >= 1 else f"{lo:.3g}-{min(hi, 1):.3g}"
    return f"{lo:.0f}-{hi:.0f} entries"


def describe(flags: list[dict[str, Any]]) -> list[str]:
    """One warning line per flagged feature."""
    names = {f["feature"] for f in flags}
    lines = []
    for f in flags:
        line = (f"systematic bias with {f['words']}: residuals in {_span(f['feature'], f['bin_lo'], f['bin_hi'])} are "
                f"{f['bin_mean']:+.1%} ({f['departure']:+.1%} from the rest), beyond their intervals (p = {f['p']:.1g})")
        if f["feature"] == "working_set_bytes":
            line += "; check the profile's memory levels (cache_bytes, transition) against this device"
        if f["feature"] == "layer_numel" and "working_set_bytes" in names:
            line += " (layer size moves with the working set here; the two cannot be told apart)"
        lines.append(line)
    return lines


def plot_residuals(points: pd.DataFrame, flags: list[dict[str, Any]], folder: Path, prefix: str, tag: str,
                   cache_bytes: int | None = None) -> Path:
    """Residuals (%) against working-set size, density and layer size, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flagged = {f["feature"] for f in flags}
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    yerr = 196 * points["se"].to_numpy(float)
    for ax, (feature, words) in zip(axes, FEATURES.items()):
        ax.axhspan(-5, 5, color="0.9", label="±5 %")
        ax.axhline(0, color="k", lw=0.8)
        ax.errorbar(points[feature], 100 * points["residual"], yerr=yerr, fmt="o", ms=4, alpha=0.8,
                    label="measured layer (95 % CI)")
        if "model_error" in points:
            ax.plot(points[feature], 100 * points["model_error"], "x", color="tab:red", ms=5, label="vs truth (sim)")
        if len(points) >= 2:
            bins = _binned(points, feature)
            ax.errorbar(bins["x"], 100 * bins["mean"], yerr=196 * bins["se"], fmt="s-", color="k", ms=6,
                        label="bin mean (95 % CI)")
        if feature == "working_set_bytes" and cache_bytes:
            ax.axvline(cache_bytes, color="tab:purple", ls="--", lw=1, label="profile cache_bytes")
        ax.set_xscale("log")
        ax.set_xlabel(words + (" (bytes)" if feature == "working_set_bytes" else ""))
        title = f"vs {words}" + ("  — BIAS" if feature in flagged else "")
        ax.set_title(title, fontsize=10, color="tab:red" if feature in flagged else "k")
    axes[0].set_ylabel("prediction error per layer (%)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"per-layer residuals{tag}", fontsize=10)
    fig.tight_layout()
    path = folder / f"{prefix}residuals.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
