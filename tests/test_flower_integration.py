"""cwmp.flower: the CWMP client mod and its server-side decoder in Flower apps that are not ours
(skipped without flwr: pip install 'energyprof[federated]').

The messages are Flower's own Message/RecordDict objects; the "apps" are train functions written
the way Flower's PyTorch template writes them (global weights in ``"arrays"``, the reply's local
weights in ``"arrays"`` and ``num-examples`` in ``"metrics"``)."""

import time

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import (  # noqa: E402
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)

from cwmp import Budget, CostMap, LayerPrice  # noqa: E402
from cwmp.flower import (  # noqa: E402
    LAYERS_KEY,
    SPARSE_KEY,
    CWMPFlowerError,
    decode_reply,
    decode_update,
    make_cwmp_mod,
    sent_masks,
)
from energyprof.models import build_model  # noqa: E402


def _message(content: RecordDict, message_type: str = MessageType.TRAIN) -> Message:
    metadata = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=3600, message_type=message_type)
    return Message(content=content, metadata=metadata)


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


def _template_train(deltas):
    """A ClientApp train function as Flower's template writes it: weights in, weights out."""
    calls = iter(deltas)

    def train(msg: Message, context: Context) -> Message:
        weights = msg.content["arrays"].to_torch_state_dict()
        delta = next(calls)
        local = {name: w + delta[name] for name, w in weights.items()}
        return Message(RecordDict({"arrays": ArrayRecord(local), "metrics": MetricRecord({"num-examples": 12,
                                                                                         "train-loss": 0.5})}),
                       reply_to=msg)

    return train


@pytest.fixture
def mlp_weights():
    return {name: t.detach().clone() for name, t in build_model("mlp").state_dict().items()}


def _deltas(weights, rounds, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(w.shape, generator=g) * 0.01 for n, w in weights.items()} for _ in range(rounds)]


def _train_msg(weights, **config):
    return _message(RecordDict({"arrays": ArrayRecord(weights), "config": ConfigRecord({"lr": 0.1, **config})}))


def test_the_mod_sends_the_pruned_update_and_keeps_the_rest_for_the_next_round(mlp_weights):
    deltas = _deltas(mlp_weights, 2)
    mod = make_cwmp_mod("sim-rpi4", model="mlp", budget=Budget.topk_keep_ratio(0.05))
    context, train = _context(), _template_train(deltas)
    sent_total = {n: torch.zeros_like(w) for n, w in mlp_weights.items()}
    for r in range(2):
        msg = _train_msg(mlp_weights)
        reply = mod(msg, context, train)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        assert "arrays" not in reply.content and SPARSE_KEY in reply.content  # nothing dense of model size
        metrics = reply.content["metrics"]
        assert metrics["num-examples"] == 12 and metrics["train-loss"] == 0.5  # the app's own metrics kept
        assert metrics["cwmp-simulated"] == 1  # sim-rpi4 is a simulated profile
        assert 0 < metrics["cwmp-kept"] < metrics["cwmp-total"] == sum(w.numel() for w in mlp_weights.values())
        layers = reply.content[LAYERS_KEY]
        assert set(layers) == set(mlp_weights) and sum(layers.values()) == metrics["cwmp-kept"]
        updates, dense = decode_update(reply, msg.content["arrays"])
        assert dense == {} and set(updates) == set(mlp_weights)
        masks = sent_masks(reply, msg.content["arrays"])
        assert {n: int(m.sum()) for n, m in masks.items()} == dict(layers)
        # the reported joules are the cost map's price of the masks sent
        cmap = CostMap.from_profile(__import__("calibrate.profile").profile.load_profile("sim-rpi4"), "mlp",
                                    mlp_weights)
        assert metrics["cwmp-predicted-j"] == pytest.approx(cmap.predicted_joules(masks), rel=1e-12)  # whole round
        assert metrics["cwmp-floor-j"] == pytest.approx(cmap.floor_j()) and metrics["cwmp-floor-j"] > 0
        assert metrics["cwmp-mask-j"] + metrics["cwmp-floor-j"] == pytest.approx(metrics["cwmp-predicted-j"])
        assert metrics["cwmp-bytes-sent"] == metrics["cwmp-kept"] * 8  # float32 value + int32 index
        for n in sent_total:
            sent_total[n] += updates[n]
    # error feedback: what was sent plus the residual the node keeps is every update, exactly
    residual = context.state["cwmp.residual"].to_torch_state_dict()
    for n in mlp_weights:
        assert torch.allclose(sent_total[n] + residual[n], deltas[0][n] + deltas[1][n], atol=1e-6), n


