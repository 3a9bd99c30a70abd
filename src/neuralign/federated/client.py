"""Client side: local training for every strategy, and the Flower ``ClientApp``.

The server tells a client what to do through the message's ``ConfigRecord``:

* ``method``: ``fedavg`` | ``fedprox`` | ``fedpfn`` | ``fedpnu`` | ``fedma``;
* ``proximal-mu`` (FedProx): weight of ``mu/2 * ||w - w_global||^2``;
* ``anchor-ratio``, ``anchor-seed``, ``anchor-granularity`` (FedPFN / FedPNU): the fixed-anchor
  mask every client rebuilds identically from the seed; the fixed values are the ones of the
  received global model;
* ``freeze`` (FedMA): comma-separated parameter names kept frozen (already-matched layers).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from neuralign.errors import NeuralignError
from neuralign.federated.task import FedTask
from neuralign.train import evaluate, train
from neuralign.train.anchors import FixedNeuronAnchors

METHODS = ("fedavg", "fedprox", "fedpfn", "fedpnu", "fedma")


class _Freeze:
    """Callback: keep whole parameters at their start values (FedMA's frozen matched layers)."""

    def __init__(self, model: nn.Module, names: list[str]):
        params = dict(model.named_parameters())
        missing = [n for n in names if n not in params]
        if missing:
            raise NeuralignError(f"cannot freeze unknown parameters {missing[:3]}")
        self.values = {n: params[n].detach().clone() for n in names}

    def after_backward(self, model, optimizer=None):
        params = dict(model.named_parameters())
        for n in self.values:
            if params[n].grad is not None:
                params[n].grad.zero_()

    @torch.no_grad()
    def after_step(self, model, optimizer=None):
        params = dict(model.named_parameters())
        for n, v in self.values.items():
            params[n].copy_(v)


def local_train(model: nn.Module, loader, task: FedTask, config) -> tuple[nn.Module, dict]:
    """Train a copy of the received global ``model`` on the client's data as ``config`` says.

    Returns the trained copy and its metrics (``train_loss``, ``train_accuracy``).
    """
    method = str(config.get("method", "fedavg"))
    if method not in METHODS:
        raise NeuralignError(f"unknown federated method {method!r}; use one of {METHODS}")
    local = copy.deepcopy(model)
    callbacks, regularizer = [], None
    if method == "fedprox":
        mu = float(config.get("proximal-mu", 0.01))
        ref = [p.detach().clone() for p in model.parameters()]

        def regularizer(m, ref=ref, mu=mu):
            return 0.5 * mu * sum(((p - r) ** 2).sum() for p, r in zip(m.parameters(), ref))
    if method in ("fedpfn", "fedpnu"):
        ratio = float(config.get("anchor-ratio", 0.4))
        if ratio > 0:
            callbacks.append(FixedNeuronAnchors(
                model, ratio, seed=int(config.get("anchor-seed", 0)),
                granularity=str(config.get("anchor-granularity", "weight"))))
    freeze = [n for n in str(config.get("freeze", "")).split(",") if n]
    if freeze:
        callbacks.append(_Freeze(local, freeze))
    hist = train(local, loader, epochs=int(config.get("local-epochs", task.local_epochs)),
                 lr=float(config.get("lr", task.lr)), momentum=task.momentum,
                 weight_decay=task.weight_decay, schedule="constant", callbacks=callbacks,
                 regularizer=regularizer, progress=False,
                 seed=int(config.get("server-round", 0)) * 7919 + task.seed)
    last = hist.epochs[-1]
    return local, {"train_loss": float(last["train_loss"]),
                   "train_accuracy": float(last["train_accuracy"])}


# ---------------------------------------------------------------------------------------------
# Flower ClientApp
# ---------------------------------------------------------------------------------------------

def _partition_id(context) -> int:
    cfg = context.node_config
    if "partition-id" not in cfg:
        raise NeuralignError("the SuperNode has no 'partition-id' in its node config; start it "
                             "with --node-config 'partition-id=0 num-partitions=N' (or, with "
                             "task.client-data=\"node\", 'data-path=\"/path/to/node.npz\"')")
    return int(cfg["partition-id"])


def _client_loader(task: FedTask, context, server_round: int = 0):
    """This node's training data: its own file (``client-data = node``: ``data-path`` in the
    node config; the whole data set is never loaded) or its partition of the built-in set."""
    cfg = context.node_config
    if task.client_data == "node":
        if "data-path" not in cfg:
            raise NeuralignError("the run reads node-local data (task.client-data = \"node\") "
                                 "but this SuperNode has no 'data-path' in its node config; "
                                 "start it with --node-config 'data-path=\"/path/to/node.npz\"'")
        return task.node_loader(str(cfg["data-path"]), server_round,
                                node_seed=int(cfg.get("partition-id", 0)))
    return task.client_loader(_partition_id(context), server_round)


def model_from_arrays(task: FedTask, arrays) -> nn.Module:
    """Build the task's model and load ``arrays`` (an ArrayRecord) into it; shapes may differ
    from the template (FedMA grows widths), in which case the layers are resized first."""
    from neuralign.federated.fedma import resize_like

    sd = arrays.to_torch_state_dict()
    model = task.build_model()
    model = resize_like(model, sd)
    model.load_state_dict(sd)
    return model


def make_client_app():
    """The Flower ``ClientApp`` (Message API): ``train`` and ``evaluate`` handlers."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def _train(msg: Message, context) -> Message:
        task = FedTask.from_run_config(context.run_config)
        pid = int(context.node_config.get("partition-id", -1))
        config = msg.content["config"]
        failing = {int(p) for p in task.fail_partitions.split(",") if p.strip()}
        if pid in failing:
            raise RuntimeError(f"client {pid} failed on purpose (fail-partitions)")
        torch.set_num_threads(int(context.node_config.get("num-threads", 1)))
        model = model_from_arrays(task, msg.content["arrays"])
        loader = _client_loader(task, context, int(config.get("server-round", 0)))
        local, metrics = local_train(model, loader, task, config)
        metrics["num-examples"] = len(loader.dataset)
        content = RecordDict({"arrays": ArrayRecord(local.state_dict()),
                              "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def _evaluate(msg: Message, context) -> Message:
        task = FedTask.from_run_config(context.run_config)
        model = model_from_arrays(task, msg.content["arrays"])
        loader = _client_loader(task, context)
        ev = evaluate(model, loader)
        metrics = {"eval_loss": float(ev["loss"]), "eval_accuracy": float(ev["accuracy"]),
                   "num-examples": len(loader.dataset)}
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app
