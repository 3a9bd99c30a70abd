"""FedMA as a Flower strategy: per-class output-layer weighting, independent client
initialisations, ``fraction`` honoured, leftover rounds run, no accuracy reported (or repeated)
for a round that has no global model."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'neuralign[fl]')")
pytest.importorskip("flwr_datasets", reason="flwr-datasets is not installed")

from neuralign.federated import FedTask
from neuralign.federated.client import make_client_app
from neuralign.federated.fedma import matched_average_step
from neuralign.federated.local_grid import LocalGrid
from neuralign.federated.runner import build_run_config, run_federated
from neuralign.federated.server import run_server

TASK = FedTask(dataset="digits", num_partitions=4, alpha=0.5, model="mlp",
               model_kwargs='{"width": 16, "depth": 1}', lr=0.1, batch_size=32, seed=0)


class SpyGrid(LocalGrid):
    """Records the train messages sent (node -> state dict) per round."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.sent: dict[int, dict] = {}

    def push_messages(self, messages):
        messages = list(messages)
        for m in messages:
            r = int(m.content["config"]["server-round"])
            self.sent.setdefault(r, {})[m.metadata.dst_node_id] = \
                m.content["arrays"].to_torch_state_dict()
        return super().push_messages(messages)


def _run(rounds, **options):
    cfg = build_run_config(TASK, "fedma", rounds, **options)
    grid = SpyGrid(make_client_app(), TASK.num_partitions, cfg)
    return run_server(grid, cfg), grid


def test_output_layer_is_weighted_per_class_by_client_class_counts():
    g = torch.Generator().manual_seed(0)
    sds = [{"0.weight": torch.randn(3, 4, generator=g), "0.bias": torch.randn(3, generator=g),
            "2.weight": torch.randn(2, 3, generator=g), "2.bias": torch.randn(2, generator=g)}
           for _ in range(2)]
    counts = [[90, 0], [10, 50]]  # client 0 never saw class 1
    _, out = matched_average_step(sds, [90.0, 60.0], ["0", "2"], 1, class_weights=counts)
    W, b = out["2.weight"], out["2.bias"]
    assert torch.allclose(W[0], 0.9 * sds[0]["2.weight"][0] + 0.1 * sds[1]["2.weight"][0])
    assert torch.allclose(W[1], sds[1]["2.weight"][1])  # only the client that has class 1
    assert torch.allclose(b[1], sds[1]["2.bias"][1])
    _, by_size = matched_average_step(sds, [90.0, 60.0], ["0", "2"], 1)
    assert not torch.allclose(by_size["2.weight"][1], W[1])


def test_clients_report_class_counts_and_the_strategy_uses_them():
    from neuralign.federated.client import local_train

    task = FedTask(**{**TASK.__dict__, "alpha": 0.1})
    model = task.build_model()
    loader = task.client_loader(0)
    _, metrics = local_train(model, loader, task, {"method": "fedma"})
    y = task.splits().train.tensors[1][task.partitions()[0]]
    assert metrics["class-counts"] == torch.bincount(y, minlength=10).tolist()


def test_fraction_is_honoured_and_the_sample_is_seeded():
    h, grid = _run(4, fraction=0.5)
    assert h["participants"] == {"1": 2, "2": 2, "3": 2, "4": 2}
    assert set(grid.sent[1]) == set(grid.sent[2])  # one pass: the same clients
    h2, grid2 = _run(4, fraction=0.5)
    assert {r: set(s) for r, s in grid.sent.items()} == {r: set(s) for r, s in grid2.sent.items()}
    assert h2["accuracy"] == h["accuracy"]


def test_leftover_rounds_run_and_only_measured_rounds_are_reported():
    from neuralign.federated import server

    calls = []
    server.ROUND_HOOKS.append(lambda r, m: calls.append((r, dict(m))))
    try:
        h, grid = _run(3)  # 2 layers: a full pass (rounds 1-2), then a leftover round 3
    finally:
        server.ROUND_HOOKS.clear()
    assert set(grid.sent) == {1, 2, 3}
    assert h["round"] == [0, 2, 3]  # round 1 (mid-pass) has no global model to measure
    assert h["loss"][2] != h["loss"][1]  # round 3's model is a new one, measured anew
    assert h["one_shot_layers"] == {"3": ["classifier"]}
    measured = [r for r, m in calls if "accuracy" in m]
    assert measured == [0, 2, 3]
    assert [r for r, m in calls if "layer" in m] == [1]
    assert h["accuracy"][-1] > h["accuracy"][0] + 0.3


def test_independent_initialisations_are_an_option():
    _, shared = _run(2)
    first = list(shared.sent[1].values())
    assert all(torch.equal(sd["layer1.0.weight"], first[0]["layer1.0.weight"]) for sd in first)
    h, own = _run(2, fedma_independent_init=True)
    first = list(own.sent[1].values())
    assert len({float(sd["layer1.0.weight"].sum()) for sd in first}) == len(first)
    assert h["accuracy"][-1] > h["accuracy"][0] + 0.3


def test_fedma_is_a_flower_strategy():
    from flwr.serverapp.strategy import Strategy

    from neuralign.federated.strategies import make_strategy

    s = make_strategy("fedma", num_clients=4, model=TASK.build_model(), max_growth=1.25)
    assert isinstance(s, Strategy)
    h = run_federated(TASK, "fedma", rounds=2, fraction=0.5)
    assert h["participants"] == {"1": 2, "2": 2}


def test_fedma_driven_by_another_round_loop_through_its_public_methods():
    """A loop other than ``Strategy.start`` (configure_train / aggregate_train only) gets the
    same passes, the leftover round completed, and ``evaluates`` says which rounds to measure."""
    from flwr.app import ArrayRecord, ConfigRecord

    from neuralign.federated.strategies import make_strategy, strategy_options

    cfg = build_run_config(TASK, "fedma", 3)
    model = TASK.build_model()
    s = make_strategy("fedma", num_clients=4, model=model, **strategy_options(cfg))
    grid = LocalGrid(make_client_app(), TASK.num_partitions, cfg)
    arrays, got = ArrayRecord(model.state_dict()), []
    for r in (1, 2, 3):
        msgs = s.configure_train(r, arrays, ConfigRecord({"lr": 0.1, "local-epochs": 1}), grid)
        agg, _ = s.aggregate_train(r, grid.send_and_receive(msgs))
        got.append((agg is not None, s.evaluates(r)))
        arrays = agg if agg is not None else arrays
    assert got == [(False, False), (True, True), (True, True)]
    assert s.history_extras()["one_shot_layers"] == {"3": ["classifier"]}
