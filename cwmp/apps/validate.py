"""``energyprof validate``: the joules a profile predicts against the joules a meter measures.

For a device profile, a model and a meter:

1. realistic updates: the accumulated update of a short real training run of the model on
   scikit-learn's digits (resized to the model's input), or heavy-tailed random updates
   (Student t, 2 degrees of freedom) when asked or when the model's input shape is unknown;
2. the masks the pruner really makes: Top-K at each keep ratio, and CWMP with p = 1 and p = 2 at
   the energy Top-K spends at that ratio on the same update;
3. each mask's whole round (:class:`energyprof.replays.RoundReplay`: the compensation every round
   pays on every tensor, then the masked update phase of every tensor with a kept entry, the replays
   the calibration measured) measured through the measurement protocol;
4. prediction (profile -> cost map -> :mod:`energyprof.costmodel`, the round's floor beside the
   masks' part) against measurement, with its
   interval; on the simulator, the simulator's truth as a third column, so that model error and
   measurement error are told apart.

5. every layer measured on its own at each of ``layer_densities`` (random positions: the same
   densities in every layer, so that density and working set vary independently): the per-layer
   residuals against working-set size, density and layer size, with a flag naming the feature
   when they trend with it beyond their intervals (:mod:`cwmp.apps.residuals`).

Output: a console table, and a report folder with the raw CSV, a scatter plot of predicted against
measured (log axes, y = x, +-5 % and +-10 % bands), a plot of error by keep ratio, the per-layer
residual plot and a Markdown summary. Every file of a simulated run says SIMULATED.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from cwmp.costmap import CostMap
from cwmp.pruner import Budget, Pruner

__all__ = ["DEFAULT_RATIOS", "ValidationResult", "validate", "model_updates"]

DEFAULT_RATIOS = (0.001, 0.01, 0.05, 0.1, 0.2)
INPUT_SHAPES = {"mlp": (1, 8), "cnn": (3, 32), "resnet18": (3, 32)}  # (channels, side) of the built-ins


@dataclass
class ValidationResult:
    table: pd.DataFrame
    summary: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    report: Path | None = None
    layers: pd.DataFrame = field(default_factory=pd.DataFrame)
    bias: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------------- updates
def _digits(channels: int, side: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.target), generator=g)[:n]
    x = torch.tensor(data.images, dtype=torch.float32)[idx].unsqueeze(1) / 16.0
    if side != 8:
        x = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    x = x.repeat(1, channels, 1, 1)
    return (x - 0.5) / 0.5, torch.tensor(data.target, dtype=torch.long)[idx]


def model_updates(model: torch.nn.Module, label: str, kind: str = "train", steps: int = 20, lr: float = 0.05,
                  seed: int = 0) -> tuple[dict[str, torch.Tensor], str]:
    """One client update of ``model``: ``train`` (the accumulated change of ``steps`` SGD steps on
    digits, the model left as it was) or ``random`` (heavy-tailed). Returns (update, how it was made)."""
    params = dict(model.named_parameters())
    if kind == "train" and label in INPUT_SHAPES:
        channels, side = INPUT_SHAPES[label]
        x, y = _digits(channels, side, 64 * steps, seed)
        before = {n: p.detach().clone() for n, p in params.items()}
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        model.train()
        for i in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[64 * i: 64 * (i + 1)]), y[64 * i: 64 * (i + 1)]).backward()
            opt.step()
        update = {n: (p.detach() - before[n]) for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(before[n])
        return update, f"{steps} SGD steps (lr {lr}) on scikit-learn digits"
    rng = np.random.default_rng(seed)
    update = {n: torch.from_numpy(rng.standard_t(2.0, size=tuple(p.shape)).astype(np.float32) * 1e-3)
              for n, p in params.items()}
    return update, "heavy-tailed random (Student t, 2 degrees of freedom)"


# ---------------------------------------------------------------------------- masks
def pruner_masks(cost_map: CostMap, update: dict[str, torch.Tensor], ratios: tuple[float, ...]) -> list[dict]:
    masks = []
    for r in ratios:
        for method, power in (("topk", 1.0), ("cwmp", 1.0), ("cwmp", 2.0)):
            res = Pruner(cost_map, Budget.topk_keep_ratio(r), method=method, power=power).masks(update)
            label = "topk" if method == "topk" else f"cwmp-p{power:g}"
            masks.append({"mask": label, "method": method, "p": power, "ratio": r, "masks": res.masks,
                          "kept": res.kept, "budget_j": res.budget_j})
    return masks


# ---------------------------------------------------------------------------- the run
def validate(
    profile_ref: str,
    meter_spec: str,
    model: str = "mlp",
    device: str | None = None,
    ratios: tuple[float, ...] = DEFAULT_RATIOS,
    updates: str = "train",
    report: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    protocol_kwargs: dict[str, Any] | None = None,
    say: Callable[[str], None] = print,
    allow_device_mismatch: bool = False,
    layer_densities: tuple[float, ...] = (0.01, 0.1),
) -> ValidationResult:
    """Every input is checked before any work (the profile, the model and the profile's table of it,
    the ratios, the report folder, the meter, the kernel device: the meter's unless ``device``)."""
    from calibrate.calibration import resolve_meter_spec
    from calibrate.profile import load_profile
    from energyprof.devices import kernel_device
    from energyprof.meters import open_meter
    from energyprof.models import load_model
    from energyprof.outputs import check_output_folder
    from energyprof.protocol import MeasurementProtocol
    from energyprof.replays import RoundReplay

    bad = [r for r in ratios if not 0 < r <= 1]
    if bad or not ratios:
        raise ValueError(f"keep ratios must be fractions in (0, 1]; got {list(ratios)}")
    if updates not in ("train", "random"):
        raise ValueError(f"updates={updates!r}: use train or random")
    profile = load_profile(profile_ref)
    module = load_model(model, seed=seed)
    warnings: list[str] = []
    if model in profile.models:
        # the table must be this model's: a table of another model's layers is refused, never priced
        # silently from the global coefficients
        cost_map = CostMap.from_profile(profile, model, module.named_parameters())
    else:
        warnings.append(f"profile {profile.name} has no per-layer table for {model}: every layer is predicted "
                        "from its global coefficients")
        cost_map = CostMap.from_profile(profile, model, module.named_parameters(), allow_predicted=True)
    if report is not None:
        check_output_folder(report, "--report")
    spec = resolve_meter_spec(meter_spec)
    protocol = MeasurementProtocol(random_state=seed, **(protocol_kwargs or dict(
        min_window_s=1.0, min_periods=10, trials=4, idle_windows=4, warmup_s=0.05)))
    rows = []
    from rich.progress import Progress

    with open_meter(spec) as meter:
        info = meter.info
        dev = kernel_device(info, device, allow_device_mismatch)
        update, update_kind = model_updates(module, model, updates, seed=seed)
        masks = pruner_masks(cost_map, update, tuple(ratios))
        warnings.extend(_mismatch(profile, info, spec, dev))
        sim = "  [SIMULATED]" if info.simulated else ""
        say(f"validate {profile.name} on {model} with meter {spec}, kernels on {dev}{sim}")
        idle = protocol.measure_idle(meter)
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("measuring masks", total=len(masks))
            for m in masks:
                replay = RoundReplay(module, m["masks"], seed=seed).setup(dev)
                run = meter.simulate(replay) if hasattr(meter, "simulate") else replay
                result = protocol.measure(run, meter, idle=idle)
                parts = cost_map.round_joules(m["masks"])
                predicted = parts.total_j
                row = {"mask": m["mask"], "method": m["method"], "p": m["p"], "ratio": m["ratio"],
                       "kept": m["kept"], "layers_touched": sum(1 for mk in m["masks"].values() if bool(mk.any())),
                       "budget_j": m["budget_j"], "predicted_j": predicted, "predicted_floor_j": parts.floor_j,
                       "predicted_mask_j": parts.mask_j, "measured_j": result.joules_per_call,
                       "ci_low_j": result.ci_low_j, "ci_high_j": result.ci_high_j,
                       "error": (predicted - result.joules_per_call) / result.joules_per_call,
                       "calls": result.calls, "simulated": info.simulated, "backend": info.backend}
                if info.simulated and hasattr(meter, "price_workload"):
                    truth = meter.price_workload(replay)
                    row.update(truth_j=truth, model_error=(predicted - truth) / truth,
                               measurement_error=(result.joules_per_call - truth) / truth)
                rows.append(row)
                bar.advance(task)
        from cwmp.apps.residuals import measure_layers, uniform_masks

        per_layer = uniform_masks(module, layer_densities, seed)
        layer_rows = measure_layers(module, per_layer, cost_map, meter, protocol, idle, dev, seed, info.simulated)
    from cwmp.apps.residuals import bias_flags, describe

    layers = pd.DataFrame(layer_rows)
    bias = bias_flags(layers) if len(layers) else []
    warnings.extend(describe(bias))
    table = pd.DataFrame(rows)
    errors = table["error"].to_numpy(float)
    worst = table.iloc[int(np.argmax(np.abs(errors)))]
    summary: dict[str, Any] = {
        "mape": float(np.mean(np.abs(errors))), "n": len(table), "worst": float(abs(worst["error"])),
        "worst_mask": f"{worst['mask']} at {worst['ratio']:g}", "bias": float(np.mean(errors)),
        "simulated": bool(info.simulated), "profile": profile.name, "profile_simulated": profile.simulated,
        "model": model, "meter": spec, "device": str(dev), "updates": update_kind,
        "predicted_layers": cost_map.predicted_layers, "warnings": warnings,
        "bias_features": [f["feature"] for f in bias], "layers_measured": len(layers),
        "floor_j": float(table["predicted_floor_j"].iloc[0]),
        "mask_share_min": float((table["predicted_mask_j"] / table["predicted_j"]).min()),
        "mask_share_max": float((table["predicted_mask_j"] / table["predicted_j"]).max()),
    }
    if len(layers):
        summary["layer_mape"] = float(layers["residual"].abs().mean())
    if "truth_j" in table:
        summary["model_mape"] = float(table["model_error"].abs().mean())
        summary["measurement_mape"] = float(table["measurement_error"].abs().mean())
    result = ValidationResult(table, summary, warnings, layers=layers, bias=bias)
    if report is not None:
        result.report = write_report(result, Path(report), profile, say=say)
    return result


def _mismatch(profile: Any, info: Any, spec: str, dev: torch.device) -> list[str]:
    out = []
    rec = profile.provenance.meter
    if rec.backend != info.backend or rec.scope != info.scope:
        out.append(f"the profile was calibrated with meter {rec.backend} ({rec.scope}); this run uses "
                   f"{info.backend} ({info.scope})")
    elif rec.details.get("preset") != info.details.get("preset"):
        out.append(f"the profile was calibrated on sim preset {rec.details.get('preset')}; this run uses "
                   f"{info.details.get('preset')}")
    if profile.simulated != info.simulated:
        out.append("the profile and the meter differ in being simulated")
    return out


# ---------------------------------------------------------------------------- output
def console_table(result: ValidationResult) -> str:
    t, s = result.table, result.summary
    tag = "  [SIMULATED]" if s["simulated"] else ""
    truth = "truth_j" in t
    head = (f"{'mask':<9} {'ratio':>6} {'kept':>9} {'mask J':>11} {'predicted J':>12} {'measured J (95 % CI)':>34} "
            f"{'error':>7}")
    lines = [f"predicted vs measured joules per round (compensation of every tensor + masked update phase){tag}",
             head + (f" {'truth J':>11} {'model err':>9}" if truth else "")]
    for _, r in t.iterrows():
        line = (f"{r['mask']:<9} {r['ratio']:>6.3g} {int(r['kept']):>9} {r['predicted_mask_j']:>11.4e} "
                f"{r['predicted_j']:>12.4e} "
                f"{r['measured_j']:>11.4e} ({r['ci_low_j']:.3e}..{r['ci_high_j']:.3e}) {r['error']:>+7.2%}")
        if truth:
            line += f" {r['truth_j']:>11.4e} {r['model_error']:>+9.2%}"
        lines.append(line)
    lines.append(f"MAPE {s['mape']:.2%} over {s['n']} masks, worst {s['worst']:.2%} ({s['worst_mask']}), "
                 f"bias {s['bias']:+.2%}{tag}")
    lines.append(f"each round pays a floor of {s['floor_j']:.4e} J whatever the mask keeps (compensation of every "
                 f"tensor); the masks add {s['mask_share_min']:.1%} to {s['mask_share_max']:.1%} of the round{tag}")
    if truth:
        lines.append(f"against the simulator's truth: model MAPE {s['model_mape']:.2%}, "
                     f"measurement MAPE {s['measurement_mape']:.2%}{tag}")
    if s.get("layers_measured"):
        lines.append(f"per layer ({s['layers_measured']} measured one by one): mean |error| {s['layer_mape']:.2%}; "
                     f"systematic bias with: {', '.join(s['bias_features']) or 'nothing beyond the intervals'}{tag}")
    for w in result.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def report_prefix(simulated: bool) -> str:
    """What the report's file names start with: ``SIMULATED-`` for simulated figures."""
    return "SIMULATED-" if simulated else ""


def write_report(result: ValidationResult, folder: Path, profile: Any, say: Callable[[str], None] | None = None) -> Path:
    """The CSV and the summaries (Markdown, JSON) first, then the plots: a plot that fails (no
    matplotlib, a backend error) loses nothing; it is said on ``say`` (raised when ``say`` is None,
    after the rest is written) and the summary then links no image."""
    folder.mkdir(parents=True, exist_ok=True)
    t, s = result.table, result.summary
    prefix = report_prefix(s["simulated"])
    t.to_csv(folder / f"{prefix}validation.csv", index=False)
    if len(result.layers):
        result.layers.to_csv(folder / f"{prefix}layers.csv", index=False)
    (folder / f"{prefix}summary.json").write_text(json.dumps(s, indent=1))
    summary = folder / f"{prefix}summary.md"
    summary.write_text(_summary_markdown(result, profile, images=()))
    try:
        images = _write_plots(result, folder, profile)
    except Exception as exc:
        if say is None:
            raise
        say(f"energyprof: warning: no plots ({type(exc).__name__}: {exc}); the CSV and {summary.name} are written")
        return folder
    summary.write_text(_summary_markdown(result, profile, images=images))
    return folder


def _write_plots(result: ValidationResult, folder: Path, profile: Any) -> tuple[tuple[str, Path], ...]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, s = result.table, result.summary
    tag = " [SIMULATED]" if s["simulated"] else ""
    prefix = report_prefix(s["simulated"])
    fig, ax = plt.subplots(figsize=(6, 5.5))
    lo = float(min(t.predicted_j.min(), t.measured_j.min())) * 0.7
    hi = float(max(t.predicted_j.max(), t.measured_j.max())) * 1.4
    xs = np.geomspace(lo, hi, 50)
    ax.fill_between(xs, xs * 0.9, xs * 1.1, color="0.9", label="±10 %")
    ax.fill_between(xs, xs * 0.95, xs * 1.05, color="0.8", label="±5 %")
    ax.plot(xs, xs, "k-", lw=1, label="y = x")
    styles = {"topk": ("o", "tab:blue"), "cwmp-p1": ("^", "tab:orange"), "cwmp-p2": ("s", "tab:green")}
    for label, (marker, color) in styles.items():
        sub = t[t["mask"] == label]
        if len(sub):
            yerr = np.vstack([sub.measured_j - sub.ci_low_j, sub.ci_high_j - sub.measured_j])
            ax.errorbar(sub.predicted_j, sub.measured_j, yerr=yerr, fmt=marker, color=color, label=label, ms=6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("predicted J per round (profile + cost model)")
    ax.set_ylabel("measured J per round (protocol, 95 % CI)")
    ax.set_title(f"{s['model']} on {profile.name}: MAPE {s['mape']:.2%}{tag}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    scatter = folder / f"{prefix}predicted-vs-measured.png"
    fig.savefig(scatter, dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (marker, color) in styles.items():
        sub = t[t["mask"] == label]
        if len(sub):
            ax.plot(sub.ratio * 100, sub.error * 100, marker=marker, color=color, label=label)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("keep ratio of the Top-K budget (%)")
    ax.set_ylabel("prediction error (%)")
    ax.set_title(f"error by keep ratio{tag}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    by_ratio = folder / f"{prefix}error-by-ratio.png"
    fig.savefig(by_ratio, dpi=110)
    plt.close(fig)
    images = [("predicted vs measured", scatter), ("error by ratio", by_ratio)]
    if len(result.layers):
        from cwmp.apps.residuals import plot_residuals

        images.append(("per-layer residuals", plot_residuals(result.layers, result.bias, folder, prefix, tag,
                                                             profile.coefficients.cache_bytes)))
    return tuple(images)


def _summary_markdown(result: ValidationResult, profile: Any, images: tuple[tuple[str, Path], ...]) -> str:
    s = result.summary
    tag = " [SIMULATED]" if s["simulated"] else ""
    p = profile.provenance
    md = [
        f"# Energy-model validation: {s['model']} on profile {profile.name}{tag}", "",
        f"- {'SIMULATED run: the meter is the simulator; no number here is a physical measurement. ' if s['simulated'] else ''}"
        f"Created {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}",
        f"- MAPE **{s['mape']:.2%}** over {s['n']} masks; worst {s['worst']:.2%} ({s['worst_mask']}); "
        f"bias {s['bias']:+.2%}",
    ]
    if "model_mape" in s:
        md.append(f"- Against the simulator's truth: model MAPE {s['model_mape']:.2%}, "
                  f"measurement MAPE {s['measurement_mape']:.2%}")
    md += [
        f"- Meter: `{s['meter']}`, kernels on {s['device']}; updates: {s['updates']}",
        f"- Profile: {profile.name} ({'SIMULATED' if profile.simulated else 'measured'}), device {p.device}, "
        f"meter {p.meter.backend} ({p.meter.scope}), created {p.created.isoformat()}, energyprof {p.toolkit_version}",
        "- Layers predicted from global coefficients rather than measured: "
        + (", ".join(f"`{n}`" for n in s["predicted_layers"]) or "none")
        + " (cost map); layers marked predicted in the profile's table: "
        + (", ".join(f"`{layer.name}`" for layer in profile.models[s['model']].layers if layer.method == 'predicted')
           if s["model"] in profile.models else "all (no table)"),
        "",
    ]
    for w in result.warnings:
        md.append(f"- **Warning:** {w}")
    if len(result.layers):
        md.append(f"- Per-layer residuals: {len(result.layers)} layers measured one by one, mean |error| "
                  f"{s['layer_mape']:.2%}; systematic bias: "
                  + (", ".join(f["words"] for f in result.bias) or "none beyond the intervals"))
    md.append("")
    for caption, path in images:
        md += [f"![{caption}]({path.name})", ""]
    md += ["```", console_table(result), "```", ""]
    return "\n".join(md)


def doubled(profile: Any) -> Any:
    """A copy of ``profile`` with every layer's compensation, fixed and marginal costs doubled (a wrong profile,
    for checking that validation catches one)."""
    data = profile.model_dump()
    for costs in data["models"].values():
        for layer in costs["layers"]:
            for k in ("fixed_j", "fixed_ci_low", "fixed_ci_high", "joules_per_update", "ci_low", "ci_high",
                      "joules_per_line", "line_ci_low", "line_ci_high",
                      "compensation_j", "compensation_ci_low", "compensation_ci_high"):
                layer[k] *= 2
    data["name"] = profile.name + "-doubled"
    return type(profile).model_validate(data)



def shrunk_cache(profile: Any, factor: float = 4.0) -> Any:
    """A copy of ``profile`` whose cache size is divided by ``factor`` and whose every layer is
    predicted again from the global coefficients with it (a deliberately wrong profile, for checking
    that validation catches one and that its residuals point at the working set)."""
    data = profile.model_dump()
    data["coefficients"]["cache_bytes"] = max(1, round(data["coefficients"]["cache_bytes"] / factor))
    data["name"] = profile.name + "-cache-div" + f"{factor:g}"
    data["quality"], data["quality_reason"], data["fit_residuals"] = None, None, {}
    wrong = type(profile).model_validate(data)
    for costs in data["models"].values():
        for layer in costs["layers"]:
            c = wrong.predict_layer(layer["numel"], layer["dtype"])
            layer.update(fixed_j=c.fixed_j, fixed_ci_low=c.fixed_j, fixed_ci_high=c.fixed_j,
                         joules_per_update=c.joules_per_update, ci_low=c.joules_per_update,
                         ci_high=c.joules_per_update, joules_per_line=c.joules_per_line,
                         line_ci_low=c.joules_per_line, line_ci_high=c.joules_per_line,
                         joules_per_update_density=c.joules_per_update_density,
                         density_ci_low=c.joules_per_update_density, density_ci_high=c.joules_per_update_density,
                         compensation_j=c.compensation_j, compensation_ci_low=c.compensation_j,
                         compensation_ci_high=c.compensation_j, compensation_method="predicted",
                         method="predicted", reason=f"deliberately wrong: cache size divided by {factor:g}")
    return type(profile).model_validate(data)
