"""The five ways the fx tracer used to return a spec that silently changed the model's function
(issue 14). Each test applies a random permutation with the derived spec and demands the same
outputs; each failed on the fx tracer."""

import pytest
import torch
from torch import nn

from neuralign.errors import SpecError
from neuralign.permute import apply_permutation, random_permutation
from neuralign.spec import spec_from_model


def _out(model, x):
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    return out.logits if hasattr(out, "logits") else out


def _exact_or_refused(model, x, seed=0):
    """Either a SpecError, or a spec that moves something and keeps the outputs."""
    model = model.eval()
    try:
        spec = spec_from_model(model, x)
    except SpecError:
        return None
    perm = random_permutation(spec, seed)
    assert sum(perm.moved().values()) > 0
    a, b = _out(model, x), _out(apply_permutation(model, perm, spec), x)
    assert (a - b).abs().max().item() < 1e-4 * max(1.0, a.abs().max().item())
    return spec


# 1. Hugging Face BERT-family task heads other than pooler -> classifier --------------------
transformers = pytest.importorskip("transformers")


def _bert_cfg(cls=transformers.BertConfig, **kw):
    base = {"vocab_size": 60, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                "intermediate_size": 32, "max_position_embeddings": 40}
    base.update(kw)
    return cls(**base)


@pytest.mark.parametrize("name,cfg", [
    ("BertForTokenClassification", lambda: _bert_cfg(num_labels=3)),
    ("BertForMaskedLM", lambda: _bert_cfg()),
    ("RobertaForSequenceClassification", lambda: _bert_cfg(transformers.RobertaConfig,
                                                           num_labels=3)),
    ("ElectraForSequenceClassification", lambda: _bert_cfg(transformers.ElectraConfig,
                                                           embedding_size=8, num_labels=3)),
])
def test_bert_family_heads_exact(name, cfg):
    torch.manual_seed(0)
    model = getattr(transformers, name)(cfg()).eval()
    ids = torch.randint(0, 60, (2, 7))
    spec = _exact_or_refused(model, {"input_ids": ids})
    assert spec is not None and len(spec) > 0
    # the residual stream is free, and whatever reads it is permuted with it
    emb = [n for n, g in spec.groups.items()
           if any(p.key.endswith("word_embeddings.weight") and p.axis == 1 for p in g.places)]
    assert emb, "the residual stream should be free to move"


def test_masked_lm_tied_decoder_permuted_with_embeddings():
    model = transformers.BertForMaskedLM(_bert_cfg()).eval()
    spec = _exact_or_refused(model, {"input_ids": torch.randint(0, 60, (2, 7))})
    (resid,) = [g for g in spec.groups.values()
                if any(p.key.endswith("word_embeddings.weight") and p.axis == 1
                       for p in g.places)]
    keys = {p.key for p in resid.places if p.axis == 1}
    assert "cls.predictions.decoder.weight" in keys  # the tied alias moves with its original
    perm = random_permutation(spec, 1)
    out = apply_permutation(model, perm, spec)
    assert out.cls.predictions.decoder.weight is out.bert.embeddings.word_embeddings.weight


# 2. channel-wise parameters reached through indexing / view / reshape ------------------------
class LayerScaleView(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)
        self.beta = nn.Parameter(torch.randn(8))
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        if self.how == "view":
            h = h * self.gamma.view(1, -1, 1, 1)
        elif self.how == "index":
            h = h * self.gamma[None, :, None, None]
        else:  # bias added after a reshape of the activations
            b, c, hh, ww = h.shape
            h = (h.reshape(b, c, hh * ww) + self.beta.reshape(1, c, 1)).reshape(b, c, hh, ww)
        return self.conv2(h).mean((2, 3))


@pytest.mark.parametrize("how", ["view", "index", "reshape"])
def test_channelwise_parameter_through_view_index_reshape(how):
    torch.manual_seed(0)
    model = LayerScaleView(how)
    spec = _exact_or_refused(model, torch.randn(2, 3, 8, 8))
    assert spec is not None
    key = "beta" if how == "reshape" else "gamma"
    assert any(p.key == key for g in spec.groups.values() for p in g.places)


# 3. a module called twice (shared weights) -----------------------------------------------------
class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.block = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = torch.relu(self.block(h))
        h = torch.relu(self.block(h))  # same weights again: one permutation on both sides
        return self.out(h)


def test_module_called_twice_ties_its_groups():
    torch.manual_seed(0)
    spec = _exact_or_refused(Shared(), torch.randn(4, 6))
    assert spec is not None
    where = [n for n, g in spec.groups.items() for p in g.places if p.key == "block.weight"]
    # input and output side of the shared layer carry one (tied) permutation
    assert len(where) == 2 and where[0] == where[1]


# 4. chunk / split / unbind as tensor methods ----------------------------------------------------
class Chunky(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a = nn.Linear(5, 12)
        self.b = nn.Linear(4, 3)
        self.c = nn.Linear(12, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if self.how == "chunk":
            p, q, r = h.chunk(3, dim=-1)
        elif self.how == "split":
            p, q, r = h.split(4, dim=-1)
        else:
            p, q, r = h.view(h.shape[0], 3, 4).unbind(1)
        return self.b(p) + self.b(q) * 2 + self.b(r) * 3 + self.c(h)


@pytest.mark.parametrize("how", ["chunk", "split", "unbind"])
def test_chunk_split_unbind_followed_or_fixed(how):
    torch.manual_seed(0)
    spec = _exact_or_refused(Chunky(how), torch.randn(4, 5))
    assert spec is not None


# 5. apply_permutation keeps the state dict's metadata ------------------------------------------
def test_apply_permutation_keeps_state_dict_metadata():
    tv = pytest.importorskip("torchvision")
    model = tv.models.mnasnet0_5(num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    spec = spec_from_model(model, x)
    sd = model.state_dict()
    new_sd = apply_permutation(sd, random_permutation(spec, 0), spec)
    assert getattr(new_sd, "_metadata", None) is not None
    assert new_sd._metadata == sd._metadata
    fresh = tv.models.mnasnet0_5(num_classes=5)
    fresh.load_state_dict(new_sd)  # MNASNet's loader reads the version from _metadata
    permuted = apply_permutation(model, random_permutation(spec, 0), spec)
    with torch.no_grad():
        assert (fresh.eval()(x) - model(x)).abs().max() < 1e-4
        assert (permuted(x) - model(x)).abs().max() < 1e-4


def test_bert_spec_by_hand_keeps_unknown_heads_exact():
    from neuralign.spec import bert_spec

    for name, cfg in [("BertForTokenClassification", _bert_cfg(num_labels=3)),
                      ("RobertaForSequenceClassification",
                       _bert_cfg(transformers.RobertaConfig, num_labels=3))]:
        model = getattr(transformers, name)(cfg).eval()
        ids = {"input_ids": torch.randint(3, 60, (2, 7))}
        spec = bert_spec(model)
        perm = random_permutation(spec, 0)
        a, b = _out(model, ids), _out(apply_permutation(model, perm, spec), ids)
        assert (a - b).abs().max().item() < 1e-4
