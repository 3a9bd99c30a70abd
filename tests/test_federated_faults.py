"""Federated runs under bad settings and failing nodes (issue 19, part A), all in process:
validation before anything starts, runs in which every round fails, clients that never return,
nodes that leave, seeded sampling, per-round checkpoints / resume / init, node-local data.
Hang cases carry a short pytest timeout (they hung forever before the fix)."""

from __future__ import annotations

import json
import random
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'neuralign[fl]')")
pytest.importorskip("flwr_datasets", reason="flwr-datasets is not installed")

from typer.testing import CliRunner

from neuralign.cli import app
from neuralign.errors import NeuralignError
from neuralign.federated import FedTask
from neuralign.federated.runner import build_run_config, run_federated

TASK = FedTask(dataset="digits", num_partitions=3, alpha=0.5, model="mlp",
               model_kwargs='{"width": 32, "depth": 1}', lr=0.1, batch_size=32, seed=0)
runner = CliRunner()


class _Spy:
    """A ClientApp wrapper that counts calls (and may block or fail some nodes)."""

    def __init__(self, block=lambda ctx, rnd: False):
        from neuralign.federated.client import make_client_app

        self.app, self.block, self.calls = make_client_app(), block, 0
        self.release = threading.Event()

    def __call__(self, msg, ctx):
        self.calls += 1
        rnd = int(msg.content["config"].get("server-round", 0)) if "config" in msg.content \
            else 0
        if self.block(ctx, rnd):
            self.release.wait(60)  # "never" returns within the test
        return self.app(msg, ctx)


# -- 1. validation before anything starts --------------------------------------------------------

BAD = [
    ({"num_partitions": 0}, "clients"),
    ({"fraction": 1.5}, "fraction"),
    ({"fraction": 0.0}, "fraction"),
    ({"min_clients": 5}, "min-clients"),
    ({"alpha": 0.0}, "alpha"),
    ({"alpha": -1.0}, "alpha"),
    ({"lr": -1.0}, "lr"),
    ({"lr": 0.0}, "lr"),
    ({"local_epochs": 0}, "local-epochs"),
    ({"num_partitions": 200}, "200"),          # more clients than the data can fill
    ({"min_replies": 4}, "min-replies"),       # more results than a round can get
    ({"batch_size": 0}, "batch-size"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("kwargs", "word"), BAD, ids=[str(k) for k, _ in BAD])
def test_bad_settings_fail_before_any_client_is_called(kwargs, word, monkeypatch):
    from neuralign.federated import client

    spy = _Spy()
    monkeypatch.setattr(client, "make_client_app", lambda: spy)
    with pytest.raises(NeuralignError, match=word) as err:
        run_federated(TASK, "fedavg", rounds=1, **kwargs)
    assert "\n" not in str(err.value) and spy.calls == 0


@pytest.mark.timeout(30)
def test_generated_app_run_config_is_checked_by_the_server_app():
    from neuralign.federated.local_grid import LocalGrid
    from neuralign.federated.server import run_server

    spy = _Spy()
    for key, value in (("fraction", 1.5), ("min-clients", 7), ("task.alpha", 0.0),
                       ("round-timeout", 0), ("task.local-epochs", 0)):
        cfg = dict(build_run_config(TASK, "fedavg", 1), **{key: value})
        with pytest.raises(NeuralignError, match=key.split(".")[-1]):
            run_server(LocalGrid(spy, 3, cfg), cfg)
    assert spy.calls == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args", [["--clients", "200"], ["--round-timeout", "0"],
                                  ["--min-replies", "3", "--fraction", "0.5", "--clients", "4"]])
def test_cli_bad_settings_exit_2_in_one_line(args):
    r = runner.invoke(app, ["federate", "--data", "digits", "--rounds", "1", "--model", "mlp",
                            "-m", "width=8", "-m", "depth=1", *args])
    assert r.exit_code == 2, r.output
    assert r.output.strip().count("\n") == 0 and "error" in r.output


# -- every round failed / failure counts / --save-model ------------------------------------------

@pytest.mark.timeout(60)
def test_every_round_failed_raises_and_saves_nothing(tmp_path):
    target = tmp_path / "m.safetensors"
    with pytest.raises(NeuralignError, match="every round failed"):
        run_federated(TASK, "fedavg", rounds=2, fail_partitions="0,1,2", save_model=str(target))
    assert not target.exists()


