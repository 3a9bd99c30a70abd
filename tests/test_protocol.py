"""The shared fine-tuning benchmark protocol (benchmarks/protocol.py)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("nl_protocol", ROOT / "benchmarks" /
                                                  "protocol.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["nl_protocol"] = mod
    spec.loader.exec_module(mod)
    return mod


P = _load()


def test_paired_differences_match_a_hand_calculation():
    per_seed = {"base": {0: 0.50, 1: 0.60, 2: 0.70, 3: 0.40},
                "m": {0: 0.55, 1: 0.68, 2: 0.71}}  # seed 3 missing: only common seeds pair
    p = P.paired_differences(per_seed, "base")["m"]
    # d = 0.05, 0.08, 0.01; mean 0.046667; sd(ddof=1) = sqrt(0.0024667 / 2) = 0.035119
    assert p.n == 3
    assert p.mean == pytest.approx(0.14 / 3)
    assert p.se == pytest.approx(0.0351188 / math.sqrt(3), rel=1e-5)
    assert p.diffs == pytest.approx((0.05, 0.08, 0.01))
    b = P.paired_differences(per_seed, "base")["base"]
    assert b.mean == 0 and b.se == 0 and b.n == 4
    one = P.paired_differences({"base": {0: 0.5}, "m": {0: 0.6}}, "base")["m"]
    assert one.mean == pytest.approx(0.1) and math.isnan(one.se)
    with pytest.raises(KeyError):
        P.paired_differences(per_seed, "nope")


def test_table_shows_paired_differences_and_compute():
    cols = {"input": {"base": {0: 0.5, 1: 0.6}, "m": {0: 0.6, 1: 0.8}}}
    md = P.paired_table(cols, "base", compute={"m": "5 runs, 20 epochs"})
    lines = md.splitlines()
    assert lines[0].startswith("| Method | input: acc | input: Δ vs base ± SE |")
    base_row = next(row for row in lines if row.startswith("| base |"))
    assert "(baseline)" in base_row and "55.0" in base_row
    m_row = next(row for row in lines if row.startswith("| m |"))
    # d = 0.1, 0.2: mean +15.0, SE = sd(0.1, 0.2)/sqrt(2) = 0.070711/1.41421 = 0.05 -> 5.0
    assert "+15.0 ± 5.0 (n=2)" in m_row and "5 runs, 20 epochs" in m_row


def _run(lr, seed, task, *, log, val, test):
    log.append((lr, seed))
    i = 0 if lr is None else task["grid"].index(lr)
    return P.Run(lr=lr, scores={task["split"]: val[i], "test": test[i]}, epochs=3)


@pytest.mark.parametrize("split", ["target_val", "train_domain_val", "id_val"])
def test_selection_uses_the_prescribed_split_never_test(split):
    grid = (1e-3, 1e-2, 1e-1)
    proto = P.Protocol("t", grid, split, epochs=3, seeds=(0,))
    log = []
    # best on validation: grid point 1; best on test: grid point 2
    m = P.Method("m", partial(_run, log=log, val=[0.5, 0.9, 0.6], test=[0.1, 0.2, 0.9]))
    sel = P.run_method(proto, m, 0, {"grid": grid, "split": split})
    assert sel.chosen.lr == 1e-2 and sel.score("test") == 0.2
    assert sel.runs == 3 and sel.epochs == 9
    other = "id_val" if split != "id_val" else "target_val"
    with pytest.raises(KeyError, match=f"no '{other}' score"):
        P.select(sel.candidates, other)


def test_every_tuned_method_gets_the_same_grid_and_untuned_one_run(tmp_path):
    grid = (3e-4, 1e-3, 3e-3, 1e-2)
    proto = P.Protocol("t", grid, "target_val", epochs=2, seeds=(0, 1))
    logs = {k: [] for k in ("a", "b", "none")}
    methods = [
        P.Method("a", partial(_run, log=logs["a"], val=[1, 2, 3, 4], test=[0] * 4)),
        P.Method("b", partial(_run, log=logs["b"], val=[4, 3, 2, 1], test=[0] * 4)),
        P.Method("none", partial(_run, log=logs["none"], val=[0], test=[0]), tuned=False),
    ]
    task = {"grid": grid, "split": "target_val"}
    store = P.ResultStore(tmp_path / "res.json")
    out = P.run_seed(proto, methods, 1, task, store=store, key="task")
    assert [lr for lr, _ in logs["a"]] == list(grid) == [lr for lr, _ in logs["b"]]
    assert logs["none"] == [(None, 1)]
    assert out["a"].chosen.lr == 1e-2 and out["b"].chosen.lr == 3e-4
    # resume: a second call reads the store and trains nothing
    again = P.run_seed(proto, methods, 1, task, store=P.ResultStore(tmp_path / "res.json"),
                       key="task")
    assert len(logs["a"]) == len(grid) and again["a"].chosen.lr == 1e-2
    assert again["b"].epochs == out["b"].epochs == 12


def test_backbone_cache_trains_once_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURALIGN_CACHE", str(tmp_path / "c"))
    assert P.cache_root() == tmp_path / "c"
    trained = []

    def make():
        torch.manual_seed(0)
        return nn.Linear(4, 2)

    def train(model):
        trained.append(1)
        with torch.no_grad():
            model.weight.add_(1.0)

    cfg = {"arch": "linear", "epochs": 3}
    m1, info1 = P.cached_backbone("toy", cfg, make, train)
    m2, info2 = P.cached_backbone("toy", {"epochs": 3, "arch": "linear"}, make, train)
    assert trained == [1] and not info1["cached"] and info2["cached"]
    assert info2["seconds"] == pytest.approx(info1["seconds"])
    assert torch.equal(m1.weight, m2.weight)
    assert info1["path"].startswith(str(tmp_path / "c" / "backbones"))
    files = sorted(p.name for p in (tmp_path / "c" / "backbones").iterdir())
    assert len(files) == 2 and not any(f.endswith(".tmp") for f in files)
    P.cached_backbone("toy", {"arch": "linear", "epochs": 4}, make, train)
    assert trained == [1, 1]  # another config, another entry


def test_protocol_validates_itself():
    with pytest.raises(ValueError, match="selection"):
        P.Protocol("t", (1e-3,), "test", epochs=1)
    with pytest.raises(ValueError, match="repeated"):
        P.Protocol("t", (1e-3, 1e-3), "id_val", epochs=1)
    proto = P.Protocol("t", (1e-3, 1e-2), "id_val", epochs=1)
    assert proto.seeds == (0, 1, 2, 3, 4) and len(proto.seeds) >= 5
    assert any("1e-3" in line or "0.001" in line for line in proto.describe())
    assert P.PAPER_SELECTION == {"auto_finetune": "target_val", "sherpa": "train_domain_val",
                                 "levi": "id_val"}


def test_compare_and_verdict():
    per = {"a": {0: 0.6, 1: 0.7, 2: 0.65}, "b": {0: 0.5, 1: 0.6, 2: 0.56}}
    p = P.compare(per, "a", "b")
    assert p.mean == pytest.approx(0.0966667, rel=1e-5) and p.n == 3
    assert P.verdict(p) == "appears"
    assert P.verdict(P.compare(per, "b", "a")) == "reversed"
    noisy = {"a": {0: 0.6, 1: 0.4}, "b": {0: 0.5, 1: 0.5}}
    assert P.verdict(P.compare(noisy, "a", "b")) == "not resolved"
    run = P.Run(lr=1e-3, scores={"id_val": 1.0}, epochs=4, runs=2, extra_epochs=3)
    assert P.Selected("m", 0, run, [run]).epochs == 11


def _bench(name):
    spec = importlib.util.spec_from_file_location(f"nl_bench_{name}", ROOT / "benchmarks" /
                                                  f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmarks_use_the_protocol_with_the_issue_rows():
    from neuralign.finetune import list_strategies

    af = _bench("auto_finetune")
    strategies = {r[1] for r in af.ROWS}
    paper = {"cross_validation", "auto_rgn", "auto_snr", "auto_rgn_hessian", "auto_rgn_change",
             "auto_rgn_hessian_change", "layerwise_surprise", "layerwise_surprise_diff",
             "module_criticality"}
    assert paper | {"full", "bn_adapt", None} <= strategies
    assert strategies - {None} <= set(list_strategies())
    assert len(af.FULL["lr_grid"]) in (4, 5) and len(af.FULL["seeds"]) >= 5
    assert {r[0] for r in af.ROWS if not r[3]} == {"No fine-tuning", "BN adaptation only"}
    dg = _bench("sherpa_dg")
    rows = set(dg.DEFAULT_METHODS.split(","))
    assert {"erm", "erm2x", "lpft", "rp_anc", "sh_new", "sh_anc_a1", "sh_anc_a6",
            "sh_lam_a1"} <= rows
    assert len(dg.FULL["lr_grid"]) in (4, 5) and dg.FULL["seeds"] >= 10
    assert dg.FULL["per_domain"] >= 500


def test_run_seeds_folds_units_into_the_store_and_resumes_from_shards(tmp_path):
    grid = (1e-3, 1e-2)
    proto = P.Protocol("t", grid, "target_val", epochs=2, seeds=(0, 1))
    log: list = []
    methods = [P.Method("a", partial(_run, log=log, val=[1, 2], test=[0, 0])),
               P.Method("b", partial(_run, log=log, val=[2, 1], test=[0, 0]))]
    task = {"grid": grid, "split": "target_val"}
    store = P.ResultStore(tmp_path / "res.json")
    # a unit a killed worker left half done: method "a" of seed 1 is in its shard
    shard_dir = store.path.with_suffix(".shards")
    shard_dir.mkdir()
    half = P.ResultStore(shard_dir / "x_y-1.json")
    half["t|x/y|1|a"] = P.run_method(proto, methods[0], 1, task).to_json()
    log.clear()
    P.run_seeds(proto, [("x/y", s, methods, task) for s in (0, 1)], store, workers=1,
                log=lambda _: None)
    assert sorted(store.data) == ["t|x/y|0|a", "t|x/y|0|b", "t|x/y|1|a", "t|x/y|1|b"]
    assert len(log) == 3 * len(grid)  # seed 0: a and b; seed 1: only b
    assert not list(shard_dir.iterdir())  # folded shards are removed
    reread = P.ResultStore(tmp_path / "res.json")
    assert reread.data == store.data
    P.run_seeds(proto, [("x/y", s, methods, task) for s in (0, 1)], reread, workers=1,
                log=lambda _: None)
    assert len(log) == 3 * len(grid)  # everything from the store: nothing trains again


def test_result_store_exports_and_a_fresh_cache_resumes_from_the_export(tmp_path):
    store = P.ResultStore(tmp_path / "cache" / "res.json")
    store.update({"t|k|0|a": {"x": 1}, "t|k|1|a": {"x": 2}})
    store.export(tmp_path / "docs" / "res_runs.json")
    fresh = P.ResultStore(tmp_path / "other_cache" / "res.json",
                          seed_from=tmp_path / "docs" / "res_runs.json")
    assert fresh.data == store.data
    # an existing cache wins over the export; no export at all starts empty
    assert P.ResultStore(tmp_path / "cache" / "res.json", seed_from=tmp_path / "none").data \
        == store.data
    assert P.ResultStore(tmp_path / "x.json", seed_from=tmp_path / "none.json").data == {}


def test_result_store_refuses_runs_made_with_other_backbones(tmp_path):
    store = P.ResultStore(tmp_path / "res.json")
    store.bind({"backbones": ["aaaa"]})
    store["t|k|0|a"] = {"x": 1}
    store.export(tmp_path / "runs.json")
    same = P.ResultStore(tmp_path / "fresh.json", seed_from=tmp_path / "runs.json")
    same.bind({"backbones": ["aaaa"]})
    assert same.runs() == {"t|k|0|a": {"x": 1}}  # the context is no run
    other = P.ResultStore(tmp_path / "fresh2.json", seed_from=tmp_path / "runs.json")
    with pytest.raises(SystemExit, match="holds runs made with"):
        other.bind({"backbones": ["bbbb"]})
    (tmp_path / "w").write_bytes(b"abc")
    assert P.file_digest(tmp_path / "w") == "ba7816bf8f01cfea"


def test_run_seeds_exports_every_finished_unit_as_it_goes(tmp_path):
    """A run cut short after its first unit leaves that unit in the committed export."""
    grid = (1e-3,)
    proto = P.Protocol("t", grid, "target_val", epochs=1, seeds=(0, 1))
    seen: list = []

    def log(msg):  # called after each fold: the export must already hold that unit
        if "done" in msg:
            seen.append(sorted(json.loads((tmp_path / "runs.json").read_text())))

    methods = [P.Method("a", partial(_run, log=[], val=[1], test=[0]))]
    store = P.ResultStore(tmp_path / "res.json")
    P.run_seeds(proto, [("k", s, methods, {"grid": grid, "split": "target_val"})
                        for s in (0, 1)], store, workers=1, log=log,
                export=tmp_path / "runs.json")
    assert seen == [["t|k|0|a"], ["t|k|0|a", "t|k|1|a"]]


def test_a_diverged_rate_is_a_failed_candidate_not_a_crash():
    from neuralign.errors import NeuralignError

    grid = (1e-2, 1e-1, 1.0)
    proto = P.Protocol("t", grid, "target_val", epochs=2, seeds=(0,))

    def fn(lr, seed, task, *, diverge):
        if lr in diverge:
            raise NeuralignError("training diverged (loss nan) at epoch 1, step 3")
        return P.Run(lr=lr, scores={"target_val": lr, "test": 0.5}, epochs=2)

    s = P.run_method(proto, P.Method("m", partial(fn, diverge={1.0})), 0, None)
    assert s.chosen.lr == 1e-1 and s.runs == 3  # the diverged run still counts as compute
    assert "diverged" in s.candidates[2].info
    with pytest.raises(RuntimeError, match="diverged at every rate"):
        P.run_method(proto, P.Method("m", partial(fn, diverge=set(grid))), 0, None)

    def other(lr, seed, task):  # any other error is a bug: it propagates
        raise NeuralignError("the loader is empty")
    with pytest.raises(NeuralignError, match="empty"):
        P.run_method(proto, P.Method("m", other), 0, None)


def test_speed_ratios_are_geometric_means_of_pairs_with_delta_method_errors():
    R = _bench("_ratios")
    # pairs 2/1, 8/1, 4/2 -> ratios 2, 8, 2 (halved by k=2: 1, 4, 1): logs 0, ln 4, 0
    g, se = R.ratio_of_pairs([2.0, 8.0, 4.0], [1.0, 1.0, 2.0], k=2)
    assert g == pytest.approx(4 ** (1 / 3))
    sd = math.sqrt(((0 - math.log(4) / 3) ** 2 * 2 + (math.log(4) * 2 / 3) ** 2) / 2)
    assert se == pytest.approx(g * sd / math.sqrt(3))
    assert R.ratio_of_pairs([3.0], [1.5]) == (pytest.approx(2.0), None)
    assert R.fmt((12.04, 0.66), "{:.1f}", "×") == "12.0× ± 0.7"
    assert R.fmt((1.0, None)) == "1.00"
    with pytest.raises(ValueError, match="equally many"):
        R.ratio_of_pairs([1.0, 2.0], [1.0])


def test_loop_speed_flop_ratio_counts_the_in_place_products_the_statistics_use():
    L = _bench("loop_speed")  # it puts benchmarks/ on sys.path for its own helpers
    a, b, out = torch.randn(6, 5), torch.randn(5, 4), torch.zeros(6, 4)

    def stats():  # as ActivationStats.update: a product into a buffer, then accumulated
        torch.mm(a, b, out=out)
        out.addmm_(a, b)
    assert L._flops(stats) == 2 * (2 * 6 * 5 * 4)
    assert L._flops(lambda: torch.nn.functional.linear(a, b.T)) == 2 * 6 * 5 * 4
    assert L._flops(lambda: a + 1) == 0
