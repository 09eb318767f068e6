"""CWMP in any Flower app (flwr >= 1.42, Message API): a client mod that sends the train reply's
update sparse, pruned under an energy budget from the client's device profile, and a strategy
wrapper (or, for a strategy of your own, ``decode_reply``) that turns the sparse replies back into
what the strategy expects.

Client side (``make_cwmp_mod``): on every train message the mod remembers the global weights the
server sent (the ``"arrays"`` ArrayRecord of Flower's templates), lets the ClientApp train, and
turns the reply's local weights into the update ``local - global`` for every tensor the cost map
prices. It adds the error-feedback residual kept in ``Context.state`` (Flower keeps it per node
across rounds), prunes the corrected update with ``cwmp.Pruner`` (CWMP or Top-K, a budget in joules
per round or Top-K's energy at a keep ratio), keeps what the masks drop as the next residual, and
replies with the kept values and their int32 positions instead of the dense weights. Tensors the
cost map does not price (BatchNorm statistics, integer counters) travel dense. The reply's
metrics gain the round's predicted joules (whole round; the mask's part and the floor when the
pruner reports them), the kept entries, the bytes sent and ``cwmp-simulated`` (1 when the costs
come from a SIMULATED profile); a second MetricRecord, ``cwmp.layers``, holds the kept entries per
tensor name.

Server side (``CWMPStrategy``): wraps any ``flwr.serverapp.strategy.Strategy`` (FedAvg, FedProx,
...). It remembers the arrays it sends in each train round and rebuilds every sparse reply as the
dense weights ``global + update`` before the wrapped strategy aggregates, so that strategy is
unchanged. It keeps each round's per-client energy and per-layer telemetry in ``rounds``.

Train-message config keys that override the mod's settings for one round (a server that sweeps
budgets sets them; ``CWMPStrategy(train_config=...)`` adds them): ``cwmp-budget-j`` (joules per
round), ``cwmp-keep-ratio`` (Top-K's energy at that ratio), ``cwmp-p``, ``cwmp-method`` and
``cwmp-run`` (a tag; when it changes the residual starts empty).

Importing this module imports ``flwr``; the ``cwmp`` core never imports it.
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # before flwr is imported: no telemetry

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import Tensor

from cwmp.costmap import CostMap
from cwmp.errors import MaskInputError
from cwmp.feedback import ErrorFeedback
from cwmp._whole_round import round_parts
from cwmp.pruner import METHODS, Budget, Pruner
from energyprof.errors import EnergyprofError

__all__ = [
    "CWMPFlowerError",
    "CWMPStrategy",
    "ClientRound",
    "LAYERS_KEY",
    "SPARSE_KEY",
    "decode_reply",
    "decode_update",
    "sent_masks",
    "make_cwmp_mod",
]

log = logging.getLogger(__name__)

SPARSE_KEY = "cwmp.sparse"  # ArrayRecord of the reply: values/NAME, indices/NAME, dense/NAME
LAYERS_KEY = "cwmp.layers"  # MetricRecord of the reply: NAME -> kept entries
RESIDUAL_KEY = "cwmp.residual"  # ArrayRecord in Context.state: the error-feedback residuals
STATE_KEY = "cwmp.state"  # ConfigRecord in Context.state: the run tag the residuals belong to
OVERRIDES = ("cwmp-budget-j", "cwmp-keep-ratio", "cwmp-p", "cwmp-method", "cwmp-run")
MOD_NAME = "cwmp mod"

Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]
ProfileSpec = Union[str, "os.PathLike[str]", Any]  # a name, a path, or a DeviceProfile
CostMapSource = Union[CostMap, Callable[[Message, Context], CostMap]]


class CWMPFlowerError(EnergyprofError, ValueError):
    """A message that does not carry what the CWMP mod or decoder needs (a missing record or key,
    tensors whose names or shapes do not match the global weights or the profile)."""


# ------------------------------------------------------------------------------- client side
def make_cwmp_mod(
    profile: Union[ProfileSpec, Callable[[Message, Context], ProfileSpec], None] = None,
    *,
    model: Union[str, Callable[[Message, Context], str], None] = None,
    cost_map: Optional[CostMapSource] = None,
    budget: Union[Budget, float, Callable[[Message, Context], Union[Budget, float]]],
    p: float = 1.0,
    method: str = "cwmp",
    layers: Optional[Sequence[str]] = None,
    allow_predicted: bool = False,
    skip_layers: int = 0,
    arrays_key: str = "arrays",
    metrics_key: str = "metrics",
    config_key: str = "config",
) -> Mod:
    """A Flower client mod (``ClientApp(mods=[make_cwmp_mod(...)])``) that sparsifies train replies.

    Costs: ``profile`` (a shipped profile's name, a YAML path or a ``DeviceProfile``; or a callable
    ``(message, context) -> profile``, e.g. to read ``context.node_config``) with ``model``, the
    name of its per-layer table (or a callable ``(message, context) -> name``;
    ``allow_predicted=True`` prices layers the table lacks from the profile's global
    coefficients); or ``cost_map``, a ready ``CostMap`` or a callable
    ``(message, context) -> CostMap``. ``layers`` names the tensors to prune (default: those the
    cost map or the profile's table prices; with ``allow_predicted`` and no table, every
    floating-point tensor of the reply). ``budget`` is joules per round for the whole round
    (``Budget.of_joules`` or a float) or ``Budget.topk_keep_ratio(r)``; ``p`` and ``method``
    (``cwmp`` or ``topk``) as in ``cwmp.Pruner``. The keys name the records of Flower's
    templates: the train message's global weights and the reply's local weights (``arrays``),
    the reply's metrics (``metrics``) and the train config (``config``). ``budget`` may also be a
    callable ``(message, context) -> budget`` (e.g. a budget per device)."""
    if cost_map is None and (profile is None or model is None):
        raise CWMPFlowerError(
            "make_cwmp_mod needs the costs: profile=... with model=... (a profile's per-layer table), "
            "or cost_map=..."
        )
    if cost_map is not None and profile is not None:
        raise CWMPFlowerError("give make_cwmp_mod either profile (with model) or cost_map, not both")
    if method not in METHODS:
        raise CWMPFlowerError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    default_budget = budget if callable(budget) and not isinstance(budget, Budget) else _budget(budget)
    if not (isinstance(p, (int, float)) and 0 < p < math.inf):
        raise CWMPFlowerError(f"p must be > 0, got {p!r}")
    for name, key in (("arrays_key", arrays_key), ("metrics_key", metrics_key), ("config_key", config_key)):
        if not isinstance(key, str) or not key:
            raise CWMPFlowerError(f"{name} must be a record name, got {key!r}")
    cache: dict[tuple, CostMap] = {}
    profiles: dict[str, Any] = {}

    def cost_map_for(msg: Message, context: Context, local: Mapping[str, Tensor]) -> tuple[CostMap, list[str]]:
        if cost_map is not None:
            cmap = cost_map(msg, context) if callable(cost_map) else cost_map
            if not isinstance(cmap, CostMap):
                raise CWMPFlowerError(f"cost_map gave a {type(cmap).__name__}, not a cwmp.CostMap")
            names = list(layers) if layers is not None else [n for n in local if n in cmap.prices]
            missing = [n for n in cmap.prices if n not in local] if layers is None else []
            if missing:
                raise CWMPFlowerError(
                    f"the cost map ({_source(cmap)}) prices {_names(missing)}, absent from the reply's "
                    f"ArrayRecord {arrays_key!r}; it describes another model, or pass layers=[...]"
                )
            for name in names:
                expected = cmap.numel.get(name)
                if expected is not None and expected != local[name].numel():
                    raise CWMPFlowerError(
                        f"layer {name!r}: the cost map ({_source(cmap)}) was built for {expected} entries, "
                        f"the reply's tensor has {local[name].numel()} {tuple(local[name].shape)}"
                    )
            return cmap, names
        spec = profile(msg, context) if callable(profile) and not _is_profile(profile) else profile
        if _is_profile(spec):
            loaded = spec
        else:  # loaded once per process and spec
            if str(spec) not in profiles:
                profiles[str(spec)] = _load_profile(spec)
            loaded = profiles[str(spec)]
        model_name = model(msg, context) if callable(model) else model
        if layers is not None:
            names = list(layers)
        elif model_name in loaded.models:
            table = loaded.layer_costs(model_name)
            names = list(table)
            missing = [n for n in names if n not in local]
            if missing:
                raise CWMPFlowerError(
                    f"profile {loaded.name!r} prices {_names(missing)} of model {model_name!r}, absent from the "
                    f"reply's ArrayRecord {arrays_key!r} (it has {_names(list(local))}); check model=..., "
                    "or pass layers=[...]"
                )
        elif allow_predicted:
            names = [n for n, t in local.items() if t.is_floating_point()]
        else:
            names = list(loaded.layer_costs(model_name))  # a ProfileError naming the models it has
        for name in names:
            if name not in local:
                raise CWMPFlowerError(f"layer {name!r} is not in the reply's ArrayRecord {arrays_key!r} "
                                      f"(it has {_names(list(local))})")
        key = (id(loaded), loaded.name, model_name, tuple((n, tuple(local[n].shape), local[n].dtype) for n in names))
        if key not in cache:
            cache.clear()
            cache[key] = CostMap.from_profile(loaded, model_name, {n: local[n] for n in names},
                                              allow_predicted=allow_predicted)
        return cache[key], names

    def mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        sent_global = msg.content.get(arrays_key) if msg.has_content() else None
        if not isinstance(sent_global, ArrayRecord):
            return _error_reply(msg, (
                f"the train message has no ArrayRecord {arrays_key!r} of global weights (its records: "
                f"{_names(list(msg.content.keys()) if msg.has_content() else [])}); pass "
                "make_cwmp_mod(arrays_key=...) naming the record the strategy sends"))
        config = msg.content.get(config_key)
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        try:
            return _sparsify(msg, reply, context, sent_global, config if isinstance(config, ConfigRecord) else None,
                             cost_map_for, default_budget, float(p), method, skip_layers, arrays_key, metrics_key)
        except EnergyprofError as exc:
            return _error_reply(msg, str(exc))

    mod.__name__ = mod.__qualname__ = "cwmp_mod"
    return mod


def _sparsify(msg, reply, context, sent_global, config, cost_map_for, default_budget, p, method, skip_layers,
              arrays_key, metrics_key) -> Message:
    content = reply.content
    local_record = content.get(arrays_key)
    if not isinstance(local_record, ArrayRecord):
        raise CWMPFlowerError(
            f"the train reply has no ArrayRecord {arrays_key!r} of local weights (its records: "
            f"{_names(list(content.keys()))}); reply with RecordDict({{{arrays_key!r}: ArrayRecord(...), ...}}) "
            "or pass make_cwmp_mod(arrays_key=...)")
    metrics = content.get(metrics_key)
    if not isinstance(metrics, MetricRecord):
        raise CWMPFlowerError(
            f"the train reply has no MetricRecord {metrics_key!r} (its records: {_names(list(content.keys()))}); "
            "the mod adds the round's predicted joules there: reply with one, or pass make_cwmp_mod(metrics_key=...)")
    if LAYERS_KEY in content or SPARSE_KEY in content:
        raise CWMPFlowerError(f"the train reply already has a {SPARSE_KEY!r} or {LAYERS_KEY!r} record: "
                              "is the CWMP mod in the ClientApp's mods twice?")
    local = _tensors(local_record)
    glob = _tensors(sent_global)
    _check_same_tensors(local, glob, arrays_key)
    overrides = {k: config[k] for k in OVERRIDES if config is not None and k in config}
    if callable(default_budget):
        default_budget = _budget(default_budget(msg, context))
    budget = _round_budget(default_budget, overrides)
    p = float(overrides.get("cwmp-p", p))
    method = str(overrides.get("cwmp-method", method))
    run_tag = str(overrides.get("cwmp-run", ""))

    cmap, names = cost_map_for(msg, context, local)
    for name in names:
        if not local[name].is_floating_point():
            raise CWMPFlowerError(f"layer {name!r} is {local[name].dtype}; only floating-point tensors are pruned")
    if budget.joules is not None:
        floor = cmap.floor_j(names)
        if budget.joules < floor:
            raise MaskInputError(
                f"the budget of {budget.joules:.6g} J per round is below the round's floor of {floor:.6g} J "
                f"(the error feedback's compensation on every tensor, {_source(cmap)}): raise the budget to at "
                "least the floor")
    updates = {name: local[name] - glob[name] for name in names}

    feedback = ErrorFeedback()
    state = context.state
    tag = state.get(STATE_KEY)
    if isinstance(tag, ConfigRecord) and tag.get("run") == run_tag and RESIDUAL_KEY in state:
        saved = state[RESIDUAL_KEY].to_torch_state_dict()
        if set(saved) == set(names):
            feedback.load_state_dict({"residuals": saved}, like=updates)  # a FeedbackStateError names the layer
    pruner = Pruner(cmap, budget, method=method, power=p, skip_layers=skip_layers if method == "cwmp" else 0)
    sent, result = pruner.compress(updates, feedback, sparse=True)
    state[RESIDUAL_KEY] = ArrayRecord(torch_state_dict=feedback.state_dict()["residuals"])
    state[STATE_KEY] = ConfigRecord({"run": run_tag})

    sparse = ArrayRecord()
    bytes_sent = 0
    for name in local_record:
        if name in sent:
            values = sent[name].values.cpu().numpy()
            indices = sent[name].indices.to(torch.int32).cpu().numpy()
            sparse[f"values/{name}"] = Array(np.ascontiguousarray(values))
            sparse[f"indices/{name}"] = Array(np.ascontiguousarray(indices))
            bytes_sent += values.nbytes + indices.nbytes
        else:
            sparse[f"dense/{name}"] = local_record[name]
            bytes_sent += local[name].numel() * local[name].element_size()
    counts = {name: int(sent[name].indices.numel()) for name in names}  # kept per layer (the masks are not made)
    metrics = MetricRecord(dict(metrics))
    metrics.update(energy_metrics(*round_parts(result, cmap, names), result, bytes_sent))
    out = RecordDict({key: record for key, record in content.items() if key not in (arrays_key, metrics_key)})
    out[SPARSE_KEY] = sparse
    out[metrics_key] = metrics
    out[LAYERS_KEY] = MetricRecord(counts)
    return Message(out, reply_to=msg)


def energy_metrics(predicted_j: float, mask_j: float, floor_j: float, result, bytes_sent: int) -> dict:
    """What the mod adds to the reply's metrics: the round's predicted joules (whole round), the
    mask's part and the floor, kept and total entries, bytes sent, and whether the costs are
    SIMULATED (1) or from a measured profile (0)."""
    return {
        "cwmp-predicted-j": float(predicted_j),
        "cwmp-mask-j": float(mask_j),
        "cwmp-floor-j": float(floor_j),
        "cwmp-kept": int(result.kept),
        "cwmp-total": int(result.total),
        "cwmp-bytes-sent": int(bytes_sent),
        "cwmp-simulated": int(bool(result.simulated)),
    }


def _budget(budget: Union[Budget, float]) -> Budget:
    if isinstance(budget, Budget):
        return budget
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise CWMPFlowerError(
            f"budget must be joules per round (a float or Budget.of_joules) or Budget.topk_keep_ratio(r), "
            f"got {budget!r}")
    return Budget.of_joules(float(budget))


def _round_budget(default: Budget, overrides: Mapping[str, Any]) -> Budget:
    if "cwmp-budget-j" in overrides and "cwmp-keep-ratio" in overrides:
        raise CWMPFlowerError("the train config sets both 'cwmp-budget-j' and 'cwmp-keep-ratio'; set one")
    if "cwmp-budget-j" in overrides:
        return Budget.of_joules(float(overrides["cwmp-budget-j"]))
    if "cwmp-keep-ratio" in overrides:
        return Budget.topk_keep_ratio(float(overrides["cwmp-keep-ratio"]))
    return default


def _is_profile(obj: Any) -> bool:
    return hasattr(obj, "layer_costs") and hasattr(obj, "models")


def _load_profile(spec: Any):
    from calibrate.profile import load_profile

    return load_profile(spec)


def _error_reply(msg: Message, reason: str) -> Message:
    reason = f"{MOD_NAME}: {reason}"
    log.error(reason)
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)


def _tensors(record: ArrayRecord) -> dict[str, Tensor]:
    return {name: torch.from_numpy(np.array(array.numpy(), copy=True)) for name, array in record.items()}


def _check_same_tensors(local: Mapping[str, Tensor], glob: Mapping[str, Tensor], key: str) -> None:
    extra = [n for n in local if n not in glob]
    absent = [n for n in glob if n not in local]
    if extra or absent:
        raise CWMPFlowerError(
            f"the reply's ArrayRecord {key!r} and the global weights sent differ in names: "
            + "; ".join(part for part in (extra and f"only in the reply: {_names(extra)}",
                                          absent and f"only in the global weights: {_names(absent)}") if part)
            + "; the mod needs the ClientApp to reply with the same tensors it received")
    for name, tensor in local.items():
        if tensor.shape != glob[name].shape:
            raise CWMPFlowerError(
                f"layer {name!r}: the reply's tensor has shape {tuple(tensor.shape)} but the global weights' has "
                f"{tuple(glob[name].shape)}")


def _names(names: Sequence[str], shown: int = 5) -> str:
    names = list(names)
    text = ", ".join(repr(n) for n in names[:shown])
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "") if names else "none"


def _source(cmap: CostMap) -> str:
    return cmap._source()


# ------------------------------------------------------------------------------- server side
def decode_update(
    content: Union[Message, RecordDict], global_arrays: ArrayRecord
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The sparse reply's tensors: (updates of the pruned tensors, dense with zeros where nothing
    was sent, shaped like ``global_arrays``; the tensors that travelled dense, as sent)."""
    record = _sparse_record(content)
    glob = _tensors(global_arrays)
    updates: dict[str, Tensor] = {}
    dense: dict[str, Tensor] = {}
    seen = set()
    for key in record:
        kind, _, name = key.partition("/")
        if kind not in ("values", "indices", "dense") or not name:
            raise CWMPFlowerError(f"the {SPARSE_KEY!r} record has an entry {key!r}; expected values/NAME, "
                                  "indices/NAME or dense/NAME")
        if name not in glob:
            raise CWMPFlowerError(f"the reply sends layer {name!r}, absent from the global weights sent "
                                  f"(they have {_names(list(glob))})")
        seen.add(name)
        if kind == "dense":
            tensor = torch.from_numpy(np.array(record[key].numpy(), copy=True))
            if tensor.shape != glob[name].shape:
                raise CWMPFlowerError(f"layer {name!r}: sent dense with shape {tuple(tensor.shape)}, the global "
                                      f"weights' is {tuple(glob[name].shape)}")
            dense[name] = tensor
        elif kind == "values":
            if f"indices/{name}" not in record:
                raise CWMPFlowerError(f"layer {name!r}: the reply sends values but no indices/{name}")
            values = torch.from_numpy(np.asarray(record[key].numpy()))
            index = torch.from_numpy(np.asarray(record[f"indices/{name}"].numpy()).astype(np.int64))
            ref = glob[name]
            if values.dim() != 1 or index.shape != values.shape:
                raise CWMPFlowerError(f"layer {name!r}: {values.numel()} values for {index.numel()} indices")
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= ref.numel()):
                raise CWMPFlowerError(f"layer {name!r}: an index is outside its {ref.numel()} entries "
                                      f"(shape {tuple(ref.shape)})")
            flat = torch.zeros(ref.numel(), dtype=ref.dtype)
            flat[index] = values.to(ref.dtype)
            updates[name] = flat.view(ref.shape)
    missing = [n for n in glob if n not in seen]
    if missing:
        raise CWMPFlowerError(f"the sparse reply lacks {_names(missing)} of the global weights sent")
    return updates, dense


