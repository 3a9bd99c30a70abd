"""Matching: planted permutations are recovered, objectives never drop, errors are clear."""

import dataclasses
import itertools

import pytest
import torch

from neuralign.align import (
    activation_matching,
    align_many,
    align_models,
    sinkhorn_matching,
    ste_matching,
    weight_matching,
    weight_objective,
)
from neuralign.errors import ArchitectureMismatchError, DataError, NeuralignError
from neuralign.models import get_model
from neuralign.permute import apply_permutation, random_permutation
from neuralign.spec import spec_from_model

torch.set_num_threads(1)
x28 = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
y28 = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(1))
LOADER = [(x28[i:i + 32], y28[i:i + 32]) for i in range(0, 64, 32)]


def _model(name, **kw):
    torch.manual_seed(0)
    return get_model(name, num_classes=10, in_channels=1, image_size=28, **kw).eval()


def _planted(model, seed=1, x=x28[:2]):
    spec = spec_from_model(model, x)
    perm = random_permutation(spec, seed)
    return spec, perm, apply_permutation(model, perm, spec)


def max_weight_diff(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


CHAIN = [("mlp", {"width": 128}), ("vgg11", {"norm": "bn", "width": 0.25}),
         ("vgg11", {"norm": "none", "width": 0.25})]


@pytest.mark.parametrize("name,kw", CHAIN)
def test_weight_matching_recovers_planted_permutation_on_chains(name, kw):
    model = _model(name, **kw)
    spec, _, permuted = _planted(model)
    perm = weight_matching(spec, model, permuted, seed=3)
    assert max_weight_diff(model, apply_permutation(permuted, perm, spec)) < 1e-6
    assert perm.info["converged"]


@pytest.mark.parametrize("name,kw", [("resnet20", {"norm": "bn"}), ("resnet20", {"norm": "ln"})])
def test_weight_matching_recovers_planted_on_residual_with_restarts(name, kw):
    model = _model(name, **kw)
    spec, _, permuted = _planted(model, seed=7)
    perm = weight_matching(spec, model, permuted, seed=0, restarts=2)
    assert max_weight_diff(model, apply_permutation(permuted, perm, spec)) < 1e-6
    assert len(perm.info["restart_objectives"]) == 3


@pytest.mark.parametrize("name,kw", [("mlp", {"width": 64}), ("resnet20", {"norm": "bn"})])
def test_weight_matching_sweeps_never_lower_the_objective(name, kw):
    a = _model(name, **kw)
    torch.manual_seed(1)
    b = get_model(name, num_classes=10, in_channels=1, image_size=28, **kw)
    spec = spec_from_model(a, x28[:2])
    perm = weight_matching(spec, a, b, seed=0)
    hist = perm.info["objective_history"]
    assert len(hist) >= 3  # at least two sweeps happened
    assert all(h1 >= h0 - 1e-9 * abs(h0) for h0, h1 in zip(hist, hist[1:]))
    assert hist[-1] > hist[0]
    # the reported objective is the one of the permuted model
    assert weight_objective(spec, a, apply_permutation(b, perm, spec)) == pytest.approx(hist[-1], rel=1e-5)


def test_weight_matching_accepts_state_dicts_and_does_not_mutate():
    model = _model("mlp", width=32)
    spec, _, permuted = _planted(model)
    before = {k: v.clone() for k, v in permuted.state_dict().items()}
    perm = weight_matching(spec, model.state_dict(), permuted.state_dict())
    assert all(torch.equal(before[k], v) for k, v in permuted.state_dict().items())
    assert max_weight_diff(model, apply_permutation(permuted, perm, spec)) < 1e-6


@pytest.mark.parametrize("name,kw", [("mlp", {}), ("vgg11", {"norm": "bn", "width": 0.25}),
                                     ("resnet20", {"norm": "bn"}), ("resnet20", {"norm": "ln"}),
                                     ("cnn", {})])
@pytest.mark.parametrize("method", ["corr", "cov"])
def test_activation_matching_recovers_planted_permutation(name, kw, method):
    model = _model(name, **kw)
    spec, _, permuted = _planted(model, seed=5)
    perm = activation_matching(model, permuted, LOADER, method=method, spec=spec)
    assert max_weight_diff(model, apply_permutation(permuted, perm, spec)) < 1e-6
    assert perm.info["samples"] > 0


def test_activation_matching_on_vit_uses_weights_for_heads():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=4,
                                       hidden_dim=32, mlp_dim=64, num_classes=5).eval()
    spec = spec_from_model(model)
    perm0 = random_permutation(spec, 2)
    permuted = apply_permutation(model, perm0, spec)
    loader = [(torch.randn(16, 3, 16, 16), None) for _ in range(2)]
    perm = activation_matching(model, permuted, loader, spec=spec)
    assert "encoder_layer_0.heads" in perm.info["weight_matched_groups"]
    assert max_weight_diff(model, apply_permutation(permuted, perm, spec)) < 1e-6


