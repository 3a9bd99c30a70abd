"""The fast paths of the training / evaluation loops keep their meaning: same batches in the
same order as the DataLoader, same training result, inference mode, progress off a terminal."""

import re

import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from neuralign.models import get_model
from neuralign.progress import Progress
from neuralign.train import evaluate, iter_batches, train

X = torch.randn(103, 1, 8, 8, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 10, (103,), generator=torch.Generator().manual_seed(1))


class SlowTensors(TensorDataset):
    """A TensorDataset subclass: the loops must read it through the DataLoader (old path)."""

    calls = 0

    def __getitem__(self, i):
        SlowTensors.calls += 1
        return super().__getitem__(i)


def _loader(ds, seed=3, **kw):
    return DataLoader(ds, batch_size=16, generator=torch.Generator().manual_seed(seed), **kw)


def _epochs(loader, read, n=3):
    return [[[t.clone() for t in b] for b in read(loader)] for _ in range(n)]


@pytest.mark.parametrize("kw", [{"shuffle": True}, {"shuffle": False},
                                {"shuffle": True, "drop_last": True},
                                {"shuffle": False, "drop_last": True}])
@pytest.mark.parametrize("subset", [False, True])
def test_fast_batches_are_the_dataloaders_batches(kw, subset, monkeypatch):
    ds = TensorDataset(X, Y)
    if subset:
        ds = Subset(ds, list(range(100, 2, -3)))
    calls = []
    monkeypatch.setattr(TensorDataset, "__getitem__",
                        lambda self, i: calls.append(i) or tuple(t[i] for t in self.tensors))
    fast = _epochs(_loader(ds, **kw), iter_batches)
    assert not calls  # sliced, not read example by example
    slow = _epochs(_loader(ds, **kw), iter)  # the DataLoader itself, same seed
    assert calls
    # same examples, same order, epoch after epoch (the generator advances identically)
    assert len(fast) == len(slow) and all(len(f) == len(s) for f, s in zip(fast, slow))
    for f_epoch, s_epoch in zip(fast, slow):
        for fb, sb in zip(f_epoch, s_epoch):
            assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(fb, sb))
            assert all(a.is_contiguous() for a in fb)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(fast[0], fast[1])) or not kw["shuffle"]


def test_fast_batches_in_order_are_copies_not_views_of_the_data():
    """An in-order loader is read by slicing; a model that writes into its input batch must
    not change the data set (the DataLoader's collate copies too)."""
    xs = X.contiguous(memory_format=torch.channels_last) if X.dim() == 4 else X.clone()
    ds, keep = TensorDataset(xs, Y), xs.clone()
    for xb, _ in iter_batches(_loader(ds)):
        assert xb.is_contiguous() and xb.untyped_storage().data_ptr() != \
            xs.untyped_storage().data_ptr()
        xb.zero_()
    assert torch.equal(xs, keep)


def test_fast_batches_fall_back_for_other_loaders():
    SlowTensors.calls = 0
    loader = _loader(SlowTensors(X, Y), shuffle=True)
    assert sum(len(b[1]) for b in iter_batches(loader)) == len(Y) and SlowTensors.calls == len(Y)
    plain = [(X[:5], Y[:5])]
    assert list(iter_batches(plain)) == plain
    custom = DataLoader(TensorDataset(X, Y), batch_size=8, collate_fn=lambda b: len(b))
    assert list(iter_batches(custom)) == list(custom)


def test_training_on_the_fast_path_equals_training_through_the_dataloader():
    results = []
    for ds in (TensorDataset(X, Y), SlowTensors(X, Y)):
        torch.manual_seed(0)
        m = get_model("mlp", num_classes=10, in_channels=1, image_size=8, width=32, depth=2)
        hist = train(m, _loader(ds, shuffle=True), epochs=2, lr=0.1, progress=False,
                     device="cpu")
        results.append((hist.epochs, m.state_dict()))
    (h_fast, w_fast), (h_slow, w_slow) = results
    for ef, es in zip(h_fast, h_slow, strict=True):
        assert ef == pytest.approx(es, rel=1e-6)
    for k in w_fast:
        torch.testing.assert_close(w_fast[k], w_slow[k], rtol=1e-6, atol=1e-7)


