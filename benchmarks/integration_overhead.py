"""What CWMP's integrations cost in time per round, against the same code without them, in one run.

Flower (``cwmp.flower``): the ClientApp of ``examples/flower-cwmp`` with its run config (digits,
``mlp`` or ``cnn``, profile ``sim-rpi4``, CWMP at Top-K's energy at 5 %, 2 local epochs) called in
this process, as Flower's runtime calls it (``ClientApp(message, context)``), with the mod, and
the same train function in a ClientApp without it. A round of one client is: train on its
partition, then (with the mod) form the update, compensate, prune, encode. The server side is FedAvg's
``aggregate_train`` over two clients' replies, with ``decode_reply`` first (what ``CWMPStrategy``
does) against FedAvg on the dense replies. Ray, the SuperLink and the transport are left out: they
cost the same with and without the mod (the sparse reply is smaller; that saving is not counted).

DDP (``cwmp.ddp``): 2 processes on gloo on the CPU, ``mlp`` on digits, batch 64: a step (forward,
backward with the communication, SGD step) with the CWMP hook, against DDP's default all-reduce;
and the same hook with ``method="topk"``, to tell the selection's cost from the exchange's.

Times are medians over interleaved repeats (the variants alternate, so load on the machine hits
both alike); the ratio is with / without. torch runs on one thread per client or rank.

    python benchmarks/integration_overhead.py            # mlp and cnn, 30 rounds; DDP 40 steps
    python benchmarks/integration_overhead.py --quick    # 5 rounds, 10 steps
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "flower-cwmp"))
sys.path.insert(0, str(ROOT))


def _message(content, message_type):
    from flwr.app import Message, Metadata

    metadata = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=3600, message_type=message_type)
    return Message(content=content, metadata=metadata)


def flower_rounds(model_name: str, rounds: int) -> dict[str, float]:
    from flwr.app import ArrayRecord, ConfigRecord, Context, MessageType, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp.strategy import FedAvg

    from cwmp.flower import decode_reply
    from flower_cwmp import client_app as example
    from flower_cwmp.task import make_model

    logging.getLogger("flwr").setLevel(logging.WARNING)  # FedAvg logs every aggregation at INFO

    plain = ClientApp()
    plain.train()(example.train)  # the same train function, no mod
    with_mod = example.app
    try:
        import tomllib
    except ImportError:  # Python 3.10: flwr's own dependency
        import tomli as tomllib

    with open(ROOT / "examples" / "flower-cwmp" / "pyproject.toml", "rb") as f:  # the example's own settings
        run_config = dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"], model=model_name)
    contexts = {name: [Context(run_id=1, node_id=i, node_config={"partition-id": i, "num-partitions": 2},
                               state=RecordDict(), run_config=run_config) for i in range(2)]
                for name in ("plain", "cwmp")}
    weights = ArrayRecord(make_model(model_name).state_dict())
    strategy = FedAvg(fraction_evaluate=0.0)
    times: dict[str, list[float]] = {"client plain": [], "client cwmp": [], "server plain": [], "server cwmp": []}
    torch.set_num_threads(1)
    for r in range(rounds + 1):  # round 0 warms up (profile load, cost map, imports)
        replies = {}
        for name, app in (("plain", plain), ("cwmp", with_mod)):
            out = []
            start = time.perf_counter()
            for i in range(2):
                msg = _message(RecordDict({"arrays": weights, "config": ConfigRecord({"server-round": r + 1})}),
                               MessageType.TRAIN)
                reply = app(msg, contexts[name][i])
                if reply.has_error():
                    raise SystemExit(f"the example's ClientApp failed: {reply.error.reason}")
                out.append(reply)
            elapsed = (time.perf_counter() - start) / 2
            if r:
                times[f"client {name}"].append(elapsed)
            replies[name] = out
        start = time.perf_counter()
        strategy.aggregate_train(r + 1, replies["plain"])
        plain_s = time.perf_counter() - start
        start = time.perf_counter()
        decoded = [_message(decode_reply(m, weights), MessageType.TRAIN) for m in replies["cwmp"]]
        strategy.aggregate_train(r + 1, decoded)
        cwmp_s = time.perf_counter() - start
        if r:
            times["server plain"].append(plain_s)
            times["server cwmp"].append(cwmp_s)
    return {k: statistics.median(v) for k, v in times.items()}


def _ddp_worker(rank: int, port: int, steps: int, queue) -> None:
    import torch.distributed as dist
    from torch import nn

    from cwmp import Budget
    from cwmp.apps.federated.data import load_dataset
    from cwmp.ddp import cwmp_hook, make_hook_state
    from energyprof.models import build_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        data = load_dataset("digits")
        x, y = torch.from_numpy(data.x_train[rank::2]), torch.from_numpy(data.y_train[rank::2])
        models = {name: nn.parallel.DistributedDataParallel(build_model("mlp", seed=0))
                  for name in ("plain", "cwmp", "topk")}
        states = {}
        for method in ("cwmp", "topk"):
            states[method] = make_hook_state(models[method], "sim-rpi4", model_name="mlp", method=method,
                                             budget=Budget.topk_keep_ratio(0.05))
            models[method].register_comm_hook(states[method], cwmp_hook)
        optimizers = {k: torch.optim.SGD(m.parameters(), lr=0.5) for k, m in models.items()}
        g = torch.Generator().manual_seed(rank)
        times: dict[str, list[float]] = {name: [] for name in models}
        for step in range(steps + 3):  # 3 warm-up steps (DDP rebuilds its buckets after the first)
            batch = torch.randint(0, len(x), (64,), generator=g)
            for name, model in models.items():
                dist.barrier()
                start = time.perf_counter()
                optimizers[name].zero_grad()
                nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
                optimizers[name].step()
                elapsed = time.perf_counter() - start
                if step >= 3:
                    times[name].append(elapsed)
        if rank == 0:
            medians = {name: statistics.median(v) for name, v in times.items()}
            queue.put(medians | {"kept": states["cwmp"].last.keep_ratio})
        dist.barrier()  # both ranks done before either tears down
        del models, optimizers
    finally:
        dist.destroy_process_group()


def ddp_steps(steps: int) -> dict[str, float]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_ddp_worker, args=(port, steps, queue), nprocs=2, join=True)
    return queue.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds and 10 DDP steps (a smoke test)")
    parser.add_argument("--models", default="mlp,cnn")
    args = parser.parse_args()
    rounds, steps = (5, 10) if args.quick else (30, 40)
    print(f"# torch {torch.__version__}, {os.cpu_count()} CPUs, costs from the SIMULATED profile sim-rpi4; "
          "medians over interleaved repeats")
    print(f"{'case':44s} {'without':>10s} {'with CWMP':>10s} {'ratio':>7s}")
    for model_name in args.models.split(","):
        t = flower_rounds(model_name, rounds)
        for side in ("client", "server"):
            a, b = t[f"{side} plain"], t[f"{side} cwmp"]
            what = "client round (train + mod)" if side == "client" else "server aggregate (2 replies)"
            print(f"{'flower ' + model_name + ': ' + what:44s} {a * 1e3:8.2f}ms {b * 1e3:8.2f}ms {b / a:7.2f}")
    d = ddp_steps(steps)
    print(f"{'ddp mlp, 2 ranks: step (hook vs all-reduce)':44s} {d['plain'] * 1e3:8.2f}ms {d['cwmp'] * 1e3:8.2f}ms "
          f"{d['cwmp'] / d['plain']:7.2f}   (rank 0 kept {d['kept']:.2%} in the last step)")
    print(f"{'ddp mlp, 2 ranks: step (hook, method=topk)':44s} {d['plain'] * 1e3:8.2f}ms {d['topk'] * 1e3:8.2f}ms "
          f"{d['topk'] / d['plain']:7.2f}   (the same hook and budget, Top-K's selection)")


if __name__ == "__main__":
    main()
