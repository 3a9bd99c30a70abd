"""The architectures the spec engine is verified on (tests/test_zoo.py,
benchmarks/spec_coverage.py): every torchvision classification model, timm architectures of many
families, and Hugging Face architectures built from tiny configs. Random weights, small inputs.

``evaluate(entry)`` derives the spec, applies a random permutation and compares every output:
the verdict is ``exact`` (relative difference below 1e-4), ``refused`` (a one-line SpecError) or
``WRONG`` (a silent wrong answer, which must never happen).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

TIMM = """resnet18 efficientnet_b0 mobilenetv3_small_100 vit_tiny_patch16_224 deit_tiny_patch16_224
swin_tiny_patch4_window7_224 convnext_atto mixer_s16_224 resmlp_12_224 regnetx_002 dla34
densenet121 dpn68 ghostnet_100 rexnet_100 cspresnet50 hrnet_w18_small levit_128s
poolformer_s12 coat_lite_tiny crossvit_tiny_240 cait_xxs24_224 xcit_nano_12_p16_224
pit_ti_224 efficientformer_l1 mobilevit_xxs edgenext_xx_small repvgg_a0 gernet_s dm_nfnet_f0
inception_v3 res2net50_14w_8s resnest14d ese_vovnet19b_dw fastvit_t8 eva02_tiny_patch14_224
beit_base_patch16_224 sequencer2d_s gcvit_xxtiny coatnet_nano_rw_224 efficientvit_b0
hgnetv2_b0 mambaout_femto starnet_s1""".split()  # noqa: SIM905

# models whose input must have a particular size (the rest get 64 x 64)
SIZES = {"inception_v3": 80, "maxvit_t": 224, "levit_128s": 224, "crossvit_tiny_240": 240,
         "coatnet_nano_rw_224": 224, "gcvit_xxtiny": 224, "efficientformer_l1": 224,
         "fastvit_t8": 64, "mambaout_femto": 64, "cait_xxs24_224": 32, "sequencer2d_s": 64,
         "dm_nfnet_f0": 64}
IMG_SIZE_KW = ("vit_", "deit_", "swin_", "mixer_", "resmlp_", "xcit_", "pit_", "cait_",
               "eva02_", "beit_", "coat_lite")


@dataclass
class Entry:
    name: str
    source: str  # torchvision | timm | hf
    build: Callable  # () -> (model, example_input)


def _tv_entry(name: str) -> Entry:
    def build():
        import torchvision

        kw: dict = {"num_classes": 10}
        size = SIZES.get(name, 64)
        if name.startswith("vit_"):
            size = 28 if name.endswith("14") else 32
            kw["image_size"] = size
        if name in ("googlenet", "inception_v3"):
            kw["aux_logits"] = False
            kw["init_weights"] = True
        if name.startswith("swin"):
            size = 64
        model = torchvision.models.get_model(name, weights=None, **kw)
        return model.eval(), torch.randn(2, 3, size, size)

    return Entry(name, "torchvision", build)


def torchvision_entries() -> list[Entry]:
    import torchvision

    return [_tv_entry(n) for n in torchvision.models.list_models(module=torchvision.models)]


def _timm_entry(name: str) -> Entry:
    def build():
        import timm

        size = SIZES.get(name, 64)
        kw: dict = {"num_classes": 10, "pretrained": False}
        if name.startswith(IMG_SIZE_KW):
            size = SIZES.get(name, 32 if "patch16" in name or "s16" in name or "_224" in name
                             else 64)
            if name.startswith("swin_"):
                size, kw["window_size"] = 64, 4
            if name.startswith("eva02_"):
                size = 28
            kw["img_size"] = size
        model = timm.create_model(name, **kw)
        return model.eval(), torch.randn(2, 3, size, size)

    return Entry(name, "timm", build)


def timm_entries() -> list[Entry]:
    return [_timm_entry(n) for n in TIMM]


def _hf_configs() -> dict:
    import transformers as T

    enc = {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
               "intermediate_size": 32, "max_position_embeddings": 40}
    dec = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
               "num_attention_heads": 4, "max_position_embeddings": 40}
    return {
        "BertForSequenceClassification": T.BertConfig(**enc, num_labels=3),
        "BertForTokenClassification": T.BertConfig(**enc, num_labels=3),
        "BertForMaskedLM": T.BertConfig(**enc),
        "BertForQuestionAnswering": T.BertConfig(**enc),
        "RobertaForSequenceClassification": T.RobertaConfig(**enc, num_labels=3),
        "ElectraForSequenceClassification": T.ElectraConfig(**enc, embedding_size=8,
                                                            num_labels=3),
        "DistilBertForSequenceClassification": T.DistilBertConfig(
            vocab_size=64, dim=16, n_layers=2, n_heads=2, hidden_dim=32,
            max_position_embeddings=40, num_labels=3),
        "AlbertForSequenceClassification": T.AlbertConfig(**enc, embedding_size=8,
                                                           num_labels=3),
        "GPT2LMHeadModel": T.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2,
                                        n_positions=40, bos_token_id=0, eos_token_id=0),
        "ViTForImageClassification": T.ViTConfig(image_size=16, patch_size=8, hidden_size=16,
                                                 num_hidden_layers=2, num_attention_heads=2,
                                                 intermediate_size=32, num_labels=3),
        "LlamaForCausalLM": T.LlamaConfig(**dec, num_key_value_heads=4),
        "MistralForCausalLM": T.MistralConfig(**dec, num_key_value_heads=2),
        "Qwen2ForCausalLM": T.Qwen2Config(**dec, num_key_value_heads=2),
        "T5ForConditionalGeneration": T.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32,
                                                 num_layers=2, num_heads=4),
        "BartForConditionalGeneration": T.BartConfig(
            vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
            decoder_ffn_dim=32, max_position_embeddings=40),
    }


def _hf_entry(name: str) -> Entry:
    def build():
        import transformers

        from neuralign.spec import default_example_input

        torch.manual_seed(0)
        model = getattr(transformers, name)(_hf_configs()[name]).eval()
        return model, default_example_input(model)

    return Entry(name, "hf", build)


HF = ["BertForSequenceClassification", "BertForTokenClassification", "BertForMaskedLM",
      "BertForQuestionAnswering", "RobertaForSequenceClassification",
      "ElectraForSequenceClassification", "DistilBertForSequenceClassification",
      "AlbertForSequenceClassification", "GPT2LMHeadModel", "ViTForImageClassification",
      "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "T5ForConditionalGeneration",
      "BartForConditionalGeneration"]


def hf_entries() -> list[Entry]:
    return [_hf_entry(n) for n in HF]


def evaluate(entry: Entry, seed: int = 0, tol: float = 1e-4) -> dict:
    """Derive, permute, compare: one row of the coverage table."""
    from neuralign.errors import SpecError
    from neuralign.spec import check_spec, spec_from_model
    from neuralign.spec.check import randomise_norm_stats

    torch.manual_seed(seed)
    row = {"model": entry.name, "source": entry.source}
    model, x = entry.build()
    model = randomise_norm_stats(model, seed, inplace=True)
    t0 = time.perf_counter()
    try:
        spec = spec_from_model(model, x, check=False)
    except SpecError as exc:
        row.update(verdict="refused", reason=str(exc), trace_time_s=time.perf_counter() - t0)
        return row
    row["trace_time_s"] = time.perf_counter() - t0
    cov = spec.coverage()
    rel = check_spec(model, spec, x, seed=seed, raise_error=False)
    row.update(verdict="exact" if rel < tol else "WRONG", rel_diff=rel, groups=len(spec),
               free_fraction=cov.free_fraction, hidden_units=cov.hidden_units,
               fixed_reasons=dict(list(cov.reasons().items())[:4]),
               unknown_ops=spec.trace_info.get("unknown_ops", {}))
    return row
