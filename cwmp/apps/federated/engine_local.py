"""The ``local`` engine: the sweep's runs on this machine, one client after another within a run.

The runs (one seed, one method) are independent, so with ``workers`` > 1 they are shared among that
many worker processes (spawned, one torch thread each: a simulated client has one CPU); the rows
come back in run order whatever finished first.

Deterministic: torch runs on one thread while it trains (so float sums do not depend on how many
threads the machine offers), every shuffle comes from ``client_generator`` and the partitions and
initial weights from the run seed. The same config gives the same CSV, bit for bit, with any number
of workers.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import queue as _queue
from collections.abc import Callable
from typing import Any, Optional

import torch

from cwmp.apps.federated.data import Dataset, load_dataset
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

__all__ = ["run_local", "one_thread", "default_workers"]

Progress = Callable[[int, str], None]  # (rounds just finished, description)


def one_thread() -> contextlib.AbstractContextManager[None]:
    """torch with one intra-op thread for the duration (each simulated client has one CPU)."""
    return torch_threads(1)


def default_workers(runs: int) -> int:
    """One worker per CPU this process may use, at most one per run."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, runs))


def run_local(config: FLConfig, dataset: Dataset, progress: Optional[Progress] = None,
              workers: int = 1) -> list[RoundRecord]:
    """Every (seed, method) run of the sweep; rows in run order, round 0 first in each run.
    ``workers`` > 1: the runs are shared among that many spawned processes, each of which loads
    ``config.dataset`` itself (``dataset`` must be what ``load_dataset(config.dataset)`` gives)."""
    runs = list(runs_of(config))
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if workers == 1 or len(runs) == 1:
        return _run_here(config, dataset, runs, progress)
    return _run_in_workers(config, dataset, runs, progress, min(workers, len(runs)))


def _run_here(config: FLConfig, dataset: Dataset, runs: list[tuple[int, Arm]],
              progress: Optional[Progress]) -> list[RoundRecord]:
    records: list[RoundRecord] = []
    x_train, y_train, x_test, y_test = tensors_of(dataset)
    with one_thread():
        setups = {}
        for seed, arm in runs:
            if seed not in setups:
                setups = {seed: seed_setup(config, dataset, seed)}
            setup = setups[seed]
            model = build_model_for(config, dataset, seed)
            fleet = Fleet(config, model)
            records.extend(_one_run(config, arm, setup, model, fleet, x_train, y_train, x_test, y_test, progress))
    return records


# ------------------------------------------------------------------------ worker processes
_WORKER: dict[str, Any] = {}


def _worker_init(config: FLConfig, messages: Any) -> None:
    # the worker loads the dataset itself (the same arrays: digits' split is fixed, CIFAR-10 is read
    # from its folder): its start-up data stay small, so the parent never blocks writing them to a
    # worker still importing torch (a Ctrl-C there left the worker to die with a traceback)
    dataset = load_dataset(config.dataset)
    _WORKER.update(config=config, dataset=dataset, messages=messages)


def _worker_run(seed: int, arm: Arm) -> list[RoundRecord]:
    config, dataset, messages = _WORKER["config"], _WORKER["dataset"], _WORKER["messages"]
    return _run_here(config, dataset, [(seed, arm)], lambda n, what: messages.put((n, what)))


def _run_in_workers(config: FLConfig, dataset: Dataset, runs: list[tuple[int, Arm]],
                    progress: Optional[Progress], workers: int) -> list[RoundRecord]:
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch's threads
    messages = context.Queue()
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                                                  initargs=(config, messages))
    try:
        futures = [pool.submit(_worker_run, seed, arm) for seed, arm in runs]
        pending = set(futures)
        told = 0
        while pending:
            done, pending = concurrent.futures.wait(pending, timeout=0.2,
                                                    return_when=concurrent.futures.FIRST_COMPLETED)
            told += _drain(messages, progress)
            for future in done:
                future.result()  # a run that failed fails the sweep here, with its own exception
        told += _drain(messages, progress, until=len(runs) * config.rounds - told)
        return [record for future in futures for record in future.result()]
    except BaseException:
        # Ctrl-C (or a failed run): the workers stop now, not after the runs they are in
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        messages.close()


def _drain(messages: Any, progress: Optional[Progress], until: int = 0) -> int:
    """Pass the workers' progress messages on; with ``until``, wait (a second at most for each) for
    that many rounds still in the queue's pipe. Returns the rounds told."""
    told = 0
    while True:
        try:
            n, what = messages.get(timeout=1.0) if told < until else messages.get_nowait()
        except (_queue.Empty, OSError, ValueError):
            return told
        told += n
        if progress is not None:
            progress(n, what)


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
