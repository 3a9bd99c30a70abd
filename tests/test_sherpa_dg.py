"""Rotated domains, leave-one-domain-out splits, and the benchmark's DomainBed path on a tiny
generated ImageFolder with torchvision's resnet50 (random weights)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from neuralign.data.rotated import leave_one_domain_out, rotate, rotated_domains
from neuralign.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def test_rotate_matches_exact_quarter_turns_and_per_image_angles():
    x = torch.randn(3, 2, 6, 6)
    torch.testing.assert_close(
        rotate(x, 90, fill=0.0), torch.rot90(x, -1, (2, 3)), atol=1e-5, rtol=0
    )
    r = rotate(x, torch.tensor([0.0, 90.0, 180.0]), fill=0.0)
    torch.testing.assert_close(r[0], x[0])
    torch.testing.assert_close(r[2], torch.rot90(x[2], 2, (1, 2)), atol=1e-5, rtol=0)
    with pytest.raises(DataError, match="angles for 3 images"):
        rotate(x, torch.tensor([1.0, 2.0]))


def test_rotated_domains_are_disjoint_and_leave_one_out_splits():
    x = torch.arange(60, dtype=torch.float32).view(60, 1, 1, 1).expand(60, 1, 4, 4).clone()
    y = torch.arange(60) % 3
    doms = rotated_domains(x, y, angles=(0, 30, 60, 90), per_domain=15, seed=0)
    assert list(doms) == ["rot0", "rot30", "rot60", "rot90"]
    centres = [set(d.tensors[0][:, 0, 1, 1].round().long().tolist()) for d in doms.values()]
    assert all(len(c) == 15 for c in centres)
    assert len(set().union(*centres)) == 60  # disjoint images
    sp = leave_one_domain_out(doms, "rot60", val_fraction=0.2)
    assert sp.source_domains == ["rot0", "rot30", "rot90"] and sp.test_domain == "rot60"
    assert (len(sp.train), len(sp.val), len(sp.test)) == (36, 9, 15)
    assert sp.classes == ["0", "1", "2"]
    with pytest.raises(DataError, match="test domain 'rot45'"):
        leave_one_domain_out(doms, "rot45")


def _tiny_imagefolder(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for d, tint in (("art", 0), ("photo", 1), ("sketch", 2)):
        for c in ("dog", "house"):
            (root / d / c).mkdir(parents=True)
            for i in range(4):
                img = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
                img[..., tint] += 150
                img[8:24, 8:24] = 255 if c == "house" else 0
                Image.fromarray(img).save(root / d / c / f"{i}.png")


@pytest.mark.slow
def test_benchmark_domainbed_path_runs_with_torchvision_resnet50(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    monkeypatch.setenv("NEURALIGN_CACHE", str(tmp_path / "cache"))
    _tiny_imagefolder(tmp_path / "data")
    spec = importlib.util.spec_from_file_location("sherpa_dg", ROOT / "benchmarks" / "sherpa_dg.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "res" / "sherpa_dg_tiny"
    result = bench.main(
        ["--data", str(tmp_path / "data"), "--arch", "torchvision:resnet50", "--image-size", "32",
         "--targets", "sketch", "--seeds", "1", "--epochs", "1", "--batch-size", "8",
         "--methods", "erm,sh_anc_a1", "--n-anchors", "1", "--align-batches", "1",
         "--lr-grid", "0.01", "--out", str(out)]
    )
    keys = sorted(result["store"])
    assert keys == ["sherpa_dg|sketch|0|erm", "sherpa_dg|sketch|0|sh_anc_a1"]
    for k in keys:
        chosen = result["store"][k]["chosen"]
        assert chosen["lr"] == 0.01
        assert 0.0 <= chosen["scores"]["test"] <= 1.0
        assert 0.0 <= chosen["scores"]["train_domain_val"] <= 1.0
    md = Path(str(out) + ".md").read_text()
    assert "SHERPA head=anchor, A=1" in md and "sketch: acc" in md
    assert "training-domain validation" in md
