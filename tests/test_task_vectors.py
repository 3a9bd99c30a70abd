"""Task vectors, TIES, DARE, SLERP and alignment-first merging: hand-computed values, and the
same inputs through mergekit (skipped where mergekit is not installed)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from neuralign.errors import ArchitectureMismatchError, NeuralignError
from neuralign.merge.task_vectors import (
    add_task_vectors,
    align_then_merge,
    apply_task_vector,
    dare_merge,
    negate_task_vector,
    scale_task_vector,
    slerp,
    task_arithmetic,
    task_merge,
    task_vector,
    ties_merge,
    trim,
)
from neuralign.permute import apply_permutation, random_permutation
from neuralign.spec import spec_from_model

torch.set_num_threads(1)


def sd(**kw):
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in kw.items()}


def test_task_vector_add_negate_scale_by_hand():
    base = sd(w=[1.0, 2.0, 3.0])
    ft1, ft2 = sd(w=[2.0, 2.0, 1.0]), sd(w=[1.0, 5.0, 3.0])
    t1, t2 = task_vector(ft1, base), task_vector(ft2, base)
    assert t1["w"].tolist() == [1.0, 0.0, -2.0]
    assert negate_task_vector(t1)["w"].tolist() == [-1.0, 0.0, 2.0]
    assert scale_task_vector(t2, 0.5)["w"].tolist() == [0.0, 1.5, 0.0]
    assert add_task_vectors([t1, t2])["w"].tolist() == [1.0, 3.0, -2.0]
    assert add_task_vectors([t1, t2], [2.0, 1.0])["w"].tolist() == [2.0, 3.0, -4.0]
    assert apply_task_vector(base, t1, 0.5)["w"].tolist() == [1.5, 2.0, 2.0]
    out = task_arithmetic(base, [ft1, ft2], scale=0.5)
    assert out["w"].tolist() == [1.5, 3.5, 2.0]
    assert base["w"].tolist() == [1.0, 2.0, 3.0]  # inputs untouched
    # forgetting: base + (-1) * tau returns base - tau
    assert apply_task_vector(ft1, negate_task_vector(t1))["w"].tolist() == base["w"].tolist()


def test_ties_three_task_vectors_by_hand():
    base = sd(w=[0.0, 0.0, 0.0, 0.0, 0.0])
    # three task vectors (base is zero, so the models are their vectors)
    t1 = sd(w=[4.0, -1.0, 0.5, 3.0, -2.0])
    t2 = sd(w=[-3.0, 2.0, 0.1, -1.0, -5.0])
    t3 = sd(w=[1.0, -6.0, 0.2, 2.0, 0.3])
    # trim to density 0.6 -> top int(0.6*5)=3 entries by |.| of each vector
    #   t1 -> [4, 0, 0, 3, -2]; t2 -> [-3, 2, 0, 0, -5]; t3 -> [1, -6, 0, 2, 0]
    # elected sign = sign of the sum: [2 -> +, -4 -> -, 0 -> + (ties go +), 5 -> +, -7 -> -]
    # disjoint mean over agreeing nonzero entries:
    #   e0: (4 + 1) / 2 = 2.5; e1: -6 / 1; e2: none -> 0; e3: (3 + 2) / 2 = 2.5;
    #   e4: (-2 - 5) / 2 = -3.5
    out = ties_merge(base, [t1, t2, t3], density=0.6)
    assert out["w"].tolist() == [2.5, -6.0, 0.0, 2.5, -3.5]
    # with lambda = 2 and a nonzero base
    base2 = sd(w=[1.0, 1.0, 1.0, 1.0, 1.0])
    mods = [{"w": base2["w"] + t["w"]} for t in (t1, t2, t3)]
    out2 = ties_merge(base2, mods, density=0.6, scale=2.0)
    assert torch.allclose(out2["w"], torch.tensor([6.0, -11.0, 1.0, 6.0, -6.0]))
    assert trim(torch.tensor([1.0, -3.0, 2.0]), 0.34).tolist() == [0.0, -3.0, 0.0]


def test_dare_fixed_mask_exact_rescale_and_expectation():
    base = sd(w=[0.0, 0.0, 0.0, 0.0])
    a, b = sd(w=[2.0, -4.0, 6.0, 8.0]), sd(w=[1.0, 1.0, -1.0, 1.0])
    masks = {"w": [torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 1.0, 1.0])]}
    # density 0.5: kept entries are doubled, dropped ones vanish, then summed (linear)
    out = dare_merge(base, [a, b], density=0.5, masks=masks)
    assert out["w"].tolist() == [4.0, 2.0, 10.0, 2.0]
    # with TIES: signs of [4, -4+2... ] -> deltas [4,0,12,0] and [0,2,-2,2]; sum [4,2,10,2] all +
    # disjoint mean: e0 4/1, e1 2/1, e2 12/1 (the -2 disagrees), e3 2/1
    out_t = dare_merge(base, [a, b], density=0.5, combine="ties", masks=masks)
    assert out_t["w"].tolist() == [4.0, 2.0, 12.0, 2.0]
    with pytest.raises(NeuralignError, match="masks"):
        dare_merge(base, [a, b], density=0.5, masks={"w": [torch.ones(3), torch.ones(3)]})
    # expectation of drop-and-rescale is the task vector itself
    big = {"w": torch.linspace(-1, 1, 4000)}
    z = {"w": torch.zeros(4000)}
    mean = sum(dare_merge(z, [big], density=0.3, seed=s)["w"] for s in range(200)) / 200
    assert (mean - big["w"]).abs().mean() < 0.05
    # seeded: same seed same result, other seed differs
    r1 = dare_merge(z, [big], density=0.3, seed=1)["w"]
    assert torch.equal(r1, dare_merge(z, [big], density=0.3, seed=1)["w"])
    assert not torch.equal(r1, dare_merge(z, [big], density=0.3, seed=2)["w"])


def test_slerp_endpoints_and_orthogonal():
    a, b = sd(w=[1.0, 0.0]), sd(w=[0.0, 1.0])
    assert torch.allclose(slerp(a, b, 0.0)["w"], a["w"])
    assert torch.allclose(slerp(a, b, 1.0)["w"], b["w"])
    mid = slerp(a, b, 0.5)["w"]
    r = math.sqrt(0.5)
    assert torch.allclose(mid, torch.tensor([r, r]), atol=1e-6)  # on the unit circle
    third = slerp(a, b, 1 / 3)["w"]
    assert torch.allclose(third, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]),
                          atol=1e-6)
    # collinear tensors fall back to linear interpolation
    c = sd(w=[2.0, 0.0])
    assert torch.allclose(slerp(a, c, 0.25)["w"], torch.tensor([1.25, 0.0]))


def test_models_and_integer_buffers_and_errors():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ft = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ft[1].num_batches_tracked += 5
    out = ties_merge(base, [ft], density=1.0)
    assert isinstance(out, nn.Module) and out is not base
    assert int(out[1].num_batches_tracked) == int(base[1].num_batches_tracked)
    assert torch.allclose(out[0].weight, ft[0].weight)  # one model at density 1 = that model
    with pytest.raises(NeuralignError, match="density"):
        ties_merge(base, [ft], density=0.0)
    with pytest.raises(NeuralignError, match="exactly one"):
        task_merge(base, [ft, ft], "slerp")
    with pytest.raises(NeuralignError, match="unknown task-vector method"):
        task_merge(base, [ft], "magic")
    with pytest.raises(ArchitectureMismatchError):
        task_arithmetic(base, [nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5))])


def test_align_then_merge_recovers_the_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(4, 5)
    spec = spec_from_model(model, x)
    other = apply_permutation(model, random_permutation(spec, seed=3), spec)
    plain = task_merge(model, [model, other], "linear")
    merged, perms = align_then_merge([model, other], x, method="linear")
    assert torch.allclose(merged(x), model(x), atol=1e-5)  # aligned copies average to the model
    assert not torch.allclose(plain(x), model(x), atol=1e-3)
    assert len(perms) == 2
    ties, _ = align_then_merge([model, other], x, method="ties", density=0.5)
    assert torch.allclose(ties(x), model(x), atol=1e-5)  # zero task vector after alignment


@pytest.mark.parametrize("method,opts", [
    ("linear", {}), ("task-arithmetic", {"scale": 0.5}), ("ties", {"density": 0.3}),
    ("dare", {"density": 0.6, "rescale": "l1", "combine": "ties"}), ("slerp", {"t": 0.4}),
])
def test_chunked_kernel_equals_one_chunk(method, opts):
    from neuralign.merge.task_vectors import check_task_options, merge_tensor

    g = torch.Generator().manual_seed(1)
    base = torch.randn(13, 11, generator=g)
    xs = [base + 0.1 * torch.randn(13, 11, generator=g) for _ in range(1 if method == "slerp"
                                                                        else 3)]
    o = check_task_options(method, len(xs), **opts)
    one = merge_tensor("w", base, xs, chunk=10**6, **o)
    small = merge_tensor("w", base, xs, chunk=7, **o)
    assert torch.allclose(one, small, atol=1e-6, rtol=0)
    assert one.shape == base.shape


# ----------------------------------------------------------------------------- mergekit
def _mergekit():
    try:
        from mergekit.merge_methods import registry
        from mergekit.merge_methods.base import TensorGroup
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"mergekit is not importable ({type(e).__name__}); pip install mergekit==0.1.5")
    return registry, TensorGroup


def _inputs(n=3, shape=(16, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("density,weights", [(0.3, [1.0, 1.0, 1.0]), (0.7, [0.5, 1.0, 2.0])])
def test_ties_matches_mergekit(density, weights):
    registry, TensorGroup = _mergekit()
    base, xs = _inputs()
    ref = registry.get("ties")([TensorGroup.from_tensors([base, *xs], base_index=0)],
                               parameters={"weight": weights, "density": density,
                                           "lambda": 1.5})[0]
    ours = ties_merge({"w": base}, [{"w": x} for x in xs], density=density, weights=weights,
                      scale=1.5)["w"]
    assert torch.allclose(ours, ref, atol=1e-6)


def test_task_arithmetic_matches_mergekit():
    registry, TensorGroup = _mergekit()
    base, xs = _inputs()
    ref = registry.get("task_arithmetic")(
        [TensorGroup.from_tensors([base, *xs], base_index=0)],
        parameters={"weight": [0.3, 0.5, 0.2], "lambda": 0.8})[0]
    ours = task_arithmetic({"w": base}, [{"w": x} for x in xs], [0.3, 0.5, 0.2], 0.8)["w"]
    assert torch.allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize("combine,name", [("linear", "dare_linear"), ("ties", "dare_ties")])
def test_dare_matches_mergekit_with_the_same_masks(combine, name):
    registry, TensorGroup = _mergekit()
    base, xs = _inputs()
    density, weights = 0.4, [1.0, 0.5, 1.5]
    torch.manual_seed(123)  # mergekit draws one Bernoulli mask per model, in order
    masks = [torch.bernoulli(torch.full(base.shape, density)) for _ in xs]
    torch.manual_seed(123)
    ref = registry.get(name)([TensorGroup.from_tensors([base, *xs], base_index=0)],
                             parameters={"weight": weights, "density": density,
                                         "normalize": combine == "ties"})[0]
    ours = dare_merge({"w": base}, [{"w": x} for x in xs], density=density, combine=combine,
                      weights=weights, rescale="l1", masks={"w": masks})["w"]
    assert torch.allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_matches_mergekit(t):
    registry, TensorGroup = _mergekit()
    base, _ = _inputs(n=1)
    other = torch.randn(base.shape, generator=torch.Generator().manual_seed(9))
    ref = registry.get("slerp")([TensorGroup.from_tensors([base, other], base_index=0)],
                                parameters={"t": t})[0]
    ours = slerp({"w": base}, {"w": other}, t)["w"]
    assert torch.allclose(ours, ref, atol=1e-5)
