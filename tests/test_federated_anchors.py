"""Fixed neuron anchors across a federation: the mask travels in full and is confirmed by hash,
mask policy options (fixed / per round, weight / neuron, head ratio), and the public client
helper used in a user-written Flower ClientApp."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'neuralign[fl]')")
pytest.importorskip("flwr_datasets", reason="flwr-datasets is not installed")

from neuralign.errors import NeuralignError
from neuralign.federated import FedTask
from neuralign.federated.client import make_client_app, model_from_arrays
from neuralign.federated.local_grid import LocalGrid
from neuralign.federated.runner import build_run_config
from neuralign.federated.server import run_server
from neuralign.train.anchors import FixedNeuronAnchors

TASK = FedTask(dataset="digits", num_partitions=3, alpha=0.5, model="mlp",
               model_kwargs='{"width": 32, "depth": 1}', lr=0.1, batch_size=32, seed=0)


def _run(app, strategy="fedpfn", rounds=2, **options):
    """Run the ServerApp on the in-process grid with ``app`` as every node's ClientApp;
    returns the history and the global state dict seen by the evaluator after each round."""
    from neuralign.federated import server

    seen, orig = {}, server.central_evaluator

    def spy(task):
        ev = orig(task)

        def fn(r, arrays):
            seen[r] = arrays.to_torch_state_dict()
            return ev(r, arrays)
        return fn

    options = {"anchor_ratio": 0.5, "anchor_seed": 3, **options}
    cfg = build_run_config(TASK, strategy, rounds, **options)
    server.central_evaluator = spy
    try:
        h = run_server(LocalGrid(app, TASK.num_partitions, cfg), cfg)
    finally:
        server.central_evaluator = orig
    return h, seen


def _rogue_app(echo):
    """A ClientApp that trains with its own mask (built from ratio and a wrong seed, as a client
    that rebuilds the mask itself could) and echoes ``echo(mask) -> metrics``."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    from neuralign.train import train

    real = make_client_app()

    def app(msg, ctx):
        if ctx.node_config["partition-id"] != 0:
            return real(msg, ctx)
        model = model_from_arrays(TASK, msg.content["arrays"])
        cb = FixedNeuronAnchors(model, float(msg.content["config"]["anchor-ratio"]), seed=99)
        loader = TASK.client_loader(0)
        train(model, loader, epochs=1, lr=0.1, callbacks=[cb], progress=False)
        metrics = {"num-examples": len(loader.dataset), "train_loss": 0.0,
                   "train_accuracy": 0.0, **echo(cb.masks)}
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                   "metrics": MetricRecord(metrics)}), reply_to=msg)
    return app


def test_a_client_with_another_mask_is_detected_and_not_averaged():
    from neuralign.federated.anchors import HASH_KEY, mask_hash

    for echo in (lambda masks: {},  # a client that does not know about masks at all
                 lambda masks: {HASH_KEY: mask_hash(masks)}):  # its own (different) mask
        h, _ = _run(_rogue_app(echo), rounds=1)
        assert h["participants"] == {"1": 2}
        assert any("anchor mask mismatch" in n and "discarded" in n for n in h["failures"]["1"])


def test_client_refuses_a_mask_that_fails_its_hash():
    from flwr.app import ArrayRecord

    from neuralign.federated.anchors import MASKS_KEY, anchors_from_message

    real = make_client_app()
    refused = []

    def tampering(msg, ctx):  # the mask is altered in transit; the hash in the config is not
        sd = msg.content[MASKS_KEY].to_torch_state_dict()
        sd = {k: torch.zeros_like(v) for k, v in sd.items()}  # nothing anchored
        msg.content[MASKS_KEY] = ArrayRecord(sd)
        with pytest.raises(NeuralignError, match="anchor mask mismatch"):
            anchors_from_message(model_from_arrays(TASK, msg.content["arrays"]), msg)
        refused.append(ctx.node_id)
        return real(msg, ctx)

    from neuralign.federated import server

    with pytest.raises(NeuralignError, match="every round failed"):
        _run(tampering, rounds=1)
    h = server.LAST_RESULT
    assert len(refused) == 3 and h["participants"] == {"1": 0}
    assert all("anchor mask mismatch" in n for n in h["failures"]["1"][:3])


def test_mask_policy_draws():
    from neuralign.federated.anchors import MaskPolicy

    sd = TASK.build_model().state_dict()
    fixed = MaskPolicy(ratio=0.5, seed=1)
    per_round = MaskPolicy(ratio=0.5, seed=1, policy="per-round", granularity="neuron",
                           head_ratio=0.3)
    assert set(fixed.draw(sd, 1)) == {"layer1.0.weight"}  # the head is free by default
    assert all(torch.equal(fixed.draw(sd, 1)[n], fixed.draw(sd, 5)[n]) for n in fixed.draw(sd, 1))
    m1, m2 = per_round.draw(sd, 1), per_round.draw(sd, 2)
    assert set(m1) == {"layer1.0.weight", "classifier.weight"}
    assert not torch.equal(m1["layer1.0.weight"], m2["layer1.0.weight"])
    rows = m1["layer1.0.weight"]
    assert torch.equal(rows, rows[:, :1].expand_as(rows))  # whole neurons
    assert int(rows[:, 0].sum()) == 16 and int(m1["classifier.weight"][:, 0].sum()) == 3
    with pytest.raises(NeuralignError, match="policy"):
        MaskPolicy(policy="sometimes")
    with pytest.raises(NeuralignError, match="head ratio"):
        MaskPolicy(head_ratio=1.5)


