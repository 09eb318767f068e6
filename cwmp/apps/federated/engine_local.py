"""The ``local`` engine: the whole sweep in this process, one client after another.

Deterministic: torch runs on one thread while it trains (so float sums do not depend on how many
threads the machine offers), every shuffle comes from ``client_generator`` and the partitions and
initial weights from the run seed. The same config gives the same CSV, bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Optional

import torch

from cwmp.apps.federated.data import Dataset
from cwmp.apps.federated.experiment import (
    Arm,
    FLConfig,
    Fleet,
    RoundRecord,
    build_model_for,
    client_energy,
    client_generator,
    compress_update,
    decode_sparse,
    evaluate,
    fedavg_step,
    local_update,
    round_record,
    runs_of,
    seed_setup,
    tensors_of,
    wire_bytes,
)
from cwmp.feedback import ErrorFeedback
from cwmp.parallel import torch_threads

__all__ = ["run_local", "one_thread"]

Progress = Callable[[int, str], None]  # (rounds just finished, description)


def one_thread() -> contextlib.AbstractContextManager[None]:
    """torch with one intra-op thread for the duration (each simulated client has one CPU)."""
    return torch_threads(1)


def run_local(config: FLConfig, dataset: Dataset, progress: Optional[Progress] = None) -> list[RoundRecord]:
    """Every (seed, method) run of the sweep; rows in run order, round 0 first in each run."""
    records: list[RoundRecord] = []
    x_train, y_train, x_test, y_test = tensors_of(dataset)
    with one_thread():
        setups = {}
        for seed, arm in runs_of(config):
            if seed not in setups:
                setups = {seed: seed_setup(config, dataset, seed)}
            setup = setups[seed]
            model = build_model_for(config, dataset, seed)
            fleet = Fleet(config, model)
            records.extend(_one_run(config, arm, setup, model, fleet, x_train, y_train, x_test, y_test, progress))
    return records


def _one_run(config: FLConfig, arm: Arm, setup, model, fleet: Fleet, x_train, y_train, x_test, y_test,
             progress: Optional[Progress]) -> list[RoundRecord]:
    state = {name: t.clone() for name, t in setup.initial_state.items()}
    params = {name: state[name] for name in setup.param_names}
    feedback = [ErrorFeedback() for _ in range(config.clients)]
    pruners = {name: arm.pruner(cmap) for name, cmap in fleet.cost_maps.items()}
    parts = [torch.from_numpy(p) for p in setup.partitions]
    simulated = fleet.simulated
    numel = {name: state[name].numel() for name in setup.param_names}
    records = [round_record(arm, setup.seed, 0, [], 0.0, evaluate(model, state, x_test, y_test), simulated, numel)]
    cumulative = 0.0
    for round_ in range(1, config.rounds + 1):
        replies, energies = [], []
        for client in range(config.clients):
            idx = parts[client]
            updates, buffers = local_update(
                model, state, x_train[idx], y_train[idx], config, client_generator(setup.seed, round_, client)
            )
            payload, result = compress_update(updates, feedback[client], pruners[config.profile_of(client)])
            energies.append(client_energy(
                fleet.cost_map(client), fleet.profile(client), result.masks, wire_bytes(payload, buffers), result
            ))
            replies.append((int(idx.numel()), decode_sparse(payload, params), buffers))
        state = fedavg_step(state, setup.param_names, replies)
        params = {name: state[name] for name in setup.param_names}
        record = round_record(arm, setup.seed, round_, energies, cumulative,
                              evaluate(model, state, x_test, y_test), simulated, numel)
        cumulative = record.cumulative_energy_j
        records.append(record)
        if progress is not None:
            progress(1, f"seed {setup.seed} {arm.label} round {round_}/{config.rounds}")
    return records
