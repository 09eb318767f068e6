"""How well does calibration recover the simulator's truth? (SIMULATED: a benchmark of the fit.)

For each simulated preset and seed, run ``energyprof calibrate`` (the real command's code: plan,
protocol, CSV, scikit-learn fit, profile) on ``sim:preset=P,seed=S`` and compare with the truth:

* every global coefficient: relative error and whether its 95 % interval covers the truth;
* every measured layer: its four per-layer costs against what the model represents of the truth
  (the truth of the same replays, projected on the per-layer curve by the same fit), with coverage;
* the prediction for held-out replays (random masks at 0.3 %, 2 %, 20 % and 60 %) of every layer, measured
  or predicted: relative error against the truth.

Goal (issue 8): at most 2 % error on what the model represents (the predictions) and intervals
covering the truth in at least 90 % of cases. Example:

    python benchmarks/calibration_accuracy.py --presets rpi4 desktop-cpu h100 --seeds 3 --model mlp
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd  # noqa: E402

from calibrate.calibration import _standard_error, calibrate  # noqa: E402
from calibrate.fit import LayerCostFit  # noqa: E402
from energyprof.costmodel import layer_costs_from_global, lines_touched, predict_joules  # noqa: E402
from energyprof.meters.sim import PRESETS  # noqa: E402
from energyprof.workloads import UpdatePhase, itemsize_of  # noqa: E402

HELD_OUT = (0.003, 0.02, 0.2, 0.6)


def truth_vector(preset) -> dict[str, float]:
    t = preset.truth
    return {
        "j_per_call": t.j_per_call,
        "read.cache": t.j_per_byte_read["cache"], "read.dram": t.j_per_byte_read["dram"],
        "write.cache": t.j_per_byte_written["cache"], "write.dram": t.j_per_byte_written["dram"],
        "line.cache": t.j_per_line_written["cache"], "line.dram": t.j_per_line_written["dram"],
        "j_per_flop": t.j_per_flop, "static_power_w": t.static_power_w,
    }


def fitted_vector(profile) -> dict[str, tuple[float, float, float]]:
    c = profile.coefficients
    e = lambda x: (x.value, x.ci_low, x.ci_high)  # noqa: E731
    return {
        "j_per_call": e(c.j_per_call),
        "read.cache": e(c.j_per_byte_read["cache"]), "read.dram": e(c.j_per_byte_read["dram"]),
        "write.cache": e(c.j_per_byte_written["cache"]), "write.dram": e(c.j_per_byte_written["dram"]),
        "line.cache": e(c.j_per_line_written["cache"]), "line.dram": e(c.j_per_line_written["dram"]),
        "j_per_flop": e(c.j_per_flop), "static_power_w": e(c.static_power_w),
    }


def run(preset_name: str, seed: int, model: str, quick: bool, folder: Path) -> dict:
    preset = PRESETS[preset_name]
    out = folder / f"{preset_name}-{seed}.yaml"
    t0 = time.monotonic()
    profile = calibrate(f"sim:preset={preset_name},seed={seed}", models=[model], out=out, quick=quick,
                        progress=False, say=lambda line: None)
    wall = time.monotonic() - t0
    truth = truth_vector(preset)
    coef_rows = []
    for name, (v, lo, hi) in fitted_vector(profile).items():
        tv = truth[name]
        coef_rows.append((name, v, tv, (v - tv) / tv, lo <= tv <= hi))
    layer_rows, pred_errors = [], []
    gen = torch.Generator().manual_seed(seed)
    table = pd.read_csv(out.with_name(out.name + ".measurements.csv"))
    for layer in profile.models[model].layers:
        if layer.method == "measured" and layer.name == layer.measured_as:
            # what the model represents: the truth projected on the per-layer curve, at the same replays
            rows = table[(table["model"] == model) & (table["size"] == layer.numel)]
            s = itemsize_of(layer.dtype)
            y = [predict_joules(UpdatePhase.counts_for(layer.numel, int(k), int(n), s), preset.truth)
                 for k, n in zip(rows["kept"], rows["lines"])]
            t = LayerCostFit(n_bootstrap=10).fit(rows["kept"], rows["lines"], y, _standard_error(rows), layer.numel)
            for what, v, lo, hi, tv in (
                ("fixed_j", layer.fixed_j, layer.fixed_ci_low, layer.fixed_ci_high, t.fixed_j_),
                ("joules_per_update", layer.joules_per_update, layer.ci_low, layer.ci_high, t.joules_per_update_),
                ("joules_per_line", layer.joules_per_line, layer.line_ci_low, layer.line_ci_high, t.joules_per_line_),
                ("joules_per_update_density", layer.joules_per_update_density, layer.density_ci_low,
                 layer.density_ci_high, t.joules_per_update_density_),
            ):
                if tv > 0 or v > 0:
                    layer_rows.append((layer.name, what, v, tv, (v - tv) / tv if tv > 0 else float("nan"),
                                       lo <= tv <= hi))
        s = itemsize_of(layer.dtype)
        for d in HELD_OUT:
            k = max(1, round(d * layer.numel))
            positions = torch.randperm(layer.numel, generator=gen)[:k]
            lines = lines_touched(positions, s)
            true_j = predict_joules(UpdatePhase.counts_for(layer.numel, k, lines, s), preset.truth)
            pred_errors.append((layer.method, (layer.joules(k, lines) - true_j) / true_j))
    return {"wall_s": wall, "coef": coef_rows, "layers": layer_rows, "pred": pred_errors}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["rpi4", "desktop-cpu", "h100"], choices=sorted(PRESETS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--full", action="store_true", help="the full plan (default: --quick)")
    args = parser.parse_args(argv)
    print(f"calibration accuracy against the simulator's truth -- SIMULATED ({'full' if args.full else 'quick'} plan, "
          f"model {args.model}, {args.seeds} seeds)\n")
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            results = [run(preset, seed, args.model, not args.full, Path(tmp)) for seed in range(args.seeds)]
            print(f"== {preset} (SIMULATED)  calibration wall time {np.mean([r['wall_s'] for r in results]):.1f} s per run")
            print(f"  {'coefficient':<16} {'truth':>11} {'mean fit':>11} {'mean |err|':>10} {'covered':>8}")
            names = [row[0] for row in results[0]["coef"]]
            cov_all, n_all = 0, 0
            for i, name in enumerate(names):
                rows = [r["coef"][i] for r in results]
                cov = sum(row[4] for row in rows)
                cov_all, n_all = cov_all + cov, n_all + len(rows)
                print(f"  {name:<16} {rows[0][2]:>11.4g} {np.mean([row[1] for row in rows]):>11.4g} "
                      f"{np.mean([abs(row[3]) for row in rows]):>10.2%} {cov:>5}/{len(rows)}")
            layer_rows = [row for r in results for row in r["layers"]]
            for what in ("fixed_j", "joules_per_update", "joules_per_line", "joules_per_update_density"):
                rows = [row for row in layer_rows if row[1] == what]
                if rows:
                    cov = sum(row[5] for row in rows)
                    cov_all, n_all = cov_all + cov, n_all + len(rows)
                    errs = np.abs([row[4] for row in rows])
                    print(f"  layers {what:<25} mean |err| {np.nanmean(errs):.2%}, "
                          f"worst {np.nanmax(errs):.2%}, covered {cov}/{len(rows)}")
            pred = [e for r in results for e in r["pred"]]
            for method in ("measured", "predicted"):
                errs = [abs(e) for m, e in pred if m == method]
                if errs:
                    print(f"  held-out replays, {method} layers: mean |err| {np.mean(errs):.2%}, "
                          f"worst {max(errs):.2%} over {len(errs)}")
            all_errs = [abs(e) for _, e in pred]
            coverage = cov_all / n_all if n_all else math.nan
            print(f"  => prediction mean |err| {np.mean(all_errs):.2%} (goal <= 2 %), "
                  f"interval coverage {coverage:.1%} of {n_all} (goal >= 90 %)\n")
            summary.append((preset, float(np.mean(all_errs)), coverage))
    ok = all(err <= 0.02 and cov >= 0.9 for _, err, cov in summary)
    print("goal met on every preset" if ok else "goal NOT met on: " + ", ".join(
        p for p, err, cov in summary if not (err <= 0.02 and cov >= 0.9)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