def test_run_config_mask_options_reach_the_server_and_clients():
    """Per-round neuron masks with an anchored head, set by run-config keys only."""
    from neuralign.federated.anchors import MaskPolicy

    h, seen = _run(make_client_app(), rounds=2, anchor_policy="per-round",
                   anchor_granularity="neuron", anchor_head_ratio=0.5)
    assert h["failures"] == {} and h["accuracy"][-1] > h["accuracy"][0] + 0.2
    pol = MaskPolicy(ratio=0.5, seed=3, policy="per-round", granularity="neuron", head_ratio=0.5)
    for r in (1, 2):
        masks = pol.draw(seen[0], r)
        for n in ("layer1.0.weight", "classifier.weight"):
            m = masks[n]
            assert torch.equal(seen[r][n][m], seen[r - 1][n][m])  # anchored this round
            assert not torch.equal(seen[r][n][~m], seen[r - 1][n][~m])
    assert not torch.equal(pol.draw(seen[0], 1)["classifier.weight"],
                           pol.draw(seen[0], 2)["classifier.weight"])


def _user_client_app(use_helper: bool):
    """What a Flower user writes: their own model, optimizer and loop, plus the helper."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from neuralign.federated.anchors import fixed_anchors

    app = ClientApp()

    @app.train()
    def train(msg, context):
        model = TASK.build_model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        loader = TASK.client_loader(int(context.node_config["partition-id"]))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        extra = {}
        with fixed_anchors(model, msg, opt) if use_helper else _nothing() as anchors:
            for x, y in loader:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
            if use_helper:
                extra = anchors.metrics
        metrics = MetricRecord({"num-examples": len(loader.dataset), **extra})
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                   "metrics": metrics}), reply_to=msg)

    return app


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


@pytest.mark.parametrize("strategy", ["fedpfn", "fedavg"])
def test_anchor_helper_in_a_user_written_client_app(strategy):
    from neuralign.federated.anchors import MaskPolicy

    h, seen = _run(_user_client_app(use_helper=True), strategy=strategy, rounds=2)
    assert h["failures"] == {} and h["participants"] == {"1": 3, "2": 3}
    assert h["accuracy"][-1] > h["accuracy"][0] + 0.2
    m = MaskPolicy(ratio=0.5, seed=3).draw(seen[0], 1)["layer1.0.weight"]
    w = [seen[r]["layer1.0.weight"] for r in (0, 1, 2)]
    if strategy == "fedpfn":  # anchors kept through the user's momentum + weight decay loop
        assert torch.equal(w[2][m], w[0][m]) and not torch.equal(w[2][~m], w[0][~m])
    else:  # no anchors in FedAvg's messages: the helper does nothing
        assert not torch.equal(w[2][m], w[0][m])


def test_user_client_app_without_the_helper_is_refused_by_fedpfn():
    from neuralign.federated import server

    with pytest.raises(NeuralignError, match="every round failed"):
        _run(_user_client_app(use_helper=False), rounds=1)
    h = server.LAST_RESULT
    assert h["participants"] == {"1": 0}
    assert len(h["failures"]["1"]) >= 3
    assert h["accuracy"][1] == h["accuracy"][0]  # nothing was averaged


def test_helper_keeps_anchors_bit_exact_and_removes_its_hooks():
    from flwr.app import ConfigRecord, RecordDict

    from neuralign.federated.anchors import (
        HASH_KEY,
        MASKS_KEY,
        MaskPolicy,
        fixed_anchors,
        mask_hash,
        pack_masks,
    )

    model = TASK.build_model()
    masks = MaskPolicy(ratio=0.4, granularity="weight", head_ratio=0.2).draw(
        model.state_dict(), 1)
    content = RecordDict({MASKS_KEY: pack_masks(masks),
                          "config": ConfigRecord({HASH_KEY: mask_hash(masks)})})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    with fixed_anchors(model, content, opt) as anchors:
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    params = dict(model.named_parameters())
    for n, m in masks.items():
        assert torch.equal(params[n][m], before[n][m])
        assert not torch.equal(params[n][~m], before[n][~m])
    assert anchors.metrics == {HASH_KEY: mask_hash(masks)}
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()  # after the block the hooks are gone: anchored weights train again
    assert not torch.equal(params["layer1.0.weight"][masks["layer1.0.weight"]],
                           before["layer1.0.weight"][masks["layer1.0.weight"]])


def test_ratio_zero_anchors_nothing_and_is_not_refused():
    h, _ = _run(make_client_app(), rounds=1, anchor_ratio=0.0)
    assert h["failures"] == {} and h["participants"] == {"1": 3}
