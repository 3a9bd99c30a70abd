"""Straight-through estimator matching (Ainsworth et al., Git Re-Basin §3.3).

Learn free weights ``W`` whose projection onto the permutations of ``b`` (by weight matching)
gives the permutation; the loss is taken at the midpoint ``(a + P(b)) / 2`` and its gradient
flows straight through the projection to ``W``. ``W`` starts at ``a``'s weights, so the first
projection is the weight-matching solution.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn
from torch.func import functional_call

from neuralign.align.activation import first_input
from neuralign.align.weight import check_same_architecture, weight_matching
from neuralign.errors import DataError
from neuralign.permute import _permute_sd
from neuralign.spec.core import Permutation, PermutationSpec

__all__ = ["ste_matching"]


def ste_matching(spec: PermutationSpec, model_a: nn.Module, model_b: nn.Module, loader, *,
                 epochs: int = 1, lr: float = 1e-3, max_steps: int | None = None,
                 loss_fn=None, seed: int = 0, wm_max_iter: int = 20,
                 device=None) -> Permutation:
    """Permutation aligning ``model_b`` to ``model_a`` by the straight-through estimator.

    ``loader`` yields ``(inputs, targets)``; Adam with learning rate ``lr`` for ``epochs``
    passes (or ``max_steps`` steps). Models are not modified. ``info["loss_history"]`` holds the
    midpoint loss per step.
    """
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    check_same_architecture(sd_a, sd_b)
    dev = torch.device(device) if device is not None else next(model_a.parameters()).device
    net = copy.deepcopy(model_a).to(dev).train()
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    names = [n for n, p in model_a.named_parameters()]
    theta_a = {n: sd_a[n].detach().to(dev) for n in names}
    free = {n: sd_a[n].detach().clone().to(dev).requires_grad_(True) for n in names}
    buffers = {n: b.detach().clone().to(dev) for n, b in model_a.named_buffers()}
    others = {k: v.detach().to(dev) for k, v in sd_a.items() if k not in free}  # state buffers
    opt = torch.optim.Adam(free.values(), lr=lr)
    sd_b_dev = {k: v.detach().to(dev) for k, v in sd_b.items()}
    perm = weight_matching(spec, {n: free[n].detach() for n in names} | others, sd_b_dev,
                           max_iter=wm_max_iter, seed=seed)
    losses, step = [], 0
    for _ in range(epochs):
        for batch in loader:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise DataError("STE matching needs a loader of (inputs, targets) batches")
            x, y = first_input(batch).to(dev), batch[1].to(dev)
            current = {n: free[n].detach() for n in names} | others
            perm = weight_matching(spec, current, sd_b_dev, max_iter=wm_max_iter, seed=seed + step,
                                   init=perm)
            proj = _permute_sd(sd_b_dev, perm, spec)
            mid = {n: 0.5 * (theta_a[n] + free[n] + (proj[n].float() - free[n]).detach())
                   for n in names}
            loss = loss_fn(functional_call(net, mid | buffers, (x,)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
            if max_steps is not None and step >= max_steps:
                break
        if max_steps is not None and step >= max_steps:
            break
    current = {n: free[n].detach() for n in names} | others
    perm = weight_matching(spec, current, sd_b_dev, max_iter=wm_max_iter, seed=seed, init=perm)
    out = Permutation({k: v.cpu() for k, v in perm.items()})
    out.info = {"method": "ste", "steps": step, "loss_history": losses,
                "time_s": time.perf_counter() - t0}
    return out
