"""The ``neuralign`` command as a real process: exit codes, one-line errors, no torch import on a
failing start-up, and Ctrl-C leaving no output behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _run(*args, cwd=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "neuralign", *map(str, args)], cwd=cwd,
                          env=ENV, capture_output=True, text=True, timeout=timeout,
                          check=False)


def test_failing_start_up_imports_no_torch(tmp_path):
    """A typo costs the start-up of typer, not of torch/sklearn/matplotlib/flwr."""
    (tmp_path / "a.pt").write_bytes(b"\x80\x04" + b"\0" * 32)
    probe = (
        "import sys\n"
        "from neuralign.cli import app\n"
        "rc = app(sys.argv[1:], standalone_mode=False)\n"
        "heavy = [m for m in ('torch', 'sklearn', 'matplotlib', 'flwr', 'numpy')"
        " if m in sys.modules]\n"
        "print('RC', rc, 'HEAVY', ','.join(heavy))\n"
    )
    for args in (["eval", "missing.safetensors"], ["--help"],
                 ["merge", "a.pt", "a.pt", "--out", "m.safetensors"],
                 ["barrier", "a.pt", "a.pt", "--points", "0"]):
        p = subprocess.run([sys.executable, "-c", probe, *args], cwd=tmp_path, env=ENV,
                           capture_output=True, text=True, timeout=60, check=False)
        last = p.stdout.strip().splitlines()[-1]
        assert last.startswith("RC") and last.endswith("HEAVY"), (args, p.stdout, p.stderr)


def test_exit_codes_and_one_line(tmp_path):
    p = _run("eval", tmp_path / "missing.safetensors")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    p = _run("barrier", "x", "y", "--points", "abc")  # a usage error is one line too
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    p = _run("no-such-command")
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    p = _run("--help")
    assert p.returncode == 0 and "align" in p.stdout


def test_ctrl_c_leaves_no_output(tmp_path):
    out = tmp_path / "m.safetensors"
    proc = subprocess.Popen([sys.executable, "-m", "neuralign", "train", "--epochs", "100000",
                             "-m", "width=64", "--out", str(out)], cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a background job inherits an ignored SIGINT: restore it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(4)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "interrupted" in lines[0] and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no output, no temp file
