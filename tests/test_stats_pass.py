"""Statistics passes (activation matching, REPAIR, BN reset, CKA): one streaming pass, exact
moments even for activations with large means, nothing kept per batch, no autograd graph."""

import gc
import weakref

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from neuralign.align import ActivationStats, activation_statistics
from neuralign.landscape import layer_cka
from neuralign.merge import reset_bn
from neuralign.merge.repair import ChannelMoments, channel_stats, channel_stats_many
from neuralign.models import get_model
from neuralign.spec import spec_from_model

G = torch.Generator().manual_seed(0)
X = torch.randn(96, 1, 28, 28, generator=G)
Y = torch.randint(0, 10, (96,), generator=G)
LOADER = DataLoader(TensorDataset(X, Y), batch_size=32)


def _model(seed, name="resnet20", **kw):
    torch.manual_seed(seed)
    kw = kw or {"width": 1, "norm": "bn"}
    return get_model(name, num_classes=10, in_channels=1, image_size=28, **kw).eval()


def test_activation_stats_are_exact_for_large_means_and_any_batching():
    za = 1e4 + torch.randn(3000, 8, generator=G, dtype=torch.float64)
    zb = za[:, torch.randperm(8, generator=G)] * 2 - 5e3 + 0.1 * torch.randn(3000, 8, generator=G,
                                                                             dtype=torch.float64)
    ref = torch.corrcoef(torch.cat([za, zb], 1).T)[:8, 8:]
    ref_cov = torch.cov(torch.cat([za, zb], 1).T, correction=0)[:8, 8:]
    for sizes in ([3000], [1000, 1000, 1000], [7, 2993]):
        st = ActivationStats(8)
        for a, b in zip(za.float().split(sizes), zb.float().split(sizes)):
            st.update(a, b)
        assert st.n == 3000
        torch.testing.assert_close(st.corr(), ref, atol=2e-4, rtol=0)
        torch.testing.assert_close(st.cov(), ref_cov, atol=2e-3, rtol=1e-3)


def test_activation_stats_raw_path_matches_a_float64_reference():
    """Moderate means (ReLU outputs): sums on the raw activations, no centring copies."""
    for size in (8, 96):  # a narrow and a wide layer
        za = torch.relu(torch.randn(3000, size, generator=G, dtype=torch.float64) + 0.5)
        zb = torch.relu(za[:, torch.randperm(size, generator=G)] + 0.3 * torch.randn(
            3000, size, generator=G, dtype=torch.float64))
        ref = torch.corrcoef(torch.cat([za, zb], 1).T)[:size, size:]
        ref_cov = torch.cov(torch.cat([za, zb], 1).T, correction=0)[:size, size:]
        st = ActivationStats(size)
        for a, b in zip(za.float().split([7, 993, 2000]), zb.float().split([7, 993, 2000])):
            st.update(a, b)
        assert st.raw and st.n == 3000
        torch.testing.assert_close(st.corr(), ref, atol=2e-5, rtol=0)
        torch.testing.assert_close(st.cov(), ref_cov, atol=2e-5, rtol=1e-4)


def test_activation_statistics_pass_keeps_nothing_per_batch():
    """Every probe output is dropped once paired: after each batch none is alive."""
    a, b = _model(0), _model(1)
    spec = spec_from_model(a, X[:2])
    alive, after_batch = [], []

    def batches():  # counts the live activations before each batch and at the end
        for xb, yb in zip(X.split(32), Y.split(32)):
            gc.collect()
            after_batch.append(sum(r() is not None for r in alive))
            yield xb, yb

    def spy(mod, inp, out):
        alive.append(weakref.ref(out))

    for m in (a, b):
        for mod in m.modules():
            if isinstance(mod, (nn.Conv2d, nn.BatchNorm2d, nn.ReLU)):
                mod.register_forward_hook(spy)
    stats, seen = activation_statistics(a, b, batches(), spec)
    gc.collect()
    assert seen == 3 and alive and after_batch and max(after_batch) == 0
    assert sum(r() is not None for r in alive) == 0
    # the accumulators are fixed-size, independent of the number of batches
    for st in stats.values():
        assert st.n > 0 and st.n % 96 == 0
        assert st.sab.shape == (st.size, st.size)


