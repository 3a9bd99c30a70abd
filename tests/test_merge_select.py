"""TIES' exact top-k selection (neuralign.merge._select) and the parallel out-of-core writer:
the selection is torch.topk's set with ties at the threshold broken by lowest index, and the
number of worker threads never changes a merged checkpoint."""

from __future__ import annotations

import pytest
import torch

from neuralign.errors import CheckpointError
from neuralign.merge import _parallel, _select
from neuralign.merge._select import topk_mask
from neuralign.merge.sharded import ShardedCheckpoint, all_finite, merge_checkpoints, save_sharded
from neuralign.merge.task_vectors import check_task_options, merge_tensor, trim

torch.set_num_threads(1)


def stable_reference(mag: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.zeros(mag.numel(), dtype=torch.bool)
    keep[torch.sort(mag, descending=True, stable=True).indices[:k]] = True
    return keep


@pytest.mark.parametrize("n", [100, 40_000, 300_000])
def test_topk_mask_is_topk_set_without_ties(n):
    g = torch.Generator().manual_seed(n)
    mag = torch.randperm(n, generator=g).float() * 1e-3
    assert mag.unique().numel() == n  # no ties: torch.topk's set is the only answer
    for k in (1, int(0.2 * n), n // 2, n - 1, n):
        ref = torch.zeros(n, dtype=torch.bool)
        ref[torch.topk(mag, k, sorted=False).indices] = True
        assert torch.equal(topk_mask(mag, k), ref), k


@pytest.mark.parametrize("n", [1000, 200_000])
def test_topk_mask_ties_keep_the_lowest_indices(n):
    # bf16 deltas as in real checkpoints: many equal magnitudes at every threshold
    g = torch.Generator().manual_seed(3)
    base = (torch.randn(n, generator=g) * 0.02).bfloat16()
    ft = (base.float() + 0.002 * torch.randn(n, generator=g)).bfloat16()
    mag = (ft.float() - base.float()).abs()
    cut = 0
    for density in (0.1, 0.2, 0.3, 0.5, 0.9):
        k = max(1, int(density * n))
        got = topk_mask(mag, k)
        t = mag[got].min()
        cut += int((mag == t).sum()) > int((mag[got] == t).sum())  # a tie is cut at t
        assert int(got.sum()) == k
        top = torch.topk(mag, k, sorted=False).values
        assert torch.equal(mag[got].sort().values, top.sort().values)  # same magnitudes
        assert torch.equal(got, stable_reference(mag, k))  # ties: lowest flat indices
    assert cut >= 3


def test_topk_mask_unlucky_sample_falls_back_exactly(monkeypatch):
    n = 1 << 17
    step = _select.sample_step(n)
    mag = torch.rand(n, generator=torch.Generator().manual_seed(0)) * 0.5
    mag[::step] += 10.0  # every sampled entry is an outlier: the bracket misses the threshold
    whole = []
    real = _select._threshold_mask
    monkeypatch.setattr(_select, "_threshold_mask",
                        lambda m, k: whole.append(m.numel()) or real(m, k))
    k = int(0.2 * n)
    assert torch.equal(topk_mask(mag, k), stable_reference(mag, k))
    assert whole == [n]


def test_trim_and_ties_kernel_equal_a_stable_sort_reference():
    g = torch.Generator().manual_seed(5)
    shape = (300, 256)
    base = (torch.randn(shape, generator=g) * 0.02).bfloat16()
    xs = [(base.float() + 0.002 * torch.randn(shape, generator=g)).bfloat16() for _ in range(3)]
    weights, density, scale = [1.0, 0.5, 2.0], 0.2, 0.8
    deltas = []
    for x in xs:
        d = (x.float() - base.float()).reshape(-1)
        k = max(1, int(density * d.numel()))
        deltas.append(d * stable_reference(d.abs(), k))
        assert torch.equal(trim(d, density), deltas[-1])
    weighted = torch.stack(deltas) * torch.tensor(weights).reshape(-1, 1)
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = weighted.sign() == elected
    den = (torch.tensor(weights).reshape(-1, 1) * agree).sum(0)
    mean = (weighted * agree).sum(0) / torch.where(den == 0, torch.ones_like(den), den)
    ref = (base.float().reshape(-1) + scale * mean).bfloat16().reshape(shape)
    opts = check_task_options("ties", 3, density=density, weights=weights, scale=scale)
    for chunk in (1 << 20, 1000):
        assert torch.equal(merge_tensor("w", base, xs, chunk=chunk, **opts), ref)


def test_all_finite_finds_a_nan_in_a_later_chunk():
    x = torch.zeros(1000, dtype=torch.bfloat16)
    assert all_finite(x, chunk=64)
    x[999] = float("nan")
    assert not all_finite(x, chunk=64)
    x[999] = float("-inf")
    assert not all_finite(x, chunk=64)


def _checkpoints(root):
    g = torch.Generator().manual_seed(0)
    shapes = {f"layers.{i}.{n}": s for i in range(4)
              for n, s in (("w", (64, 48)), ("b", (64,)), ("u", (96, 64)))}
    base = {k: torch.randn(s, generator=g).bfloat16() for k, s in shapes.items()}
    fts = [{k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)).bfloat16()
            for k, v in base.items()} for _ in range(2)]
    return [save_sharded(sd, root / name, max_shard_bytes=20_000)
            for sd, name in zip([base, *fts], ["base", "ft1", "ft2"])]


