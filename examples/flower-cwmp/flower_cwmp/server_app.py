"""The ServerApp: FedAvg wrapped in CWMPStrategy, which decodes the clients' sparse replies."""

from __future__ import annotations

from logging import INFO

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from cwmp.flower import CWMPStrategy

from flower_cwmp.task import accuracy, digits, make_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    torch.set_num_threads(1)
    config = context.run_config
    rounds = int(config["num-server-rounds"])
    model = make_model(str(config["model"]))
    cwmp = {"cwmp-keep-ratio": float(config["keep-ratio"]), "cwmp-method": str(config["method"]),
            "cwmp-p": float(config["p"])}
    strategy = CWMPStrategy(FedAvg(fraction_evaluate=0.0), train_config=cwmp)
    _, _, x_test, y_test = digits()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        return MetricRecord({"accuracy": accuracy(model, x_test, y_test)})

    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=rounds,
                            evaluate_fn=evaluate)

    simulated = any(c.simulated for clients in strategy.rounds.values() for c in clients)
    label = " [SIMULATED profile]" if simulated else ""
    log(INFO, "CWMP (%s, %s @ keep ratio %s, p=%s)%s:", config["profile"], config["method"],
        config["keep-ratio"], config["p"], label)
    for r, clients in sorted(strategy.rounds.items()):
        kept, total = sum(c.kept for c in clients), sum(c.total for c in clients)
        acc = result.evaluate_metrics_serverapp[r]["accuracy"]
        log(INFO, "  round %d: predicted %.4g J (all clients), kept %.2f%% of entries, %d bytes sent, "
            "test accuracy %.3f", r, strategy.rounds_j()[r], 100 * kept / total, sum(c.bytes_sent for c in clients),
            acc)
    opened = strategy.opened_layers()
    replies = sum(len(c) for c in strategy.rounds.values())
    log(INFO, "  layers opened (replies that kept any entry, of %d): %s", replies,
        ", ".join(f"{name} {n}" for name, n in opened.items()))
    never = [name for name, n in opened.items() if n == 0]
    log(INFO, "  never opened: %s", ", ".join(never) if never else "none")
