"""Straight-through estimator matching (Ainsworth et al., Git Re-Basin §3.3).

Learn free weights ``W`` whose projection onto the permutations of ``b`` (by weight matching)
gives the permutation; the loss is taken at the midpoint ``(a + P(b)) / 2`` and its gradient
flows straight through the projection to ``W``. ``W`` starts at ``a``'s weights, so the first
projection is the weight-matching solution. As in the authors' code, every step's loss is the
midpoint's loss on that step's batch before the update, and the permutation returned is the one
with the lowest such loss seen (not the last); their optimiser settings are the defaults: SGD
with momentum 0.9, learning rate 1e-2, 250 epochs, each projection warm-started weight matching
with up to 100 sweeps (their batches held 500-1000 examples; the loader decides here).
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn
from torch.func import functional_call

from neuralign.align.activation import first_input
from neuralign.align.weight import check_same_architecture, weight_matching
from neuralign.errors import DataError, NeuralignError
from neuralign.permute import _permute_sd
from neuralign.spec.core import Permutation, PermutationSpec

__all__ = ["ste_matching"]
OPTIMIZERS = ("sgd", "adam")


def ste_matching(spec: PermutationSpec, model_a: nn.Module, model_b: nn.Module, loader, *,
                 epochs: int = 250, lr: float = 1e-2, optimizer: str = "sgd",
                 momentum: float = 0.9, max_steps: int | None = None, loss_fn=None,
                 seed: int = 0, wm_max_iter: int = 100, device=None) -> Permutation:
    """Permutation aligning ``model_b`` to ``model_a`` by the straight-through estimator.

    ``loader`` yields ``(inputs, targets)``; ``epochs`` passes over it (or ``max_steps`` steps)
    of ``optimizer`` (``"sgd"`` with ``momentum``, or ``"adam"``) at learning rate ``lr``. The
    defaults are Git Re-Basin's (expensive: 250 epochs; cap with ``max_steps``). Returns the
    permutation whose midpoint had the lowest batch loss, evaluated before each update as the
    authors do. Models are not modified. ``info``: ``loss_history`` (the midpoint loss per
    step), ``best_step``, ``best_loss``, ``steps``.
    """
    if optimizer not in OPTIMIZERS:
        raise NeuralignError(f"unknown STE optimizer '{optimizer}'; use one of {', '.join(OPTIMIZERS)}")
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
    if optimizer == "sgd":
        opt = torch.optim.SGD(free.values(), lr=lr, momentum=momentum)
    else:
        opt = torch.optim.Adam(free.values(), lr=lr)
    sd_b_dev = {k: v.detach().to(dev) for k, v in sd_b.items()}
    perm, best, best_loss, best_step = None, None, float("inf"), -1
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
            value = float(loss.detach())
            if not torch.isfinite(loss.detach()):
                raise NeuralignError(f"STE loss is not finite at step {step}; lower the learning "
                                     f"rate (lr={lr})")
            if value < best_loss:
                best_loss, best_step = value, step
                best = {k: v.detach().clone() for k, v in perm.items()}
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(value)
            step += 1
            if max_steps is not None and step >= max_steps:
                break
        if max_steps is not None and step >= max_steps:
            break
    if best is None:
        raise DataError("the data loader yielded no batches; STE matching needs (inputs, targets)")
    out = Permutation({k: v.cpu() for k, v in best.items()})
    out.info = {"method": "ste", "steps": step, "loss_history": losses, "best_step": best_step,
                "best_loss": best_loss, "time_s": time.perf_counter() - t0}
    return out
