"""Programmatic specs for transformer encoders, where tracing cannot see the symmetries.

Groups per encoder layer: ``heads`` (attention heads permuted as wholes), ``qk`` (within-head
dims of queries and keys, the same permutation in every head), ``vo`` (within-head dims of values
and of the output projection's input), ``mlp`` (hidden units of the feed-forward block); one
``resid`` group for the residual stream (embeddings, every LayerNorm, every projection into or
out of the stream). Units of ``resid`` and ``mlp`` are probed at module outputs for activation
matching; the attention groups have no probes (activation matching falls back to weight
matching for them).
"""

from __future__ import annotations

from torch import nn

from neuralign.spec.core import Group, PermutationSpec, Place, Probe


def _add(groups: dict, name: str, size: int, places, probes=(), kind="units") -> None:
    groups[name] = Group(name, size, list(places), list(probes), kind)


def is_torchvision_vit(model: nn.Module) -> bool:
    return type(model).__name__ == "VisionTransformer" and hasattr(model, "conv_proj") and hasattr(
        model, "encoder")


def vit_spec(model: nn.Module) -> PermutationSpec:
    """Spec of a torchvision ``VisionTransformer`` (vit_b_16 and friends)."""
    sd = model.state_dict()
    e = model.hidden_dim
    groups: dict[str, Group] = {}
    resid = [Place("conv_proj.weight", 0), Place("conv_proj.bias", 0),
             Place("class_token", 2), Place("encoder.pos_embedding", 2),
             Place("encoder.ln.weight", 0), Place("encoder.ln.bias", 0)]
    probes = []
    layer_groups = []
    for lname, layer in model.encoder.layers.named_children():
        p = f"encoder.layers.{lname}"
        attn = layer.self_attention
        h = attn.num_heads
        dh = e // h
        for ln in ("ln_1", "ln_2"):
            resid += [Place(f"{p}.{ln}.weight", 0), Place(f"{p}.{ln}.bias", 0)]
        resid += [Place(f"{p}.self_attention.in_proj_weight", 1),
                  Place(f"{p}.self_attention.out_proj.weight", 0),
                  Place(f"{p}.self_attention.out_proj.bias", 0),
                  Place(f"{p}.mlp.0.weight", 1), Place(f"{p}.mlp.3.weight", 0),
                  Place(f"{p}.mlp.3.bias", 0)]
        probes.append(Probe(p, -1, kind="module"))
        w, b, o = (f"{p}.self_attention.in_proj_weight", f"{p}.self_attention.in_proj_bias",
                   f"{p}.self_attention.out_proj.weight")
        heads = [Place(w, 0, 3, dh), Place(o, 1, 1, dh)]
        qk = [Place(w, 0, h, 1, 0), Place(w, 0, h, 1, e)]
        vo = [Place(w, 0, h, 1, 2 * e), Place(o, 1, h, 1)]
        if b in sd:
            heads.append(Place(b, 0, 3, dh))
            qk += [Place(b, 0, h, 1, 0), Place(b, 0, h, 1, e)]
            vo.append(Place(b, 0, h, 1, 2 * e))
        hidden = layer.mlp[0].out_features
        mlp = [Place(f"{p}.mlp.0.weight", 0), Place(f"{p}.mlp.0.bias", 0),
               Place(f"{p}.mlp.3.weight", 1)]
        layer_groups.append((lname, h, dh, hidden, heads, qk, vo, mlp,
                             [Probe(f"{p}.mlp.1", -1, kind="module")]))
    head = getattr(model.heads, "head", None)
    if head is not None and "heads.pre_logits.weight" not in sd:
        resid.append(Place("heads.head.weight", 1))
    else:  # representation layer before the head: keep its input side permuted
        resid.append(Place("heads.pre_logits.weight", 1))
    _add(groups, "resid", e, resid, probes)
    for lname, h, dh, hidden, heads, qk, vo, mlp, mprobes in layer_groups:
        _add(groups, f"{lname}.heads", h, heads, kind="heads")
        _add(groups, f"{lname}.qk", dh, qk)
        _add(groups, f"{lname}.vo", dh, vo)
        _add(groups, f"{lname}.mlp", hidden, mlp, mprobes)
    return PermutationSpec(groups, source="vit")


