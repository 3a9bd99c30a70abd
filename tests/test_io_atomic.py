"""A save is all or nothing: an interrupt at any point leaves the old file intact or the new one
complete, and never a temp file."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from neuralign.errors import CheckpointError
from neuralign.io import atomic, load_model, save_model
from neuralign.models import get_model


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def old_and_new(tmp_path):
    old = get_model("mlp", width=64, depth=2, seed=0)
    new = get_model("mlp", width=64, depth=2, seed=1)
    path = save_model(old, tmp_path / "m.safetensors", metadata={"which": "old"})
    return old, new, path


STEPS = ["temp_path_for", "write", "chmod", "_fsync_file", "replace", "_fsync_dir"]


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
def test_interrupt_at_each_step(old_and_new, monkeypatch, step, exc):
    _, new, path = old_and_new
    before = path.read_bytes()
    import safetensors.torch

    def boom(real):
        def f(*a, **k):
            if step in ("write", "replace"):  # half done, then interrupted
                real(*a, **k)
            raise exc("interrupted")
        return f

    if step == "write":
        monkeypatch.setattr(safetensors.torch, "save_file", boom(safetensors.torch.save_file))
    elif step in ("chmod", "replace"):
        monkeypatch.setattr(atomic.os, step, boom(getattr(os, step)))
    else:
        monkeypatch.setattr(atomic, step, boom(getattr(atomic, step)))
    with pytest.raises(CheckpointError if exc is OSError else exc):
        save_model(new, path, metadata={"which": "new"})
    monkeypatch.undo()
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.safetensors"]
    if step in ("replace", "_fsync_dir"):  # the rename happened: the new file is complete
        assert _same(load_model(path), new)
    else:
        assert path.read_bytes() == before


def test_sigint_during_rename_is_delivered_after_it(old_and_new, monkeypatch):
    """Ctrl-C that lands while the rename runs waits for it, then interrupts."""
    _, new, path = old_and_new
    real = os.replace

    def replace_with_signal(src, dst):
        os.kill(os.getpid(), signal.SIGINT)
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace_with_signal)
    with pytest.raises(KeyboardInterrupt):
        save_model(new, path)
    monkeypatch.undo()
    assert _same(load_model(path), new)
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.safetensors"]


CHILD = textwrap.dedent("""
    import sys
    from neuralign.io import save_model
    from neuralign.models import get_model
    path = sys.argv[1]
    models = [get_model("mlp", width=512, depth=4, seed=s) for s in (0, 1)]
    save_model(models[0], path)
    print("ready", flush=True)
    i = 1
    while True:
        save_model(models[i % 2], path)
        i += 1
""")


def test_real_sigint_at_random_moments(tmp_path):
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    ref = [get_model("mlp", width=512, depth=4, seed=s) for s in (0, 1)]
    for trial, delay in enumerate((0.0, 0.013, 0.031, 0.057, 0.11, 0.2)):
        path = tmp_path / f"m{trial}.safetensors"
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode != 0 and "KeyboardInterrupt" in err
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
        loaded = load_model(path)
        assert _same(loaded, ref[0]) or _same(loaded, ref[1])