@pytest.mark.timeout(60)
def test_cli_every_round_failed_exits_non_zero(monkeypatch):
    import neuralign.federated.runner as rn

    real = rn.run_federated
    monkeypatch.setattr(rn, "run_federated",
                        lambda *a, **k: real(*a, fail_partitions="0,1", **k))
    r = runner.invoke(app, ["federate", "--data", "digits", "--rounds", "1", "--clients", "2",
                            "--model", "mlp", "-m", "width=8", "-m", "depth=1"])
    assert r.exit_code != 0 and "every round failed" in r.output


def test_cli_counts_failed_clients_not_notes(monkeypatch):
    import neuralign.federated.runner as rn

    hist = {"round": [0, 1, 2], "accuracy": [0.1, 0.1, 0.5], "loss": [2.3, 2.3, 1.0],
            "final_accuracy": 0.5, "best_accuracy": 0.5, "seconds": 1.0,
            "participants": {"1": 0, "2": 3},
            "failures": {"1": [f"node {i}: error: boom" for i in range(3)]
                         + ["round skipped: 0 result(s) < min-replies=1"]}}
    monkeypatch.setattr(rn, "run_federated", lambda *a, **k: hist)
    r = runner.invoke(app, ["federate", "--data", "digits", "--rounds", "2", "--clients", "3"])
    assert r.exit_code == 0, r.output
    assert "3 client(s) failed" in r.output and "4 client(s)" not in r.output
    assert "round 1: round skipped" in r.output


@pytest.mark.timeout(60)
def test_save_model_after_failed_rounds_saves_the_last_good_model(tmp_path):
    from neuralign.federated.local_grid import LocalGrid
    from neuralign.federated.server import run_server
    from neuralign.io import load_state_dict

    target = tmp_path / "m.safetensors"

    class _Round2Fails(_Spy):
        def __call__(self, msg, ctx):
            if int(msg.content["config"]["server-round"]) == 2:
                raise RuntimeError("round 2 breaks")
            return super().__call__(msg, ctx)

    cfg = build_run_config(TASK, "fedavg", 2, save_model=str(target))
    h = run_server(LocalGrid(_Round2Fails(), 3, cfg), cfg)
    assert h["skipped"] == [2] and h["participants"] == {"1": 3, "2": 0}
    assert h["accuracy"][2] == h["accuracy"][1]
    assert target.exists() and len(load_state_dict(target)) > 0


# -- 2. time-outs, lost nodes, seeded sampling ---------------------------------------------------

@pytest.mark.timeout(60)
def test_client_that_never_returns_does_not_stall_the_run(monkeypatch):
    from neuralign.federated import client

    spy = _Spy(block=lambda ctx, rnd: ctx.node_config["partition-id"] == 2 and rnd == 2)
    monkeypatch.setattr(client, "make_client_app", lambda: spy)
    try:
        h = run_federated(TASK, "fedavg", rounds=2, round_timeout=10.0)
    finally:
        spy.release.set()
        for t in threading.enumerate():  # let the abandoned client finish before we exit
            if t.name.startswith("neuralign-client-"):
                t.join(30)
    assert h["finished"] and h["participants"] == {"1": 3, "2": 2}
    assert any("no reply" in n for n in h["failures"]["2"])
    assert h["accuracy"][2] > 0.5


@pytest.mark.timeout(60)
def test_node_that_leaves_after_round_1_does_not_stall_the_run():
    from neuralign.federated.local_grid import LocalGrid
    from neuralign.federated.server import run_server

    class _Leaving(LocalGrid):
        def push_messages(self, messages):
            messages = list(messages)
            if messages and messages[0].content["config"]["server-round"] >= 2:
                self.offline.add(1002)  # gone: not listed, never answers
            return super().push_messages(messages)

        def get_node_ids(self):
            return [n for n in self.node_ids if n not in getattr(self, "offline", ())]

    cfg = build_run_config(TASK, "fedavg", 3, node_timeout=1.0)
    grid = _Leaving(_Spy(), 3, cfg)
    h = run_server(grid, cfg)  # round 2 sampled node 1002 and lost it; round 3 waits 1 s
    assert h["finished"] and h["participants"] == {"1": 3, "2": 2, "3": 2}
    assert any("no reply" in n for n in h["failures"]["2"])
    assert any("only 2 node(s) online" in n for n in h["failures"]["3"])
    assert h["sampled"]["3"] == [1000, 1001]


