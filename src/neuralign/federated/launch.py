"""Flower's simulation engine through Flower's public command line, not ``run_simulation``.

flwr 1.42 deprecates ``flwr.simulation.run_simulation`` in favour of ``flwr run`` against a
SuperLink in simulation mode. :func:`run_on_simulation_engine` does exactly that, on loopback and
in a temporary folder: it writes the run as a Flower App, starts ``flower-superlink --simulation``
(its own process group), submits the app with ``flwr run --federation-config
num-supernodes=N``, follows the per-round history the ServerApp writes (calling
:data:`neuralign.federated.server.ROUND_HOOKS`, so the CLI prints every round), and stops the
SuperLink when the ServerApp has written its result.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from neuralign.errors import NeuralignError


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    import shutil

    found = shutil.which(name)
    if found is None:
        raise NeuralignError(f"Flower's {name!r} executable is not installed; "
                             "pip install 'neuralign[fl]'")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc, deadline: float) -> bool:
    while time.time() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.3)
    return False


def _stop(proc, grace: float = 20.0) -> None:
    """SIGTERM the SuperLink's process group (it and what it started), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_on_simulation_engine(cfg: dict, num_supernodes: int, *, timeout: float = 24 * 3600,
                             verbose: bool = False) -> dict:
    """Run the run config ``cfg`` on Flower's simulation engine with ``num_supernodes``
    virtual SuperNodes; returns the ServerApp's history."""
    from neuralign.federated.deploy import write_flower_app
    from neuralign.federated.server import ROUND_HOOKS

    with tempfile.TemporaryDirectory(prefix="neuralign-sim-") as tmp:
        tmp = Path(tmp)
        out = tmp / "history.json"
        ck = Path(str(cfg.get("checkpoint-dir", "")) or tmp / "ck")
        run_cfg = dict(cfg, **{"task.output": str(out), "checkpoint-dir": str(ck)})
        write_flower_app(tmp / "app", run_cfg, name="neuralign-fl-sim")
        port = _free_port()
        home = tmp / "home"
        home.mkdir()
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{port}"\n'
            "insecure = true\n")
        bindir = str(Path(_bin("flower-superlink")).parent)  # it starts flower-superexec
        env = dict(os.environ, FLWR_HOME=str(home),
                   PATH=os.pathsep.join([bindir, os.environ.get("PATH", "")]),
                   PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        log = open(tmp / "superlink.log", "w")  # noqa: SIM115 - closed below
        link = subprocess.Popen(
            [_bin("flower-superlink"), "--insecure", "--simulation",
             "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port",
             str(port)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp,
            start_new_session=True)
        deadline = time.time() + timeout
        try:
            if not _wait_port(port, link, time.time() + 120):
                raise NeuralignError("Flower's simulation SuperLink did not start: "
                                     + _tail(tmp / "superlink.log"))
            run = subprocess.run(
                [_bin("flwr"), "run", str(tmp / "app"), "sim", "--federation-config",
                 f"num-supernodes={int(num_supernodes)}"], env=env, cwd=tmp, check=False,
                capture_output=True, text=True, timeout=300)
            if "Successfully started run" not in run.stdout:
                raise NeuralignError("flwr run did not start the simulation: "
                                     + (run.stdout + run.stderr).strip()[-300:])
            run_id = run.stdout.split("Successfully started run", 1)[1].split()[0]
            seen, next_check = 0, time.time() + 5
            while not out.exists():
                if link.poll() is not None or time.time() > deadline:
                    raise NeuralignError("the Flower simulation ended without a result: "
                                         + _tail(tmp / "superlink.log"))
                if time.time() > next_check:  # a run that failed never writes its result
                    next_check = time.time() + 5
                    status = _run_status(run_id, env, tmp)
                    if status.startswith("finished") and not out.exists():
                        time.sleep(1)
                        if not out.exists():
                            raise NeuralignError(f"the Flower simulation run {status} without "
                                                 "a result; rerun with --verbose for its log")
                hist = _read(ck / "history.json") or {}
                for i in range(seen, len(hist.get("round", []))):
                    for hook in tuple(ROUND_HOOKS):
                        hook(hist["round"][i], {"accuracy": hist["accuracy"][i],
                                                "loss": hist["loss"][i]})
                    seen = i + 1
                time.sleep(0.5)
            result = _read(out)
        finally:
            _stop(link)
            log.close()
            if verbose:
                sys.stderr.write(_tail(tmp / "superlink.log", 20_000) + "\n")
    if not result:
        raise NeuralignError("the Flower simulation wrote no readable result")
    if not result.get("finished", False):
        raise NeuralignError("every round failed on the simulation engine; see its log "
                             "(--verbose)")
    return result


def _run_status(run_id: str, env: dict, cwd: Path) -> str:
    """``flwr ls``'s status of the run (``running``, ``finished:failed`` ...), or ''."""
    try:
        res = subprocess.run([_bin("flwr"), "ls", "sim", "--run-id", run_id, "--format",
                              "json"], env=env, cwd=cwd, check=False, capture_output=True,
                             text=True, timeout=60)
        runs = json.loads(res.stdout).get("runs", [])
    except (subprocess.TimeoutExpired, ValueError, OSError):
        return ""
    return str(runs[0].get("status", "")) if runs else ""


def _tail(path: Path, n: int = 600) -> str:
    try:
        return path.read_text()[-n:].strip()
    except OSError:
        return "(no log)"
