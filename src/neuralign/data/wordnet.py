"""Gloss classification tasks from WordNet 3.0, parsed from the database files directly.

Debian's ``wordnet-base`` (``apt-get install -y wordnet-base``) puts the files in
``/usr/share/wordnet`` (``data.noun``, ``data.verb``, ``data.adj``, ``data.adv``). Each line of a
``data.*`` file is one synset: ``offset lex_filenum ss_type w_cnt word lex_id ... p_cnt
[pointer ...] [frames] | gloss``. The lexicographer file number names one of the 45 WordNet
supersenses (26 noun, 15 verb, 3 adjective, 1 adverb: the fixed ``lexnames`` table, read from a
``lexnames`` file when one is present, else the table below, which is the one documented in
``lexnames(5WN)``).

Tasks (every one a :class:`TextSplits` of glosses and integer labels, its train/val/test split
drawn from ``data_seed`` alone, never from a model's seed):

* ``noun_supersense`` (26 classes), ``verb_supersense`` (15), ``pos`` (noun/verb/adjective/adverb,
  satellites counted as adjectives), ``adj_class`` (``adj.all`` / ``adj.pert`` / ``adj.ppl``, or
  ``by="head"``: head vs satellite adjective);
* :func:`wordnet_breeds`: BREEDS-style sub-population shift on the noun hypernym tree;
* :func:`spurious_tokens`: a class-coded token prepended to a task's texts.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from neuralign.errors import DataError

WORDNET_DEFAULT = "/usr/share/wordnet"
_INSTALL = "run 'apt-get install -y wordnet-base' (files in /usr/share/wordnet)"
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather",
    "adj.ppl",
)
_POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
POS_NAMES = ("noun", "verb", "adjective", "adverb")
_POS_INDEX = {"n": 0, "v": 1, "a": 2, "s": 2, "r": 3}
TASKS = ("noun_supersense", "verb_supersense", "pos", "adj_class")


@dataclass(frozen=True)
class Synset:
    key: str                 # "<pos><offset>", e.g. "n00001740" (satellites are "a")
    pos: str                 # n, v, a, s, r (as in the file)
    lexname: str             # e.g. "noun.animal"
    words: tuple[str, ...]
    gloss: str
    hypernyms: tuple[str, ...]   # keys of "@" and "@i" targets, in file order


class TextDataset(Dataset):
    """Texts and int64 labels; an item is ``(text, label)`` (a DataLoader batches them into a
    list of strings and a label tensor)."""

    def __init__(self, texts, labels):
        self.texts = list(texts)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        if len(self.texts) != len(self.labels):
            raise DataError(f"{len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        return self.texts[i], self.labels[i]


@dataclass
class TextSplits:
    """Train / validation / test :class:`TextDataset`s; ``ood_test`` for shift tasks (the ID test
    is ``test``). ``meta`` records how the task was built (sub-trees, tokens)."""

    train: TextDataset
    val: TextDataset
    test: TextDataset
    num_classes: int
    class_names: tuple[str, ...]
    name: str
    data_seed: int = 0
    ood_test: TextDataset | None = None
    meta: dict = field(default_factory=dict)

    def loader(self, split: str = "train", batch_size: int = 128, shuffle: bool | None = None,
               seed: int = 0):
        """A deterministic DataLoader of ``(list of texts, label tensor)`` batches; ``split`` is
        train, val, test or ood_test."""
        from neuralign.data.core import make_loader

        ds = getattr(self, split, None) if split in ("train", "val", "test", "ood_test") else None
        if ds is None:
            raise DataError(f"split must be train, val, test or ood_test (when present), "
                            f"got {split!r}")
        return make_loader(ds, batch_size, shuffle=(split == "train") if shuffle is None
                           else shuffle, seed=seed)

    def __repr__(self) -> str:
        ood = f", ood_test={len(self.ood_test)}" if self.ood_test is not None else ""
        return (f"TextSplits({self.name}: train={len(self.train)}, val={len(self.val)}, "
                f"test={len(self.test)}{ood}, classes={self.num_classes}, "
                f"data_seed={self.data_seed})")


# ----------------------------------------------------------------------------- parsing
_CACHE: dict[str, dict[str, Synset]] = {}
_MARKER = re.compile(r"\((a|p|ip)\)$")   # adjective syntactic markers: able(p)


def wordnet_root(root=None) -> Path:
    r = Path(root if root is not None else os.environ.get("NEURALIGN_WORDNET", WORDNET_DEFAULT))
    if not all((r / f"data.{p}").is_file() for p in _POS_FILES.values()):
        raise DataError(f"WordNet data files (data.noun, data.verb, data.adj, data.adv) not found "
                        f"in {r}: {_INSTALL}")
    return r


def _lexnames(r: Path) -> tuple[str, ...]:
    f = r / "lexnames"
    if not f.is_file():
        return LEXNAMES
    rows = [ln.split() for ln in f.read_text().splitlines() if ln.strip()]
    try:
        table = {int(a[0]): a[1] for a in rows}
        return tuple(table[i] for i in range(len(table)))
    except (ValueError, IndexError, KeyError) as exc:
        raise DataError(f"{f} is not a WordNet lexnames file: {exc}") from exc


def _parse_line(line: str, names: tuple[str, ...]) -> Synset:
    head, _, gloss = line.partition(" | ")
    t = head.split()
    off, lex, pos, n = t[0], int(t[1]), t[2], int(t[3], 16)
    words = tuple(_MARKER.sub("", t[4 + 2 * i]).replace("_", " ") for i in range(n))
    i = 4 + 2 * n
    p_cnt = int(t[i])
    hyp = []
    for j in range(p_cnt):
        sym, tgt, tpos = t[i + 1 + 4 * j: i + 4 + 4 * j]
        if sym in ("@", "@i"):
            hyp.append(("a" if tpos == "s" else tpos) + tgt)
    key = ("a" if pos == "s" else pos) + off
    if pos not in _POS_INDEX or not 0 <= lex < len(names):
        raise ValueError(f"bad ss_type {pos!r} or lex_filenum {lex}")
    return Synset(key, pos, names[lex], words, gloss.strip(), tuple(hyp))


def load_synsets(root=None) -> dict[str, Synset]:
    """Every synset of the four ``data.*`` files by key (parsed once per process and root)."""
    r = wordnet_root(root)
    ck = str(r.resolve())
    if ck in _CACHE:
        return _CACHE[ck]
    names = _lexnames(r)
    out: dict[str, Synset] = {}
    for stem in _POS_FILES.values():
        path = r / f"data.{stem}"
        with open(path, encoding="utf-8", errors="replace") as fh:
            for k, line in enumerate(fh, 1):
                if line.startswith("  ") or not line.strip():
                    continue     # the licence header
                try:
                    s = _parse_line(line, names)
                except (ValueError, IndexError) as exc:
                    raise DataError(f"{path}:{k}: not a WordNet data line ({exc}); the file is "
                                    f"corrupt — reinstall wordnet-base") from None
                out[s.key] = s
    if len(out) < 1000:
        raise DataError(f"only {len(out)} synsets parsed from {r}: the files are truncated")
    _CACHE[ck] = out
    return out


# ----------------------------------------------------------------------------- splitting
def _split(n: int, seed: int, fractions) -> list[np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    a = round(n * fractions[0])
    b = a + round(n * fractions[1])
    return [perm[:a], perm[a:b], perm[b:]]


def _cap(idx: np.ndarray, m: int | None) -> np.ndarray:
    return idx if m is None else idx[:m]


def _check_sizes(**kw):
    for k, v in kw.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))
                              or v < 1):
            raise DataError(f"{k} must be a positive integer or None, got {v!r}")


def _make(texts, labels, names, name, data_seed, fractions, max_train, max_eval, meta=None
          ) -> TextSplits:
    _check_sizes(max_train=max_train, max_eval=max_eval)
    if len(fractions) != 2 or min(fractions) <= 0 or sum(fractions) >= 1:
        raise DataError(f"fractions (val, test) must be two positive numbers summing below 1, "
                        f"got {fractions!r}")
    texts, labels = list(texts), np.asarray(labels)
    va, te, tr = _split(len(texts), data_seed, fractions)
    ds = [TextDataset([texts[i] for i in ix], labels[ix])
          for ix in (_cap(tr, max_train), _cap(va, max_eval), _cap(te, max_eval))]
    return TextSplits(*ds, len(names), tuple(names), name, data_seed, meta=meta or {})


def definition(gloss: str) -> str:
    """A gloss without its quoted usage examples (``'able to swim'`` often names the word)."""
    cut = gloss.find('; "')
    d = gloss[:cut] if cut >= 0 else gloss
    return d.strip() if not d.startswith('"') else gloss.strip()


def _text(s: Synset, with_words: bool, examples: bool = True) -> str:
    g = s.gloss if examples else definition(s.gloss)
    return (", ".join(s.words) + ": " + g) if with_words else g


def load_wordnet_task(task: str, *, data_seed: int = 0, root=None, fractions=(0.1, 0.2),
                      max_train: int | None = None, max_eval: int | None = None,
                      with_words: bool = False, examples: bool = True, by: str = "lexname"
                      ) -> TextSplits:
    """One gloss-classification ``task`` of :data:`TASKS`. The synsets (sorted by key) are
    split into val / test / train by ``fractions`` (val, test) from ``data_seed``; ``max_train``
    and ``max_eval`` keep the first examples of that permutation. ``with_words`` prefixes the
    synset's words to its gloss (off by default: the words often name the class);
    ``examples=False`` keeps only the definition (:func:`definition`)."""
    if task not in TASKS:
        raise DataError(f"unknown WordNet task {task!r}; choose from {', '.join(TASKS)}")
    syn = sorted(load_synsets(root).values(), key=lambda s: s.key)
    if task in ("noun_supersense", "verb_supersense"):
        pre = "noun." if task == "noun_supersense" else "verb."
        names = [n for n in LEXNAMES if n.startswith(pre)]
        keep = [s for s in syn if s.lexname.startswith(pre)]
        labels = [names.index(s.lexname) for s in keep]
    elif task == "pos":
        names, keep = list(POS_NAMES), syn
        labels = [_POS_INDEX[s.pos] for s in keep]
    else:
        keep = [s for s in syn if s.pos in ("a", "s")]
        if by == "lexname":
            names = ["adj.all", "adj.pert", "adj.ppl"]
            labels = [names.index(s.lexname) for s in keep]
        elif by == "head":
            names = ["head", "satellite"]
            labels = [int(s.pos == "s") for s in keep]
        else:
            raise DataError(f"adj_class: by must be 'lexname' or 'head', got {by!r}")
    return _make([_text(s, with_words, examples) for s in keep], labels, names, f"wordnet_{task}",
                 data_seed, fractions, max_train, max_eval)


# ----------------------------------------------------------------------------- BREEDS
def _tree(syn: dict[str, Synset]):
    """The noun hypernym DAG reduced to a tree: every synset's parent is its first hypernym."""
    children: dict[str, list[str]] = {}
    roots = []
    for k in sorted(syn):
        s = syn[k]
        if s.pos != "n":
            continue
        par = next((h for h in s.hypernyms if h in syn), None)
        if par is None:
            roots.append(k)
        else:
            children.setdefault(par, []).append(k)
    return roots, children


