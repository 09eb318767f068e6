"""How long a mask takes: cwmp_mask (exact budget) against torch.topk, in one run.

For each size and keep ratio r, the update is N(0, 1) float32 and k = round(r N). cwmp_mask gets
one cost per entry-of-the-layer and the budget k * c, so it must keep exactly Top-K's entries; the
script checks that it does, and that ``topk_mask`` (the project's Top-K, the same sort-free selection)
does, against a reference built on ``torch.topk`` with ties settled by lower index. Times are medians over interleaved repeats, so that a noisy
neighbour slows all three alike. The goal: cwmp_mask at most 0.33x the torch.topk time.

    python benchmarks/mask_speed.py                      # 1 M, 10 M, 100 M entries; 1 % and 10 %
    python benchmarks/mask_speed.py --sizes 1e6 --repeats 21
    python benchmarks/mask_speed.py --device cuda

The 100 M case needs about 3 GiB of memory and runs in under two minutes on two cores.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from cwmp import cwmp_mask, topk_mask  # noqa: E402

JOULES_PER_UPDATE = 2.0**-29  # ~1.9e-9 J, H100-like; a power of two keeps |u| / c exact, so ties stay ties


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def reference_topk(update: torch.Tensor, k: int) -> torch.Tensor:
    """Top-K from torch.topk's k-th value, equal values by lower flat index (independent of cwmp)."""
    magnitude = update.reshape(-1).abs()
    mask = torch.zeros(magnitude.numel(), dtype=torch.bool, device=update.device)
    if k > 0:
        kth = torch.topk(magnitude, k, sorted=False).values.min()
        torch.gt(magnitude, kth, out=mask)
        ties = torch.nonzero(magnitude == kth).squeeze(1)
        mask[ties[: k - int(torch.count_nonzero(mask))]] = True
    return mask


def bench(n: int, ratio: float, repeats: int, device: torch.device, generator: torch.Generator) -> dict[str, float]:
    update = torch.randn(n, generator=generator).to(device)
    k = int(round(ratio * n))
    budget_j = k * JOULES_PER_UPDATE
    candidates = {
        "torch.topk": lambda: torch.topk(update.abs(), k, sorted=False),
        "topk_mask": lambda: topk_mask(update, k),
        "cwmp_mask": lambda: cwmp_mask(update, JOULES_PER_UPDATE, budget_j),
    }
    expected = reference_topk(update, k)  # also a warm-up
    same = torch.equal(cwmp_mask(update, JOULES_PER_UPDATE, budget_j), expected) and torch.equal(
        topk_mask(update, k), expected
    )
    candidates["torch.topk"]()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            times[name].append(timed(fn, device))
    result = {name: statistics.median(ts) for name, ts in times.items()}
    result["same"] = float(same)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 1e8], help="entries per update")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.01, 0.1], help="keep ratios")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per case (median reported)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(args.seed)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# torch {torch.__version__}, {device.type} ({where}), {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print(f"{'entries':>11} {'keep':>5} {'torch.topk ms':>14} {'topk_mask ms':>13} {'cwmp_mask ms':>13} "
          f"{'cwmp/torch.topk':>16} {'same mask':>10}")
    worst = 0.0
    for size in args.sizes:
        for ratio in args.keep:
            r = bench(int(size), ratio, args.repeats, device, generator)
            share = r["cwmp_mask"] / r["torch.topk"]
            worst = max(worst, share)
            print(f"{int(size):>11} {ratio:>5.0%} {r['torch.topk'] * 1e3:>14.1f} {r['topk_mask'] * 1e3:>13.1f} "
                  f"{r['cwmp_mask'] * 1e3:>13.1f} {share:>15.3f}x {'yes' if r['same'] else 'NO':>10}", flush=True)
    print(f"# worst cwmp_mask / torch.topk: {worst:.3f}x (goal <= 0.33x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