def sent_masks(content: Union[Message, RecordDict], global_arrays: ArrayRecord) -> dict[str, Tensor]:
    """The masks the client kept, per pruned tensor (bool, shaped like ``global_arrays``), from the
    positions it sent: what its energy is priced on."""
    record = _sparse_record(content)
    glob = {name: array.shape for name, array in global_arrays.items()}
    out = {}
    for key in record:
        kind, _, name = key.partition("/")
        if kind != "indices":
            continue
        if name not in glob:
            raise CWMPFlowerError(f"the reply sends layer {name!r}, absent from the global weights sent")
        shape = tuple(glob[name])
        mask = torch.zeros(math.prod(shape), dtype=torch.bool)
        mask[torch.from_numpy(np.asarray(record[key].numpy()).astype(np.int64))] = True
        out[name] = mask.view(shape)
    return out


def decode_reply(content: Union[Message, RecordDict], global_arrays: ArrayRecord,
                 arrays_key: str = "arrays") -> RecordDict:
    """The reply's content as the ClientApp made it, for any strategy: ``arrays_key`` holds the
    weights ``global + update`` (the dense tensors as sent), in the global weights' order; the
    ``cwmp.sparse`` and ``cwmp.layers`` records are gone, every other record is kept."""
    updates, dense = decode_update(content, global_arrays)
    glob = _tensors(global_arrays)
    weights = ArrayRecord()
    for name, ref in glob.items():
        tensor = dense[name] if name in dense else ref + updates[name]
        weights[name] = Array(tensor.numpy())
    base = content.content if isinstance(content, Message) else content
    out = RecordDict({k: r for k, r in base.items() if k not in (SPARSE_KEY, LAYERS_KEY)})
    out[arrays_key] = weights
    return out


