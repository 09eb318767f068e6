"""How long the pruner takes on a whole model update, against torch.topk, in one run.

Two update shapes: ResNet-18 (CIFAR variant, from ``energyprof.models.build_model("resnet18")``)
and a model of a few large layers (about 100 M entries by default). The updates are N(0, 1)
float32, each layer scaled by its own factor (seeded). The costs come from a device profile made
here: the SIMULATED ``sim-h100`` coefficients, with a per-layer table whose ``joules_per_update`` is
the profile's prediction for the layer times a per-layer spread factor, and ``fixed_j`` = 1000 x
that (made-up numbers, labelled SIMULATED; they make the layers' costs differ and exercise the fixed
costs). For each keep ratio r the rows are:

- ``torch.topk``: ``torch.topk(magnitudes, k, sorted=False)`` over the concatenated magnitudes,
  made before timing (the baseline; k = round(r N));
- ``cwmp@topk-J``: ``Pruner(costs, Budget.topk_keep_ratio(r), method="cwmp").masks(update)``, i.e.
  Top-K's energy found and CWMP's masks chosen within it;
- ``topk``: ``Pruner(..., method="topk").masks(update)``;
- ``ef-step``: ``pruner.compress(update, feedback, sparse=True)`` with the CWMP pruner above and a
  residual from an earlier step: compensate, mask, keep the residual, return what is sent, i.e.
  what a client puts on the wire: per layer the kept entries' positions and values
  (``SparseUpdate``), not a dense tensor of the update's size. Nor does it make the result's dense
  masks: ``PruneResult.masks`` is then a ``LazyMasks``, made from the kept positions when first
  read (the check reads them, outside the timing). Its check: the masks equal the
  reference's check (below), each layer's ``to_dense()`` plus the new residual equals the compensated
  update exactly, and the values sent are the compensated update's at the kept positions.

Times are medians over interleaved repeats. Every row's masks are checked against a slow reference
on the concatenation: Top-K's against a stable sort of all magnitudes; CWMP's (the set-up-aware
rule, CWMP's default) by what the rule promises: its exact per-layer ``fixed_j +
joules_per_update * k`` within the budget, each layer's k largest magnitudes (a stable sort per
layer), and at least Top-K's retained ``sum |u|``. Extra memory is the peak resident
memory during one call minus the resident memory before it, outputs included (masks; for ef-step
also the kept positions and values sent). On Linux the peak is reset through
``/proc/self/clear_refs`` and read as ``VmHWM``. glibc is told (``mallopt``) from the start to map
every allocation of 128 KiB or more on its own and to unmap it when it is freed, and every case's
checks and memory probes run before any timing: a large free block left in the heap would
otherwise be handed out again, and the resident pages it already had, or the pages it had lost to
``malloc_trim``, would make the figure depend on what ran before rather than on the call. Then,
for the timing, glibc is set as a long-running process ends up by itself (blocks up to 32 MiB from
the heap, reused), for every row alike. On CUDA extra memory is
``torch.cuda.max_memory_allocated`` minus the memory allocated before.

    python benchmarks/prune_speed.py                 # ResNet-18 and 100 M entries, 1 % and 10 %
    python benchmarks/prune_speed.py --quick         # the CNN's shapes and 1 M entries (the smoke test)
    python benchmarks/prune_speed.py --device cuda
    python benchmarks/prune_speed.py --threads 1     # baseline and pruner on one thread each

The 100 M case needs about 6 GiB of memory (most of it the references' sorts) and a few minutes on
two cores.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import platform
import statistics
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from calibrate.profile import DeviceProfile, load_profile  # noqa: E402
from cwmp import Budget, CostMap, ErrorFeedback, Pruner  # noqa: E402
from cwmp.masks import cwmp_scores  # noqa: E402
from energyprof.models import build_model  # noqa: E402
from mask_speed import timed  # noqa: E402

GOAL_TIME, GOAL_MEMORY = 0.3, 1.0


# ------------------------------------------------------------------------------------ workloads
def builtin_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a built-in model (``resnet18``: the CIFAR ResNet-18)."""
    return {n: tuple(p.shape) for n, p in build_model(name).named_parameters()}


