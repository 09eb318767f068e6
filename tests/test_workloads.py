"""Each workload's declared counts against what its kernel really does, on small tensors.

Two independent checks: an aten-level recorder (TorchDispatchMode) that prices every op the call
dispatches with its own traffic/FLOP rules, and diffs of the operands before and after one call."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from energyprof.counts import WorkCounts
from energyprof.meters.sim import SimMeter
from energyprof.workloads import (
    DENSITIES,
    DTYPES,
    SIZES,
    WORKLOADS,
    Compensation,
    make_workload,
)
from energyprof.replays import LayerReplay, RoundReplay, SimKernel

N = 4096
DEVICES = ["cpu"] + (["cuda:0"] if torch.cuda.is_available() else [])


def build(name, dtype="float32", size=N, device="cpu", **params):
    if WORKLOADS[name].sparse:
        params.setdefault("density", 0.05)
    return make_workload(name, size=size, dtype=dtype, **params).setup(device)


def nbytes(t):
    return t.numel() * t.element_size()


# ---------------------------------------------------------------------------- aten recorder
_FREE = {"aten::view", "aten::_unsafe_view", "aten::lift_fresh", "aten::detach", "aten::alias"}
_OVERWRITE = {"aten::copy_", "aten::index_put_", "aten::index_fill_"}  # self is written, not read


class OpTraffic(TorchDispatchMode):
    """Logical traffic of every op a call dispatches: each distinct operand read once, each written
    element once; indexing ops touch only the indexed entries. FLOPs per output element by op."""

    def __init__(self):
        super().__init__()
        self.read = self.written = self.flops = 0
        self.launches = self.scattered = self.lines = 0
        self.allocated = []

    def _scatter(self, index, target, row=1):
        """A scattered write of ``index``'s rows into ``target``: bytes and distinct 64-byte lines."""
        size = target.element_size()
        positions = (index.reshape(-1, 1) * row + torch.arange(row, device=index.device)).reshape(-1)
        self.scattered += positions.numel() * size
        self.lines += int(torch.unique(positions * size // 64).numel())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name
        if name in _FREE:
            return out
        self.launches += 1
        schema_args = func._schema.arguments
        bound = list(zip(schema_args, args)) + [(a, kwargs[a.name]) for a in schema_args if a.name in kwargs]
        targets = [v for a, v in bound if a.alias_info is not None and a.alias_info.is_write]
        inputs = {}
        for a, v in bound:
            for t in v if isinstance(v, (list, tuple)) else [v]:
                if isinstance(t, torch.Tensor):
                    inputs[(t.data_ptr(), t.numel(), t.dtype)] = t
        if not targets:  # a functional op: its result is a fresh allocation
            self.allocated.append(name)
            targets = [out]
        target = targets[0]
        a = {s.name: v for s, v in bound}
        if name == "aten::index_put_":
            idx = [i for i in a["indices"] if i is not None]
            self.read += nbytes(a["values"]) + sum(nbytes(i) for i in idx)
            self.written += nbytes(a["values"])
            row = target.numel() // target.shape[0]
            self._scatter(idx[0], target, row)
            return out
        if name == "aten::index_fill_":
            row = target.numel() // target.shape[a["dim"]]
            self.read += nbytes(a["index"])
            self.written += a["index"].numel() * row * target.element_size()
            self._scatter(a["index"], target, row)
            return out
        if name == "aten::index_add_":  # target[index] += source: reads both, writes the rows
            assert a.get("alpha", 1) == 1
            self.read += nbytes(a["index"]) + 2 * nbytes(a["source"])
            self.written += nbytes(a["source"])
            self.flops += a["source"].numel()
            self._scatter(a["index"], target, target.numel() // target.shape[a["dim"]])
            return out
        if name == "aten::index_select":
            self.read += nbytes(a["index"]) + nbytes(target)
            self.written += nbytes(target)
            return out
        overwritten = name in _OVERWRITE or "out" in a  # the target is not read
        for t in inputs.values():
            if not (overwritten and any(t is x for x in targets)):
                self.read += nbytes(t)
        self.written += nbytes(target)
        self.flops += self._flops(name, a, target)
        return out

    @staticmethod
    def _flops(name, a, target):
        n = target.numel()
        if name == "aten::mm":
            return 2 * a["self"].shape[0] * a["self"].shape[1] * a["mat2"].shape[1]
        scaled = lambda key: int(a.get(key, 1) != 1)  # noqa: E731  an extra multiply by a scalar
        per_element = {
            "aten::add_": 1 + scaled("alpha"),
            "aten::mul_": 1,
            "aten::sqrt": 1,
            "aten::lerp_": 3,  # self + w * (end - self)
            "aten::addcmul_": 2 + scaled("value"),
            "aten::addcdiv_": 2 + scaled("value"),
            "aten::copy_": 0,
        }
        assert name in per_element, f"no FLOP rule for {name}: the kernel runs an op this test does not know"
        return n * per_element[name]


def trace(w):
    with OpTraffic() as rec:
        w()
    return rec


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(WORKLOADS))
def test_declared_traffic_and_flops_match_the_ops_the_kernel_runs(name, dtype):
    w = build(name, dtype)
    rec = trace(w)
    assert rec.allocated == []  # no hidden temporaries: the declared traffic is all of it
    assert (rec.read, rec.written, rec.flops) == (w.counts_.bytes_read, w.counts_.bytes_written, w.counts_.flops)
    assert rec.launches == w.counts_.launches
    assert (rec.scattered, rec.lines) == (w.counts_.scattered_bytes_written, w.counts_.lines_written)


@pytest.mark.parametrize("fmas", [1, 4, 64])
def test_fma_flops_agree_with_torch_flop_counter(fmas):
    w = build("fma", size=N, fmas=fmas)
    with FlopCounterMode(display=False) as fc:
        w()
    assert fc.get_total_flops() == w.counts_.flops == 2 * fmas * w.size
    assert w.counts_.elements == w.tensors_["y"].numel() == w.size


# ---------------------------------------------------------------------------- diffs of the operands
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", ["scatter", "runs"])
def test_kept_writes_land_exactly_on_the_kept_entries(name, dtype):
    w = build(name, dtype, density=0.03)
    target = w.tensors_["target"]
    target.fill_(float("nan"))  # a sentinel: every entry the kernel writes stops being NaN
    w()
    written = (~target.isnan()).nonzero().squeeze(1)
    expected = round(0.03 * N) if name == "scatter" else round(0.03 * (N // 32)) * 32
    assert written.numel() == w.counts_.elements == expected
    assert written.numel() * target.element_size() == w.counts_.bytes_written
    if name == "scatter":
        assert torch.equal(written, w.tensors_["positions"])
        assert torch.equal(target[written], w.tensors_["values"])
    else:  # whole runs, aligned to run_length
        rows = written.view(-1, w.run_length)
        assert torch.equal(rows[:, 0] // w.run_length, w.tensors_["runs"])
        assert bool((rows.diff(dim=1) == 1).all())


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_update_phase_sends_the_compensated_entries_clears_them_and_applies_them(dtype):
    """The masked update phase a non-empty mask adds: pack, clear, apply; never the dense add."""
    w = build("update", dtype, density=0.02)
    t = {k: v.clone() for k, v in w.tensors_.items()}
    w()
    after, p = w.tensors_, t["positions"]
    assert "update" not in after  # the compensation is not part of the update phase (issue 21)
    compensated = t["residual"]  # compensated already: the round's Compensation ran before
    assert torch.equal(after["send_values"], compensated[p])
    assert torch.equal(after["send_positions"].long(), p)
    kept = torch.zeros(w.size, dtype=torch.bool)
    kept[p] = True
    assert torch.equal(after["residual"], torch.where(kept, torch.zeros_like(compensated), compensated))
    expected_param = t["param"].clone()
    expected_param[p] += compensated[p]
    assert torch.equal(after["param"], expected_param)
    per_line = 64 // after["param"].element_size()
    assert w.counts_.lines_written == 2 * int(torch.unique(p // per_line).numel())


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_pack_fills_the_send_buffer_with_the_kept_values_and_positions(dtype):
    w = build("pack", dtype, density=0.02)
    t = w.tensors_
    t["send_values"].fill_(float("nan"))
    t["send_positions"].fill_(-1)
    w()
    assert torch.equal(t["send_values"], t["update"][t["positions"]])
    assert torch.equal(t["send_positions"].long(), t["positions"])
    k = t["positions"].numel()
    assert w.counts_.elements == k
    assert w.counts_.bytes_written == nbytes(t["send_values"]) + nbytes(t["send_positions"])


UPDATED = {"scatter": "target", "runs": "target", "pack": "send_values", "residual": "residual", "update": "param",
           "compensation": "residual",
           "sgd": "param", "momentum": "param", "adam": "param", "fma": "y"}
BIG_STEP = {"sgd": {"lr": 0.5}, "momentum": {"lr": 0.5}, "adam": {"lr": 0.5}}  # changes visible in float32


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_elements_are_the_entries_the_update_changes(name):
    assert set(UPDATED) == set(WORKLOADS)
    w = build(name, **BIG_STEP.get(name, {}))
    out = w.tensors_[UPDATED[name]]
    if name in ("pack", "fma"):  # write-only outputs: a NaN sentinel shows every entry written
        out.fill_(float("nan"))
    before = out.clone()
    w()
    changed = (out != before) & ~out.isnan()
    assert int(changed.sum()) == w.counts_.elements


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_operands_are_random_not_zeros(name):
    w = build(name, "bfloat16")
    assert w.tensors_
    for key, t in w.tensors_.items():
        if t.is_floating_point() and key not in ("send_values", "denom", "y"):  # outputs: written by the call
            assert float(t.float().std()) > 0.1, key


def test_dense_residual_update_accumulates_then_clears_the_sent_entries():
    w = build("residual", density=0.1)
    t = w.tensors_
    expected = t["residual"] + t["update"]
    expected[t["positions"]] = 0
    w()
    assert torch.equal(t["residual"], expected)


def test_compute_updates_do_the_textbook_math():
    sgd = build("sgd", lr=0.1)
    p, g = sgd.tensors_["param"].clone(), sgd.tensors_["grad"]
    sgd()
    torch.testing.assert_close(sgd.tensors_["param"], p - 0.1 * g)

    adam = build("adam", lr=0.01)
    t = {k: v.clone() for k, v in adam.tensors_.items()}
    adam()
    m = 0.9 * t["exp_avg"] + 0.1 * t["grad"]
    v = 0.999 * t["exp_avg_sq"] + 0.001 * t["grad"] ** 2
    torch.testing.assert_close(adam.tensors_["param"], t["param"] - 0.01 * m / (v.sqrt() + 1e-8))


# ---------------------------------------------------------------------------- sizes, densities, registry
@pytest.mark.parametrize("density", DENSITIES)
def test_densities_from_a_tenth_of_a_percent_to_all(density):
    w = build("scatter", size=10_000, density=density)
    assert w.counts_.elements == max(1, round(density * 10_000))
    assert w.tensors_["positions"].unique().numel() == w.counts_.elements


def test_grid_spans_cache_to_dram_and_the_three_dtypes():
    assert SIZES[0] * 4 <= 64 * 2**10 and SIZES[-1] * 4 >= 2**30
    assert set(DTYPES) == {"float32", "float16", "bfloat16"}
    assert min(DENSITIES) == 0.001 and max(DENSITIES) == 1.0


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_counts_scale_with_element_size(dtype):
    s = torch.empty((), dtype=DTYPES[dtype]).element_size()
    w = build("sgd", dtype)
    assert w.counts_ == WorkCounts(N, 2 * N * s, N * s, 2 * N, 2 * N * s, launches=1)


def test_registry_errors_name_the_choices():
    with pytest.raises(ValueError, match="scatter"):
        make_workload("nope")
    with pytest.raises(ValueError, match="no density"):
        make_workload("sgd", density=0.1)
    with pytest.raises(ValueError, match="density"):
        make_workload("scatter", density=0.0)
    with pytest.raises(ValueError, match="dtype"):
        make_workload("sgd", dtype="int8").setup()


# ---------------------------------------------------------------------------- layer replay
def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8, 4))


@pytest.mark.parametrize("kernel", ["scatter", "pack", "residual"])
def test_layer_replay_updates_each_parameter_with_its_mask(kernel):
    model = small_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(p.shape, generator=gen) < 0.2 for n, p in model.named_parameters() if n != "3.bias"}
    replay = LayerReplay(model, masks, kernel=kernel).setup("cpu")
    assert list(replay.layers_) == list(masks)
    for name, layer in replay.layers_.items():
        p = dict(model.named_parameters())[name]
        assert layer.size == p.numel() and layer.dtype_ == p.dtype
        assert torch.equal(layer.tensors_["positions"], masks[name].flatten().nonzero().squeeze(1))
    rec = trace(replay)
    total = replay.counts_
    assert (rec.read, rec.written) == (total.bytes_read, total.bytes_written)
    assert total.elements == sum(layer.counts_.elements for layer in replay.layers_.values())
    if kernel != "residual":
        assert total.elements == sum(int(m.sum()) for m in masks.values())
    for n, p in model.named_parameters():  # the model itself is never touched
        assert torch.equal(p, before[n])


def test_compensation_is_the_dense_add_error_feedback_runs_every_round():
    w = build("compensation")
    t = {k: v.clone() for k, v in w.tensors_.items()}
    w()
    assert torch.equal(w.tensors_["residual"], t["residual"] + t["update"])
    assert w.counts_.elements == N and w.counts_.launches == 1 and w.counts_.lines_written == 0


def test_round_replay_compensates_every_tensor_and_updates_only_the_kept_ones():
    """A round: the compensation of every tensor (kept or not), then the update phase of the tensors
    a mask keeps entries of; its counts are the traced ops'."""
    model = small_model()
    gen = torch.Generator().manual_seed(2)
    masks = {n: torch.rand(p.shape, generator=gen) < 0.2 for n, p in model.named_parameters()}
    masks["3.bias"][:] = False  # not opened: compensated, nothing else
    replay = RoundReplay(model, masks).setup("cpu")
    names = [n for n, _ in model.named_parameters()]
    assert list(replay.layers_) == [f"{n}#compensation" for n in names] + [n for n in names if n != "3.bias"]
    assert isinstance(replay.layers_["3.bias#compensation"], Compensation)
    rec = trace(replay)
    total = replay.counts_
    assert (rec.read, rec.written, rec.launches) == (total.bytes_read, total.bytes_written, total.launches)
    assert len(replay.count_parts_) == len(replay.layers_)


def test_layer_replay_rejects_unknown_names_and_wrong_shapes():
    model = small_model()
    with pytest.raises(KeyError, match="nope"):
        LayerReplay(model, {"nope": torch.ones(3, dtype=torch.bool)}).setup()
    with pytest.raises(ValueError, match="shape"):
        LayerReplay(model, {"3.bias": torch.ones(5, dtype=torch.bool)}).setup()


# ---------------------------------------------------------------------------- stand-in and devices
def test_sim_kernel_reports_its_own_work_once_per_call():
    meter = SimMeter("h100", clock="virtual", effects="-drift")  # a cold device: each call costs the same
    counts = WorkCounts(bytes_written=10**6, working_set_bytes=10**6)
    k = SimKernel(meter, counts, 0.01).setup()
    assert k.reports_work and k.counts_ == counts
    for _ in range(3):
        k()
    assert meter.clock() == pytest.approx(0.03)
    assert meter.reported_dynamic_j == pytest.approx(3 * meter.price(counts))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
@pytest.mark.parametrize("name", list(WORKLOADS))
def test_workloads_run_on_cuda_with_the_same_counts(name):
    cpu, gpu = build(name, "float16"), build(name, "float16", device="cuda:0")
    rec = trace(gpu)
    torch.cuda.synchronize()
    assert gpu.counts_ == cpu.counts_
    assert (rec.read, rec.written, rec.flops) == (gpu.counts_.bytes_read, gpu.counts_.bytes_written, gpu.counts_.flops)
    assert all(t.device.type == "cuda" for t in gpu.tensors_.values())
    assert not math.isnan(float(gpu.tensors_[UPDATED[name]].float().sum()))


def test_a_compensation_group_is_each_tensors_compensation_one_launch_each():
    from energyprof.workloads import Compensation, CompensationGroup

    sizes = (10, 64, 64, 1728)
    group = CompensationGroup(sizes, seed=3).setup("cpu")
    assert group.count_parts_ == tuple(Compensation.counts_for(n, 4) for n in sizes)
    assert group.counts_.launches == len(sizes) and group.counts_.elements == sum(sizes)
    before = {k: t.clone() for k, t in group.tensors_.items()}
    group()
    for i, n in enumerate(sizes):
        assert torch.equal(group.tensors_[f"{i}.residual"], before[f"{i}.residual"] + before[f"{i}.update"])
    with pytest.raises(ValueError, match="sizes"):
        CompensationGroup(())
