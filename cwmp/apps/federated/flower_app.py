"""The ``flower`` engine: the same experiment on Flower's simulation runtime (flwr >= 1.42, Ray
backend), with Flower's Message API.

- ``client_app`` (a ``flwr.clientapp.ClientApp``) trains: it receives the global weights and the
  run's settings in the train message, trains on its partition (the node's ``partition-id``) and
  replies with the dense update. It knows nothing of pruning.
- ``cwmp_mod`` is the thin client-side mod that sparsifies that reply on its way out: it adds the
  client's error-feedback residual (kept in ``Context.state``, which Flower keeps per node across
  rounds), masks with Top-K or CWMP, stores the new residual, replaces the dense update by the
  kept values and int32 indices, and adds the client's predicted energy to the reply's metrics.
- ``SparseFedAvg`` (a ``flwr.serverapp.strategy.FedAvg``) decodes the sparse replies and applies
  the example-weighted mean to the global weights, with the same ``fedavg_step`` as the local
  engine; the ``ServerApp`` runs one strategy per (seed, method) of the sweep and evaluates the
  global model on the held-out test split after every round.

Every computation is a function of ``experiment`` shared with the local engine, so both engines
give the same numbers up to float summation order (the test states the tolerance).

Importing this module imports ``flwr``; the ``cwmp`` core never does.
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # before flwr is imported: no telemetry

import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict
from typing import Optional

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from cwmp.apps.federated.data import Dataset, load_dataset
from cwmp.apps.federated.engine_local import one_thread
from cwmp.apps.federated.experiment import (
    Arm,
    ClientEnergy,
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

__all__ = ["SparseFedAvg", "client_app", "cwmp_mod", "make_server_app", "run_flower"]

UPDATE_KEY, BUFFERS_KEY, SPARSE_KEY, METRICS_KEY = "update", "buffers", "sparse", "metrics"
RESIDUAL_KEY, RUN_KEY = "cwmp.residual", "cwmp.run"
Progress = Callable[[int, str], None]


# ------------------------------------------------------------------------ settings on the wire
def settings_record(config: FLConfig, seed: int, arm: Arm) -> ConfigRecord:
    """Everything a client needs for one run, as a ConfigRecord sent with every train message."""
    c = asdict(config)
    return ConfigRecord({
        "dataset": c["dataset"], "model": c["model"], "clients": c["clients"], "alpha": c["alpha"],
        "rounds": c["rounds"], "local-epochs": c["local_epochs"], "batch-size": c["batch_size"], "lr": c["lr"],
        "min-partition": c["min_partition"], "profiles": list(c["profiles"]),
        "seed": seed, "method": arm.method, "ratio": arm.ratio, "power": arm.power or 0.0, "fixed": arm.fixed,
    })


def settings_of(record: ConfigRecord) -> tuple[FLConfig, int, Arm]:
    config = FLConfig(
        dataset=str(record["dataset"]), model=str(record["model"]), clients=int(record["clients"]),
        alpha=float(record["alpha"]), rounds=int(record["rounds"]), local_epochs=int(record["local-epochs"]),
        batch_size=int(record["batch-size"]), lr=float(record["lr"]), min_partition=int(record["min-partition"]),
        profiles=tuple(str(p) for p in record["profiles"]), seeds=(int(record["seed"]),),
    )
    method, power = str(record["method"]), float(record["power"])
    return config, int(record["seed"]), Arm(method, float(record["ratio"]), power if method == "cwmp" else None,
                                            bool(record["fixed"]))


# ------------------------------------------------------------------ per-process caches (actors)
_DATASETS: dict[str, Dataset] = {}
_SETUPS: dict[tuple, object] = {}
_FLEETS: dict[tuple, tuple[torch.nn.Module, Fleet]] = {}


def _dataset(spec: str) -> Dataset:
    if spec not in _DATASETS:
        _DATASETS[spec] = load_dataset(spec)
    return _DATASETS[spec]


def _setup(config: FLConfig, seed: int):
    key = (config.dataset, config.model, config.clients, config.alpha, config.min_partition, seed)
    if key not in _SETUPS:
        _SETUPS.clear()
        _SETUPS[key] = seed_setup(config, _dataset(config.dataset), seed)
    return _SETUPS[key]


def _fleet(config: FLConfig) -> tuple[torch.nn.Module, Fleet]:
    key = (config.dataset, config.model, config.profiles, config.clients)
    if key not in _FLEETS:
        model = build_model_for(config, _dataset(config.dataset), 0)
        _FLEETS[key] = (model, Fleet(config, model))
    return _FLEETS[key]


# ----------------------------------------------------------------------------- the ClientApp
def cwmp_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Client-side mod: sparsify the dense update that the train function replies with."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    config, seed, arm = settings_of(msg.content["config"])
    client = int(context.node_config["partition-id"])
    _, fleet = _fleet(config)
    updates = reply.content[UPDATE_KEY].to_torch_state_dict()

    feedback = ErrorFeedback()
    run_tag = f"{seed}/{arm.tag()}"
    if RUN_KEY in context.state and context.state[RUN_KEY]["tag"] == run_tag and RESIDUAL_KEY in context.state:
        feedback.load_state_dict({"residuals": context.state[RESIDUAL_KEY].to_torch_state_dict()}, like=updates)
    # (a new run starts with an empty residual: the same as a fresh ErrorFeedback in the local engine)
    with one_thread():
        payload, result = compress_update(updates, feedback, arm.pruner(fleet.cost_map(client)))
    context.state[RESIDUAL_KEY] = ArrayRecord(torch_state_dict=feedback.state_dict()["residuals"])
    context.state[RUN_KEY] = ConfigRecord({"tag": run_tag})

    buffers = reply.content[BUFFERS_KEY].to_torch_state_dict()
    energy = client_energy(fleet.cost_map(client), fleet.profile(client), result.masks, wire_bytes(payload, buffers),
                           result)
    sparse = ArrayRecord(numpy_ndarrays=[])
    for name, (values, index) in payload.items():
        sparse[f"{name}/values"] = _array(values)
        sparse[f"{name}/indices"] = _array(index)
    metrics = reply.content[METRICS_KEY]
    metrics.update({
        "floor-j": energy.floor_j, "mask-j": energy.mask_j, "radio-j": energy.radio_j, "bytes-sent": energy.bytes_sent,
        "kept": energy.kept, "total": energy.total,
        **{f"kept/{name}": k for name, k in energy.kept_by_layer.items()},
    })
    return Message(
        RecordDict({SPARSE_KEY: sparse, BUFFERS_KEY: reply.content[BUFFERS_KEY], METRICS_KEY: metrics}),
        reply_to=msg,
    )


def _array(values: np.ndarray):
    from flwr.app import Array

    return Array(np.ascontiguousarray(values))


client_app = ClientApp(mods=[cwmp_mod])


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Local SGD from the global weights; replies with the dense update (the mod sparsifies it)."""
    config, seed, _ = settings_of(msg.content["config"])
    server_round = int(msg.content["config"]["server-round"])
    client = int(context.node_config["partition-id"])
    dataset = _dataset(config.dataset)
    setup = _setup(config, seed)
    model, _ = _fleet(config)
    idx = torch.from_numpy(setup.partitions[client])
    x_train, y_train, _, _ = tensors_of(dataset)
    global_state = msg.content["arrays"].to_torch_state_dict()
    with one_thread():
        updates, buffers = local_update(
            model, global_state, x_train[idx], y_train[idx], config, client_generator(seed, server_round, client)
        )
    content = RecordDict({
        UPDATE_KEY: ArrayRecord(torch_state_dict=updates),
        BUFFERS_KEY: ArrayRecord(torch_state_dict=buffers),
        METRICS_KEY: MetricRecord({"num-examples": int(idx.numel()), "partition-id": client}),
    })
    return Message(content, reply_to=msg)


