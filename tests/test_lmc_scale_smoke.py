"""The lmc_scale benchmark end to end in its --smoke mode (tiny data, seconds): it trains and
caches the models, measures every alignment x correction, renders the report, and a rerun
resumes from the cache instead of training or measuring again."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    from neuralign.data.core import fashion_mnist_root

    if not fashion_mnist_root().is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)")
    sys.path.insert(0, str(BENCH))
    try:
        import lmc_scale
    finally:
        sys.path.remove(str(BENCH))
    return lmc_scale


def test_smoke_run_trains_measures_reports_and_resumes(bench, tmp_path, capsys):
    from neuralign.landscape import barrier

    cache, out = tmp_path / "cache", tmp_path / "out"
    argv = ["--smoke", "--cache", str(cache), "--out", str(out)]
    results = bench.main(argv)
    assert set(results) == {"mlp1-w16", "resnet20x1-bn"}
    assert len(list((cache / "models").glob("*.pt"))) == 6
    assert len(list((cache / "rows").glob("*.json"))) == 6

    for name, r in results.items():
        want = {f"{a}/{f}" for a in ("naive", "wm", "am")
                for f in (("plain", "bn_reset", "repair") if name.startswith("resnet")
                          else ("plain", "repair"))}
        for row, (i, j) in zip(r["rows"], bench.PAIRS):
            assert set(row["curves"]) == want  # BN reset only where there is batch norm
            # The end points are the trained models: their recorded test results.
            assert row["ends"][0]["accuracy"] == pytest.approx(r["models"][i]["test"]["accuracy"])
            assert row["ends"][1]["accuracy"] == pytest.approx(r["models"][j]["test"]["accuracy"])
            for c in row["curves"].values():
                assert c["loss"][0] == row["ends"][0]["loss"]
                assert c["loss"][-1] == row["ends"][1]["loss"]
                assert all(math.isfinite(v) for v in c["loss"])
                assert c["loss_entezari"] == pytest.approx(barrier(c, "loss", "entezari"))
                assert c["loss_entezari"] >= 0.0  # t=0 is on the line: the max is >= 0

    md = (out / "lmc_scale.md").read_text()
    for part in ("## Trained end points", "### resnet20x1-bn", "wm/repair − wm/bn_reset",
                 "Barrier vs width: MLP", "## Verdicts", "SMOKE RUN"):
        assert part in md
    for png in ("lmc_scale_width.png", "lmc_scale_curves_resnet20x1-bn.png",
                "lmc_scale_curves_mlp_curve.png"):
        assert (out / png).stat().st_size > 1000
    summary = json.loads((out / "lmc_scale.json").read_text())
    assert summary["resnet20x1-bn"]["rows"][0]["revision"]["commit"]

    capsys.readouterr()
    mtimes = {p: p.stat().st_mtime_ns for p in cache.rglob("*.pt")}
    again = bench.main(argv + ["--reuse"])  # resumes: nothing trained or measured again
    log = capsys.readouterr().out
    assert "trained" not in log and "measuring" not in log
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.pt")} == mtimes
    assert again["resnet20x1-bn"]["rows"] == results["resnet20x1-bn"]["rows"]


def test_unknown_setting_is_refused(bench, tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--settings", "resnet20x3-bn", "--cache", str(tmp_path)])
