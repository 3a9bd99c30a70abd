"""Federated learning: partitions, strategies through Flower's ServerApp/ClientApp on the
in-process grid, client failures and time-outs, FedPFN/FedPNU anchors, FedMA matching."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'neuralign[fl]')")
pytest.importorskip("flwr_datasets", reason="flwr-datasets is not installed")

from neuralign.errors import NeuralignError
from neuralign.federated import FedTask, dirichlet_partition, label_histogram
from neuralign.federated.fedma import match_layer, matched_average_step
from neuralign.federated.runner import run_federated
from neuralign.train.anchors import anchor_masks

TASK = FedTask(dataset="digits", num_partitions=3, alpha=0.5, model="mlp",
               model_kwargs='{"width": 32, "depth": 1}', lr=0.1, batch_size=32, seed=0)


def test_dirichlet_partition_disjoint_complete_and_heterogeneous():
    y = np.random.default_rng(0).integers(0, 10, 3000)
    p01 = dirichlet_partition(y, 10, 0.1, seed=1)
    p100 = dirichlet_partition(y, 10, 100.0, seed=1)
    allidx = np.concatenate(p01)
    assert len(allidx) == len(y) and len(np.unique(allidx)) == len(y)
    assert all(np.array_equal(a, b) for a, b in zip(p01, dirichlet_partition(y, 10, 0.1, seed=1)))

    def skew(parts):  # mean share of each client's dominant label
        h = label_histogram(y, parts, 10)
        return float((h.max(1) / h.sum(1)).mean())

    assert skew(p01) > 0.5 > skew(p100)
    with pytest.raises(NeuralignError, match="alpha"):
        dirichlet_partition(y, 10, 0.0)


def test_fedavg_improves_global_model_and_reports_no_failures():
    h = run_federated(TASK, "fedavg", rounds=2)
    assert h["finished"] and h["round"] == [0, 1, 2]
    assert h["accuracy"][-1] > h["accuracy"][0] + 0.3
    assert h["failures"] == {} and h["participants"] == {"1": 3, "2": 3}


def test_client_that_raises_does_not_stop_the_round():
    h = run_federated(TASK, "fedprox", rounds=2, fail_partitions="1")
    assert set(h["failures"]) == {"1", "2"}
    assert all("failed on purpose" in note for notes in h["failures"].values() for note in notes)
    assert h["participants"] == {"1": 2, "2": 2}
    assert h["accuracy"][-1] > h["accuracy"][0] + 0.3  # the other two clients still trained


def test_client_that_times_out_is_dropped():
    from neuralign.federated.client import make_client_app
    from neuralign.federated.local_grid import LocalGrid
    from neuralign.federated.runner import build_run_config
    from neuralign.federated.server import run_server

    app = make_client_app()

    def slow_app(msg, ctx):
        if ctx.node_config["partition-id"] == 2:
            time.sleep(0.6)
        return app(msg, ctx)

    cfg = build_run_config(TASK, "fedavg", 1)
    grid = LocalGrid(slow_app, 3, cfg, client_timeout=0.5)
    h = run_server(grid, cfg)
    assert h["participants"] == {"1": 2}
    assert any("no reply" in n for n in h["failures"]["1"])


@pytest.mark.parametrize("strategy", ["fedpfn", "fedpnu"])
def test_anchor_strategies_keep_fixed_neurons(strategy):
    from neuralign.federated import server

    seen = {}
    orig = server.central_evaluator

    def spy(task):
        ev = orig(task)

        def fn(r, arrays):
            seen[r] = arrays.to_torch_state_dict()
            return ev(r, arrays)
        return fn

    server.central_evaluator = spy
    try:
        h = run_federated(TASK, strategy, rounds=2, anchor_ratio=0.5, anchor_seed=4)
    finally:
        server.central_evaluator = orig
    assert h["accuracy"][-1] > h["accuracy"][0] + 0.2
    model = TASK.build_model()
    if strategy == "fedpfn":  # the same anchors for the whole run, bit-exact on the server
        masks = anchor_masks(model, 0.5, seed=4)
        for r in (1, 2):
            for n, m in masks.items():
                assert torch.equal(seen[r][n][m], seen[0][n][m])
                assert not torch.equal(seen[r][n][~m], seen[0][n][~m])
    else:  # a different set of whole neurons stays fixed in each round
        m1 = anchor_masks(model, 0.5, seed=4 * 100_003 + 1, granularity="neuron")
        m2 = anchor_masks(model, 0.5, seed=4 * 100_003 + 2, granularity="neuron")
        n = "layer1.0.weight"
        assert not torch.equal(m1[n], m2[n])
        assert torch.equal(seen[1][n][m1[n]], seen[0][n][m1[n]])
        assert torch.equal(seen[2][n][m2[n]], seen[1][n][m2[n]])
        assert not torch.equal(seen[2][n][~m2[n]], seen[1][n][~m2[n]])


def test_match_layer_recovers_permutations_without_growth():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(12, 7, generator=g)
    perms = [torch.arange(12), torch.randperm(12, generator=g), torch.randperm(12, generator=g)]
    feats = [base[p] + 0.01 * torch.randn(12, 7, generator=g) for p in perms]
    G, assign = match_layer(feats, [1.0, 2.0, 1.0], threshold=1.0, max_width=18)
    assert G.shape == (12, 7)
    for p, a in zip(perms, assign):  # client row i is base row p[i]: same global neuron
        assert torch.equal(a, assign[0][p])
    assert torch.allclose(G[assign[0]], base, atol=0.05)


def test_match_layer_grows_width_for_unmatched_neurons_up_to_cap():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(6, 5, generator=g)
    b = a.clone()
    b[:3] = 5 * torch.randn(3, 5, generator=g)  # three neurons the other client does not have
    G, assign = match_layer([a, b], [1.0, 1.0], threshold=0.5, max_width=12)
    assert G.shape[0] == 9
    G2, _ = match_layer([a, b], [1.0, 1.0], threshold=0.5, max_width=7)
    assert G2.shape[0] == 7


def test_matched_average_of_permuted_copies_is_functionally_the_same_model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 4))
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    p = torch.randperm(16)
    sd2 = dict(sd, **{"0.weight": sd["0.weight"][p], "0.bias": sd["0.bias"][p],
                      "2.weight": sd["2.weight"][:, p]})
    layers = ["0", "2"]
    x = torch.randn(8, 5)
    for template in (None, net):  # own matcher, then neuralign.merge.matched_averaging
        new, glob = matched_average_step([sd, sd2], [1.0, 3.0], layers, 0, template=template)
        assert glob["0.weight"].shape == (16, 5)
        final, _ = matched_average_step(new, [1.0, 3.0], layers, 1, template=template)
        merged = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 4))
        merged.load_state_dict(final[0])
        assert torch.allclose(merged(x), net(x), atol=1e-5)


@pytest.mark.parametrize("matcher", ["merge", "own"])
def test_fedma_end_to_end_learns(matcher):
    h = run_federated(TASK, "fedma", rounds=2, fedma_max_growth=1.25, fedma_matcher=matcher)
    assert h["finished"] and h["global_widths"]["layer1.0"] >= 32
    assert h["global_widths"]["layer1.0"] <= 40
    assert h["accuracy"][-1] > h["accuracy"][0] + 0.3
    with pytest.raises(NeuralignError, match="normalisation"):
        run_federated(FedTask(dataset="digits", num_partitions=2, model="mlp",
                              model_kwargs='{"width": 8, "depth": 1, "norm": "bn"}'), "fedma", 1)


def test_unknown_strategy_is_a_clear_error():
    with pytest.raises(NeuralignError, match="unknown strategy"):
        run_federated(TASK, "fedsgd", rounds=1)


def test_fedma_round_with_a_crashing_client_completes():
    h = run_federated(TASK, "fedma", rounds=2, fail_partitions="2")
    assert h["finished"] and h["participants"] == {"1": 2, "2": 2}
    assert set(h["failures"]) == {"1"}  # it then sits out the rest of the pass (round 2)
    assert h["accuracy"][-1] > h["accuracy"][0] + 0.3


def test_round_with_too_few_results_is_skipped_and_reported():
    from neuralign.federated.server import LAST_RESULT

    with pytest.raises(NeuralignError, match="every round failed"):  # the only round: exit != 0
        run_federated(TASK, "fedpfn", rounds=1, fail_partitions="0,1", min_replies=2)
    h = LAST_RESULT
    assert h["participants"] == {"1": 1} and not h["finished"]
    assert any("round skipped" in n for n in h["failures"]["1"])
    assert h["accuracy"][1] == h["accuracy"][0]  # the global model was kept
