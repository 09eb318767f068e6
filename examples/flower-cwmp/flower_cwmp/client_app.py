"""The ClientApp: a train function as Flower's PyTorch template writes it, plus the CWMP mod."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from cwmp import Budget
from cwmp.flower import make_cwmp_mod

from flower_cwmp.task import make_model, partition, train as train_model


def _table(msg: Message, context: Context) -> str:
    """The profile's per-layer table for the model: the shipped profiles price ``mlp`` at digits'
    shape; their ``cnn`` table is for CIFAR-10's 3x32x32 input, so on digits every ``cnn`` layer is
    priced from the profile's global coefficients (allow_predicted) under a name of its own."""
    name = str(context.run_config["model"])
    return name if name == "mlp" else f"{name} (digits)"


# The CWMP mod: the profile and model come from the run config; the budget (Top-K's energy at
# 5 %) is the default that the ServerApp's `cwmp-keep-ratio` overrides every round.
cwmp_mod = make_cwmp_mod(
    profile=lambda msg, context: str(context.run_config["profile"]),
    model=_table,
    allow_predicted=True,
    budget=Budget.topk_keep_ratio(0.05),
)

app = ClientApp(mods=[cwmp_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    config = context.run_config
    model = make_model(str(config["model"]))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    client = int(context.node_config["partition-id"])
    x, y = partition(client, int(context.node_config["num-partitions"]), float(config["alpha"]))
    seed = 1000 * int(msg.content["config"]["server-round"]) + client  # the same shuffles with and without CWMP
    loss = train_model(model, x, y, int(config["local-epochs"]), int(config["batch-size"]), float(config["lr"]),
                       seed)
    content = RecordDict({
        "arrays": ArrayRecord(model.state_dict()),
        "metrics": MetricRecord({"train-loss": loss, "num-examples": len(x)}),
    })
    return Message(content=content, reply_to=msg)