def large_shapes(entries: int) -> dict[str, tuple[int, ...]]:
    """Four weight matrices of 4096 columns (1/3, 1/3, 1/6, 1/6 of the entries) and their biases."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i, share in enumerate((1 / 3, 1 / 3, 1 / 6, 1 / 6)):
        rows = max(1, round(share * entries / 4096))
        shapes[f"layers.{i}.weight"] = (rows, 4096)
        shapes[f"layers.{i}.bias"] = (rows,)
    return shapes


def make_update(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    update = {}
    for name, shape in shapes.items():
        scale = 2.0 ** float(torch.empty(()).uniform_(-3, 3, generator=g))
        update[name] = torch.randn(shape, generator=g).mul_(scale)
    return update


def make_costs(model: str, shapes: dict[str, tuple[int, ...]]) -> CostMap:
    """A SIMULATED profile with a per-layer table for this model (see the module docstring)."""
    base = load_profile("sim-h100")
    data = base.model_dump()
    layers = []
    for i, (name, shape) in enumerate(shapes.items()):
        c = base.predict_layer(math.prod(shape), "float32")
        j = (c.joules_per_update + c.joules_per_line) * (0.5 + 0.25 * (i % 5))  # per entry, lines not shared
        layers.append({"name": name, "shape": list(shape), "dtype": "float32", "numel": math.prod(shape),
                       "compensation_j": c.compensation_j, "compensation_ci_low": c.compensation_j,
                       "compensation_ci_high": c.compensation_j,
                       "fixed_j": 1000 * j, "fixed_ci_low": 1000 * j, "fixed_ci_high": 1000 * j,
                       "joules_per_update": j, "ci_low": j, "ci_high": j, "method": "predicted"})
    data["models"] = {model: {"description": "benchmark table (SIMULATED)", "layers": layers}}
    profile = DeviceProfile.model_validate(data)
    return CostMap.from_profile(profile, model, {n: torch.empty(s, device="meta") for n, s in shapes.items()})


# ------------------------------------------------------------------------------------ reference
class Reference:
    """The contract on the concatenation, the slow and obvious way: stable sorts of all entries."""

    def __init__(self, update: dict[str, torch.Tensor], costs: CostMap) -> None:
        tensors = [u.detach().cpu() for u in update.values()]
        self.names = list(update)
        self.sizes = [t.numel() for t in tensors]
        self.marginal = [costs.marginal_j(n) for n in self.names]
        self.fixed = [costs.fixed_j(n) for n in self.names]
        self.costs = costs
        self.magnitudes = torch.cat([t.reshape(-1) for t in tensors]).abs_()
        self.scores = torch.cat([cwmp_scores(t, c).reshape(-1) for t, c in zip(tensors, self.marginal)])
        self.bounds = torch.tensor(self.sizes).cumsum(0)

    def topk(self, k: int) -> torch.Tensor:
        order = torch.from_numpy(np.argsort(-self.magnitudes.numpy(), kind="stable")[:k])
        mask = torch.zeros(self.magnitudes.numel(), dtype=torch.bool)
        mask[order] = True
        return mask

    def joules(self, mask: torch.Tensor) -> float:
        counts = [int(np.count_nonzero(p.numpy())) for p in torch.split(mask, self.sizes)]
        return math.fsum(f + m * k for f, m, k in zip(self.fixed, self.marginal, counts) if k)

    def cwmp(self, budget_j: float) -> torch.Tensor:
        order = torch.from_numpy(np.argsort(-self.scores.numpy(), kind="stable"))  # ties: lower position first
        layer = torch.bucketize(order, self.bounds, right=True, out_int32=True)
        step = torch.tensor(self.marginal, dtype=torch.float64)[layer]
        first = torch.full((len(self.sizes),), len(order), dtype=torch.int64)
        first.scatter_reduce_(0, layer.long(), torch.arange(len(order)), "amin")
        touched = first < len(order)
        step[first[touched]] += torch.tensor(self.fixed, dtype=torch.float64)[touched]
        j = int((step.cumsum_(0) <= budget_j).sum())
        del step, layer

        def mask_of(j: int) -> torch.Tensor:
            mask = torch.zeros(len(order), dtype=torch.bool)
            mask[order[:j]] = True
            return mask

        while j < len(order) and self.joules(mask_of(j + 1)) <= budget_j:  # the float64 cumsum is
            j += 1  # not the contract's sum: correct it with the exact per-layer one
        while j > 0 and self.joules(mask_of(j)) > budget_j:
            j -= 1
        return mask_of(j)


    def setup_rule_ok(self, mask: torch.Tensor, budget_j: float, top: torch.Tensor) -> bool:
        """What the set-up-aware rule (CWMP's default) promises, checked the slow way: the mask's
        exact joules are within the budget, each layer keeps its k largest magnitudes (ties by
        lower index) for some k, and it retains at least Top-K's ``sum |u|`` (``top``: Top-K's mask
        at this energy)."""
        if self.joules(mask) > budget_j:
            return False
        start = 0
        for size in self.sizes:
            part, magnitudes = mask[start : start + size], self.magnitudes[start : start + size]
            start += size
            k = int(np.count_nonzero(part.numpy()))
            if k and k < size:
                order = np.argsort(-magnitudes.numpy(), kind="stable")[:k]
                expected = np.zeros(size, dtype=bool)
                expected[order] = True
                if not np.array_equal(expected, part.numpy()):
                    return False
        kept = math.fsum(self.magnitudes[mask].double().tolist()) if mask.any() else 0.0
        return kept >= math.fsum(self.magnitudes[top].double().tolist()) * (1 - 1e-12)


def flat(masks: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([m.reshape(-1).cpu() for m in masks.values()])


# ------------------------------------------------------------------------------------ measuring
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
TIMING_MMAP_THRESHOLD = 32 * 2**20  # what glibc's dynamic threshold grows to in a long-running process
PROBE_MMAP_THRESHOLD = 128 * 1024  # glibc's default: blocks this large are mapped, and unmapped when freed


def mallopt(mmap_threshold: int) -> bool:
    """glibc: allocations of ``mmap_threshold`` bytes or more are mapped and unmapped on free;
    the heap is trimmed past twice that."""
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) and libc.mallopt(M_TRIM_THRESHOLD, 2 * mmap_threshold))


def memory_probe_ready() -> str:
    """'' when peak RSS can be measured per call, else why not. Leaves glibc mapping every block of
    128 KiB or more on its own (the mode the memory probes need, set before anything is allocated)."""
    try:
        if not mallopt(PROBE_MMAP_THRESHOLD):
            return "mallopt refused"
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
        return ""
    except OSError as exc:
        return f"no per-call peak RSS here ({exc})"


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> float:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del out
        return float(peak - before)
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # free heap pages go back before the call
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    out = fn()
    peak = _status_kib("VmHWM")
    del out
    return (peak - before) * 1024.0


# ------------------------------------------------------------------------------------ the runs
class Case(NamedTuple):
    model: str
    ratio: float
    n: int
    update_bytes: int
    calls: dict[str, Callable[[], object]]
    same: dict[str, bool]
    extra: dict[str, float]


def prepare(model: str, shapes, ratio: float, device: torch.device, memory: bool, seed: int) -> Case:
    """Build one case, check every row's masks (also the warm-up), and probe each call's memory."""
    update = {n: u.to(device) for n, u in make_update(shapes, seed).items()}
    costs = make_costs(model, shapes)
    n = sum(u.numel() for u in update.values())
    update_bytes = sum(u.numel() * u.element_size() for u in update.values())
    k = int(math.floor(ratio * n + 0.5))
    budget = Budget.topk_keep_ratio(ratio)
    cwmp, topk = Pruner(costs, budget, method="cwmp"), Pruner(costs, budget, method="topk")
    magnitudes = torch.cat([u.reshape(-1) for u in update.values()]).abs_()

    # correctness of every row, against the reference on the concatenation (also a warm-up)
    ref = Reference(update, costs)
    top_ref = ref.topk(k)
    kth = float(torch.topk(magnitudes, k, sorted=False).values.min()) if k else math.inf
    same = {"torch.topk": not k or kth == float(ref.magnitudes[top_ref].min())}
    top = topk.masks(update)
    floor_j = costs.floor_j(list(update))  # the round's compensation, paid whatever is kept
    same["topk"] = (torch.equal(flat(top.masks), top_ref) and top.mask_j == ref.joules(top_ref)
                    and top.budget_j == top.predicted_j == floor_j + top.mask_j)
    cw = cwmp.masks(update)
    same["cwmp@topk-J"] = (ref.setup_rule_ok(flat(cw.masks), top.mask_j, top_ref) and cw.budget_j == top.budget_j
                           and cw.predicted_j == floor_j + cw.mask_j <= cw.budget_j)
    del ref, top_ref, top, cw
    feedback = ErrorFeedback()
    cwmp.compress(update, feedback)  # a residual to work with
    corrected = {name: u + feedback.residuals[name] for name, u in update.items()}
    sent, result = cwmp.compress(update, feedback, sparse=True)
    ref = Reference(corrected, costs)
    top_ref = ref.topk(k)
    same["ef-step"] = ref.setup_rule_ok(flat(result.masks), ref.joules(top_ref), top_ref) and all(
        torch.equal(sent[name].to_dense() + feedback.residuals[name], corrected[name])
        and torch.equal(sent[name].values, corrected[name][result.masks[name]])
        and torch.equal(sent[name].to_dense() != 0, result.masks[name] & (corrected[name] != 0))
        for name in update
    )
    del ref, top_ref, corrected, sent, result

    calls: dict[str, Callable[[], object]] = {
        "torch.topk": lambda: torch.topk(magnitudes, k, sorted=False),
        "cwmp@topk-J": lambda: cwmp.masks(update),
        "topk": lambda: topk.masks(update),
        "ef-step": lambda: cwmp.compress(update, feedback, sparse=True),  # what a client sends
    }
    extra = {name: peak_extra_bytes(fn, device) if memory else math.nan for name, fn in calls.items()}
    return Case(model, ratio, n, update_bytes, calls, same, extra)


def medians(case: Case, repeats: int, device: torch.device) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in case.calls}
    for _ in range(repeats):
        for name, fn in case.calls.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "large"], choices=["resnet18", "cnn", "large"],
                        help="built-in model shapes (resnet18, cnn) and/or the few-large-layers model")
    parser.add_argument("--large-entries", type=float, default=1e8, help="entries of the few-large-layers model")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.01, 0.1], help="keep ratios")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per case (median reported)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads first (the baseline's and the pruner's threads; default: torch's)")
    parser.add_argument("--quick", action="store_true",
                        help="the small CNN's shapes and 1 M entries, 1 repeat (the smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.large_entries, args.repeats = ["cnn", "large"], min(args.large_entries, 1e6), 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    why_no_memory = "" if device.type == "cuda" else memory_probe_ready()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# torch {torch.__version__}, {device.type} ({where}), {torch.get_num_threads()} threads, "
          f"median of {args.repeats}; costs: SIMULATED sim-h100 profile with a made-up per-layer table")
    if why_no_memory:
        print(f"# extra memory not measured: {why_no_memory}")
    cases = []
    for model in args.models:  # first every check and memory probe, then the timing (see the docstring)
        shapes = large_shapes(int(args.large_entries)) if model == "large" else builtin_shapes(model)
        for ratio in args.keep:
            cases.append(prepare(model, shapes, ratio, device, not why_no_memory, args.seed))
    if device.type == "cpu" and not why_no_memory:
        mallopt(TIMING_MMAP_THRESHOLD)
    print(f"{'model':<9} {'entries':>10} {'keep':>5} {'call':<12} {'ms':>9} {'x topk':>8} "
          f"{'extra MiB':>10} {'x update':>9} {'masks ok':>9}")
    worst_time = worst_memory = 0.0
    all_same = True
    for case in cases:
        times = medians(case, args.repeats, device)
        for name, seconds in times.items():
            share = seconds / times["torch.topk"]
            memory = case.extra[name] / case.update_bytes
            if name != "torch.topk":
                worst_time = max(worst_time, share)
                worst_memory = max(worst_memory, memory)
            all_same &= case.same[name]
            print(f"{case.model:<9} {case.n:>10} {case.ratio:>5.0%} {name:<12} {seconds * 1e3:>9.1f} {share:>7.3f}x "
                  f"{case.extra[name] / 2**20:>10.1f} {memory:>8.2f}x {'yes' if case.same[name] else 'NO':>9}",
                  flush=True)
    print(f"# worst pruner / torch.topk: {worst_time:.3f}x (goal <= {GOAL_TIME}x); worst extra memory: "
          f"{worst_memory:.2f}x the update (goal <= {GOAL_MEMORY}x; ef-step's includes what it sends: kept positions and values)")
    return 0 if all_same else 1


if __name__ == "__main__":
    sys.exit(main())