def _subtree(k: str, children) -> list[str]:
    out, stack = [], [k]
    while stack:
        n = stack.pop()
        out.append(n)
        stack.extend(children.get(n, ()))
    return out


def wordnet_breeds(*, depth: int = 5, num_classes: int = 10, min_subtree: int = 20,
                   data_seed: int = 0, root=None, fractions=(0.1, 0.2),
                   max_train: int | None = None, max_eval: int | None = None,
                   with_words: bool = False, examples: bool = True) -> TextSplits:
    """BREEDS-style sub-population shift on the noun hypernym tree (first hypernym = parent).

    Classes are the ``num_classes`` largest nodes at ``depth`` (the root ``entity`` is depth 0)
    with at least two child sub-trees of ``min_subtree`` or more synsets; a class's examples are
    the glosses of its descendants (the class node itself excluded). Each class's child sub-trees
    are shuffled by ``data_seed`` and dealt, the big ones (``min_subtree`` or more synsets) first,
    each to the side with fewer synsets so far: *source* and *target* sub-trees, disjoint, each
    side with at least one big sub-tree (a class dominated by one sub-tree stays unbalanced).
    ``train``/``val``/``test`` come from the source sub-trees (``test`` is the ID test),
    ``ood_test`` from the target sub-trees. ``meta["source"]``/``meta["target"]`` list the
    sub-tree roots per class."""
    _check_sizes(depth=depth, num_classes=num_classes, min_subtree=min_subtree)
    syn = load_synsets(root)
    roots, children = _tree(syn)
    level = list(roots)
    for _ in range(depth):
        level = [c for n in level for c in children.get(n, ())]
    cands = []
    for n in level:
        subs = [_subtree(c, children) for c in children.get(n, ())]
        if sum(len(s) >= min_subtree for s in subs) >= 2:
            cands.append((-sum(map(len, subs)), n, subs))
    if len(cands) < num_classes:
        raise DataError(f"only {len(cands)} nodes at depth {depth} have two sub-trees of "
                        f">= {min_subtree} synsets; ask for fewer classes or another depth")
    cands = sorted(cands)[:num_classes]
    rng = np.random.default_rng(data_seed)
    src_txt, src_y, tgt_txt, tgt_y, meta_s, meta_t, names = [], [], [], [], [], [], []
    for ci, (_, node, subs) in enumerate(cands):
        order = rng.permutation(len(subs))
        big = [i for i in order if len(subs[i]) >= min_subtree]
        small = [i for i in order if len(subs[i]) < min_subtree]
        src, size = set(), [0, 0]
        for i in big + small:     # in random order, each sub-tree to the smaller side
            side = int(size[1] < size[0])
            size[side] += len(subs[i])
            if side == 0:
                src.add(i)
        meta_s.append([subs[i][0] for i in sorted(src)])
        meta_t.append([subs[i][0] for i in range(len(subs)) if i not in src])
        for i, sub in enumerate(subs):
            txt = [_text(syn[k], with_words, examples) for k in sub]
            (src_txt if i in src else tgt_txt).extend(txt)
            (src_y if i in src else tgt_y).extend([ci] * len(txt))
        names.append(syn[node].words[0])
    out = _make(src_txt, src_y, names, f"wordnet_breeds_d{depth}", data_seed, fractions,
                max_train, max_eval, meta={"classes": [c[1] for c in cands], "source": meta_s,
                                           "target": meta_t})
    perm = np.random.default_rng(data_seed + 1).permutation(len(tgt_txt))[
        : max_eval if max_eval is not None else None]
    out.ood_test = TextDataset([tgt_txt[i] for i in perm], np.asarray(tgt_y)[perm])
    return out


