"""The federated experiment, shared by both engines: what a client does in a round, how its energy
is counted, how the server averages, and which runs a sweep holds.

One round of FedAvg with sparsified updates (both engines call exactly these functions):

1. the server sends the global weights to every client (all clients take part in every round, in
   the order of their ids: the client schedule is the same for every method);
2. a client trains ``local_epochs`` epochs of plain SGD on its partition, shuffled by a generator
   seeded with (run seed, round, client id), and forms its update ``u = local - global`` for every
   parameter;
3. it adds its error-feedback residual, masks the result with Top-K (keep ratio r) or CWMP (the
   energy Top-K spends at ratio r on this same corrected update, ``Budget.topk_keep_ratio(r)``),
   keeps what the mask drops as its new residual, and sends the kept entries as values and int32
   indices (``encode_sparse``); buffers (BatchNorm statistics) travel dense. The budget sweep's arms
   (``fixed=True``) give every method the same fixed joules per round instead: the round's floor
   plus what keeping r of every tensor would add (``budget_sweep_j``), so that each method has a
   frontier of its own;
4. the server decodes every reply and adds the example-weighted mean of the sparse updates to the
   global weights (``fedavg_step``), then measures accuracy on the held-out test split.

A client's energy in a round (``client_energy``) is its device profile's prediction for the whole
round, ``CostMap.round_joules(masks)`` (the project's one cost model): the compensation every tensor
pays whatever the mask keeps (the floor), beside what the masks add (their layers' update phases),
plus, when the profile has a ``radio`` entry, that entry's joules per byte (a datasheet figure, not
a measurement) times the bytes it sends. Local training costs the same for every method and no
profile measures it yet, so it is left out (and said so in the summary). Which layers each client
opened in each round is kept (``ClientEnergy.kept_by_layer``) for the per-layer telemetry.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from cwmp.apps.federated.data import DataError, Dataset, dirichlet_partition
from cwmp.costmap import CostMap
from cwmp.feedback import ErrorFeedback
from cwmp.pruner import Budget, Pruner, PruneResult
from energyprof.costmodel import transmission_joules

__all__ = [
    "DEFAULT_RATIOS",
    "DEFAULT_SWEEP",
    "budget_sweep_j",
    "DEFAULT_ROUNDS",
    "DEFAULT_SEEDS",
    "Arm",
    "ClientEnergy",
    "Fleet",
    "FLConfig",
    "RoundRecord",
    "arms_of",
    "client_energy",
    "client_generator",
    "compress_update",
    "decode_sparse",
    "encode_sparse",
    "evaluate",
    "fedavg_step",
    "local_update",
    "parse_ratios",
]

DEFAULT_RATIOS = (0.01, 0.05, 0.10, 0.20)
DEFAULT_SWEEP = (0.005, 0.4)  # the budget sweep extends each frontier below 1 % and above 20 %
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_ROUNDS = 30  # digits + cnn, 10 clients, 3 seeds x 12 runs: well under 10 minutes on 2 cores
INDEX_BYTES = 4  # int32 index per kept entry on the wire


@dataclass(frozen=True)
class FLConfig:
    """Everything that defines a sweep; two runs with equal configs give equal results."""

    dataset: str = "digits"
    model: str = "cnn"
    clients: int = 10
    alpha: float = 0.5
    rounds: int = DEFAULT_ROUNDS
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.2  # digits + cnn, Top-K 5 %, seed 0: test accuracy 0.87 after 30 rounds (0.59 at 0.1, 0.34 at 0.05)
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    sweep: tuple[float, ...] = DEFAULT_SWEEP  # fixed budget levels (budget_sweep_j at these keep ratios)
    powers: tuple[float, ...] = (1.0, 2.0)
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    profiles: tuple[str, ...] = ("sim-rpi4",)
    min_partition: int = 10

    def __post_init__(self) -> None:
        problems = []
        if self.clients < 1:
            problems.append(f"--clients must be >= 1, got {self.clients}")
        if self.rounds < 1:
            problems.append(f"--rounds must be >= 1, got {self.rounds}")
        if self.local_epochs < 1:
            problems.append(f"--local-epochs must be >= 1, got {self.local_epochs}")
        if self.batch_size < 1:
            problems.append(f"batch size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"learning rate must be > 0, got {self.lr}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            problems.append(f"--alpha must be > 0 (small: strong label skew), got {self.alpha}")
        if not self.ratios or any(not 0 < r <= 1 for r in self.ratios):
            problems.append(f"--ratios must be keep ratios in (0, 1], got {self.ratios}")
        if any(not 0 < r <= 1 for r in self.sweep):
            problems.append(f"--sweep must be keep ratios in (0, 1], got {self.sweep}")
        if any(not 0 < p < math.inf for p in self.powers):
            problems.append(f"CWMP powers must be > 0, got {self.powers}")
        if not self.seeds:
            problems.append("give at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            problems.append(f"--seeds repeats a seed: {self.seeds}")
        if not self.profiles:
            problems.append("give at least one profile")
        if problems:
            raise ValueError("; ".join(problems))

    def profile_of(self, client: int) -> str:
        """Profiles are assigned to clients round-robin: client i gets ``profiles[i % len(profiles)]``."""
        return self.profiles[client % len(self.profiles)]


@dataclass(frozen=True)
class Arm:
    """One method of the sweep: Top-K at a keep ratio, or CWMP at the energy Top-K spends there."""

    method: str  # "topk" or "cwmp"
    ratio: float
    power: Optional[float] = None  # CWMP's p; None for Top-K
    fixed: bool = False  # the budget sweep: fixed joules per round (budget_sweep_j), not Top-K's energy

    @property
    def label(self) -> str:
        base = "Top-K" if self.method == "topk" else f"CWMP p={self.power:g}"
        r = f"{self.ratio:.0%}" if self.ratio >= 0.01 else f"{self.ratio:.2%}"
        return f"{base} @ fixed J of {r}" if self.fixed else f"{base} @ {r}"

    @property
    def family(self) -> str:
        return "Top-K" if self.method == "topk" else f"CWMP p={self.power:g}"

    def pruner(self, cost_map: CostMap) -> Pruner:
        budget = Budget.of_joules(budget_sweep_j(cost_map, self.ratio)) if self.fixed else Budget.topk_keep_ratio(self.ratio)
        if self.method == "topk":
            return Pruner(cost_map, budget, method="topk")
        return Pruner(cost_map, budget, method="cwmp", power=float(self.power))

    def tag(self) -> str:
        """A short id for state keys and file names."""
        base = f"{self.method}-p{self.power:g}-r{self.ratio:g}" if self.power else f"{self.method}-r{self.ratio:g}"
        return base + ("-fixed" if self.fixed else "")

    def matches(self, method: str, ratio: float, p: Optional[float], fixed: bool) -> bool:
        return (self.method, self.ratio, self.power, self.fixed) == (method, ratio, p, fixed)


def budget_sweep_j(cost_map: CostMap, ratio: float) -> float:
    """The budget sweep's joules per round on one device: the floor every round pays plus what
    keeping ``ratio`` of every tensor (random positions) would add. Fixed for the whole run, so
    every method spends at most the same joules every round."""
    return cost_map.floor_j() + cost_map.uniform_mask_joules(ratio)


def arms_of(config: FLConfig) -> list[Arm]:
    """For every ratio: Top-K, then CWMP at each power, at Top-K's energy; then the budget sweep:
    every method at each fixed budget level."""
    out = []
    for ratio in config.ratios:
        out.append(Arm("topk", ratio))
        out.extend(Arm("cwmp", ratio, float(p)) for p in config.powers)
    for ratio in config.sweep:
        out.append(Arm("topk", ratio, fixed=True))
        out.extend(Arm("cwmp", ratio, float(p), fixed=True) for p in config.powers)
    return out


def parse_ratios(text: str) -> tuple[float, ...]:
    """``0.01,0.05`` or ``1%,5%``: keep ratios as fractions."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            value = float(part[:-1]) / 100 if part.endswith("%") else float(part)
        except ValueError:
            raise ValueError(f"keep ratio {part!r} is not a number; give fractions (0.05) or percents (5%)") from None
        if not 0 < value <= 1:
            raise ValueError(
                f"keep ratio {part!r} is outside (0, 1]; give fractions (0.05) or percents (5%)"
            )
        out.append(value)
    if not out:
        raise ValueError("no keep ratios given; e.g. --ratios 1%,5%,10%,20%")
    return tuple(out)