def _sparse_record(content: Union[Message, RecordDict]) -> ArrayRecord:
    if isinstance(content, Message):
        if content.has_error():
            raise CWMPFlowerError(f"the reply is an error: {content.error.reason}")
        content = content.content
    record = content.get(SPARSE_KEY)
    if not isinstance(record, ArrayRecord):
        raise CWMPFlowerError(
            f"the reply has no ArrayRecord {SPARSE_KEY!r} (its records: {_names(list(content.keys()))}); "
            "add make_cwmp_mod(...) to the ClientApp's mods")
    return record


@dataclass
class ClientRound:
    """One client's reply in one round, as the mod reported it."""

    node_id: int
    predicted_j: float  # whole round, from the client's profile
    kept: int
    total: int
    bytes_sent: int
    simulated: bool
    mask_j: Optional[float] = None
    floor_j: Optional[float] = None
    layers: dict[str, int] = field(default_factory=dict)  # kept entries per tensor


class CWMPStrategy(Strategy):
    """Wrap a strategy so that it aggregates CWMP's sparse replies: ``CWMPStrategy(FedAvg(...))``.

    Train replies are decoded with ``decode_reply`` against the arrays this round sent, then
    handed to the wrapped strategy, which sees the weights it expects. ``train_config`` (a dict, or
    a callable ``server_round -> dict``) adds ``cwmp-*`` keys to every train message (e.g. a budget
    per round). A reply that failed in the CWMP mod stops the run with the mod's reason
    (``strict=True``); the wrapped strategy handles other failures its own way. ``rounds`` holds
    every round's ``ClientRound`` list; ``rounds_j`` the predicted joules of each round."""

    def __init__(self, strategy: Strategy, *, arrays_key: Optional[str] = None,
                 train_config: Union[Mapping[str, Any], Callable[[int], Mapping[str, Any]], None] = None,
                 strict: bool = True) -> None:
        if not isinstance(strategy, Strategy):
            raise CWMPFlowerError(f"CWMPStrategy wraps a flwr.serverapp.strategy.Strategy, got {strategy!r}")
        self.strategy = strategy
        self.arrays_key = arrays_key or getattr(strategy, "arrayrecord_key", "arrays")
        self.train_config = train_config
        self.strict = strict
        self.rounds: dict[int, list[ClientRound]] = {}
        self._sent: dict[int, ArrayRecord] = {}

    def __getattr__(self, name: str) -> Any:  # the wrapped strategy's own attributes
        if name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def summary(self) -> None:
        log.info("CWMPStrategy: sparse CWMP replies decoded for %s", type(self.strategy).__name__)
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        extra = self.train_config(server_round) if callable(self.train_config) else self.train_config
        if extra:
            unknown = [k for k in extra if k not in OVERRIDES]
            if unknown:
                raise CWMPFlowerError(f"train_config keys {unknown} are not CWMP settings; use {', '.join(OVERRIDES)}")
            config = ConfigRecord({**dict(config), **dict(extra)})
        self._sent = {server_round: arrays}
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        sent = self._sent.get(server_round)
        decoded, clients = [], []
        for msg in replies:
            if msg.has_error():
                reason = msg.error.reason or ""
                if self.strict and reason.startswith(MOD_NAME):
                    raise CWMPFlowerError(f"round {server_round}, node {msg.metadata.src_node_id}: {reason}")
                decoded.append(msg)
                continue
            if sent is None:
                raise CWMPFlowerError(f"round {server_round}: no arrays were sent through this CWMPStrategy")
            clients.append(_client_round(msg))
            decoded.append(Message(content=decode_reply(msg, sent, self.arrays_key), metadata=msg.metadata))
        self.rounds[server_round] = clients
        return self.strategy.aggregate_train(server_round, decoded)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        return self.strategy.aggregate_evaluate(server_round, replies)

    def rounds_j(self) -> dict[int, float]:
        """Predicted joules of each round, all clients together."""
        return {r: math.fsum(c.predicted_j for c in clients) for r, clients in self.rounds.items()}

    def opened_layers(self) -> dict[str, int]:
        """For every tensor, in how many (client, round) replies it kept at least one entry."""
        out: dict[str, int] = {}
        for clients in self.rounds.values():
            for c in clients:
                for name, kept in c.layers.items():
                    out[name] = out.get(name, 0) + (1 if kept else 0)
        return out


def _client_round(msg: Message) -> ClientRound:
    metrics = [r for k, r in msg.content.metric_records.items() if k != LAYERS_KEY]
    found = next((m for m in metrics if "cwmp-predicted-j" in m), None)
    if found is None:
        raise CWMPFlowerError(f"the reply of node {msg.metadata.src_node_id} has no 'cwmp-predicted-j' metric; "
                              "add make_cwmp_mod(...) to the ClientApp's mods")
    layers = msg.content.get(LAYERS_KEY)
    return ClientRound(
        node_id=int(msg.metadata.src_node_id),
        predicted_j=float(found["cwmp-predicted-j"]),
        kept=int(found["cwmp-kept"]),
        total=int(found["cwmp-total"]),
        bytes_sent=int(found["cwmp-bytes-sent"]),
        simulated=bool(found["cwmp-simulated"]),
        mask_j=float(found["cwmp-mask-j"]) if "cwmp-mask-j" in found else None,
        floor_j=float(found["cwmp-floor-j"]) if "cwmp-floor-j" in found else None,
        layers={k: int(v) for k, v in layers.items()} if isinstance(layers, MetricRecord) else {},
    )
