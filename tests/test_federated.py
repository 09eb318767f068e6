"""The federated benchmark's experiment, local engine, outputs and command line (small runs: mlp on
digits, a few clients and rounds)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from calibrate.profile import Radio, load_profile
from cwmp.apps.federated.data import load_dataset
from cwmp.apps.federated.engine_local import run_local
from cwmp.apps.federated.experiment import (
    DEFAULT_ROUNDS,
    FLConfig,
    Fleet,
    arms_of,
    build_model_for,
    client_energy,
    decode_sparse,
    encode_sparse,
    fedavg_step,
    parse_ratios,
    runs_of,
    wire_bytes,
)
from cwmp.costmap import CostMap
from tests.sigint import sigint_default
from energyprof.cli import _FL_DEFAULT_ROUNDS, main

TINY = dict(model="mlp", clients=3, rounds=2, seeds=(0, 1), ratios=(0.05,), lr=0.1, sweep=())


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_the_core_imports_neither_flower_nor_the_meters():
    code = (
        "import sys, cwmp, cwmp.masks, cwmp.pruner, cwmp.feedback, cwmp.costmap, cwmp.apps.federated; "
        "bad = sorted(m for m in sys.modules if m == 'flwr' or m.startswith(('flwr.', 'energyprof.meters', 'ray'))); "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_sweep_and_ratios():
    assert parse_ratios("1%,5%,0.1,20%") == (0.01, 0.05, 0.1, 0.2)
    for bad in ("5", "0", "x%", ""):
        with pytest.raises(ValueError, match="keep ratio|no keep ratios"):
            parse_ratios(bad)
    arms = arms_of(FLConfig(ratios=(0.01, 0.1), sweep=()))
    assert [(a.method, a.ratio, a.power) for a in arms] == [
        ("topk", 0.01, None), ("cwmp", 0.01, 1.0), ("cwmp", 0.01, 2.0),
        ("topk", 0.1, None), ("cwmp", 0.1, 1.0), ("cwmp", 0.1, 2.0),
    ]
    # the budget sweep: every method again at fixed joules per round, after the ratios
    arms = arms_of(FLConfig(ratios=(0.01,), sweep=(0.005, 0.4)))
    assert [(a.method, a.ratio, a.power, a.fixed) for a in arms[3:]] == [
        ("topk", 0.005, None, True), ("cwmp", 0.005, 1.0, True), ("cwmp", 0.005, 2.0, True),
        ("topk", 0.4, None, True), ("cwmp", 0.4, 1.0, True), ("cwmp", 0.4, 2.0, True),
    ]
    assert len({a.tag() for a in arms}) == len(arms)
    config = FLConfig(profiles=("sim-rpi4", "sim-h100"), clients=5)
    assert [config.profile_of(i) for i in range(5)] == ["sim-rpi4", "sim-h100"] * 2 + ["sim-rpi4"]
    with pytest.raises(ValueError, match="--alpha must be > 0.*--seeds repeats"):
        FLConfig(alpha=0, seeds=(1, 1))
    assert DEFAULT_ROUNDS == _FL_DEFAULT_ROUNDS


def test_sparse_wire_format_and_fedavg_weights():
    like = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    sent = {"w": torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, -1.0]]), "b": torch.tensor([0.5, 0.0, 0.0])}
    masks = {n: t != 0 for n, t in sent.items()}
    payload = encode_sparse(sent, masks)
    assert payload["w"][1].dtype == np.int32 and list(payload["w"][1]) == [1, 5]
    assert wire_bytes(payload, {}) == 3 * (4 + 4)  # 3 kept float32 values + 3 int32 indices
    back = decode_sparse(payload, like)
    assert all(torch.equal(back[n], sent[n]) for n in like)
    state = {"w": torch.ones(2, 3), "b": torch.zeros(3), "bn.running_mean": torch.zeros(3)}
    other = {"w": torch.zeros(2, 3), "b": torch.tensor([1.0, 0.0, 0.0])}
    new = fedavg_step(state, ["w", "b"], [
        (30, back, {"bn.running_mean": torch.full((3,), 1.0)}),
        (10, other, {"bn.running_mean": torch.full((3,), 5.0)}),
    ])
    assert torch.allclose(new["w"], torch.ones(2, 3) + 0.75 * sent["w"])
    assert torch.allclose(new["b"], 0.75 * sent["b"] + 0.25 * other["b"])
    assert torch.allclose(new["bn.running_mean"], torch.full((3,), 2.0))


def test_client_energy_is_the_cost_map_plus_the_radio_datasheet_figure(digits):
    config = FLConfig(model="mlp")
    model = build_model_for(config, digits, 0)
    profile = load_profile("sim-rpi4")
    cmap = CostMap.from_profile(profile, "mlp", model.named_parameters(), allow_predicted=True)
    masks = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) < 0.1 for n, p in model.named_parameters()}
    e = client_energy(cmap, profile, masks, bytes_sent=1000)
    assert e.joules == pytest.approx(cmap.predicted_joules(masks)) and e.radio_j == 0.0
    # the whole round: every tensor's compensation (the floor) beside what the masks add
    assert e.floor_j == pytest.approx(sum(cmap.compensation_j(n) for n in cmap.prices)) and e.floor_j > 0
    assert e.mask_j == pytest.approx(cmap.mask_joules(masks)) and e.mask_j > 0
    radio = profile.model_copy(update={"radio": Radio(joules_per_byte=5e-8, source="datasheet: test figure")})
    e2 = client_energy(cmap, radio, masks, bytes_sent=1000)
    assert e2.radio_j == pytest.approx(5e-5) and e2.joules == pytest.approx(e.joules + 5e-5)
    assert e2.kept == sum(int(m.sum()) for m in masks.values())
    # an empty mask still pays the floor: the compensation runs every round whatever is kept
    empty = client_energy(cmap, profile, {n: torch.zeros_like(m) for n, m in masks.items()}, bytes_sent=0)
    assert empty.mask_j == 0.0 and empty.joules == pytest.approx(e.floor_j)
    assert set(empty.kept_by_layer) == set(masks) and not any(empty.kept_by_layer.values())


def test_local_engine_is_deterministic_and_fair(digits):
    config = FLConfig(**TINY)
    a = run_local(config, digits)
    b = run_local(config, digits)
    assert [(r.method, r.p, r.seed, r.round, r.accuracy, r.cumulative_energy_j) for r in a] == \
        [(r.method, r.p, r.seed, r.round, r.accuracy, r.cumulative_energy_j) for r in b]
    assert len(a) == 2 * 3 * (config.rounds + 1)
    for seed in config.seeds:
        rows = [r for r in a if r.seed == seed]
        # the same initial weights for every method: the same round-0 accuracy
        assert len({r.accuracy for r in rows if r.round == 0}) == 1
        topk = {r.round: r for r in rows if r.method == "topk"}
        for r in rows:
            assert r.simulated is True
            if r.round:
                assert r.kept_fraction > 0
                assert r.round_energy_j > 0
                # CWMP spends at most what Top-K spends on the same update (the budget is Top-K's energy)
                if r.method == "cwmp":
                    assert r.round_energy_j <= topk[r.round].round_energy_j * 3  # same order of energy
        assert abs(topk[config.rounds].kept_fraction - 0.05) < 0.001
        assert topk[config.rounds].accuracy > topk[0].accuracy  # it learns
    # every round pays every client's floor (the compensation of every tensor), whatever is kept
    fleet = Fleet(config, build_model_for(config, digits, 0))
    floor = config.clients * fleet.cost_map(0).floor_j()
    for r in a:
        if r.round:
            assert r.floor_energy_j == pytest.approx(floor) and r.mask_energy_j > 0
            assert r.round_energy_j == pytest.approx(r.floor_energy_j + r.mask_energy_j + r.radio_energy_j)
            # per-layer telemetry adds up to what was kept
            assert sum(r.kept_by_layer.values()) / (config.clients * sum(r.numel_by_layer.values())) == \
                pytest.approx(r.kept_fraction)
            assert all(0 <= r.opened_by_layer[n] <= config.clients for n in r.numel_by_layer)


def test_the_budget_sweep_gives_every_method_the_same_fixed_joules(digits):
    """A fixed-budget arm: each client's round costs at most the floor plus what keeping that share of
    every tensor would add, the same for every method and every round."""
    from cwmp.apps.federated.experiment import budget_sweep_j

    config = FLConfig(model="mlp", clients=2, rounds=2, seeds=(0,), ratios=(0.05,), powers=(2.0,), lr=0.1,
                      sweep=(0.02,))
    records = run_local(config, digits)
    fleet = Fleet(config, build_model_for(config, digits, 0))
    budget = budget_sweep_j(fleet.cost_map(0), 0.02)
    assert budget > fleet.cost_map(0).floor_j()
    fixed = [r for r in records if r.fixed and r.round]
    assert {r.method for r in fixed} == {"topk", "cwmp"}
    for r in fixed:
        assert max(r.client_energy_j) <= budget * (1 + 1e-9)
        assert max(r.client_energy_j) > 0.5 * budget  # the budget is spent, not left over


def test_a_heterogeneous_fleet_prices_each_client_on_its_own_profile(digits):
    config = FLConfig(model="mlp", clients=2, rounds=1, seeds=(0,), ratios=(0.1,), powers=(1.0,),
                      profiles=("sim-rpi4", "sim-h100"))
    records = run_local(config, digits)
    first = [r for r in records if r.method == "topk" and r.round == 1][0]
    fleet = Fleet(config, build_model_for(config, digits, 0))
    per_entry = [fleet.cost_map(i)["1.weight"] for i in range(2)]
    assert per_entry[0] != per_entry[1]
    assert first.client_energy_j[0] != pytest.approx(first.client_energy_j[1], rel=0.01)
    info = {p["profile"]: p for p in fleet.describe()}
    assert info["sim-rpi4"]["clients"] == [0] and info["sim-h100"]["clients"] == [1]
    assert info["sim-rpi4"]["predicted_layers"]  # recorded: the shipped profiles have no layer table yet


def test_cli_writes_csv_plot_and_summary_labelled_simulated(tmp_path, capsys):
    out = tmp_path / "fl"
    rc = main(["fl", "--model", "mlp", "--clients", "3", "--rounds", "2", "--seeds", "0,1", "--ratios", "5%",
               "--sweep", "30%", "--lr", "0.1", "--out", str(out), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["simulated"] is True and "SIMULATED" in summary["energy_label"]
    block = summary["ratios"][0]
    assert [m["label"] for m in block["methods"]] == ["Top-K", "CWMP p=1", "CWMP p=2"]
    for m in block["methods"]:
        assert 0 <= m["final_accuracy_mean"] <= 1 and m["final_energy_j_mean"] > 0
    assert block["methods"][1]["energy_to_topk_accuracy_j"] == "never" or \
        block["methods"][1]["energy_to_topk_accuracy_j"] > 0
    csv_text = (out / "rounds.csv").read_text().splitlines()
    assert csv_text[0].startswith("# SIMULATED")
    assert csv_text[1].startswith("method,p,ratio,fixed_budget,seed,round,round_energy_j,floor_energy_j,mask_energy_j")
    assert len(csv_text) == 2 + 2 * 6 * 3 and all(line.endswith("SIMULATED") for line in csv_text[2:])
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "summary.md").read_text()
    assert "SIMULATED" in md.splitlines()[0] and "| 5% | CWMP p=2 |" in md
    # frontiers over the ratios and the sweep, where the joules go, which layers each method opens
    assert len(summary["frontier"]["points"]) == 6 and summary["frontier"]["rows"]
    assert all(row["ahead"] for row in summary["frontier"]["rows"])
    for e in summary["energy_split"]:
        assert e["floor_share"] + e["mask_share"] + e["radio_share"] == pytest.approx(1.0)
        assert 0 < e["floor_share"] < 1
    names = {n for n, _ in build_model_for(FLConfig(model="mlp"), load_dataset("digits"), 0).named_parameters()}
    assert {t["layer"] for t in summary["layers"]} == names
    assert "Per-layer telemetry" in md and "Where a client's round goes" in md and "Frontiers" in md
    assert (out / "layers.csv").read_text().startswith("# SIMULATED")


def test_cli_bad_input_names_the_problem(tmp_path, capsys):
    assert main(["fl", "--dataset", f"cifar10:{tmp_path / 'none'}", "--out", str(tmp_path)]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["fl", "--ratios", "5", "--out", str(tmp_path)]) == 1
    assert "percents" in capsys.readouterr().err
    assert main(["fl", "--profile", "no-such-device", "--out", str(tmp_path)]) == 1
    assert "no profile named 'no-such-device'" in capsys.readouterr().err
    assert main(["fl", "--workers", "0", "--out", str(tmp_path)]) == 1
    assert "--workers must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_worker_processes_give_the_same_records_bit_for_bit(digits):
    """--workers 2: the runs shared among two spawned processes give exactly the rows of one process,
    in the same order (the dataset reaches the workers pickled, with other strides: tensors_of
    copies it into one layout, or the convolutions round differently)."""
    from dataclasses import asdict

    # the CLI's learning rate and 10 clients: convolutions whose rounding the layout changes
    config = FLConfig(model="cnn", clients=10, rounds=1, seeds=(0,), ratios=(0.01,), powers=(1.0,), sweep=())
    told = []
    one = run_local(config, digits)
    two = run_local(config, digits, progress=lambda n, what: told.append(n), workers=2)
    assert [asdict(r) for r in two] == [asdict(r) for r in one]
    assert sum(told) == len(list(runs_of(config))) * config.rounds  # every round reported


def test_the_frontier_says_who_is_ahead_and_who_is_level():
    from cwmp.apps.federated.report import ahead

    b = lambda a, s: {"accuracy": a, "std": s}  # noqa: E731
    assert ahead({"Top-K": b(0.59, 0.11), "CWMP p=1": b(0.83, 0.07), "CWMP p=2": b(0.87, 0.04)}) == \
        "CWMP p=2 and CWMP p=1 (level within the seeds' spread; ahead of Top-K)"
    assert ahead({"Top-K": b(0.86, 0.04), "CWMP p=2": b(0.87, 0.03)}) == "tie (within the seeds' spread)"
    assert ahead({"Top-K": b(0.48, 0.14)}) == "Top-K"
    assert ahead({"Top-K": b(0.50, 0.01), "CWMP p=2": b(0.60, 0.02)}) == "CWMP p=2"
    assert ahead({}) is None


@pytest.mark.slow
def test_ctrl_c_stops_the_workers_at_once_and_exits_130(tmp_path):
    """SIGINT to `energyprof fl` alone (as `kill -INT` sends it; a terminal's Ctrl-C reaches the
    workers too): exit 130 with one line, and no worker left running its run to the end."""
    import os
    import signal
    import time

    cmd = [sys.executable, "-m", "energyprof", "fl", "--model", "mlp", "--clients", "3", "--rounds", "500",
           "--seeds", "0,1", "--ratios", "5%", "--sweep", "none", "--workers", "2", "--out", str(tmp_path / "o")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_default)  # as in a terminal, whatever the runner inherited
    children: set[int] = set()
    deadline = time.monotonic() + 120
    while len(children) < 2 and time.monotonic() < deadline and proc.poll() is None:  # the workers are up
        time.sleep(0.5)
        for task in os.listdir(f"/proc/{proc.pid}/task"):
            with open(f"/proc/{proc.pid}/task/{task}/children") as f:
                children |= {int(c) for c in f.read().split()}
    assert len(children) >= 2, "the workers never started"
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)  # 500 rounds x 3 runs each would take many minutes
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    time.sleep(1.0)
    alive = [c for c in children if os.path.exists(f"/proc/{c}") and
             open(f"/proc/{c}/stat").read().split()[2] != "Z"]
    assert not alive, alive