# ----------------------------------------------------------------------------- spurious token
def _tokens(n: int) -> list[str]:
    base = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
            "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo",
            "sierra", "tango", "uniform", "victor", "whiskey", "xray", "yankee", "zulu"]
    return base[:n] + [f"token{i}" for i in range(len(base), n)]


def spurious_tokens(splits: TextSplits, p: float = 0.9, *, seed: int | None = None
                    ) -> TextSplits:
    """A copy of ``splits`` whose texts start with a class-coded token: in ``train``, ``val``
    and the ID ``test`` the token is the label's with probability ``p`` and a uniformly random
    class's otherwise; in ``ood_test`` (a copy of ``test``, or of the existing ``ood_test``) it
    is uniformly random, independent of the label. Draws from ``seed`` (default the data seed)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise DataError(f"p must be a probability in [0, 1], got {p!r}")
    seed = splits.data_seed if seed is None else seed
    toks = _tokens(splits.num_classes)
    rng = np.random.default_rng([seed, 7])

    def mark(ds: TextDataset, prob: float) -> TextDataset:
        y = ds.labels.numpy()
        rand = rng.integers(0, splits.num_classes, len(y))
        t = np.where(rng.random(len(y)) < prob, y, rand)
        return TextDataset([f"{toks[k]} {x}" for k, x in zip(t, ds.texts)], y)

    ood_src = splits.ood_test if splits.ood_test is not None else splits.test
    meta = dict(splits.meta, spurious_p=float(p), spurious_tokens=toks)
    return replace(splits, train=mark(splits.train, p), val=mark(splits.val, p),
                   test=mark(splits.test, p), ood_test=mark(ood_src, 0.0),
                   name=f"{splits.name}_spurious{p:g}", meta=meta)


def load_wordnet(name: str, *, data_seed: int = 0, root=None, **kw) -> TextSplits:
    """By name: a task of :data:`TASKS`, ``breeds`` (:func:`wordnet_breeds`), or either with a
    ``_spurious`` suffix (``p=`` for :func:`spurious_tokens`)."""
    key = name.removeprefix("wordnet_").removeprefix("wordnet-").replace("-", "_")
    spur = key.endswith("_spurious")
    key = key.removesuffix("_spurious")
    p = kw.pop("p", 0.9)
    if key == "breeds":
        out = wordnet_breeds(data_seed=data_seed, root=root, **kw)
    elif key not in TASKS:
        raise DataError(f"unknown WordNet task {name!r}; choose from wordnet_"
                        + ", wordnet_".join((*TASKS, "breeds")) + " (+ '_spurious')")
    else:
        out = load_wordnet_task(key, data_seed=data_seed, root=root, **kw)
    return spurious_tokens(out, p) if spur else out
