"""End-to-end tests of Flower's engines: a SuperLink and two SuperNodes as separate processes on
127.0.0.1, two rounds of FedPFN submitted with ``flwr run``; a fault run (three SuperNodes with
their own data, one killed, the server killed and the run resumed); the simulation engine. Every
process (and the SuperExec / ServerApp / ClientApp processes they spawn) is torn down."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'neuralign[fl]')")
psutil = pytest.importorskip("psutil", reason="psutil is needed to tear the process tree down")

BIN = Path(sys.executable).parent
SRC = Path(__file__).resolve().parents[1] / "src"
DEADLINE_S = 600  # the whole federation, bounded (it took 7 min on a 2-core machine at load 17)

RUN_CONFIG = {
    "strategy": "fedpfn", "num-rounds": 2, "anchor-ratio": 0.4, "task.dataset": "digits",
    "task.num-partitions": 2, "task.alpha": 1.0, "task.model": "mlp",
    "task.model-kwargs": '{"width": 32, "depth": 1}', "task.lr": 0.1,
}


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait_port(port, proc, deadline):
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.5)
    return False


def _teardown(procs):
    tree = []
    for p in procs:
        try:
            tree += [psutil.Process(p.pid)] + psutil.Process(p.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for p in tree:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass
    return [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


class _Deployment:
    """Flower processes on loopback: ``flwr`` finds the local SuperLink at ``link_port`` through
    ``home``; every process logs to ``tmp_path/<name>.log``; all are torn down on exit (what
    survives the teardown is kept in ``survivors``)."""

    def __init__(self, tmp_path, home, link_port, deadline):
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = '
            f'"127.0.0.1:{link_port}"\ninsecure = true\n')
        self.env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                        PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                        FLWR_HOME=str(home), OMP_NUM_THREADS="1")
        self.tmp, self.port, self.deadline = tmp_path, link_port, deadline
        self.procs, self.logs, self.survivors = [], [], None

    def start(self, name, args):
        log = open(self.tmp / f"{name}.log", "a")  # noqa: SIM115 - closed in __exit__
        self.logs.append(log)
        self.procs.append(subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=log,
                                           stderr=subprocess.STDOUT, env=self.env, cwd=self.tmp))
        return self.procs[-1]

    def start_link(self, tag="", *extra):
        link = self.start(f"superlink{tag}", ["flower-superlink", "--insecure",
                                              "--disable-runtime-dependency-installation",
                                              *extra, "--host", "127.0.0.1",
                                              "--port", str(self.port)])
        assert _wait_port(self.port, link, self.deadline), \
            (self.tmp / f"superlink{tag}.log").read_text()[-2000:]
        return link

    def start_node(self, i, port, node_config):
        return self.start(f"supernode{i}", ["flower-supernode", "--insecure", "--superlink",
                                            f"127.0.0.1:{self.port}", "--host", "127.0.0.1",
                                            "--port", str(port), "--node-config", node_config])

    def flwr_run(self, app, *extra):
        run = subprocess.run([str(BIN / "flwr"), "run", str(app), "local", *extra],
                             env=self.env, check=False, capture_output=True, text=True,
                             timeout=120, cwd=self.tmp)
        assert "Successfully started run" in run.stdout, run.stdout + run.stderr

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.survivors = _teardown(self.procs)
        for log in self.logs:
            log.close()
        return False


@pytest.mark.slow
@pytest.mark.skipif(not (BIN / "flower-superlink").exists() or not (BIN / "flwr").exists(),
                    reason="Flower's flower-superlink / flwr executables are not installed")
def test_superlink_and_two_supernodes_run_fedpfn(tmp_path):
    app, home, out = tmp_path / "app", tmp_path / "home", tmp_path / "result.json"
    from neuralign.federated.deploy import write_flower_app

    home.mkdir()
    write_flower_app(app, dict(RUN_CONFIG, **{"task.output": str(out)}), name="neuralign-fl-test")
    link_port, n0, n1 = _free_ports(3)
    with _Deployment(tmp_path, home, link_port, time.time() + DEADLINE_S) as d:
        link = d.start_link()
        for i, port in enumerate([n0, n1]):
            d.start_node(i, port, f"partition-id={i} num-partitions=2")
        d.flwr_run(app)
        while not out.exists() and time.time() < d.deadline:
            assert link.poll() is None, "the SuperLink died"
            time.sleep(1)
        assert out.exists(), f"no result within {DEADLINE_S}s; superlink log: " + \
            (tmp_path / "superlink.log").read_text()[-2000:]
        hist = json.loads(out.read_text())
    assert d.survivors == [], f"processes left running: {d.survivors}"
    assert hist["finished"] and hist["strategy"] == "fedpfn" and hist["round"] == [0, 1, 2]
    assert hist["participants"] == {"1": 2, "2": 2} and hist["failures"] == {}
    assert hist["accuracy"][-1] > hist["accuracy"][0] + 0.2, hist["accuracy"]
    shutil.rmtree(home / "apps", ignore_errors=True)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("NEURALIGN_RAY_TESTS") != "1",
                    reason="starts a Ray cluster (minutes on 2 cores); set NEURALIGN_RAY_TESTS=1")
def test_simulation_engine_runs_the_same_apps():
    pytest.importorskip("ray", reason="Flower's simulation engine needs ray")
    from neuralign.federated import FedTask, run_federated

    task = FedTask(dataset="digits", num_partitions=2, alpha=1.0, model="mlp",
                   model_kwargs='{"width": 32, "depth": 1}', lr=0.1)
    hist = run_federated(task, "fedpfn", 2, engine="simulation")
    assert hist["finished"] and hist["participants"] == {"1": 2, "2": 2}
    assert hist["accuracy"][-1] > hist["accuracy"][0] + 0.3


def _kill_tree(proc) -> None:
    """Kill ``proc`` and every process it spawned, at once (as a crash or a pulled plug)."""
    try:
        root = psutil.Process(proc.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=15)
    proc.wait(timeout=5)


def _history(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _wait_for(cond, deadline, procs_alive=(), what=""):
    while time.time() < deadline:
        for p in procs_alive:
            assert p.poll() is None, f"a process died while waiting for {what}"
        value = cond()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
@pytest.mark.skipif(not (BIN / "flower-superlink").exists() or not (BIN / "flwr").exists(),
                    reason="Flower's flower-superlink / flwr executables are not installed")
@pytest.mark.skipif(os.environ.get("NEURALIGN_DEPLOY_FAULT_TESTS") != "1",
                    reason="3-6 minutes on 2 cores (its fast in-process twins are in "
                    "test_federated_faults.py); set NEURALIGN_DEPLOY_FAULT_TESTS=1")
def test_lost_supernode_and_killed_server_resume_on_the_deployment_engine(tmp_path):
    """SuperLink + 3 SuperNodes on loopback, each node reading its own data file. SuperNode 2
    is killed after round 1: the run goes on with the other two and reports the loss. The
    SuperLink (with the ServerApp) is killed after round 2 and restarted; ``flwr run ... -c
    'resume=true'`` continues from the last checkpoint with nothing lost."""
    from neuralign.federated import FedTask
    from neuralign.federated.deploy import write_flower_app
    from neuralign.federated.node_data import write_node_data
    from neuralign.federated.runner import build_run_config

    app, home, out, ck = (tmp_path / "app", tmp_path / "home", tmp_path / "result.json",
                          tmp_path / "ck")
    home.mkdir()
    task = FedTask(dataset="digits", num_partitions=3, alpha=1.0, model="mlp",
                   model_kwargs='{"width": 32, "depth": 1}', lr=0.1, client_data="node",
                   output=str(out))
    files = write_node_data(task, tmp_path / "data")
    write_flower_app(app, build_run_config(task, "fedavg", 4, round_timeout=240.0,
                                           node_timeout=30.0, checkpoint_dir=str(ck)),
                     name="neuralign-fl-faults")
    link_port, *node_ports = _free_ports(4)
    db = ("--database", str(tmp_path / "superlink.db"))  # a restarted SuperLink knows its nodes
    with _Deployment(tmp_path, home, link_port, time.time() + 2 * DEADLINE_S) as d:
        link = d.start_link("", *db)
        nodes = [d.start_node(i, port, f'data-path="{f}" partition-id={i}')
                 for i, (f, port) in enumerate(zip(files, node_ports))]
        _wait_for(lambda: (tmp_path / "superlink.log").read_text().count("Activated node_id")
                  >= 3, d.deadline, [link, *nodes], "the three SuperNodes to connect")
        d.flwr_run(app)
        _wait_for(lambda: (_history(ck / "history.json") or {}).get("round", [0])[-1] >= 1,
                  d.deadline, [link], "round 1")
        _kill_tree(nodes[2])  # a node lost after round 1
        _wait_for(lambda: (h := _history(ck / "history.json")) and h["round"][-1] >= 2 and h,
                  d.deadline, [link], "round 2")
        _kill_tree(link)  # the server machine goes down (SuperLink and ServerApp)
        assert not out.exists()
        before = _history(ck / "history.json")  # the last checkpoint written

        def reconnects():
            return [(tmp_path / f"supernode{i}.log").read_text().count("Connection successful")
                    for i in (0, 1)]

        was = reconnects()
        link = d.start_link("-restarted", *db)
        _wait_for(lambda: all(n > w for n, w in zip(reconnects(), was)), d.deadline,
                  [link, *nodes[:2]], "the two SuperNodes to reconnect")
        d.flwr_run(app, "--run-config", "resume=true")
        _wait_for(out.exists, d.deadline, [link], "the resumed run's result")
        hist = json.loads(out.read_text())
    assert d.survivors == [], f"processes left running: {d.survivors}"
    k = before["round"][-1]
    assert hist["finished"] and hist["round"] == [0, 1, 2, 3, 4]
    assert hist["resumed_at"] == [k]
    assert hist["accuracy"][:k + 1] == before["accuracy"]  # nothing lost
    assert hist["participants"]["1"] == 3
    assert all(hist["participants"][str(r)] == 2 for r in range(2, 5)), hist["participants"]
    lost = [n for r in range(2, 5) for n in hist["failures"].get(str(r), [])]
    assert any("Unavailable" in n or "no reply" in n or "online" in n for n in lost), lost
    assert hist["accuracy"][-1] > hist["accuracy"][0] + 0.2, hist["accuracy"]
    shutil.rmtree(home / "apps", ignore_errors=True)