def test_decode_reply_gives_any_strategy_the_weights_it_expects(mlp_weights):
    weights = dict(mlp_weights, **{"bn.num_batches_tracked": torch.tensor(3)})  # an integer buffer: dense
    delta = {n: (torch.randn(w.shape) * 0.01 if w.is_floating_point() else torch.tensor(1)) for n, w in weights.items()}
    mod = make_cwmp_mod("sim-rpi4", model="mlp", budget=Budget.topk_keep_ratio(1.0))  # keep everything
    msg = _train_msg(weights)
    reply = mod(msg, _context(), _template_train([delta]))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    content = decode_reply(reply, msg.content["arrays"])
    assert set(content) == {"arrays", "metrics"}  # one ArrayRecord, one MetricRecord: what FedAvg checks
    back = content["arrays"].to_torch_state_dict()
    assert list(back) == list(weights)
    for n, w in weights.items():
        assert torch.allclose(back[n], w + delta[n], atol=1e-7), n  # at a 100 % budget: the dense reply


def test_non_train_messages_pass_untouched(mlp_weights):
    mod = make_cwmp_mod("sim-rpi4", model="mlp", budget=1.0)
    msg = _message(RecordDict({"arrays": ArrayRecord(mlp_weights)}), MessageType.EVALUATE)
    reply_content = RecordDict({"metrics": MetricRecord({"accuracy": 0.5, "num-examples": 3})})
    out = mod(msg, _context(), lambda m, c: Message(reply_content, reply_to=m))
    assert out.content is reply_content


def _reason(reply: Message) -> str:
    assert reply.has_error()
    return reply.error.reason


def test_bad_input_is_an_error_reply_naming_the_key_or_layer(mlp_weights):
    budget = Budget.topk_keep_ratio(0.05)
    mod = make_cwmp_mod("sim-rpi4", model="mlp", budget=budget)
    # a reply without the record of weights
    def no_arrays(m, c):
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=m)
    assert "no ArrayRecord 'arrays'" in _reason(mod(_train_msg(mlp_weights), _context(), no_arrays))
    # a train message keyed otherwise than the mod was told
    weights_msg = _message(RecordDict({"weights": ArrayRecord(mlp_weights)}))
    assert "no ArrayRecord 'arrays' of global weights" in _reason(mod(weights_msg, _context(), no_arrays))
    # a model whose tensors are not the ones the profile priced
    wide = {n: torch.zeros(w.shape[0] + 1, *w.shape[1:]) for n, w in mlp_weights.items()}
    reason = _reason(mod(_train_msg(wide), _context(), _template_train(_deltas(wide, 1))))
    assert "layer '1.weight' was priced as float32[256, 64]" in reason
    # a reply whose tensors are not the ones it received
    def renamed(m, c):
        w = m.content["arrays"].to_torch_state_dict()
        w["extra"] = w.pop("5.bias")
        return Message(RecordDict({"arrays": ArrayRecord(w), "metrics": MetricRecord({"num-examples": 1})}), reply_to=m)
    reason = _reason(mod(_train_msg(mlp_weights), _context(), renamed))
    assert "only in the reply: 'extra'" in reason and "only in the global weights: '5.bias'" in reason
    # a model the profile has no table for
    other = make_cwmp_mod("sim-rpi4", model="vgg", budget=budget)
    assert "no per-layer table for model 'vgg'" in _reason(
        other(_train_msg(mlp_weights), _context(), _template_train(_deltas(mlp_weights, 1))))
    with pytest.raises(CWMPFlowerError, match="profile=... with model"):
        make_cwmp_mod("sim-rpi4", budget=budget)


