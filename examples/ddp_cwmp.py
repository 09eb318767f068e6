"""Data-parallel training with CWMP-pruned gradients: DistributedDataParallel on 2 CPU processes
(gloo), scikit-learn's digits, energyprof's ``mlp``, and the CWMP communication hook.

    python examples/ddp_cwmp.py                  # 2 processes, 20 steps, CWMP at Top-K's 5 % energy
    python examples/ddp_cwmp.py --steps 50 --keep-ratio 0.1 --profile my-device.yaml

Every step prints the loss (averaged over the ranks), the share of gradient entries rank 0 kept,
and rank 0's predicted joules for the step, labelled SIMULATED when the profile is simulated.
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cwmp import Budget
from cwmp.apps.federated.data import load_dataset
from cwmp.ddp import cwmp_hook, make_hook_state
from energyprof.models import build_model

WORLD = 2


def train(rank: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        data = load_dataset("digits")
        x = torch.from_numpy(data.x_train[rank::WORLD])  # each rank its half of the training split
        y = torch.from_numpy(data.y_train[rank::WORLD])
        model = nn.parallel.DistributedDataParallel(build_model("mlp", seed=0))
        # the lines CWMP adds: a state from this rank's profile, and the hook
        state = make_hook_state(model, args.profile, model_name="mlp", p=args.p, method=args.method,
                                budget=Budget.topk_keep_ratio(args.keep_ratio))
        model.register_comm_hook(state, cwmp_hook)

        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
        generator = torch.Generator().manual_seed(rank)
        for step in range(1, args.steps + 1):
            batch = torch.randint(0, len(x), (args.batch_size,), generator=generator)
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            if rank == 0:
                s = state.last
                label = " SIMULATED" if s.simulated else ""
                print(f"step {step:3d}: loss {float(mean_loss) / WORLD:.4f}, kept {s.keep_ratio:6.2%} of "
                      f"{s.total} entries, predicted {s.predicted_j:.3g} J{label} (rank 0)", flush=True)
        if rank == 0:
            data_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
            with torch.no_grad():
                acc = (model.module(data_test[0]).argmax(1) == data_test[1]).float().mean()
            print(f"test accuracy after {args.steps} steps: {float(acc):.3f}", flush=True)
        dist.barrier()  # both ranks done before either tears down
        del model, optimizer
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profile", default="sim-rpi4", help="device profile: shipped name or YAML path")
    parser.add_argument("--keep-ratio", type=float, default=0.05, help="budget: Top-K's energy at this ratio")
    parser.add_argument("--method", default="cwmp", choices=("cwmp", "topk"))
    parser.add_argument("--p", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(train, args=(port, args), nprocs=WORLD, join=True)


if __name__ == "__main__":
    main()
