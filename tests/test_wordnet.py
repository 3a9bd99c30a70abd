"""WordNet gloss tasks parsed from /usr/share/wordnet (skipped when wordnet-base is absent)."""

from __future__ import annotations

import numpy as np
import pytest

from neuralign.data import load_data
from neuralign.data import wordnet as wn
from neuralign.errors import DataError


def _have_wordnet() -> bool:
    try:
        wn.wordnet_root()
        return True
    except DataError:
        return False


needs_wordnet = pytest.mark.skipif(not _have_wordnet(), reason="WordNet files absent: "
                                   "apt-get install -y wordnet-base")


def test_missing_files_name_the_package(tmp_path):
    with pytest.raises(DataError, match=r"apt-get install -y wordnet-base"):
        wn.load_synsets(tmp_path)
    with pytest.raises(DataError, match=r"apt-get install -y wordnet-base"):
        load_data("wordnet_pos", root=tmp_path)


def test_corrupt_line_is_a_one_line_error(tmp_path):
    for stem in ("noun", "verb", "adj", "adv"):
        (tmp_path / f"data.{stem}").write_text("  licence header\n00001740 03 n zz | broken\n")
    with pytest.raises(DataError, match=r"data\.\w+:2: not a WordNet data line"):
        wn.load_synsets(tmp_path)


@needs_wordnet
def test_parse_counts_and_a_known_synset():
    syn = wn.load_synsets()
    assert 115_000 < len(syn) < 120_000
    pos = {p: sum(s.pos == p for s in syn.values()) for p in "nvasr"}
    assert pos["n"] > 80_000 and pos["v"] > 13_000 and pos["r"] > 3_000
    assert pos["a"] + pos["s"] > 18_000
    assert len({s.lexname for s in syn.values()}) == 45
    dog = syn["n02084071"]
    assert "dog" in dog.words and dog.lexname == "noun.animal" and "canis" in dog.gloss.lower()
    assert "n02083346" in dog.hypernyms            # canine
    assert not any("(" in w for s in syn.values() if s.pos in "as" for w in s.words)
    assert wn.load_synsets() is syn                # parsed once per process
    assert sum(n.startswith("noun.") for n in wn.LEXNAMES) == 26
    assert sum(n.startswith("verb.") for n in wn.LEXNAMES) == 15


@needs_wordnet
@pytest.mark.parametrize("task,classes,total", [("noun_supersense", 26, 82115),
                                                ("verb_supersense", 15, 13767),
                                                ("pos", 4, 117659), ("adj_class", 3, 18156)])
def test_task_shapes(task, classes, total):
    sp = wn.load_wordnet_task(task)
    assert sp.num_classes == classes == len(sp.class_names)
    assert len(sp.train) + len(sp.val) + len(sp.test) == total
    for ds in (sp.train, sp.val, sp.test):
        assert len(ds.texts) == len(ds.labels) and ds.labels.dtype.is_floating_point is False
        assert 0 <= int(ds.labels.min()) and int(ds.labels.max()) < classes
    assert abs(len(sp.val) / total - 0.1) < 0.01 and abs(len(sp.test) / total - 0.2) < 0.01
    assert len(set(sp.train.labels.tolist())) == classes
    text, label = sp.train[0]
    assert isinstance(text, str) and text and int(label) >= 0
    texts, labels = next(iter(sp.loader("val", batch_size=8)))
    assert len(texts) == 8 and labels.shape == (8,) and texts[0] == sp.val.texts[0]


@needs_wordnet
def test_split_fixed_by_data_seed_and_caps():
    a = wn.load_wordnet_task("verb_supersense", data_seed=3, max_train=50, max_eval=20)
    b = load_data("wordnet_verb_supersense", data_seed=3, max_train=50, max_eval=20)
    c = wn.load_wordnet_task("verb_supersense", data_seed=4, max_train=50, max_eval=20)
    assert (len(a.train), len(a.val), len(a.test)) == (50, 20, 20)
    assert a.train.texts == b.train.texts and a.test.texts == b.test.texts
    assert a.train.texts != c.train.texts
    d = wn.load_wordnet_task("verb_supersense", max_train=50, examples=False)
    assert all('"' not in t or not t.startswith('"') for t in d.train.texts)
    with pytest.raises(DataError, match="max_train"):
        load_data("wordnet_pos", subset=10)
    with pytest.raises(DataError, match="unknown WordNet task"):
        load_data("wordnet_nope")


def _keys_under(roots, children):
    return {k for r in roots for k in wn._subtree(r, children)}


@needs_wordnet
def test_breeds_subtrees_disjoint_and_deterministic():
    b = wn.wordnet_breeds(depth=5, num_classes=8, data_seed=0)
    b2 = wn.wordnet_breeds(depth=5, num_classes=8, data_seed=0)
    b3 = wn.wordnet_breeds(depth=5, num_classes=8, data_seed=1)
    assert b.meta == b2.meta and b.train.texts == b2.train.texts
    assert b.ood_test.texts == b2.ood_test.texts
    assert b.meta["source"] != b3.meta["source"]
    assert b.meta["classes"] == b3.meta["classes"]          # classes do not depend on the seed
    syn = wn.load_synsets()
    _, children = wn._tree(syn)
    src_all, tgt_all = set(), set()
    for c, (s, t) in enumerate(zip(b.meta["source"], b.meta["target"])):
        assert s and t and not set(s) & set(t)
        ks, kt = _keys_under(s, children), _keys_under(t, children)
        assert not ks & kt
        assert ks | kt | {b.meta["classes"][c]} == set(wn._subtree(b.meta["classes"][c], children))
        src_all |= ks
        tgt_all |= kt
    assert not src_all & tgt_all
    src_text = {syn[k].gloss for k in src_all}
    tgt_text = {syn[k].gloss for k in tgt_all}
    unique_ood = [t for t in b.ood_test.texts if t not in src_text]
    assert len(unique_ood) / len(b.ood_test) > 0.99    # identical glosses across sub-trees are rare
    assert all(t in tgt_text for t in b.ood_test.texts)
    assert all(t in src_text for t in b.test.texts + b.train.texts)
    assert b.num_classes == 8 and set(b.ood_test.labels.tolist()) == set(range(8))


@needs_wordnet
def test_spurious_token_correlates_in_training_only():
    base = wn.load_wordnet_task("noun_supersense", max_train=4000, max_eval=4000)
    sp = wn.spurious_tokens(base, p=0.9)
    toks = sp.meta["spurious_tokens"]

    def agree(ds):
        first = np.array([t.split(" ", 1)[0] for t in ds.texts])
        return float(np.mean(first == np.array([toks[y] for y in ds.labels.tolist()])))

    c = base.num_classes
    assert abs(agree(sp.train) - (0.9 + 0.1 / c)) < 0.02
    assert abs(agree(sp.ood_test) - 1 / c) < 0.02
    assert [t.split(" ", 1)[1] for t in sp.train.texts] == base.train.texts
    assert sp.ood_test.labels.tolist() == base.test.labels.tolist()
    with pytest.raises(DataError, match="probability"):
        wn.spurious_tokens(base, p=1.5)