@pytest.mark.timeout(60)
def test_lost_node_answered_for_by_the_superlink_counts_once():
    from flwr.app import Error, Message

    from neuralign.federated.local_grid import LocalGrid
    from neuralign.federated.server import run_server

    class _LinkLike(LocalGrid):
        """As a SuperLink: messages get ids when pushed, and a lost node's reply is an error
        from the SuperLink itself (node id 1) that names the message it answers."""

        def send_and_receive(self, messages, *, timeout=None):
            messages, out = list(messages), []
            for m in messages:
                m.metadata.__dict__["_message_id"] = f"msg-{m.metadata.dst_node_id}"
                if m.metadata.dst_node_id == 1002:
                    err = Message(Error(5, "Node Unavailable"), reply_to=m)
                    err.metadata.__dict__["_src_node_id"] = 1
                    out.append(err)
                else:
                    out += super().send_and_receive([m])
            return out

    cfg = build_run_config(TASK, "fedavg", 1)
    h = run_server(_LinkLike(_Spy(), 3, cfg), cfg)
    assert h["participants"] == {"1": 2}
    assert h["failures"]["1"] == ["node 1002: error: Node Unavailable"]


@pytest.mark.timeout(120)
def test_client_sampling_is_seeded():
    runs = []
    for global_seed in (1, 2):  # Python's global RNG must not matter
        random.seed(global_seed)
        runs.append(run_federated(TASK, "fedavg", rounds=3, fraction=0.34, min_clients=1))
    a, b = runs
    assert a["accuracy"] == b["accuracy"] and a["sampled"] == b["sampled"]
    assert all(len(v) == 1 for v in a["sampled"].values())
    other = run_federated(TASK, "fedavg", rounds=3, fraction=0.34, min_clients=1, seed=5)
    assert other["sampled"] != a["sampled"]  # the task's seed does


def test_sampling_keeps_64_bit_node_ids_exact():
    from neuralign.federated.rounds import sample_nodes

    class _Grid:  # SuperLink node ids are unsigned 64-bit integers
        def get_node_ids(self):
            return [15309221318880358887, 6451705859976080554, 2**64 - 1]

    for frac in (1.0, 0.5):
        sample, note = sample_nodes(_Grid(), 1, seed=0, fraction=frac, min_clients=1,
                                    node_timeout=0)
        assert set(sample) <= set(_Grid().get_node_ids()) and note is None
    assert len(sample) == 1


# -- 3. checkpoints, resume, init ----------------------------------------------------------------

