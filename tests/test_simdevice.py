"""The simulator's device model (energyprof/meters/simdevice.py): a truth of its own, with physics the
cost model lacks, each effect switchable. Virtual clock only: no wall-clock assertion."""

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import energyprof.costmodel as cm
from energyprof.counts import WorkCounts
from energyprof.errors import MeterSpecError
from energyprof.meters import open_meter
from energyprof.meters.sim import PRESETS, SimMeter
from energyprof.meters.simdevice import EFFECTS, DEVICES, parse_effects
from energyprof.workloads import UpdatePhase, scatter_layout

ROOT = Path(__file__).resolve().parent.parent
TRUTH_FILES = ("energyprof/meters/simdevice.py", "energyprof/meters/sim.py")


def test_the_truth_code_never_imports_the_cost_model():
    for rel in TRUTH_FILES:
        tree = ast.parse((ROOT / rel).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.module is None or "costmodel" not in node.module, f"{rel} imports {node.module}"
                assert all(a.name != "costmodel" for a in node.names), rel
            elif isinstance(node, ast.Import):
                assert all("costmodel" not in a.name for a in node.names), rel
            elif isinstance(node, ast.Name | ast.Attribute):
                name = node.id if isinstance(node, ast.Name) else node.attr
                assert name not in ("predict_joules", "dram_fraction", "features", "costmodel"), f"{rel} uses {name}"
    # and importing the simulated meter does not load it
    code = "import sys, energyprof.meters.sim; print('energyprof.costmodel' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_effects_syntax():
    assert parse_effects(None) == parse_effects("all") == frozenset(EFFECTS)
    assert parse_effects("none") == frozenset()
    assert parse_effects("-drift-interference") == frozenset(EFFECTS) - {"drift", "interference"}
    assert parse_effects("levels+pages") == {"levels", "pages"}
    assert parse_effects("none+drift") == {"drift"}
    assert parse_effects("all-launch") == frozenset(EFFECTS) - {"launch"}
    for bad in ("heat", "drift+heat", "levels,pages", "drift+none"):
        with pytest.raises(ValueError, match="effects"):
            parse_effects(bad)
    with pytest.raises(MeterSpecError, match="unknown effect 'heat'.*levels"):
        open_meter("sim:effects=-heat")
    m = open_meter("sim:preset=rpi4,effects=-drift,clock=virtual")
    assert m.info.details["effects"] == "levels+pages+prefetch+launch+interference"
    assert "drift" not in m.device.effects and m.info.simulated


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_three_memory_levels_or_more_and_a_step_with_levels_off(preset):
    device = PRESETS[preset].device
    assert len(device.levels) >= 3 and device.levels[-1].capacity_bytes is None
    caps = [lv.capacity_bytes for lv in device.levels[:-1]]

    def per_byte(d, ws):
        return d.price(WorkCounts(bytes_written=10**6, working_set_bytes=int(ws))) / 10**6

    sizes = [caps[0] / 4, caps[0] * 0.99, caps[1] * 0.99, caps[-1] * 64]
    costs = [per_byte(device, ws) for ws in sizes]
    assert costs[0] == pytest.approx(device.levels[0].write_j_per_byte)
    assert costs[1] == pytest.approx(device.levels[0].write_j_per_byte)  # still fits the first level
    assert device.levels[0].write_j_per_byte < costs[2] <= device.levels[1].write_j_per_byte
    assert costs[3] == pytest.approx(device.levels[-1].write_j_per_byte, rel=0.01)
    grid = np.geomspace(caps[0] / 8, caps[-1] * 256, 60)
    prices = [per_byte(device, ws) for ws in grid]
    assert all(a <= b * (1 + 1e-12) for a, b in zip(prices, prices[1:]))  # more traffic leaves the caches
    for ws in grid:
        assert device.level_shares(ws).sum() == pytest.approx(1.0)
    # levels off: the last cache level and main memory, a step the cost model can represent
    two = device.with_effects(frozenset())
    assert per_byte(two, caps[0] / 4) == per_byte(two, caps[-1]) == pytest.approx(device.levels[-2].write_j_per_byte)
    assert per_byte(two, caps[-1] * 1.01) == pytest.approx(device.levels[-1].write_j_per_byte)


def test_with_every_effect_off_the_cost_model_can_represent_the_device_exactly():
    """Why the effects matter: without them the truth is a cost-model shape (checked here, in the
    test, against energyprof.costmodel; the truth code itself never calls it)."""
    device = DEVICES["desktop-cpu"].with_effects(frozenset())
    llc, dram = device.levels[-2], device.levels[-1]
    coefficients = cm.CostCoefficients(
        j_per_call=device.launch_j, j_per_byte_read={"cache": llc.read_j_per_byte, "dram": dram.read_j_per_byte},
        j_per_byte_written={"cache": llc.write_j_per_byte, "dram": dram.write_j_per_byte},
        j_per_line_written={"cache": 64 * llc.write_j_per_byte, "dram": 64 * dram.write_j_per_byte},
        j_per_flop=device.j_per_flop, cache_bytes=llc.capacity_bytes, transition_octaves=0.0)
    g = torch.Generator().manual_seed(0)
    for n in (4096, 1 << 16, 1 << 20, 1 << 23):
        for d in (0.001, 0.05, 0.5):
            k = max(1, round(d * n))
            layout = scatter_layout(torch.randperm(n, generator=g)[:k].sort().values, 4)
            counts = UpdatePhase.counts_for(n, k, layout["lines_written"], 4, layout["pages_written"],
                                            layout["line_runs_written"])
            assert device.price(counts) == pytest.approx(cm.predict_joules(counts, coefficients), rel=1e-9)
            # every effect on: the same counts cost something the model's shape does not give
    on = DEVICES["desktop-cpu"]
    n, k = 1 << 20, 1 << 14
    positions = torch.randperm(n, generator=g)[:k].sort().values
    layout = scatter_layout(positions, 4)
    counts = UpdatePhase.counts_for(n, k, layout["lines_written"], 4, layout["pages_written"], layout["line_runs_written"])
    assert abs(on.price(counts) / device.price(counts) - 1) > 0.01


def test_pages_and_prefetch():
    device = DEVICES["rpi4"]
    n = 1 << 22  # 16 MiB of float32: main memory
    spread = torch.arange(0, n, 1024)[:1024]  # one entry per 4 KiB page: 1024 lines, 1024 pages
    packed = torch.arange(0, 1024 * 16, 16)  # one entry per line, consecutive lines: 1024 lines, 16 pages
    a, b = scatter_layout(spread, 4), scatter_layout(packed, 4)
    assert a["lines_written"] == b["lines_written"] == 1024
    assert (a["pages_written"], a["line_runs_written"]) == (1024, 1024)
    assert (b["pages_written"], b["line_runs_written"]) == (16, 1)

    def price(layout, effects):
        counts = WorkCounts(bytes_written=4096, scattered_bytes_written=4096, working_set_bytes=4 * n, **layout)
        return device.with_effects(frozenset(effects)).price(counts)

    miss = device.tlb_miss_share(4 * n)
    assert 0 < miss < 1 and device.tlb_miss_share(device.tlb_reach_bytes) == 0.0  # within the TLB's reach: free
    assert price(a, {"pages"}) - price(b, {"pages"}) == pytest.approx((1024 - 16) * device.page_j * miss)
    assert price(b, {"prefetch"}) < price(a, {"prefetch"})  # neighbouring lines ride the prefetcher
    assert price(b, {"prefetch"}) / price(a, {"prefetch"}) == pytest.approx(1 - device.prefetch_discount, rel=0.01)
    assert price(a, set()) == price(b, set())  # without both effects, lines are all that count


def test_launch_cost_depends_on_the_kernel_and_its_arguments():
    device = DEVICES["h100"]
    plain = WorkCounts(bytes_read=4096, bytes_written=4096, working_set_bytes=8192, launches=1)
    scatter = WorkCounts(bytes_read=4096, bytes_written=4096, scattered_bytes_written=4096, lines_written=64,
                         working_set_bytes=8192, launches=1)
    big = WorkCounts(bytes_read=1 << 30, bytes_written=1 << 30, working_set_bytes=1 << 31, launches=1)
    assert device.launch_joules(scatter) > 1.1 * device.launch_joules(plain)
    assert device.launch_joules(big) > 1.2 * device.launch_joules(plain)
    off = device.with_effects(frozenset())
    assert off.launch_joules(scatter) == off.launch_joules(plain) == off.launch_joules(big) == device.launch_j


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_drift_a_few_percent_over_a_busy_minute_and_relaxing_at_idle(preset):
    m = SimMeter(preset, clock="virtual", noise_w=0.0)
    counts = WorkCounts(bytes_written=10**6, working_set_bytes=10**9)
    cold = m.price(counts)
    for _ in range(600):  # a minute of back-to-back work
        m.run_kernel(counts, 0.1)
    hot = m.price(counts)
    assert 0.02 <= hot / cold - 1 <= 0.10, hot / cold - 1
    assert m.device.static_power(m.temperature()) > m.device.static_power_w
    m.sleep(10 * m.device.tau_s)
    assert m.price(counts) / cold - 1 < 0.001
    still = SimMeter(preset, clock="virtual", effects="-drift")
    for _ in range(100):
        still.run_kernel(counts, 0.1)
    assert still.price(counts) == pytest.approx(still.device.price(counts))


def test_interference_bursts_are_heavy_tailed_and_foreign():
    m = SimMeter("h100", seed=3, clock="virtual")
    bursts = m.interference.bursts(0.0, 3600.0)
    assert 40 < len(bursts) < 170  # one per 40 s on average
    powers = np.array([p for _, _, p in bursts])
    assert powers.max() > 5 * np.median(powers)  # heavy tail: rare big bursts
    m.begin()
    t0 = m.clock()
    m.sleep(600.0)
    meas = m.end()
    foreign = m.foreign_energy_j(t0, m.clock())
    assert foreign > 0
    assert meas.energy_j == pytest.approx(m.true_energy_j(t0, m.clock()) + foreign, rel=2e-3)
    quiet = SimMeter("h100", seed=3, clock="virtual", effects="-interference")
    assert quiet.interference.bursts(0.0, 3600.0) == []