def test_activation_matching_streams_batches_consistently():
    model = _model("mlp", width=32)
    spec, _, permuted = _planted(model)
    one = activation_matching(model, permuted, [(x28, y28)], spec=spec, tie_break=0)
    two = activation_matching(model, permuted, LOADER, spec=spec, tie_break=0)
    for n in spec.groups:
        # float32 sums within a batch, float64 across batches
        assert one.info["score_after"][n] == pytest.approx(two.info["score_after"][n], abs=1e-6)


def test_ste_and_sinkhorn_recover_planted_permutation():
    model = _model("mlp", width=32)
    spec, _, permuted = _planted(model)
    p1 = ste_matching(spec, model, permuted, LOADER, max_steps=2)
    assert max_weight_diff(model, apply_permutation(permuted, p1, spec)) < 1e-6
    assert len(p1.info["loss_history"]) == 2
    p2 = sinkhorn_matching(spec, model, permuted, max_iter=8)
    assert max_weight_diff(model, apply_permutation(permuted, p2, spec)) < 1e-6


def test_align_many_to_reference_and_mean():
    model = _model("mlp", width=32)
    spec = spec_from_model(model, x28[:2])
    models = [apply_permutation(model, random_permutation(spec, s), spec) for s in range(3)]
    for ref in (1, "mean"):
        perms = align_many(spec, models, reference=ref)
        aligned = [apply_permutation(m, p, spec) for m, p in zip(models, perms)]
        assert max(max_weight_diff(aligned[0], m) for m in aligned[1:]) < 1e-6


def test_align_models_summary():
    model = _model("mlp", width=32)
    spec, _, permuted = _planted(model)
    aligned, perm, summary = align_models(model, permuted, "weight", example_input=x28[:2])
    assert max_weight_diff(model, aligned) < 1e-6
    assert summary["weight_objective_after"] > summary["weight_objective_before"]
    assert {g["name"] for g in summary["groups"]} == set(spec.groups)
    assert sum(g["moved"] for g in summary["groups"]) > 0


def test_errors_are_one_line():
    a, b = _model("mlp", width=32), _model("mlp", width=64)
    spec = spec_from_model(a, x28[:2])
    with pytest.raises(ArchitectureMismatchError, match="same architecture") as e:
        weight_matching(spec, a, b)
    assert "\n" not in str(e.value)
    with pytest.raises(ArchitectureMismatchError):
        activation_matching(a, b, LOADER)
    with pytest.raises(ArchitectureMismatchError):
        weight_matching(spec, a, _model("vgg11", width=0.25))
    bad = [(torch.randn(4, 3, 7, 7), None)]
    with pytest.raises(DataError, match=r"shape \(4, 3, 7, 7\)") as e:
        activation_matching(a, a, bad, spec=spec)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="empty"):
        activation_matching(a, a, [], spec=spec)
    with pytest.raises(DataError, match="needs data"):
        align_models(a, a, "activation", example_input=x28[:2])


def test_align_models_checks_a_hand_written_spec():
    """A spec given by hand goes through the same function check as a derived one."""
    from neuralign.align import align_models
    from neuralign.errors import SpecError
    from neuralign.spec import PermutationSpec

    a = _model("mlp", width=16)
    spec = spec_from_model(a, x28[:2])
    first = next(iter(spec.groups))
    g = spec.groups[first]
    # the layer that reads these units is left out: permuting with it changes the function
    bad = PermutationSpec({first: dataclasses.replace(g, places=list(g.places[:1]))})
    with pytest.raises(SpecError):
        align_models(a, a, "weight", spec=bad, example_input=x28[:2])


def _independent_pair():
    """Two independently initialised VGG-11s: weight matching needs ~10 sweeps to converge."""
    a = _model("vgg11", norm="bn", width=0.5)
    torch.manual_seed(1)
    b = get_model("vgg11", num_classes=10, in_channels=1, image_size=28, norm="bn", width=0.5)
    return spec_from_model(a, x28[:2]), a, b


