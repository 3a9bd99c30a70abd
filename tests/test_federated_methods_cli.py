"""fed-methods on fed-robust's round loop: FedMA in ``run_rounds``, lost nodes reported under
their own id by the strategies, 64-bit node ids in FedMA's sampler, and the mask / FedMA options
from the CLI and ``run_federated`` to the run config, checked before anything starts."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'neuralign[fl]')")
pytest.importorskip("flwr_datasets", reason="flwr-datasets is not installed")

from typer.testing import CliRunner

from neuralign.cli import app
from neuralign.errors import NeuralignError
from neuralign.federated import FedTask
from neuralign.federated.runner import run_federated
from neuralign.federated.validate import check_run_config

TASK = FedTask(dataset="digits", num_partitions=3, alpha=0.5, model="mlp",
               model_kwargs='{"width": 16, "depth": 1}', lr=0.1, batch_size=32, seed=0)
SMALL = ["--data", "digits", "--clients", "3", "--rounds", "1", "--model", "mlp",
         "-m", "width=8", "-m", "depth=1"]
runner = CliRunner()


def test_exports():
    from neuralign.federated import FedMA, fixed_anchors
    from neuralign.federated.anchors import fixed_anchors as helper
    from neuralign.federated.fedma_strategy import FedMA as cls

    assert FedMA is cls and fixed_anchors is helper


def test_fedma_sampler_keeps_64_bit_node_ids_exact():
    from neuralign.federated.strategies import make_strategy

    ids = [15309221318880358887, 6451705859976080554, 2**64 - 1]

    class _Grid:  # SuperLink node ids are unsigned 64-bit integers
        def get_node_ids(self):
            return list(ids)

    s = make_strategy("fedma", num_clients=3, fraction=0.67, model=TASK.build_model())
    for r in (1, 2, 3):
        assert set(s._sample(_Grid(), r)) <= set(ids)


def test_strategy_reports_a_lost_node_under_its_own_id():
    from flwr.app import Error, Message, MessageType, RecordDict

    from neuralign.federated.local_grid import _set_task_identity
    from neuralign.federated.strategies import make_strategy

    _set_task_identity(1)  # as a ServerApp's runtime does
    s = make_strategy("fedavg", num_clients=2)
    msgs = []
    for n in (1001, 1002):
        m = Message(RecordDict(), dst_node_id=n, message_type=MessageType.TRAIN, group_id="1")
        m.metadata.__dict__["_message_id"] = f"msg-{n}"  # as the SuperLink sets it on push
        msgs.append(m)
    s._record_sent(1, msgs)
    err = Message(Error(5, "Node Unavailable"), reply_to=msgs[1])
    err.metadata.__dict__["_src_node_id"] = 1  # the SuperLink answers for the lost node
    s._record_replies(1, [err])
    assert s.failures[1] == ["node 1002: error: Node Unavailable",
                             "node 1001: no reply (timed out or lost)"]


def test_fedma_in_the_round_loop_has_no_skipped_mid_pass_rounds():
    h = run_federated(TASK, "fedma", rounds=3)  # 2 layers: a pass, then a leftover round
    assert h["round"] == [0, 2, 3] and h["skipped"] == []
    assert not any("skipped" in n for notes in h["failures"].values() for n in notes)
    assert h["sampled"] == {"1": h["sampled"]["2"], "2": h["sampled"]["1"],
                            "3": h["sampled"]["3"]} and len(h["sampled"]["1"]) == 3
    assert h["one_shot_layers"] == {"3": ["classifier"]} and "widths" in h


def test_fedma_whose_every_pass_failed_raises():
    with pytest.raises(NeuralignError, match="every round failed"):
        run_federated(TASK, "fedma", rounds=2, fail_partitions="0,1,2")


BAD = [
    ({"strategy": "fedma", "resume": True, "checkpoint-dir": "ck"}, "not supported for fedma"),
    ({"strategy": "fedpfn", "anchor-policy": "sometimes"}, "anchor-policy"),
    ({"strategy": "fedpfn", "anchor-granularity": "layer"}, "anchor-granularity"),
    ({"strategy": "fedpnu", "anchor-head-ratio": 1.5}, "anchor-head-ratio"),
    ({"strategy": "fedavg", "anchor-policy": "fixed"}, "fedpfn / fedpnu only"),
    ({"strategy": "fedma", "fedma-matcher": "best"}, "fedma-matcher"),
    ({"strategy": "fedma", "fedma-max-growth": 0.5}, "fedma-max-growth"),
    ({"strategy": "fedma", "fedma-class-weighting": "maybe"}, "fedma-class-weighting"),
    ({"strategy": "fedpfn", "fedma-independent-init": True}, "fedma only"),
]


@pytest.mark.parametrize(("cfg", "word"), BAD)
def test_bad_method_options_are_refused_in_one_line(cfg, word):
    with pytest.raises(NeuralignError, match=word) as exc:
        check_run_config(cfg)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("args", [
    ["--strategy", "fedpfn", "--anchor-policy", "sometimes"],
    ["--strategy", "fedpfn", "--anchor-granularity", "layer"],
    ["--strategy", "fedpnu", "--anchor-head-ratio", "1"],
    ["--anchor-policy", "fixed"],
    ["--fedma-independent-init"],
    ["--strategy", "fedprox", "--no-fedma-class-weighting"],
    ["--strategy", "fedma", "--resume", "--checkpoint-dir", "ck"],
])
def test_cli_bad_method_flags_exit_2_in_one_line(args):
    r = runner.invoke(app, ["federate", *SMALL, *args])
    assert r.exit_code == 2, r.output
    assert r.output.strip().count("\n") == 0 and "error" in r.output


def _app_config(tmp_path, args):
    import tomllib

    d = tmp_path / "app"
    r = runner.invoke(app, ["federate", *SMALL, *args, "--write-app", str(d)])
    assert r.exit_code == 0, r.output
    return tomllib.loads((d / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_cli_mask_flags_reach_the_generated_app(tmp_path):
    cfg = _app_config(tmp_path, ["--strategy", "fedpfn", "--anchor-policy", "per-round",
                                 "--anchor-granularity", "neuron", "--anchor-head-ratio", "0.2"])
    assert cfg["anchor-policy"] == "per-round" and cfg["anchor-granularity"] == "neuron"
    assert cfg["anchor-head-ratio"] == 0.2 and "fedma-threshold" not in cfg


def test_cli_fedma_flags_reach_the_generated_app(tmp_path):
    cfg = _app_config(tmp_path, ["--strategy", "fedma", "--fedma-independent-init",
                                 "--no-fedma-class-weighting"])
    assert cfg["fedma-independent-init"] is True and cfg["fedma-class-weighting"] is False
    assert cfg["fedma-matcher"] == "merge" and "anchor-policy" not in cfg


def test_cli_mask_flags_reach_the_strategy(monkeypatch):
    from neuralign.federated import strategies

    made, real = [], strategies.make_strategy
    monkeypatch.setattr(strategies, "make_strategy",
                        lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    r = runner.invoke(app, ["federate", *SMALL, "--strategy", "fedpfn", "--anchor-policy",
                            "per-round", "--anchor-granularity", "neuron",
                            "--anchor-head-ratio", "0.25"])
    assert r.exit_code == 0, r.output
    p = made[0].policy
    assert (p.policy, p.granularity, p.head_ratio) == ("per-round", "neuron", 0.25)