def test_a_budget_below_the_rounds_floor_is_refused_by_name():
    weights = {"w": torch.zeros(4, 4), "b": torch.zeros(4)}
    prices = {"w": LayerPrice(1e-6, "measured", compensation_j=2e-3), "b": LayerPrice(1e-6, "measured",
                                                                                     compensation_j=1e-3)}
    cmap = CostMap(prices, simulated=False, profile="test", model="tiny")
    mod = make_cwmp_mod(cost_map=cmap, budget=Budget.of_joules(1e-3))
    reason = _reason(mod(_train_msg(weights), _context(), _template_train(_deltas(weights, 1))))
    assert "below the round's floor of 0.003 J" in reason
    ok = make_cwmp_mod(cost_map=cmap, budget=Budget.of_joules(3.5e-3))
    reply = ok(_train_msg(weights), _context(), _template_train(_deltas(weights, 1)))
    assert not reply.has_error() and reply.content["metrics"]["cwmp-simulated"] == 0


def test_the_train_config_overrides_the_budget_for_a_round(mlp_weights):
    mod = make_cwmp_mod("sim-rpi4", model="mlp", budget=Budget.topk_keep_ratio(0.01))
    deltas = _deltas(mlp_weights, 2)
    kept = []
    for ratio in (None, 0.2):
        # Top-K in both rounds: its count is the budget's keep ratio (CWMP's set-up-aware rule may
        # keep many more entries than Top-K at Top-K's energy, when set-ups dominate)
        extra = {"cwmp-method": "topk"} if ratio is None else {"cwmp-keep-ratio": ratio, "cwmp-method": "topk"}
        reply = mod(_train_msg(mlp_weights, **extra), _context(), _template_train(deltas))
        kept.append(reply.content["metrics"]["cwmp-kept"])
    total = sum(w.numel() for w in mlp_weights.values())
    assert kept[1] == round(0.2 * total)  # Top-K at 20 %: exactly k entries
    assert kept[0] == round(0.01 * total) < kept[1]  # the default budget in the round without an override


def test_decode_refuses_a_reply_without_the_sparse_record(mlp_weights):
    reply_content = RecordDict({"arrays": ArrayRecord(mlp_weights), "metrics": MetricRecord({"num-examples": 1})})
    with pytest.raises(CWMPFlowerError, match="no ArrayRecord 'cwmp.sparse'.*add make_cwmp_mod"):
        decode_update(reply_content, ArrayRecord(mlp_weights))


def test_a_stock_strategy_refuses_sparse_replies_instead_of_averaging_positions(mlp_weights):
    from flwr.serverapp.exception import InconsistentMessageReplies
    from flwr.serverapp.strategy import FedAvg

    mod = make_cwmp_mod("sim-rpi4", model="mlp", budget=Budget.topk_keep_ratio(0.05))
    replies = [mod(_train_msg(mlp_weights), _context(), _template_train(_deltas(mlp_weights, 1, seed=s)))
               for s in range(2)]
    with pytest.raises(InconsistentMessageReplies, match="exactly one MetricRecord"):
        FedAvg().aggregate_train(1, replies)


# ------------------------------------------------------------------- a whole app that is not ours
@pytest.mark.slow
def test_the_mod_in_a_foreign_flower_app_at_full_budget_equals_plain_fedavg():
    """A least-squares ClientApp written as Flower's template writes it, run twice on Flower's
    simulation runtime: plain FedAvg, and with the CWMP mod (Top-K's energy at 100 %) plus
    CWMPStrategy(FedAvg()). Keeping every entry, both give the same global weights; at 10 % the
    mod's telemetry shows what was kept."""
    pytest.importorskip("ray")
    from foreign_flower_app import run_foreign_app

    plain, _ = run_foreign_app(mod_ratio=None)
    full, rounds_full = run_foreign_app(mod_ratio=1.0)
    for name in plain:
        np.testing.assert_allclose(full[name], plain[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert all(c.kept == c.total for clients in rounds_full.values() for c in clients)
    sparse, rounds = run_foreign_app(mod_ratio=0.1)
    assert sorted(rounds) == [1, 2, 3] and all(len(c) == 2 for c in rounds.values())
    for clients in rounds.values():
        for c in clients:
            assert c.predicted_j > 0 and c.simulated and 0 < c.kept < c.total
            assert set(c.layers) == {"lin.weight", "lin.bias"}
    assert not np.allclose(sparse["lin.weight"], plain["lin.weight"])