# ----------------------------------------------------------------------------- the ServerApp
class SparseFedAvg(FedAvg):
    """FedAvg over sparse replies (kept values + int32 indices), all clients every round, the
    replies summed in partition-id order; collects each round's per-client energy."""

    def __init__(self, config: FLConfig, seed: int, arm: Arm, param_names: list[str]) -> None:
        super().__init__(
            fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=config.clients,
            min_available_nodes=config.clients,
        )
        self.config, self.seed, self.arm, self.param_names = config, seed, arm, param_names
        self.energies: dict[int, list[ClientEnergy]] = {}
        self._global: dict[str, torch.Tensor] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = arrays.to_torch_state_dict()
        return super().configure_train(server_round, arrays, settings_record(self.config, self.seed, self.arm), grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        failed = [m for m in replies if m.has_error()]
        if failed:
            reasons = "; ".join(f"node {m.metadata.src_node_id}: {m.error.reason}" for m in failed[:3])
            raise RuntimeError(f"round {server_round}: {len(failed)} of {len(replies)} clients failed ({reasons})")
        if len(replies) != self.config.clients:
            raise RuntimeError(f"round {server_round}: {len(replies)} replies from {self.config.clients} clients")
        replies.sort(key=lambda m: int(m.content[METRICS_KEY]["partition-id"]))
        params = {name: self._global[name] for name in self.param_names}
        decoded, energies = [], []
        for m in replies:
            sparse, metrics = m.content[SPARSE_KEY], m.content[METRICS_KEY]
            payload = {
                name: (sparse[f"{name}/values"].numpy(), sparse[f"{name}/indices"].numpy()) for name in params
            }
            decoded.append((int(metrics["num-examples"]), decode_sparse(payload, params),
                            m.content[BUFFERS_KEY].to_torch_state_dict()))
            energies.append(ClientEnergy(float(metrics["floor-j"]), float(metrics["mask-j"]), float(metrics["radio-j"]),
                                         int(metrics["bytes-sent"]), int(metrics["kept"]), int(metrics["total"]),
                                         {name: int(metrics[f"kept/{name}"]) for name in params}))
        self.energies[server_round] = energies
        new = fedavg_step(self._global, self.param_names, decoded)
        return ArrayRecord(torch_state_dict=new), MetricRecord({"clients": len(replies)})


def make_server_app(config: FLConfig, records: list[RoundRecord], progress: Optional[Progress] = None) -> ServerApp:
    """A ServerApp that runs the whole sweep (one ``SparseFedAvg`` per seed and method) and appends
    every round's record to ``records``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        dataset = _dataset(config.dataset)
        _, _, x_test, y_test = tensors_of(dataset)
        model, fleet = _fleet(config)
        for seed, arm in runs_of(config):
            setup = _setup(config, seed)
            strategy = SparseFedAvg(config, seed, arm, setup.param_names)
            accuracy: dict[int, float] = {}

            def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
                with one_thread():
                    accuracy[server_round] = evaluate(model, arrays.to_torch_state_dict(), x_test, y_test)
                if server_round and progress is not None:
                    progress(1, f"seed {seed} {arm.label} round {server_round}/{config.rounds} (flower)")
                return MetricRecord({"accuracy": accuracy[server_round]})

            strategy.start(grid=grid, initial_arrays=ArrayRecord(torch_state_dict=setup.initial_state),
                           num_rounds=config.rounds, evaluate_fn=evaluate_fn)
            cumulative = 0.0
            numel = {name: setup.initial_state[name].numel() for name in setup.param_names}
            records.append(round_record(arm, seed, 0, [], 0.0, accuracy[0], fleet.simulated, numel))
            for r in range(1, config.rounds + 1):
                rec = round_record(arm, seed, r, strategy.energies[r], cumulative, accuracy[r], fleet.simulated, numel)
                cumulative = rec.cumulative_energy_j
                records.append(rec)

    return app


def run_flower(config: FLConfig, progress: Optional[Progress] = None, ray_address: Optional[str] = None,
               num_cpus: Optional[int] = None, verbose: bool = False) -> list[RoundRecord]:
    """Run the sweep on Flower's simulation runtime: ``config.clients`` virtual SuperNodes, each
    ClientApp actor given 1 CPU (Flower's default of 2 would serialise clients on a 2-core machine).
    ``ray_address`` joins an existing Ray cluster (``auto``, or ``HOST:PORT`` of ``ray start --head``)."""
    from flwr.simulation import run_simulation

    if not verbose:
        for name in ("flwr", "ray"):
            logging.getLogger(name).setLevel(logging.WARNING)
    _dataset(config.dataset)  # fail here, with a clear message, before Ray starts
    Fleet(config, build_model_for(config, _dataset(config.dataset), 0))
    records: list[RoundRecord] = []
    init_args: dict = {"logging_level": logging.ERROR, "log_to_driver": verbose}
    if ray_address:
        init_args["address"] = ray_address
    elif num_cpus:
        init_args["num_cpus"] = num_cpus
    run_simulation(
        server_app=make_server_app(config, records, progress),
        client_app=client_app,
        num_supernodes=config.clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": init_args},
        verbose_logging=verbose,
    )
    expected = len(list(runs_of(config))) * (config.rounds + 1)
    if len(records) != expected:
        raise RuntimeError(
            f"the Flower simulation ended with {len(records)} of {expected} round records; "
            "rerun with verbose logging (--verbose) to see the ServerApp's error"
        )
    return records
