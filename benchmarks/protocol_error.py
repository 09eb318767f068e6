"""Energy of a short kernel on the simulated H100-like counter: one naive window vs the protocol.

The simulated counter updates every 100 ms and averages only the last 25 ms of each period (NVML on
A100/H100, Yang et al., SC'24), with 1 mJ steps and 1 W of noise per update. A stand-in kernel of about
``--kernel-ms`` (drawn per seed within +-10 %, so that windows are not by chance whole numbers of
counter periods) streams HBM traffic (about 105 W above the 70 W idle). For each seed (a fresh
meter: a fresh counter phase and noise) the same session measures:

* naive: one window around one call, against the simulator's true energy of that call (static + dynamic);
* protocol: ``MeasurementProtocol`` defaults, total joules per call (static share + dynamic) and
  joules per call above idle (dynamic only), against the truth; plus how often its 95 % interval
  holds the truth;
* protocol without alignment (``max_edge_error=1``): the same, with windows that open and close
  anywhere in a counter period (what the alignment to counter updates buys).

Every figure is SIMULATED. Run: python benchmarks/protocol_error.py [--seeds 400] [--kernel-ms 10] [--preset desktop-cpu] [--spread 0.3]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's energyprof, not an installed one

from energyprof.counts import WorkCounts
from energyprof.meters.sim import SimMeter
from energyprof.protocol import MeasurementProtocol
from energyprof.replays import SimKernel

HBM_BYTES_PER_S = 3.0e12  # an H100-like stream: half read, half written


def kernel_counts(seconds: float) -> WorkCounts:
    half = round(seconds * HBM_BYTES_PER_S / 2)
    return WorkCounts(bytes_read=half, bytes_written=half, working_set_bytes=4 * 2**30)


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % for z = 1.96)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def one_seed(seed: int, kernel_s: float, preset: str, spread: float = 0.1) -> dict[str, float]:
    duration_s = kernel_s * np.random.default_rng(seed).uniform(1 - spread, 1 + spread)
    counts = kernel_counts(duration_s)
    meter = SimMeter(preset, seed=seed, clock="virtual")
    static_w = meter.preset.static_power_w
    true_total = static_w * duration_s + meter.price(counts)

    meter.begin("naive")
    t0, t1 = meter.run_kernel(counts, duration_s)
    naive_j = meter.end("naive").energy_j
    naive_truth = meter.true_energy_j(t0, t1)

    kernel = SimKernel(meter, counts, duration_s).setup()
    meter.sleep(1.0)
    started = meter.clock()
    r = MeasurementProtocol(random_state=seed).measure(kernel, meter)
    virtual_s = meter.clock() - started
    meter.sleep(1.0)
    unaligned = MeasurementProtocol(random_state=seed, max_edge_error=1.0).measure(kernel, meter)
    truth_dyn = meter.price(counts)
    return {
        "naive": abs(naive_j - naive_truth) / naive_truth,
        "naive_zero": naive_j == 0,
        "protocol_total": abs(r.total_joules_per_call - true_total) / true_total,
        "protocol_dynamic": abs(r.joules_per_call - truth_dyn) / truth_dyn,
        "unaligned_dynamic": abs(unaligned.joules_per_call - truth_dyn) / truth_dyn,
        "covered": r.ci_low_j <= truth_dyn <= r.ci_high_j,
        "virtual_s": virtual_s,
        "calls": r.calls,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=200)
    ap.add_argument("--kernel-ms", type=float, default=10.0)
    ap.add_argument("--preset", default="h100")
    ap.add_argument("--spread", type=float, default=0.1,
                    help="kernel durations are drawn in kernel-ms * (1 +- spread) (default 0.1)")
    args = ap.parse_args(argv)

    wall = time.perf_counter()
    rows = [one_seed(seed, args.kernel_ms / 1e3, args.preset, args.spread) for seed in range(args.seeds)]
    wall = time.perf_counter() - wall
    col = {k: np.array([r[k] for r in rows], dtype=float) for k in rows[0]}

    p = SimMeter(args.preset).preset
    print(f"SIMULATED: preset {p.name} (update every {p.update_period_s * 1e3:g} ms, averaging "
          f"{p.averaging_window_s * 1e3:g} ms, {p.resolution_j * 1e3:g} mJ steps, noise {p.noise_w:g} W), "
          f"~{args.kernel_ms:g} ms kernel (+-{100 * args.spread:g} %), "
          f"{SimMeter(args.preset).price(kernel_counts(args.kernel_ms / 1e3)):.4g} J above idle per call at "
          f"{args.kernel_ms:g} ms, {args.seeds} seeds")
    print(f"{'method':<44}{'mean error':>12}{'worst error':>13}")
    for label, key in (
        ("naive: one window around one call", "naive"),
        ("protocol: total joules per call", "protocol_total"),
        ("protocol: joules per call above idle", "protocol_dynamic"),
        ("  same, windows not aligned to updates", "unaligned_dynamic"),
    ):
        print(f"{label:<44}{100 * col[key].mean():>11.2f}%{100 * col[key].max():>12.2f}%")
    print(f"naive windows in which the counter never moved: {100 * col['naive_zero'].mean():.0f} %")
    print(f"naive / protocol mean error (total per call): {col['naive'].mean() / col['protocol_total'].mean():.0f}x")
    covered = int(col["covered"].sum())
    lo, hi = wilson(covered, args.seeds)
    print(f"protocol 95 % interval holds the truth in {covered} of {args.seeds} seeds = "
          f"{100 * covered / args.seeds:.1f} % (Wilson 95 % interval {100 * lo:.1f} .. {100 * hi:.1f} %)")
    print(f"protocol cost: {col['virtual_s'].mean():.1f} s of (virtual) device time, "
          f"{col['calls'].mean():.0f} calls in its kernel windows; benchmark wall time {wall:.1f} s")


if __name__ == "__main__":
    main()
