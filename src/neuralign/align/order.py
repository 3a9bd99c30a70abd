"""The starting point of weight matching on specs with attention heads.

Coordinate descent from the identity misses planted permutations on transformers: a head or a
residual-stream unit scored while the other groups are still scrambled sees mostly noise.
``staged_start`` aligns in stages instead: (1) each plain group (no blocks, no repeats) alone on
the tensors that no other group touches, a clean signal (embeddings, norms, biases, the patch
projection); (2) the plain groups together, the head groups held; the caller then runs the full
descent from there (heads first, by a score blind to the order inside a head).
"""

from __future__ import annotations

from neuralign.spec.core import Group, Permutation, PermutationSpec


def has_heads(spec: PermutationSpec) -> bool:
    return any(g.kind == "heads" for g in spec.groups.values())


def plain_groups(spec: PermutationSpec) -> list[str]:
    """Groups acting on whole axes (not heads, not dims repeated inside heads)."""
    return [n for n, g in spec.groups.items()
            if g.kind != "heads" and all(p.outer == 1 and p.inner == 1 for p in g.places)]


def staged_start(spec: PermutationSpec, sd_a, sd_b, seed: int = 0, **options) -> Permutation:
    from neuralign.align.weight import weight_matching

    by_key = spec.key_places()
    plain = plain_groups(spec)
    init = Permutation.identity(spec)
    for n in sorted(plain, key=lambda n: -len(spec.groups[n].places)):
        g = spec.groups[n]
        clean = [p for p in g.places if len(by_key[p.key]) == 1]
        if clean:
            sub = PermutationSpec({n: Group(n, g.size, clean)})
            init[n] = weight_matching(sub, sd_a, sd_b, seed=seed, **options)[n]
    if not plain:
        return init
    return weight_matching(spec, sd_a, sd_b, init=init, groups=plain, seed=seed, **options)
