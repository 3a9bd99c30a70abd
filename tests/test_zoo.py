"""Zoo-wide property test of the spec engine: for every architecture, a random permutation with
the derived spec leaves every output equal, or the model is refused with a one-line reason.
Never silently wrong. The default run takes a representative slice; ``pytest -m zoo`` runs the
full zoo (neuralign.spec.zoo; benchmarks/spec_coverage.py writes the same rows as a table)."""

import pytest
import torch

from neuralign.spec import zoo

tv = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

SLICE = {
    "torchvision": ["shufflenet_v2_x0_5", "squeezenet1_1", "googlenet"],
    "timm": ["vit_tiny_patch16_224", "mixer_s16_224", "convnext_atto"],
    "hf": ["GPT2LMHeadModel", "MistralForCausalLM", "T5ForConditionalGeneration"],
}


def _entries(source):
    return {"torchvision": zoo.torchvision_entries, "timm": zoo.timm_entries,
            "hf": zoo.hf_entries}[source]()


def _check(entry):
    row = zoo.evaluate(entry)
    assert row["verdict"] != "WRONG", f"{entry.name}: silently wrong ({row['rel_diff']:.2g})"
    if row["verdict"] == "refused":
        assert "\n" not in row["reason"] and row["reason"]
    return row


@pytest.mark.parametrize("source,name", [(s, n) for s, ns in SLICE.items() for n in ns])
def test_zoo_slice_exact(source, name):
    (entry,) = [e for e in _entries(source) if e.name == name]
    row = _check(entry)
    assert row["verdict"] == "exact" and row["groups"] > 0
    assert row["free_fraction"] > 0.5


def test_zoo_lists_are_large_enough():
    assert len(zoo.timm_entries()) >= 25
    assert len(zoo.hf_entries()) >= 12
    names = {e.name for e in zoo.torchvision_entries()}
    assert set(tv.models.list_models(module=tv.models)) == names


@pytest.mark.zoo
@pytest.mark.parametrize("entry", zoo.torchvision_entries(), ids=lambda e: e.name)
def test_zoo_torchvision_exact(entry):
    torch.manual_seed(0)
    assert _check(entry)["verdict"] == "exact"


@pytest.mark.zoo
@pytest.mark.parametrize("entry", zoo.timm_entries() + zoo.hf_entries(), ids=lambda e: e.name)
def test_zoo_timm_hf_exact_or_refused(entry):
    _check(entry)