@pytest.mark.timeout(120)
def test_crash_then_resume_loses_nothing(tmp_path):
    from neuralign.federated import server
    from neuralign.io import load_state_dict

    full = run_federated(TASK, "fedpfn", rounds=3, save_model=str(tmp_path / "full.safetensors"))
    ck = tmp_path / "ck"

    def crash(r, metrics):
        if r == 3:
            raise KeyboardInterrupt("server killed")

    server.ROUND_HOOKS.append(crash)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_federated(TASK, "fedpfn", rounds=3, checkpoint_dir=str(ck))
    finally:
        server.ROUND_HOOKS.remove(crash)
    saved = json.loads((ck / "history.json").read_text())
    assert saved["round"] == [0, 1, 2]
    h = run_federated(TASK, "fedpfn", rounds=3, checkpoint_dir=str(ck), resume=True,
                      save_model=str(tmp_path / "resumed.safetensors"))
    assert h["round"] == [0, 1, 2, 3] and h["resumed_at"] == [2]
    assert h["accuracy"] == full["accuracy"] and h["participants"] == full["participants"]
    a, b = load_state_dict(tmp_path / "full.safetensors"), load_state_dict(
        tmp_path / "resumed.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    more = run_federated(TASK, "fedpfn", rounds=4, checkpoint_dir=str(ck), resume=True)
    assert more["round"] == [0, 1, 2, 3, 4] and more["accuracy"][:4] == full["accuracy"]
    with pytest.raises(NeuralignError, match="another run"):
        run_federated(TASK, "fedavg", rounds=5, checkpoint_dir=str(ck), resume=True)
    with pytest.raises(NeuralignError, match="already holds a checkpoint"):  # not resumed
        run_federated(TASK, "fedpfn", rounds=3, checkpoint_dir=str(ck))


@pytest.mark.timeout(120)
def test_init_starts_from_the_checkpoint_and_refuses_another_width(tmp_path):
    from neuralign.federated import client

    first = tmp_path / "first.safetensors"
    h1 = run_federated(TASK, "fedavg", rounds=1, save_model=str(first))
    h2 = run_federated(TASK, "fedavg", rounds=1, init=str(first))
    assert h2["accuracy"][0] == pytest.approx(h1["accuracy"][-1])
    spy = _Spy()
    for strategy in ("fedavg", "fedpfn"):
        old = client.make_client_app
        client.make_client_app = lambda: spy
        try:
            with pytest.raises(NeuralignError, match="does not fit the task's model"):
                run_federated(TASK, strategy, rounds=1, init=str(first),
                              model_kwargs='{"width": 16, "depth": 1}')
        finally:
            client.make_client_app = old
    assert spy.calls == 0


# -- 4. node-local data --------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_nodes_train_on_their_own_files_without_the_data_set(tmp_path, monkeypatch):
    import dataclasses

    from neuralign.federated import task as task_mod
    from neuralign.federated.local_grid import LocalGrid
    from neuralign.federated.node_data import write_node_data
    from neuralign.federated.server import run_server

    paths = write_node_data(TASK, tmp_path)
    parts = TASK.partitions()
    assert [len(np.load(p)["y"]) for p in paths] == [len(p) for p in parts]
    ref = run_federated(TASK, "fedavg", rounds=2)

    in_client = threading.local()
    real_splits = task_mod._splits

    def guarded(*a):
        assert not getattr(in_client, "on", False), "a node loaded the whole data set"
        return real_splits(*a)

    monkeypatch.setattr(task_mod, "_splits", guarded)
    spy = _Spy()

    def node_app(msg, ctx):
        in_client.on = True
        try:
            return spy(msg, ctx)
        finally:
            in_client.on = False

    node_task = dataclasses.replace(TASK, client_data="node")
    cfg = build_run_config(node_task, "fedavg", 2)
    nodes = [{"data-path": str(p), "partition-id": i} for i, p in enumerate(paths)]
    h = run_server(LocalGrid(node_app, 3, cfg, node_configs=nodes), cfg)
    assert h["failures"] == {} and h["accuracy"] == ref["accuracy"]

    nodes[1] = {"partition-id": 1}  # forgot its data-path: a clear error, the others train
    h = run_server(LocalGrid(node_app, 3, cfg, node_configs=nodes), cfg)
    assert any("data-path" in n for n in h["failures"]["1"])


def test_node_data_file_is_validated(tmp_path):
    from neuralign.errors import DataError
    from neuralign.federated.node_data import load_node_data

    p = tmp_path / "n.npz"
    np.savez(p, x=np.zeros((4, 1, 8, 8), np.float32), y=np.array([0, 1, 2, 12]))
    with pytest.raises(DataError, match="labels span"):
        load_node_data(p, input_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(DataError, match="shape"):
        load_node_data(p, input_shape=(1, 28, 28))
    np.savez(p, inputs=np.zeros((4, 3)))
    with pytest.raises(DataError, match="lacks"):
        load_node_data(p)
    with pytest.raises(DataError, match="not found"):
        load_node_data(tmp_path / "missing")


def test_federated_docs_command_lines_use_existing_options():
    import re
    import shlex
    from pathlib import Path

    import click
    import typer

    text = (Path(__file__).resolve().parents[1] / "docs" / "federated.md").read_text()
    cmd = typer.main.get_command(app).commands["federate"]
    opts = {o for p in cmd.params if isinstance(p, click.Option) for o in p.opts + p.secondary_opts}
    lines = [shlex.split(line.split(" #")[0])[2:]
             for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL)
             for line in block.replace("\\\n", " ").splitlines()
             if line.startswith("neuralign federate")]
    assert len(lines) >= 5
    for args in lines:
        for tok in args:
            if tok.startswith("--"):
                assert tok.split("=")[0] in opts, f"docs/federated.md: no option {tok}"
    for flag in ("--round-timeout", "--node-timeout", "--checkpoint-dir", "--resume", "--init",
                 "--client-data", "--write-node-data"):
        assert flag in text and flag in opts


def test_cli_flags_reach_the_generated_app(tmp_path):
    import tomllib

    d = tmp_path / "app"
    r = runner.invoke(app, ["federate", "--data", "digits", "--clients", "3", "--rounds", "2",
                            "--model", "mlp", "-m", "width=8", "--round-timeout", "30",
                            "--node-timeout", "5", "--min-replies", "2", "--client-data",
                            "node", "--checkpoint-dir", str(tmp_path / "ck"), "--write-app",
                            str(d)])
    assert r.exit_code == 0, r.output
    cfg = tomllib.loads((d / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert cfg["round-timeout"] == 30.0 and cfg["node-timeout"] == 5.0
    assert cfg["min-replies"] == 2 and cfg["resume"] is False and cfg["init"] == ""
    assert cfg["task.client-data"] == "node" and cfg["task.input-shape"] == "1,8,8"
    assert cfg["task.num-classes"] == 10 and cfg["checkpoint-dir"] == str(tmp_path / "ck")