def is_bert_like(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return cfg is not None and getattr(cfg, "model_type", None) in (
        "bert", "roberta", "xlm-roberta", "camembert", "electra", "mpnet_bert")


def bert_spec(model: nn.Module, permute_residual: bool | None = None) -> PermutationSpec:
    """Spec of a Hugging Face BERT-family encoder (BertModel, RobertaModel, *ForSequenceClassification...).

    The residual stream is the model's output for a bare encoder (``last_hidden_state``), so it
    is only permuted when the model ends in a task head, or when ``permute_residual=True``.
    """
    sd = model.state_dict()
    base = getattr(model, "base_model_prefix", "bert")
    prefix = f"{base}." if any(k.startswith(f"{base}.") for k in sd) else ""
    cfg = model.config
    e, h = cfg.hidden_size, cfg.num_attention_heads
    dh = e // h
    known = (f"{prefix}embeddings.", f"{prefix}encoder.", f"{prefix}pooler.")
    pooled_head = f"{prefix}pooler.dense.weight" in sd and "classifier.weight" in sd
    other = [k for k in sd if not k.startswith(known) and not (
        pooled_head and k in ("classifier.weight", "classifier.bias"))]
    if other:  # a head this function does not know reads the stream: keep it fixed
        permute_residual = False
    if permute_residual is None:
        permute_residual = prefix != ""
    groups: dict[str, Group] = {}
    emb = f"{prefix}embeddings"
    resid = [Place(f"{emb}.{n}.weight", 1) for n in
             ("word_embeddings", "position_embeddings", "token_type_embeddings")
             if f"{emb}.{n}.weight" in sd]
    resid += [Place(f"{emb}.LayerNorm.weight", 0), Place(f"{emb}.LayerNorm.bias", 0)]
    probes = []
    n_layers = cfg.num_hidden_layers
    for i in range(n_layers):
        p = f"{prefix}encoder.layer.{i}"
        a = f"{p}.attention"
        for n in ("query", "key", "value"):
            resid.append(Place(f"{a}.self.{n}.weight", 1))
        resid += [Place(f"{a}.output.dense.weight", 0), Place(f"{a}.output.dense.bias", 0),
                  Place(f"{a}.output.LayerNorm.weight", 0), Place(f"{a}.output.LayerNorm.bias", 0),
                  Place(f"{p}.intermediate.dense.weight", 1),
                  Place(f"{p}.output.dense.weight", 0), Place(f"{p}.output.dense.bias", 0),
                  Place(f"{p}.output.LayerNorm.weight", 0), Place(f"{p}.output.LayerNorm.bias", 0)]
        probes.append(Probe(p, -1, kind="module"))
        heads = [Place(f"{a}.self.{n}.{t}", 0, 1, dh) for n in ("query", "key", "value")
                 for t in ("weight", "bias")] + [Place(f"{a}.output.dense.weight", 1, 1, dh)]
        qk = [Place(f"{a}.self.{n}.{t}", 0, h, 1) for n in ("query", "key")
              for t in ("weight", "bias")]
        vo = [Place(f"{a}.self.value.weight", 0, h, 1), Place(f"{a}.self.value.bias", 0, h, 1),
              Place(f"{a}.output.dense.weight", 1, h, 1)]
        inter = sd[f"{p}.intermediate.dense.weight"].shape[0]
        mlp = [Place(f"{p}.intermediate.dense.weight", 0), Place(f"{p}.intermediate.dense.bias", 0),
               Place(f"{p}.output.dense.weight", 1)]
        _add(groups, f"layer{i}.heads", h, heads, kind="heads")
        _add(groups, f"layer{i}.qk", dh, qk)
        _add(groups, f"layer{i}.vo", dh, vo)
        _add(groups, f"layer{i}.mlp", inter, mlp, [Probe(f"{p}.intermediate", -1, kind="module")])
    pool = f"{prefix}pooler.dense"
    if f"{pool}.weight" in sd:
        resid.append(Place(f"{pool}.weight", 1))
        if "classifier.weight" in sd:  # pooler output feeds the task head: its units are free
            _add(groups, "pooler", e, [Place(f"{pool}.weight", 0), Place(f"{pool}.bias", 0),
                                       Place("classifier.weight", 1)],
                 [Probe(f"{prefix}pooler", -1, kind="module")])
    if permute_residual:
        groups = {"resid": Group("resid", e, resid, probes), **groups}
    return PermutationSpec(groups, source="bert")