def test_weight_matching_stops_at_tol_and_tol_zero_runs_to_convergence():
    spec, a, b = _independent_pair()
    full = weight_matching(spec, a, b, seed=0, tol=0)
    early = weight_matching(spec, a, b, seed=0, tol=1e-2)
    assert full.info["converged"] and full.info["stopped"] == "converged"
    assert early.info["stopped"] == "tol" and not early.info["converged"]
    assert early.info["sweeps"] < full.info["sweeps"]
    hist = early.info["objective_history"]
    # it stopped at the first sweep whose relative gain was <= tol, not before
    gains = [(h1 - h0) / abs(h0) for h0, h1 in itertools.pairwise(hist)]
    assert gains[-1] <= 1e-2 and all(g > 1e-2 for g in gains[:-1])
    # same seed, same path: the early run is a prefix of the full one
    assert hist == pytest.approx(full.info["objective_history"][:len(hist)], rel=1e-9)
    assert len(early.info["time_history_s"]) == len(hist)
    # the default tolerance stops before full convergence, within a fraction of a percent of it
    default = weight_matching(spec, a, b, seed=0)
    assert default.info["tol"] == 1e-3 and default.info["sweeps"] < full.info["sweeps"]
    assert default.info["objective"] >= 0.995 * full.info["objective"]
    # align_models passes tol through
    _, perm, _ = align_models(a, b, method="weight", example_input=x28[:2], tol=0)
    assert perm.info["stopped"] == "converged" and perm.info["tol"] == 0


def test_weight_matching_skipping_unchanged_groups_keeps_the_result():
    """Groups whose tensors no other group touched since they were solved are skipped; with
    ``tol=0`` the result is the same as solving every group every sweep (rtol rejects ties)."""
    spec, a, b = _independent_pair()
    perm = weight_matching(spec, a, b, seed=0, tol=0)
    assert perm.info["groups_skipped"] > 0
    # reference: coordinate ascent without skipping, written out here
    from neuralign.align.weight import _State
    st = _State(spec, a.state_dict(), b.state_dict(), random_permutation(spec, 0).identity(spec))
    gen = torch.Generator().manual_seed(0)
    names = list(spec.groups)
    for _ in range(100):
        st.stale = dict.fromkeys(names, True)
        order = torch.randperm(len(names), generator=gen).tolist()
        changed = [st.step(names[i], 1e-7) for i in order]  # every group, no short cut
        if not any(changed):
            break
    for n in names:
        assert torch.equal(perm[n], st.perm[n])


def test_weight_matching_rejects_bad_tolerances():
    spec, a, b = _independent_pair()
    with pytest.raises(NeuralignError, match="tol >= 0"):
        weight_matching(spec, a, b, tol=-1)


def test_a_group_seen_through_one_vector_is_solved_exactly_by_sorting(monkeypatch):
    """Rank-1 scores (a bias alone: the staged start of transformer MLP groups) are solved by
    pairing sorted units, not by the LAP solver (slowest there); the result must reach the
    LAP's optimum, ties included."""
    from scipy.optimize import linear_sum_assignment

    import neuralign.align.weight as W

    def no_lap(_s):
        raise AssertionError("a rank-1 group went to the LAP solver")
    monkeypatch.setattr(W, "solve_lap", no_lap)

    from neuralign.spec.core import Group, PermutationSpec, Place

    g = torch.Generator().manual_seed(3)
    for n, ties in ((7, False), (300, False), (64, True)):
        u, v = torch.randn(n, generator=g), torch.randn(n, generator=g)
        if ties:  # many equal entries
            u, v = u.round(), v.round()
        spec = PermutationSpec({"h": Group("h", n, [Place("b", 0)])})
        perm = weight_matching(spec, {"b": u}, {"b": v}, tol=0.0)
        s = torch.outer(u.double(), v.double()).numpy()
        rows, cols = linear_sum_assignment(s, maximize=True)
        best = float(s[rows, cols].sum())
        got = float((u.double() * v.double()[perm["h"]]).sum())
        assert got == pytest.approx(best, rel=1e-12, abs=1e-9)
        assert perm.info["objective"] == pytest.approx(best, rel=1e-5, abs=1e-5)
        assert sorted(perm["h"].tolist()) == list(range(n))


