"""The ``flower`` engine: the same experiment on Flower's simulation runtime (flwr >= 1.42, Ray
backend), with Flower's Message API.

- ``client_app`` (a ``flwr.clientapp.ClientApp``) trains as Flower's templates do: it receives the
  global weights (``"arrays"``) and the run's settings (``"config"``), trains on its partition (the
  node's ``partition-id``) and replies with its local weights and ``num-examples``. It knows
  nothing of pruning.
- Its one mod is the integration anyone can add to their own app, ``cwmp.flower.make_cwmp_mod``:
  it turns the reply into the update, adds the client's error-feedback residual (kept in
  ``Context.state``), masks with Top-K or CWMP at the run's keep ratio (the ``cwmp-*`` keys of the
  train config; ``cwmp-run`` starts each (seed, method) run with an empty residual), and sends the
  kept values and int32 indices. The cost map is the client's profile's, from the ``Fleet``.
- ``SparseFedAvg`` (a ``flwr.serverapp.strategy.FedAvg``) decodes the sparse replies with
  ``cwmp.flower.decode_update`` and applies the example-weighted mean to the global weights with
  the local engine's ``fedavg_step``; a client's energy is ``client_energy`` of the masks it sent
  (``cwmp.flower.sent_masks``). The ``ServerApp`` runs one strategy per (seed, method) of the sweep
  and evaluates the global model on the held-out test split after every round.

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

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
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
    evaluate,
    fedavg_step,
    local_update,
    round_record,
    runs_of,
    seed_setup,
    tensors_of,
)
from cwmp.flower import decode_update, make_cwmp_mod, sent_masks
from cwmp.pruner import Budget

__all__ = ["SparseFedAvg", "client_app", "cwmp_mod", "make_server_app", "run_flower"]

ARRAYS_KEY, CONFIG_KEY, METRICS_KEY = "arrays", "config", "metrics"
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
        # what the CWMP mod reads (cwmp.flower): this run's method and residual tag (the budget: _client_budget)
        "cwmp-method": arm.method, "cwmp-p": arm.power or 1.0, "cwmp-run": f"{seed}/{arm.tag()}",
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
def _client_cost_map(msg: Message, context: Context):
    config, _, _ = settings_of(msg.content[CONFIG_KEY])
    _, fleet = _fleet(config)
    return fleet.cost_map(int(context.node_config["partition-id"]))


def _client_budget(msg: Message, context: Context) -> Budget:
    """The run's budget on this client's device: what ``Arm.pruner`` gives the local engine."""
    config, _, arm = settings_of(msg.content[CONFIG_KEY])
    return arm.pruner(_client_cost_map(msg, context)).budget


# the run's method, p and residual tag come with every train message (``cwmp-*`` keys)
_sparsify = make_cwmp_mod(cost_map=_client_cost_map, budget=_client_budget)


def cwmp_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """The integration's mod (``cwmp.flower.make_cwmp_mod``) with torch on one thread."""
    with one_thread():
        return _sparsify(msg, context, call_next)


client_app = ClientApp(mods=[cwmp_mod])


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Local SGD from the global weights; replies with the local weights, as Flower's templates do (the
    mod sparsifies the update)."""
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
        local_update(
            model, global_state, x_train[idx], y_train[idx], config, client_generator(seed, server_round, client)
        )
    local = {name: t.detach().clone() for name, t in model.state_dict().items()}
    content = RecordDict({
        ARRAYS_KEY: ArrayRecord(torch_state_dict=local),
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
        self._sent = ArrayRecord()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = arrays.to_torch_state_dict()
        self._sent = arrays
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
        _, fleet = _fleet(self.config)
        decoded, energies = [], []
        for m in replies:
            metrics = m.content[METRICS_KEY]
            client = int(metrics["partition-id"])
            updates, dense = decode_update(m, self._sent)
            buffers = {name: dense[name] for name in self._global if name not in updates}
            decoded.append((int(metrics["num-examples"]), updates, buffers))
            energies.append(client_energy(fleet.cost_map(client), fleet.profile(client), sent_masks(m, self._sent),
                                          int(metrics["cwmp-bytes-sent"])))
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