def test_evaluation_runs_in_inference_mode_and_accepts_a_device():
    m = get_model("mlp", num_classes=10, in_channels=1, image_size=8, width=16, depth=1)
    modes = []
    m.register_forward_hook(lambda *_: modes.append(torch.is_inference_mode_enabled()))
    res = evaluate(m, _loader(TensorDataset(X, Y)), device="cpu")
    assert modes and all(modes) and res["n"] == len(Y)


def test_progress_off_a_terminal_prints_plain_lines(capsys):
    m = get_model("mlp", num_classes=10, in_channels=1, image_size=8, width=16, depth=1)
    train(m, (X, Y), epochs=2, lr=0.05, batch_size=32)  # pytest's stderr is not a terminal
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2
    for e, line in enumerate(err, start=1):
        assert re.match(rf"train: epoch {e}/2, train_loss \d+\.\d+, train_accuracy [\d.]+, "
                        rf"step {4 * e}/8, \d+ img/s, \d+ s$", line), line
    train(m, (X, Y), epochs=2, lr=0.05, batch_size=32, progress=False)
    evaluate(m, (X, Y))  # short: silent by default
    assert capsys.readouterr().err == ""


def test_progress_reports_at_most_every_interval(capsys):
    with Progress("evaluate", 10, True, every=0.0) as prog:
        due = [prog.advance(4) for _ in range(3)]
        prog.report("loss 1.0")
    with Progress("evaluate", 10, True, every=3600.0) as prog:
        late = [prog.advance(4) for _ in range(3)]
    with Progress("evaluate", 10, False, every=0.0) as prog:
        off = [prog.advance(4) for _ in range(3)]
    assert all(due) and not any(late) and not any(off)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [lines[0]] and lines[0].startswith("evaluate: loss 1.0, step 3/10, ")


def test_parallel_units_are_cached_and_resumed(tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from _parallel import run_units

    monkeypatch.setenv("NEURALIGN_CACHE", str(tmp_path))
    calls = []

    def fn(u):
        calls.append(u)
        return {"double": 2 * u["seed"]}

    units = [{"seed": s} for s in range(3)]
    assert run_units(fn, units, name="t", workers=1, log=lambda *_: None) == [
        {"double": 0}, {"double": 2}, {"double": 4}]
    assert len(list((tmp_path / "benchmarks" / "t").glob("*.json"))) == 3
    # a rerun reads every unit from the cache; a new unit alone is computed
    calls.clear()
    out = run_units(fn, [*units, {"seed": 5}], name="t", workers=1, log=lambda *_: None)
    assert out[-1] == {"double": 10} and calls == [{"seed": 5}]
    # worker processes (spawned, one thread each) give the same results in unit order
    out = run_units(dict, units, name="t2", workers=2, log=lambda *_: None)
    assert out == units


def test_compile_flag_trains_through_torch_compile(monkeypatch):
    compiled = []

    def fake_compile(model):  # the wiring, without minutes of compiling in a unit test
        compiled.append(model)
        return lambda x: model(x)

    monkeypatch.setattr(torch, "compile", fake_compile)
    m = get_model("mlp", num_classes=10, in_channels=1, image_size=8, width=16, depth=1)
    train(m, (X, Y), epochs=1, batch_size=32, progress=False, compile=True)
    assert compiled == [m]
    train(m, (X, Y), epochs=1, batch_size=32, progress=False)
    assert compiled == [m]


def test_channels_last_batches_hold_the_same_values():
    from neuralign.evaluation import to_device

    for x in (torch.randn(4, 1, 5, 6), torch.randn(4, 3, 5, 6)):
        cl = to_device(x, torch.device("cpu"), channels_last=True)
        assert torch.equal(cl, x) and cl.is_contiguous(memory_format=torch.channels_last)
        assert cl.stride()[1] == 1
    x2 = torch.randn(4, 10)
    assert to_device(x2, torch.device("cpu"), channels_last=True) is x2