def _zoo_pair(source, name):
    from neuralign.spec import zoo

    if source == "hand":  # a group on both axes of one tensor (a recurrent weight)
        from neuralign.spec.core import Group, PermutationSpec, Place

        spec = PermutationSpec({"h": Group("h", 24, [Place("w", 0), Place("w", 1),
                                                     Place("v", 1)]),
                                "g": Group("g", 16, [Place("v", 0), Place("u", 1)])})
        gen = torch.Generator().manual_seed(0)
        a, b = ({"w": torch.randn(24, 24, generator=gen), "v": torch.randn(16, 24, generator=gen),
                 "u": torch.randn(8, 16, generator=gen)} for _ in range(2))
        return spec, a, b
    pytest.importorskip({"torchvision": "torchvision", "timm": "timm",
                         "hf": "transformers"}[source])
    entries = {"torchvision": zoo.torchvision_entries, "timm": zoo.timm_entries,
               "hf": zoo.hf_entries}[source]()
    (entry,) = [e for e in entries if e.name == name]
    torch.manual_seed(0)
    a, x = entry.build()
    torch.manual_seed(1)
    b, _ = entry.build()
    return spec_from_model(a, x), a, b


@pytest.mark.parametrize("source,name", [("torchvision", "resnet18"),
                                         ("timm", "vit_tiny_patch16_224"),
                                         ("hf", "GPT2LMHeadModel"), ("hand", "recurrent")])
def test_weight_matching_updated_similarities_equal_recomputed_ones(monkeypatch, source, name):
    """After the first sweep a group's similarity matrix is updated from its last one over the
    columns of b that changed (and reordered with its own units). On a residual net, a ViT
    (heads) and GPT-2 (q, k, v in one tensor): every matrix equals the one computed from
    scratch, updates are used, and the result is that of recomputing everything. A group on two
    axes of one tensor is recomputed (its own moves change its columns)."""
    import neuralign.align.weight as W

    spec, a, b = _zoo_pair(source, name)
    if isinstance(a, torch.nn.Module):
        a, b = a.eval(), b.eval()
    score = W._State.score
    calls = {"updated": 0, "fresh": 0}

    def checked(self, n):
        updated = n in self.S
        s = score(self, n)
        if s is not None:
            fresh = None
            for pl, am in self.amats[n]:
                t = am @ W.unit_matrix(self.B[pl.key], pl, self.spec.groups[n].size).T
                fresh = t if fresh is None else fresh + t
            assert torch.allclose(s, fresh, rtol=1e-4, atol=1e-4 * fresh.abs().max().item())
            calls["updated" if updated else "fresh"] += 1
        return s

    monkeypatch.setattr(W._State, "score", checked)
    init = random_permutation(spec, 0)  # a start far from the optimum: many sweeps
    got = weight_matching(spec, a, b, seed=0, tol=0, max_iter=4, init=init)
    assert calls["updated"] > 0 and calls["fresh"] > 0
    monkeypatch.setattr(W._State, "score", score)
    setup = W._State.__init__

    def no_cache(self, *args, **kw):
        setup(self, *args, **kw)
        self.cached = dict.fromkeys(self.cached, False)

    monkeypatch.setattr(W._State, "__init__", no_cache)
    ref = weight_matching(spec, a, b, seed=0, tol=0, max_iter=4, init=init)
    assert got.info["objective"] == pytest.approx(ref.info["objective"], rel=1e-6)
    assert sum(not torch.equal(got[n], ref[n]) for n in spec.groups) <= 1  # float ties at most


def test_weight_matching_keeps_no_similarities_for_weights_over_the_cap(monkeypatch):
    """Keeping similarity matrices holds older tensors of b (up to two more copies): above
    CACHE_MAX_NUMEL compared values nothing is kept, and the result is the same."""
    import neuralign.align.weight as W

    spec, a, b = _independent_pair()
    kept = weight_matching(spec, a, b, seed=0, tol=0, max_iter=3)
    monkeypatch.setattr(W, "CACHE_MAX_NUMEL", 1000)
    made = []
    setup = W._State.__init__

    def spy(self, *args, **kw):
        setup(self, *args, **kw)
        made.append(self)
    monkeypatch.setattr(W._State, "__init__", spy)
    capped = weight_matching(spec, a, b, seed=0, tol=0, max_iter=3)
    assert made and not any(v for st in made for v in st.cached.values())
    assert all(not st.S for st in made)
    assert capped.info["objective"] == pytest.approx(kept.info["objective"], rel=1e-6)