def test_channel_moments_match_a_float64_reference():
    y = 300.0 + torch.randn(50, 4, 6, 6, generator=G) * torch.tensor([1.0, 0.01, 5, 0])[:, None, None]
    acc = ChannelMoments()
    for part in y.split([3, 17, 30]):
        acc.update(part, 1)
    mean, std = acc.mean_std()
    y64 = y.double().transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(mean.double(), y64.mean(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(std.double(), y64.std(1, correction=0), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("mean_in_sds", [0.0, 3.9, 4.1, 1e4])
def test_batch_moments_match_float64_on_both_paths(mean_in_sds):
    """Means up to 4 SDs take the uncentred (mean-square) path, larger ones are centred
    first: the variance stays within float32 rounding of float64's either way."""
    from neuralign.merge.repair import batch_moments

    sd = torch.tensor([1.0, 0.01, 5.0, 1e-3])
    y = (mean_in_sds + torch.randn(64, 4, 9, 9, generator=G)) * sd[:, None, None]
    mean, var = batch_moments(y.contiguous(memory_format=torch.channels_last), 1)
    y64 = y.double().transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(mean.double(), y64.mean(1), rtol=1e-5, atol=0)
    torch.testing.assert_close(var.double(), y64.var(1, correction=0), rtol=2e-5, atol=0)


def test_repair_statistics_of_two_models_in_one_pass_equal_separate_passes():
    a, b = _model(0), _model(1)
    names = ["layer1.0.bn1", "layer2.2.bn2"] if "layer1.0.bn1" in dict(a.named_modules()) else [
        n for n, m in a.named_modules() if isinstance(m, nn.BatchNorm2d)][:2]
    both = channel_stats_many([a, b], LOADER, names)
    for model, got in zip((a, b), both):
        alone = channel_stats(model, LOADER, names)
        for n in names:
            torch.testing.assert_close(got[n][0], alone[n][0])
            torch.testing.assert_close(got[n][1], alone[n][1])


def test_reset_bn_builds_no_autograd_graph_and_averages_batch_statistics():
    m = _model(0, "vgg11", width=0.25, norm="bn")
    grad_on = []
    m.register_forward_hook(lambda *_: grad_on.append(torch.is_grad_enabled()))
    r = reset_bn(m, LOADER)
    assert grad_on and not any(grad_on)
    first = next(x for x in r.modules() if isinstance(x, nn.BatchNorm2d))
    conv = next(x for x in m.modules() if isinstance(x, nn.Conv2d))
    with torch.no_grad():
        means = torch.stack([conv(xb).mean((0, 2, 3)) for xb in X.split(32)])
    torch.testing.assert_close(first.running_mean, means.mean(0), rtol=1e-5, atol=1e-6)


def test_linear_cka_in_float32_matches_float64():
    a, b = _model(0, "mlp", width=64, depth=2), _model(1, "mlp", width=64, depth=2)
    got, la, lb = layer_cka(a, b, LOADER, n_examples=96)
    from neuralign.landscape import cka, features

    fa, fb = features(a, LOADER, la, 96), features(b, LOADER, lb, 96)
    ref = torch.tensor([[cka(fa[i], fb[j]) for j in lb] for i in la])
    torch.testing.assert_close(got, ref.float(), atol=1e-5, rtol=1e-5)
    assert got.diagonal().min() > 0 and float(got.max()) <= 1 + 1e-5


@pytest.mark.parametrize("what", ["activation", "repair"])
def test_passes_accept_plain_lists_of_batches(what):
    a, b = _model(0, "mlp", width=32, depth=1), _model(1, "mlp", width=32, depth=1)
    batches = [(X[:40], Y[:40]), (X[40:], Y[40:])]
    if what == "activation":
        stats, seen = activation_statistics(a, b, batches, spec_from_model(a, X[:2]))
        assert seen == 2 and all(st.n == 96 for st in stats.values())
    else:
        got = channel_stats(a, batches, ["layer1.0"])["layer1.0"]
        ref = channel_stats(a, [(X, Y)], ["layer1.0"])["layer1.0"]
        torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)


def test_activation_statistics_equal_a_reference_from_stored_activations():
    """The pass (A's outputs copied into reused buffers, batches of unequal size, channels-last
    convolution outputs) gives the correlations of all the activations computed at once."""
    a, b = _model(0), _model(1)
    spec = spec_from_model(a, X[:2])
    batches = [(X[:40], Y[:40]), (X[40:80], Y[40:80]), (X[80:], Y[80:])]
    stats, seen = activation_statistics(a, b, batches, spec)
    assert seen == 3
    checked = 0
    for n, g in list(spec.groups.items())[::4]:
        for i, p in enumerate(g.probes):
            outs = []
            for m in (a, b):
                got = []
                h = dict(m.named_modules())[p.name].register_forward_hook(
                    lambda mod, inp, out, got=got: got.append(out.double()))
                with torch.no_grad():
                    m(X)
                h.remove()
                outs.append(got[0].movedim(1, -1).reshape(-1, g.size))
            ref = torch.corrcoef(torch.cat(outs, 1).T)[:g.size, g.size:]
            ref = torch.nan_to_num(ref, nan=0.0)
            torch.testing.assert_close(stats[(n, i)].corr(), ref, atol=1e-4, rtol=0)
            checked += 1
    assert checked >= 6


def test_activation_stats_cross_products_across_float32_flushes():
    """Small batches of a wide layer: cross-products pile up in float32 for up to FLUSH_ROWS
    rows, then join the float64 total; reading the totals midway (a flush) and going on gives
    the float64 sums all along."""
    size, rows = 64, 96
    za = torch.relu(torch.randn(100 * rows, size, generator=G, dtype=torch.float64))
    zb = torch.relu(za.flip(1) + 0.5 * torch.randn(100 * rows, size, generator=G,
                                                    dtype=torch.float64))
    st = ActivationStats(size)
    assert rows * 100 > 2 * st.FLUSH_ROWS
    for k, (a, b) in enumerate(zip(za.float().split(rows), zb.float().split(rows))):
        st.update(a, b)
        if k in (3, 50, 99):
            ref = za[:(k + 1) * rows].T @ zb[:(k + 1) * rows]
            torch.testing.assert_close(st.sab, ref, rtol=2e-6, atol=0)
    ref = torch.corrcoef(torch.cat([za, zb], 1).T)[:size, size:]
    torch.testing.assert_close(st.corr(), ref, atol=2e-6, rtol=0)


def test_layer_cka_of_channels_last_convolutions_matches_float64():
    """Conv features gathered in memory (channels-last) order into one buffer per layer, Gram
    matrices from the blocks on and above the diagonal: the float64 CKA of the usual features."""
    a, b = _model(0, "vgg11", width=0.25, norm="bn"), _model(1, "vgg11", width=0.25, norm="bn")
    x = torch.randn(301, 1, 28, 28, generator=G)
    loader = DataLoader(TensorDataset(x, torch.zeros(301, dtype=torch.long)), batch_size=128)
    got, la, lb = layer_cka(a, b, loader, n_examples=300)
    from neuralign.landscape import cka, features

    fa, fb = features(a, loader, la, 300), features(b, loader, lb, 300)
    assert fa[la[0]].shape[0] == 300
    ref = torch.tensor([[cka(fa[i], fb[j]) for j in lb] for i in la])
    torch.testing.assert_close(got, ref.float(), atol=1e-5, rtol=1e-5)


def test_layer_cka_refuses_a_module_run_twice_per_forward():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(784, 16)
            self.out = nn.Linear(16, 10)

        def forward(self, x):
            h = self.lin(x.flatten(1))
            return self.out(h + self.lin(x.flatten(1)))

    with pytest.raises(Exception, match="more than once"):
        layer_cka(Twice(), Twice(), LOADER, layers_a=["lin"], layers_b=["lin"])


def _bn_randomised(model, seed):
    """Batch norms that are far from the identity (negative scales too), as after training."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.running_mean is not None:
                m.running_mean.normal_(0, 0.5, generator=g)
                m.running_var.uniform_(0.2, 3.0, generator=g)
            if m.weight is not None:
                m.weight.data.normal_(0, 1.0, generator=g)
                m.bias.data.normal_(0, 0.5, generator=g)
    return model.eval()


class _ConvBnLinearBn(nn.Module):
    """conv -> BN (no affine) -> ReLU, a batch-statistics BN, linear -> BN1d -> ReLU."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6, affine=False)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(5, track_running_stats=False)  # batch statistics: measured
        self.fc = nn.Linear(5 * 14 * 14, 7)
        self.bn3 = nn.BatchNorm1d(7)
        self.out = nn.Linear(7, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.out(torch.relu(self.bn3(self.fc(x.flatten(1)))))


def _float64_units(model, name, x):
    """A module's output in float64 as (samples, channels)."""
    import copy

    m, out = copy.deepcopy(model).double().eval(), []
    # a copy: an in-place ReLU overwrites a norm's output after its hook
    m.get_submodule(name).register_forward_hook(lambda _m, _i, o: out.append(o.clone()))
    with torch.no_grad():
        m(x.double())
    return out[0].movedim(1, -1).reshape(-1, out[0].shape[1])


@pytest.mark.parametrize("make", [
    lambda s: _model(s, "resnet20", width=1, norm="bn"),
    lambda s: _model(s, "vgg11", width=0.25, norm="bn"),
    lambda s: _ConvBnLinearBn(),
    pytest.param(lambda s: __import__("torchvision").models.resnet18(num_classes=10),
                 id="torchvision-resnet18"),
], ids=["resnet20", "vgg11", "conv-bn-linear-bn", "torchvision-resnet18"])
def test_derived_batchnorm_statistics_equal_measured_ones(make):
    """An eval-mode BN output's statistics are derived from its input's, not measured; they
    must equal the measured ones (and BNs on batch statistics must be measured)."""
    torch.manual_seed(0)
    a = _bn_randomised(make(0), 10)
    torch.manual_seed(1)
    b = _bn_randomised(make(1), 11)
    x = torch.randn(64, 3 if any(isinstance(m, nn.Conv2d) and m.in_channels == 3
                                 for m in a.modules()) else 1, 28, 28, generator=G)
    loader = DataLoader(TensorDataset(x), batch_size=16)
    spec = spec_from_model(a, x[:2])
    fast, n_fast = activation_statistics(a, b, loader, spec)
    slow, n_slow = activation_statistics(a, b, loader, spec, derive=False)
    assert n_fast == n_slow == 4 and fast.keys() == slow.keys()
    n_derived = sum(st.derived for st in fast.values())
    assert n_derived > 0 and not any(st.derived for st in slow.values())
    for k, st in fast.items():
        assert st.n == slow[k].n
        torch.testing.assert_close(st.corr(), slow[k].corr(), atol=1e-3, rtol=0)
        torch.testing.assert_close(st.cov(), slow[k].cov(), atol=1e-4, rtol=1e-3)
        p = spec.groups[k[0]].probes[k[1]]
        if st.derived:  # and against float64 activations: derived is at least as accurate
            za, zb = (_float64_units(m, p.name, x) for m in (a, b))
            ref = torch.corrcoef(torch.cat([za, zb], 1).T)[:st.size, st.size:]
            ok = torch.isfinite(ref)
            err_fast = (st.corr() - ref)[ok].abs().max()
            assert err_fast <= max(2e-5, (slow[k].corr() - ref)[ok].abs().max())
    if isinstance(a, _ConvBnLinearBn):  # bn derived; bn2 (batch statistics) measured, and bn3
        # too: its units are on dim -1, the channels only if the input has rank 2
        names = {spec.groups[n].probes[i].name for (n, i), st in fast.items() if st.derived}
        assert names == {"bn"}
    with pytest.raises(RuntimeError, match="derived"):
        next(st for st in fast.values() if st.derived).update(torch.zeros(2, 1), torch.zeros(2, 1))


def _hooks(m):
    return sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())


@pytest.mark.parametrize("fail", [False, True])
def test_activation_statistics_leave_the_models_as_they_were(fail):
    """The pass runs the models themselves (no copies): it puts them in eval mode and hooks
    them only while it runs, also when a batch fails."""
    a, b = _model(0).train(), _model(1)
    a.layer1[0].norm1.eval()  # a mixed mode, kept as it was
    modes = {m: [x.training for x in m.modules()] for m in (a, b)}
    spec = spec_from_model(a, X[:2])
    if fail:
        bad = [(X[:4], Y[:4]), (torch.randn(4, 3, 28, 28), Y[:4])]  # 3 channels: model fails
        with pytest.raises(Exception, match="cannot run"):
            activation_statistics(a, b, bad, spec)
    else:
        activation_statistics(a, b, LOADER, spec)
    for m in (a, b):
        assert [x.training for x in m.modules()] == modes[m]
        assert _hooks(m) == 0


def test_activation_statistics_of_a_model_with_itself_are_perfectly_correlated():
    """The same model as A and B (each run gets its own hooks): every unit that varies is
    correlated 1 with itself."""
    a = _model(0)
    spec = spec_from_model(a, X[:2])
    stats, _ = activation_statistics(a, a, LOADER, spec)
    assert _hooks(a) == 0
    for st in stats.values():
        c = st.corr().diagonal()
        live = (st.saa / st.n - (st.sa / st.n) ** 2) > 1e-8
        torch.testing.assert_close(c[live], torch.ones_like(c[live]), rtol=0, atol=1e-4)