# -------------------------------------------------------------------------------------- fleet
class Fleet:
    """The clients' device profiles and the cost maps of the model on each, built once."""

    def __init__(self, config: FLConfig, model: nn.Module) -> None:
        from calibrate.profile import load_profile

        self.config = config
        self.profiles = {name: load_profile(name) for name in dict.fromkeys(config.profiles)}
        named = list(model.named_parameters())
        self.table_notes: dict[str, str] = {}
        self.cost_maps = {name: self._cost_map(name, profile, named) for name, profile in self.profiles.items()}

    def _cost_map(self, name: str, profile, named) -> CostMap:
        """The profile's table for the model when it describes these tensors; when it was calibrated
        for another input shape (e.g. the CIFAR-10 variant of ``cnn`` and the digits run here), every
        layer is priced from the profile's global coefficients through the cost model, and said so."""
        from cwmp.errors import CostMapError

        try:
            return CostMap.from_profile(profile, self.config.model, named, allow_predicted=True)
        except CostMapError as exc:
            self.table_notes[name] = (
                f"profile {name}'s {self.config.model} table is for another input shape ({exc}); every layer is "
                "predicted from its global coefficients")
            return CostMap.from_profile(profile, f"{self.config.model} (this input shape)", named,
                                        allow_predicted=True)

    def profile(self, client: int):
        return self.profiles[self.config.profile_of(client)]

    def cost_map(self, client: int) -> CostMap:
        return self.cost_maps[self.config.profile_of(client)]

    @property
    def simulated(self) -> bool:
        return any(p.simulated for p in self.profiles.values())

    def describe(self) -> list[dict]:
        """What each profile prices and how (for the summary): which layers were predicted from the
        global coefficients, whether every layer costs the same (then CWMP is Top-K there), the radio."""
        out = []
        for name, profile in self.profiles.items():
            cmap = self.cost_maps[name]
            prices = {layer: cmap[layer] for layer in cmap.prices}
            out.append({
                "profile": name,
                "simulated": bool(profile.simulated),
                "clients": [i for i in range(self.config.clients) if self.config.profile_of(i) == name],
                "layers": len(prices),
                "predicted_layers": cmap.predicted_layers,
                "table_note": self.table_notes.get(name),
                "uniform_costs": len(set(prices.values())) == 1 and len({cmap.fixed_j(n) for n in cmap.prices}) == 1,
                "joules_per_update_min": min(prices.values()),
                "joules_per_update_max": max(prices.values()),
                "radio": None if profile.radio is None else {
                    "joules_per_byte": profile.radio.joules_per_byte, "source": profile.radio.source,
                },
            })
        return out