def read_all(path):
    ck = ShardedCheckpoint.open(path)
    return {k: ck.get(k) for k in ck.weight_map}


@pytest.mark.parametrize("method,opts", [("linear", {}), ("ties", {"density": 0.3})])
def test_workers_do_not_change_the_result(tmp_path, method, opts):
    paths = _checkpoints(tmp_path)
    base = None if method == "linear" else paths[0]
    outs = [read_all(merge_checkpoints(paths[1:], tmp_path / f"o{w}", method, base=base,
                                       workers=w, **opts)) for w in (1, 3)]
    assert outs[0].keys() == outs[1].keys() and len(outs[0]) == 12
    for k in outs[0]:
        assert torch.equal(outs[0][k].view(torch.int16), outs[1][k].view(torch.int16)), k


def test_worker_failure_leaves_nothing(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    paths = _checkpoints(root)
    ck = ShardedCheckpoint.open(paths[2])
    bad = read_all(paths[2])
    last = list(ck.weight_map)[-1]
    bad[last][0, 0] = float("nan")
    badpath = save_sharded(bad, root / "bad", max_shard_bytes=20_000)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="NaN"):
        merge_checkpoints([paths[1], badpath], out, "ties", base=paths[0], density=0.3,
                          workers=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
    with pytest.raises(Exception, match="workers"):
        merge_checkpoints(paths[1:], out, workers=0)


def test_merge_package_exports_resolve_lazily():
    import os
    import subprocess
    import sys
    from pathlib import Path

    import neuralign.merge as m

    assert sorted(m.__all__) == sorted(m._WHERE)
    assert all(getattr(m, n) is not None for n in m.__all__)
    with pytest.raises(AttributeError):
        m.no_such_name  # noqa: B018
    # the out-of-core merge does not import optimal transport (POT, scikit-learn)
    code = "import sys, neuralign.merge.sharded; print('ot' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(Path(m.__file__).parents[2])}
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          check=True).stdout.strip() == "False"
    # a name that is also a submodule's: importing the submodule first must not make the
    # package attribute the module (``from neuralign.merge import repair`` is the function)
    code = ("import neuralign.merge.repair; from neuralign.merge import repair, reset_bn; "
            "print(callable(repair), repair.__module__)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          check=True).stdout.strip() == "True neuralign.merge.repair"


@pytest.mark.parametrize("elect", ["sum", "count"])
def test_elect_and_mean_equals_the_boolean_formulation(elect):
    from neuralign.merge.task_vectors import _elect_and_mean

    g = torch.Generator().manual_seed(2)
    deltas = torch.randn(3, 5000, generator=g)
    deltas[:, ::7] = 0.0  # trimmed entries, some all-zero columns
    deltas[1, ::3] = -deltas[0, ::3]  # exact cancellations: ref == 0
    for weights in ([1.0, 1.0, 1.0], [0.5, -1.0, 2.0], [1.0, 0.0, 1.0]):
        w = torch.tensor(weights).reshape(-1, 1)
        weighted = deltas * w  # the formulation before the float-only rewrite
        sign = weighted.sign()
        ref = weighted.sum(0) if elect == "sum" else sign.sum(0)
        agree = sign == torch.where(ref >= 0, 1.0, -1.0)
        den = (w * agree).sum(0)
        old = (weighted * agree).sum(0) / torch.where(den == 0, torch.ones_like(den), den)
        new = _elect_and_mean(deltas, w, elect)
        assert torch.equal(new.view(torch.int32), old.view(torch.int32)), weights


def test_default_workers_counts_idle_cores(monkeypatch):
    monkeypatch.setattr(_parallel.os, "cpu_count", lambda: 2)
    for load, want in ((0.1, 2), (0.9, 1), (3.0, 1)):
        monkeypatch.setattr(_parallel.os, "getloadavg", lambda load=load: (load, 0.0, 0.0))
        assert _parallel.default_workers() == want
    monkeypatch.setattr(_parallel.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(_parallel.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert _parallel.default_workers() == 4


@pytest.mark.parametrize("workers", [1, 3])
def test_ordered_runs_on_one_intra_op_thread_and_restores_the_count(workers):
    """Several intra-op threads on a core another process keeps busy made a 1.1B merge 7x slower
    (OpenMP barriers wait for the preempted thread): the kernel runs on one, and the caller's
    thread count is back afterwards."""
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = [n for _, n in _parallel.ordered(lambda k: torch.get_num_threads(),
                                                list("abcde"), workers)]
        assert seen == [1] * 5
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(prev)
