"""The ATen spec engine: unknown operations fix what they touch instead of refusing, coverage
reports why, grouped convolutions and attention forms are exact, hand-written specs are checked."""

import pytest
import torch
from torch import nn

from neuralign.errors import SpecError
from neuralign.spec import Group, PermutationSpec, Place, check_spec, spec_from_model


class CumsumChannels(nn.Module):
    """An op on an axis of units the engine cannot follow (cumsum over channels)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = torch.relu(self.b(h)).cumsum(-1)
        return self.c(h)


def test_unknown_or_positional_op_fixes_its_groups_with_a_reason():
    spec = spec_from_model(CumsumChannels(), torch.randn(3, 4))
    assert [g.size for g in spec.groups.values()] == [8]  # a's units free, b's fixed
    cov = spec.coverage()
    (fixed,) = cov.fixed
    assert fixed["size"] == 6 and "cumsum" in fixed["reason"]
    assert 0 < cov.free_fraction < 1 and "cumsum" in cov.summary()


class Nothing(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x):
        return self.a(x)


def test_nothing_to_permute_is_refused():
    with pytest.raises(SpecError, match="nothing in Nothing can be permuted"):
        spec_from_model(Nothing(), torch.randn(2, 4))


class Grouped(nn.Module):
    def __init__(self, transposed=False):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.g = (nn.ConvTranspose2d(8, 12, 3, padding=1, groups=4) if transposed else
                  nn.Conv2d(8, 12, 3, padding=1, groups=4))
        self.bn = nn.BatchNorm2d(12)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        h = torch.relu(self.bn(self.g(torch.relu(self.a(x)))))
        return self.head(torch.relu(self.dw(h)).mean((2, 3)))


@pytest.mark.parametrize("transposed", [False, True])
def test_grouped_and_depthwise_convolutions_move_whole_groups(transposed):
    model = Grouped(transposed).eval()
    x = torch.randn(2, 3, 8, 8)
    spec = spec_from_model(model, x)
    assert spec.coverage().free_fraction == pytest.approx(1.0)
    kinds = {g.kind for g in spec.groups.values()}
    assert "heads" in kinds  # the 4 groups of the grouped conv move as blocks
    assert check_spec(model, spec, x, seed=3) < 1e-4


transformers = pytest.importorskip("transformers")


def test_grouped_query_attention_heads_are_kv_heads_times_repeats():
    cfg = transformers.MistralConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.MistralForCausalLM(cfg).eval()
    spec = spec_from_model(model)
    k_heads = [g for g in spec.groups.values() if g.kind == "heads" and any(
        p.key.endswith("k_proj.weight") for p in g.places)]
    assert k_heads and k_heads[0].size == 2  # key/value heads move, with their query heads
    q = [p for p in k_heads[0].places if p.key.endswith("q_proj.weight")]
    assert q and q[0].inner == 8  # each kv head owns 2 query heads of 4 dims
    cov = spec.coverage()
    assert any("inv_freq" in (g["reason"] or "") for g in cov.fixed)  # rotary fixes q.k dims


def test_hand_written_spec_that_misses_a_place_is_caught():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    bad = PermutationSpec({"h": Group("h", 8, [Place("0.weight", 0), Place("2.weight", 1)])})
    with pytest.raises(SpecError, match="does not preserve"):
        check_spec(model, bad, torch.randn(5, 4))
    good = PermutationSpec({"h": Group("h", 8, [Place("0.weight", 0), Place("0.bias", 0),
                                                Place("2.weight", 1)])})
    assert check_spec(model, good, torch.randn(5, 4)) < 1e-4


def test_spec_from_model_leaves_the_model_alone():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec_from_model(model, torch.randn(5, 4))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
