"""A Flower app that is not ours, written as Flower's PyTorch template writes one (a ClientApp
whose train function replies with ``"arrays"`` and ``"metrics"``, a ServerApp running FedAvg),
with the five lines that add CWMP. Used by tests/test_flower_integration.py; imported by Ray's
workers, hence a module of its own."""

from __future__ import annotations

import logging
import os
from typing import Optional

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch import nn

ROUNDS = 3


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def client_data(partition: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + partition)
    x = torch.randn(64, 16, generator=g)
    true_w = torch.linspace(-1, 1, 64).view(4, 16)
    return x, x @ true_w.T + 0.01 * torch.randn(64, 4, generator=g)


def make_client_app(mod_ratio: Optional[float]) -> ClientApp:
    mods = []
    if mod_ratio is not None:
        from cwmp import Budget
        from cwmp.flower import make_cwmp_mod

        mods.append(make_cwmp_mod("sim-rpi4", model="linreg", allow_predicted=True,
                                  budget=Budget.topk_keep_ratio(mod_ratio)))
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        model = Net()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        x, y = client_data(int(context.node_config["partition-id"]))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(5):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                              "metrics": MetricRecord({"train-loss": float(loss), "num-examples": len(x)})})
        return Message(content=content, reply_to=msg)

    return app


def make_server_app(mod: bool, out: dict) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(0)
        strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2)
        if mod:
            from cwmp.flower import CWMPStrategy

            strategy = CWMPStrategy(strategy)
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()), num_rounds=ROUNDS)
        out["arrays"] = {k: np.array(v.numpy()) for k, v in result.arrays.items()}
        out["rounds"] = getattr(strategy, "rounds", {})

    return app


def run_foreign_app(mod_ratio: Optional[float]) -> tuple[dict, dict]:
    """(final global weights, CWMPStrategy.rounds or {}) after ``ROUNDS`` rounds on 2 nodes."""
    from flwr.simulation import run_simulation

    here = os.path.dirname(os.path.abspath(__file__))
    path = os.environ.get("PYTHONPATH", "")
    if here not in path.split(os.pathsep):  # Ray's workers import this module by name
        os.environ["PYTHONPATH"] = here + (os.pathsep + path if path else "")
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)
    out: dict = {}
    run_simulation(
        server_app=make_server_app(mod_ratio is not None, out),
        client_app=make_client_app(mod_ratio),
        num_supernodes=2,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                        "init_args": {"num_cpus": 2, "logging_level": logging.ERROR, "log_to_driver": False}},
    )
    if "arrays" not in out:
        raise RuntimeError("the foreign app's ServerApp did not finish; run it with verbose logging")
    return out["arrays"], out["rounds"]
