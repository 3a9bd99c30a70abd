"""SHERPA: stage 1 preserves the function, alignment recovers a hidden permutation, the head
variants do what they say, and SGD's permutation equivariance (why head='new' is ERM)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from neuralign.errors import NeuralignError
from neuralign.finetune import finetune
from neuralign.finetune.sherpa import (
    kendall_tau_distance,
    select_blocks,
    soup,
)
from neuralign.models import SmallCNN, get_head_name
from neuralign.permute import apply_permutation, random_permutation
from neuralign.spec import spec_from_model

KW = dict(lr=0.05, batch_size=16, progress=False)


def _data(n=48, classes=3, seed=0, size=8, ch=1):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, ch, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)
    )


def _model(num_classes=3, seed=0):
    torch.manual_seed(seed)
    return SmallCNN(in_channels=1, num_classes=num_classes, width=4)


def _out(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_stage1_is_function_preserving_and_moves_units():
    d = _data()
    m, a = _model(num_classes=5, seed=0), _model(num_classes=3, seed=1)
    res = finetune(m, d, strategy="sherpa", anchor=a, head="keep", epochs=0, num_classes=3, **KW)
    ref = finetune(m, d, strategy="full", epochs=0, num_classes=3, **KW).model  # same new head
    x = d.tensors[0][:10]
    torch.testing.assert_close(_out(res.model, x), _out(ref, x), atol=1e-5, rtol=1e-5)
    perm = res.info["permutation"]
    assert sum(perm.moved().values()) > 0
    assert set(res.info["kendall_tau"]) == set(perm)
    # head="new" (the paper): ERM's fresh head, carried through the permutation with the
    # features, so the aligned start computes ERM's start function (a provable no-op)
    new = finetune(
        m, d, strategy="sherpa", anchor=a, head="new", epochs=0, num_classes=3, **KW
    )
    torch.testing.assert_close(
        new.model.state_dict()["block1.0.0.weight"], res.model.state_dict()["block1.0.0.weight"]
    )
    assert not torch.equal(new.model.classifier.weight, ref.classifier.weight)  # columns permuted
    torch.testing.assert_close(_out(new.model, x), _out(ref, x), atol=1e-5, rtol=1e-5)
    assert new.info["equivalent_to_erm"]


def test_alignment_recovers_a_hidden_permutation_of_the_anchor():
    d = _data(n=64)
    a = _model(seed=1)
    spec = spec_from_model(a, d.tensors[0][:2])
    m = apply_permutation(a, random_permutation(spec, seed=7), spec)  # the anchor, scrambled
    res = finetune(m, d, strategy="sherpa", anchor=a, head="keep", epochs=0, **KW)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(res.model.state_dict()[k], v, msg=f"{k} not realigned")


def test_head_anchor_transplants_the_anchor_head_and_lam_interpolates():
    d = _data()
    m, a = _model(seed=0), _model(seed=1)
    head = get_head_name(a)
    r = finetune(m, d, strategy="sherpa", anchor=a, head="anchor", epochs=0, **KW)
    torch.testing.assert_close(r.model.get_submodule(head).weight, a.get_submodule(head).weight)
    start = r.info["aligned_start"]
    r2 = finetune(
        m, d, strategy="sherpa", anchor=a, head="anchor", lam=0.5, reset_bn=False, epochs=0, **KW
    )
    k = "block2.1.0.weight"
    torch.testing.assert_close(
        r2.model.state_dict()[k], 0.5 * (start.state_dict()[k] + a.state_dict()[k])
    )
    bad = _model(num_classes=4, seed=2)
    with pytest.raises(NeuralignError, match="head='anchor' needs an anchor"):
        finetune(m, d, strategy="sherpa", anchor=bad, head="anchor", epochs=0, **KW)
    with pytest.raises(NeuralignError, match="needs anchor="):
        finetune(m, d, strategy="sherpa", epochs=0, **KW)


def test_soup_is_the_mean_of_the_anchors():
    a, b = _model(seed=1), _model(seed=2)
    s = soup([a, b])
    k = "block1.0.0.weight"
    torch.testing.assert_close(s.state_dict()[k], (a.state_dict()[k] + b.state_dict()[k]) / 2)


def test_sgd_is_permutation_equivariant():
    """Fine-tuning pi(M) (head permuted along) equals pi(fine-tuned M): permuting alone changes
    nothing but which head a run starts with."""
    d = _data(n=64)
    m = _model(seed=0)
    spec = spec_from_model(m, d.tensors[0][:2])
    perm = random_permutation(spec, seed=3)
    opts = dict(epochs=2, weight_decay=1e-3, seed=5, **KW)
    ft_then_perm = apply_permutation(finetune(m, d, **opts).model, perm, spec)
    perm_then_ft = finetune(apply_permutation(m, perm, spec), d, **opts).model
    for k, v in ft_then_perm.state_dict().items():
        torch.testing.assert_close(perm_then_ft.state_dict()[k], v, atol=1e-5, rtol=1e-4)


def test_random_perm_differs_by_seed_and_preserves_function():
    d = _data()
    m = _model(seed=0)
    r0 = finetune(m, d, strategy="random_perm", perm_seed=0, head="keep", epochs=0, **KW).model
    r1 = finetune(m, d, strategy="random_perm", perm_seed=1, epochs=0, **KW).model
    x = d.tensors[0][:8]
    torch.testing.assert_close(_out(r0, x), _out(m, x), atol=1e-5, rtol=1e-5)
    assert not torch.equal(
        r0.state_dict()["block1.0.0.weight"], r1.state_dict()["block1.0.0.weight"]
    )


def test_kendall_tau_distance_and_block_selection_rule():
    assert kendall_tau_distance(torch.arange(10)) == 0.0
    assert kendall_tau_distance(torch.arange(10).flip(0)) == 1.0
    p = torch.arange(5)
    p[[1, 2]] = p[[2, 1]]
    assert kendall_tau_distance(p) == pytest.approx(1 / 10)
    taus = {"a": 0.50, "b": 0.49, "c": 0.51, "d": 0.50, "e": 0.10}
    assert select_blocks(taus, z=2.0) == ["e"]
    assert select_blocks({"a": 0.5, "b": 0.5}, z=2.0) == ["a"]  # nothing atypical: farthest one


def test_sherpa_select_tunes_only_selected_blocks_and_head():
    d = _data()
    m, a = _model(seed=0), _model(seed=1)
    start = finetune(m, d, strategy="sherpa", anchor=a, epochs=0, **KW).model
    r = finetune(m, d, strategy="sherpa_select", anchor=a, epochs=1, **KW)
    chosen = r.info["selected_blocks"]
    assert chosen
    trained = tuple(f"{b}." for b in [*chosen, get_head_name(m)])
    for k, v in start.state_dict().items():
        if not k.startswith(trained):
            assert torch.equal(r.model.state_dict()[k], v), f"{k} changed but was not selected"
    assert not torch.equal(r.model.classifier.weight, start.classifier.weight)


def test_stage1_on_a_torchvision_resnet():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    m = tv.models.resnet18(num_classes=10)
    torch.manual_seed(1)
    a = tv.models.resnet18(num_classes=4)
    d = _data(n=16, classes=4, size=32, ch=3)
    res = finetune(
        m,
        d,
        strategy="sherpa",
        anchor=a,
        head="keep",
        epochs=0,
        num_classes=4,
        align_batches=1,
        **KW,
    )
    ref = finetune(m, d, strategy="full", epochs=0, num_classes=4, **KW).model
    x = d.tensors[0][:4]
    torch.testing.assert_close(_out(res.model, x), _out(ref, x), atol=1e-4, rtol=1e-4)
    assert sum(res.info["permutation"].moved().values()) > 0


def test_lam_start_reestimates_batch_norm_statistics():
    d = _data(n=64)
    m, a = _model(seed=0), _model(seed=1)
    kw = dict(strategy="sherpa", anchor=a, head="anchor", lam=0.5, epochs=0, **KW)
    plain = finetune(m, d, reset_bn=False, **kw).model.state_dict()
    reset = finetune(m, d, reset_bn=True, **kw).model.state_dict()
    k = "block2.1.0.weight"
    torch.testing.assert_close(reset[k], plain[k])  # weights: the same interpolation
    rm = "block2.1.1.running_mean"
    assert not torch.allclose(reset[rm], plain[rm])  # statistics: re-estimated on source data
