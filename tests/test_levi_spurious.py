"""Spurious-cue data for the LEVI benchmark (neuralign.data.spurious)."""

import pytest
import torch

from neuralign.data.spurious import (
    add_cue,
    cue_labels,
    cue_patterns,
    levi_spurious_benchmark,
    spurious_split,
)
from neuralign.errors import DataError


def test_cue_labels_correlation():
    y = torch.arange(5000) % 10
    assert torch.equal(cue_labels(y, 10, 1.0), y)
    assert not (cue_labels(y, 10, 0.0) == y).any()                 # always another class
    agree = (cue_labels(y, 10, 0.8, seed=3) == y).float().mean().item()
    assert abs(agree - 0.8) < 0.03
    free = cue_labels(y, 10, None, seed=3)
    assert abs((free == y).float().mean().item() - 0.1) < 0.02     # independent of the label
    assert torch.equal(cue_labels(y, 10, 0.8, seed=3), cue_labels(y, 10, 0.8, seed=3))
    with pytest.raises(DataError, match="rho"):
        cue_labels(y, 10, 1.5)


@pytest.mark.parametrize("kind", ["barcode", "patch", "grating"])
def test_patterns_are_distinct_per_class(kind):
    pats = cue_patterns(kind, 10, (28, 28), size=3)
    flat = pats.flatten(1)
    d = torch.cdist(flat, flat)
    assert (d + torch.eye(10) * 1e9).min() > 0.5                   # every class looks different


def test_add_cue_paints_only_where_the_pattern_is():
    x = torch.zeros(4, 1, 28, 28)
    out = add_cue(x, torch.tensor([0, 3, 9, 3]), "patch", num_classes=10, size=3,
                  value_range=(0.0, 1.0))
    assert torch.equal(x, torch.zeros_like(x))                      # input untouched
    assert out[:, :, :25].abs().sum() == 0                          # only the bottom rows
    assert torch.equal(out[1], out[3]) and not torch.equal(out[0], out[1])
    assert out.max() == 1.0
    with pytest.raises(DataError, match="unknown cue kind"):
        add_cue(x, torch.zeros(4), "stripes", num_classes=10)
    with pytest.raises(DataError, match="N, C, H, W"):
        add_cue(x[:, 0], torch.zeros(4), "patch", num_classes=10)


def test_spurious_split_cue_predicts_label():
    y = torch.arange(200) % 4
    x = torch.zeros(200, 1, 12, 12)
    ds = spurious_split(x, y, {"c": {"kind": "patch", "rho": 1.0, "size": 3}}, num_classes=4,
                        value_range=(0.0, 1.0))
    pats = cue_patterns("patch", 4, (12, 12), size=3)
    # the painted image equals the pattern of its own label
    assert torch.equal(ds.tensors[0][:, 0], pats[y])


def test_benchmark_sets():
    g = torch.Generator().manual_seed(0)
    xtr, ytr = torch.rand(600, 1, 28, 28, generator=g), torch.arange(600) % 10
    xte, yte = torch.rand(200, 1, 28, 28, generator=g), torch.arange(200) % 10
    d = levi_spurious_benchmark(xtr, ytr, xte, yte, n_pretrain=300, n_finetune=100, n_val=50,
                                rho_pre=1.0, rho_ft=1.0)
    assert [len(d[k]) for k in ("pretrain", "finetune", "val", "id_test", "ood_test")] == \
        [300, 100, 50, 200, 200]
    top = lambda ds: ds.tensors[0][:, 0, :3]
    bottom = lambda ds: ds.tensors[0][:, 0, -4:]
    # pre-training carries the barcode; fine-tuning does not (the raw image there is < 1)
    assert (top(d["pretrain"]) == xtr.max()).float().mean() > 0.3
    assert (top(d["finetune"]) == xtr.max()).float().mean() < 0.05
    assert (top(d["ood_test"]) == xtr.max()).float().mean() > 0.3
    # the patch cue on the ID test agrees with the label, on the OOD test it does not
    pats = cue_patterns("patch", 10, (28, 28), size=4)[:, -4:]
    def cue_of(ds):
        b = (bottom(ds) > 0.999).float().flatten(1)
        return (b @ pats.flatten(1).T).argmax(1)
    assert (cue_of(d["id_test"]) == yte).float().mean() == 1.0
    assert (cue_of(d["ood_test"]) == yte).float().mean() < 0.3
    gap = levi_spurious_benchmark(xtr, ytr, xte, yte, variant="domain_gap", n_pretrain=200,
                                  n_finetune=100, n_val=50)
    assert int(gap["pretrain"].tensors[1].max()) == 4 and int(gap["finetune"].tensors[1].max()) == 4
    assert len(gap["id_test"]) == 100                               # classes 5-9 of the test set
    with pytest.raises(DataError, match="variant"):
        levi_spurious_benchmark(xtr, ytr, xte, yte, variant="other")
    with pytest.raises(DataError, match="not enough"):
        levi_spurious_benchmark(xtr, ytr, xte, yte, n_pretrain=590)