# ---------------------------------------------------------------------------------- the client
def client_generator(seed: int, round_: int, client: int) -> torch.Generator:
    """The shuffling generator of one client in one round: the same for every method and engine."""
    state = np.random.SeedSequence([seed, round_, client]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def local_update(
    model: nn.Module,
    global_state: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    config: FLConfig,
    generator: torch.Generator,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Train from the global weights; return (parameter updates local - global, buffers)."""
    model.load_state_dict(global_state)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    n = x.shape[0]
    for _ in range(config.local_epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, config.batch_size):
            batch = order[start:start + config.batch_size]
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    params = dict(model.named_parameters())
    updates = {name: (p.detach() - global_state[name]).clone() for name, p in params.items()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    return updates, buffers


def compress_update(
    updates: Mapping[str, Tensor], feedback: ErrorFeedback, pruner: Pruner
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], PruneResult]:
    """Error feedback + mask; returns the wire payload (``encode_sparse``) and the prune result."""
    sent, result = pruner.compress(updates, feedback)
    return encode_sparse(sent, result.masks), result


def encode_sparse(
    sent: Mapping[str, Tensor], masks: Mapping[str, Tensor]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per tensor: the kept values (the update's dtype) and their flat indices (int32)."""
    out = {}
    for name, values in sent.items():
        index = torch.nonzero(masks[name].reshape(-1)).squeeze(1)
        out[name] = (
            values.reshape(-1)[index].cpu().numpy(),
            index.to(torch.int32).cpu().numpy(),
        )
    return out


def decode_sparse(
    payload: Mapping[str, tuple[np.ndarray, np.ndarray]], like: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Dense updates (zeros where nothing was sent) shaped like ``like``."""
    out = {}
    for name, ref in like.items():
        values, index = payload[name]
        dense = torch.zeros(ref.numel(), dtype=ref.dtype)
        dense[torch.from_numpy(np.asarray(index, dtype=np.int64))] = torch.from_numpy(np.asarray(values)).to(ref.dtype)
        out[name] = dense.view(ref.shape)
    return out


def wire_bytes(payload: Mapping[str, tuple[np.ndarray, np.ndarray]], buffers: Mapping[str, Tensor]) -> int:
    """Bytes a client sends: kept values and int32 indices, plus dense buffers."""
    sparse = sum(int(v.nbytes) + int(i.nbytes) for v, i in payload.values())
    return sparse + sum(b.numel() * b.element_size() for b in buffers.values())


@dataclass(frozen=True)
class ClientEnergy:
    """One client's predicted energy in one round, split by who decides it."""

    floor_j: float  # the compensation of every tensor: paid whatever the mask keeps
    mask_j: float  # what the masks add: their layers' update phases
    radio_j: float  # radio joules per byte x bytes sent (0 without a radio entry)
    bytes_sent: int
    kept: int
    total: int
    kept_by_layer: Mapping[str, int] = field(default_factory=dict)  # entries kept per tensor (0: not opened)

    @property
    def joules(self) -> float:
        return math.fsum((self.floor_j, self.mask_j, self.radio_j))


def client_energy(cost_map: CostMap, profile, masks: Mapping[str, Tensor], bytes_sent: int,
                  result: Optional[PruneResult] = None) -> ClientEnergy:
    """The whole round through the cost model (``CostMap.round_joules``), plus the radio when the
    profile has one. ``result``: the prune result of these masks, whose per-layer joules are reused."""
    radio = getattr(profile, "radio", None)
    radio_j = transmission_joules(bytes_sent, radio.joules_per_byte) if radio is not None else 0.0
    by_layer = None if result is None else result.joules_by_layer
    parts = cost_map.round_joules(masks, by_layer=by_layer, transmission_j=radio_j)
    kept_by_layer = {name: int(torch.count_nonzero(m)) for name, m in masks.items()}
    total = sum(m.numel() for m in masks.values())
    return ClientEnergy(parts.floor_j, parts.mask_j, radio_j, bytes_sent, sum(kept_by_layer.values()), total,
                        kept_by_layer)


# ---------------------------------------------------------------------------------- the server
def fedavg_step(
    global_state: Mapping[str, Tensor],
    param_names: Sequence[str],
    replies: Sequence[tuple[int, Mapping[str, Tensor], Mapping[str, Tensor]]],
) -> dict[str, Tensor]:
    """New global state: parameters += example-weighted mean of the (decoded, sparse) updates;
    buffers = example-weighted mean of the clients' buffers. ``replies`` = (examples, updates,
    buffers) in client-id order, so that the float sums are the same on every engine."""
    total = sum(n for n, _, _ in replies)
    if total <= 0:
        raise ValueError("no client sent any example; nothing to average")
    new = {name: t.clone() for name, t in global_state.items()}
    for name in param_names:
        acc = torch.zeros_like(global_state[name], dtype=torch.float64)
        for n, updates, _ in replies:
            acc += (n / total) * updates[name].to(torch.float64)
        new[name] = (global_state[name].to(torch.float64) + acc).to(global_state[name].dtype)
    buffer_names = [name for name in global_state if name not in set(param_names)]
    for name in buffer_names:
        acc = torch.zeros_like(global_state[name], dtype=torch.float64)
        for n, _, buffers in replies:
            acc += (n / total) * buffers[name].to(torch.float64)
        ref = global_state[name]
        new[name] = (acc.round() if not ref.is_floating_point() else acc).to(ref.dtype)
    return new


@torch.no_grad()
def evaluate(model: nn.Module, state: Mapping[str, Tensor], x: Tensor, y: Tensor, batch: int = 1000) -> float:
    """Accuracy of ``state`` on (x, y)."""
    model.load_state_dict(state)
    model.eval()
    correct = 0
    for start in range(0, x.shape[0], batch):
        correct += int((model(x[start:start + batch]).argmax(1) == y[start:start + batch]).sum())
    return correct / x.shape[0]


# ---------------------------------------------------------------------------------- records
@dataclass
class RoundRecord:
    """One row of the rounds CSV: one method, one seed, one round (round 0: the initial model)."""

    method: str
    p: Optional[float]
    ratio: float
    seed: int
    round: int
    round_energy_j: float  # all clients of the round together: floor + masks + radio
    floor_energy_j: float  # the compensation every tensor pays whatever the masks keep
    mask_energy_j: float  # what the masks added
    radio_energy_j: float
    mean_client_energy_j: float
    max_client_energy_j: float
    cumulative_energy_j: float
    bytes_sent: int
    kept_fraction: float
    accuracy: float
    simulated: bool
    fixed: bool = False
    client_energy_j: list[float] = field(default_factory=list)
    opened_by_layer: dict[str, int] = field(default_factory=dict)  # clients that kept an entry of the tensor
    kept_by_layer: dict[str, int] = field(default_factory=dict)  # entries kept of the tensor, all clients
    numel_by_layer: dict[str, int] = field(default_factory=dict)


def round_record(arm: Arm, seed: int, round_: int, energies: Sequence[ClientEnergy], cumulative_before: float,
                 accuracy: float, simulated: bool, numel_by_layer: Optional[Mapping[str, int]] = None) -> RoundRecord:
    joules = [e.joules for e in energies]
    total = math.fsum(joules)
    kept, entries = sum(e.kept for e in energies), sum(e.total for e in energies)
    opened: dict[str, int] = {name: 0 for name in (numel_by_layer or {})}
    kept_layers: dict[str, int] = {name: 0 for name in (numel_by_layer or {})}
    for e in energies:
        for name, k in e.kept_by_layer.items():
            opened[name] = opened.get(name, 0) + (1 if k else 0)
            kept_layers[name] = kept_layers.get(name, 0) + int(k)
    return RoundRecord(
        method=arm.method, p=arm.power, ratio=arm.ratio, seed=seed, round=round_, fixed=arm.fixed,
        round_energy_j=total,
        floor_energy_j=math.fsum(e.floor_j for e in energies),
        mask_energy_j=math.fsum(e.mask_j for e in energies),
        radio_energy_j=math.fsum(e.radio_j for e in energies),
        mean_client_energy_j=total / len(joules) if joules else 0.0,
        max_client_energy_j=max(joules) if joules else 0.0,
        cumulative_energy_j=cumulative_before + total,
        bytes_sent=sum(e.bytes_sent for e in energies),
        kept_fraction=kept / entries if entries else 0.0,
        accuracy=accuracy, simulated=simulated, client_energy_j=joules,
        opened_by_layer=opened, kept_by_layer=kept_layers, numel_by_layer=dict(numel_by_layer or {}),
    )


# ---------------------------------------------------------------------------------- set-up
@dataclass
class SeedSetup:
    """What every method of one seed shares: partitions, initial weights, tensors."""

    seed: int
    partitions: list[np.ndarray]
    initial_state: dict[str, Tensor]
    param_names: list[str]


def build_model_for(config: FLConfig, dataset: Dataset, seed: int) -> nn.Module:
    from energyprof.models import build_model

    return build_model(
        config.model, in_channels=dataset.in_channels, image_size=dataset.image_size,
        num_classes=dataset.num_classes, seed=seed,
    )


def seed_setup(config: FLConfig, dataset: Dataset, seed: int) -> SeedSetup:
    partitions = dirichlet_partition(dataset.y_train, config.clients, config.alpha, seed, config.min_partition)
    model = build_model_for(config, dataset, seed)
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    return SeedSetup(seed, partitions, state, [name for name, _ in model.named_parameters()])


def tensors_of(dataset: Dataset) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The dataset as tensors in the standard contiguous layout. A copy: an array's strides along a
    dimension of size 1 are arbitrary (digits' images come with a channels-last stride, a pickled
    copy without), and torch picks its convolution kernels, and so its float rounding, by them; a
    worker process must train exactly as this one does."""
    def standard(a: np.ndarray) -> Tensor:
        out = torch.empty(a.shape, dtype=torch.from_numpy(a[:0]).dtype)  # the standard strides
        return out.copy_(torch.from_numpy(a))

    return tuple(standard(a) for a in (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test))


def check_partitionable(config: FLConfig, dataset: Dataset) -> None:
    if config.clients * config.min_partition > dataset.y_train.shape[0]:
        raise DataError(
            f"{config.clients} clients x at least {config.min_partition} examples exceed the "
            f"{dataset.y_train.shape[0]} training examples of {dataset.name}; use fewer clients"
        )


def runs_of(config: FLConfig) -> Iterable[tuple[int, Arm]]:
    for seed in config.seeds:
        for arm in arms_of(config):
            yield seed, arm
