"""L-BFGS inverse-Hessian approximation (Byrd et al. 1995, Nocedal 1980) for Auto-RGN+Hessian.

``two_loop`` is the classic two-loop recursion: it applies the L-BFGS inverse-Hessian
approximation ``H_k`` built from the stored pairs ``s_i = θ_{i+1} − θ_i``,
``y_i = ∇L(θ_{i+1}) − ∇L(θ_i)`` to a vector in O(m·P) time and memory, without forming ``H``.

``preconditioned_gradient`` collects the pairs by running a few L-BFGS iterations (Armijo
backtracking) on the loss over fixed minibatches, on a functional copy of the parameters (the
model is untouched), then returns ``H · ∇L(θ_0)`` at the starting point, split per parameter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from neuralign.errors import NeuralignError


def two_loop(g: torch.Tensor, s_list: Sequence[torch.Tensor], y_list: Sequence[torch.Tensor],
             gamma: float | None = None) -> torch.Tensor:
    """``H g`` for the L-BFGS inverse Hessian of the pairs (oldest first).

    ``H_0 = gamma · I`` with ``gamma = s·y / y·y`` of the newest pair unless given; with no
    pairs the result is ``gamma · g`` (``gamma`` defaults to 1).
    """
    if len(s_list) != len(y_list):
        raise NeuralignError("two_loop needs as many s vectors as y vectors")
    q = g.clone()
    rhos = [1.0 / torch.dot(y, s) for s, y in zip(s_list, y_list)]
    alphas = []
    for s, y, rho in zip(reversed(s_list), reversed(y_list), reversed(rhos)):
        a = rho * torch.dot(s, q)
        q = q - a * y
        alphas.append(a)
    if gamma is None:
        gamma = (float(torch.dot(s_list[-1], y_list[-1]) / torch.dot(y_list[-1], y_list[-1]))
                 if s_list else 1.0)
    r = gamma * q
    for s, y, rho, a in zip(s_list, y_list, rhos, reversed(alphas)):
        b = rho * torch.dot(y, r)
        r = r + s * (a - b)
    return r


def _flat_objective(model: nn.Module, batches: list, names: list[str], loss_fn):
    """A function ``theta -> (loss, grad)`` over the flattened parameters ``names``."""
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}  # BN may update them
    total = float(sum(len(b[1]) for b in batches))

    def f(theta: torch.Tensor):
        theta = theta.detach().requires_grad_(True)
        pieces = dict(zip(names, (t.view(s) for t, s in zip(theta.split(sizes), shapes))))
        with torch.enable_grad():
            loss = sum(loss_fn(functional_call(model, (pieces, buffers), (x,)), y)
                       * (len(y) / total) for x, y in batches)
            (g,) = torch.autograd.grad(loss, theta)
        return float(loss.detach()), g.detach()

    theta0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    return f, theta0, sizes, shapes


def lbfgs_pairs(f, theta0: torch.Tensor, *, memory: int = 10, steps: int = 10,
                init_step: float = 1e-3, c1: float = 1e-4, max_backtrack: int = 12):
    """Run ``steps`` L-BFGS iterations from ``theta0`` on ``f(theta) -> (loss, grad)``.

    Returns ``(s_list, y_list, g0)``: the last ``memory`` curvature pairs with ``s·y > 0`` and
    the gradient at ``theta0``. The first step has length ``init_step · ‖θ_0‖``.
    """
    theta = theta0.clone()
    loss, g = f(theta)
    g0 = g.clone()
    s_list: list[torch.Tensor] = []
    y_list: list[torch.Tensor] = []
    for _ in range(steps):
        gnorm = float(g.norm())
        if gnorm == 0:
            break
        if s_list:
            d = -two_loop(g, s_list, y_list)
        else:
            d = -g * (init_step * max(float(theta0.norm()), 1.0) / gnorm)
        slope = float(torch.dot(g, d))
        if slope >= 0:  # not a descent direction: restart from steepest descent
            s_list.clear(), y_list.clear()
            d = -g * (init_step * max(float(theta0.norm()), 1.0) / gnorm)
            slope = float(torch.dot(g, d))
        t, accepted = 1.0, None
        for _ in range(max_backtrack):
            new_theta = theta + t * d
            new_loss, new_g = f(new_theta)
            if new_loss <= loss + c1 * t * slope:
                accepted = (new_theta, new_loss, new_g)
                break
            t *= 0.5
        if accepted is None:
            break
        new_theta, new_loss, new_g = accepted
        s, y = new_theta - theta, new_g - g
        if float(torch.dot(s, y)) > 1e-10 * float(s.norm() * y.norm()):
            s_list.append(s), y_list.append(y)
            if len(s_list) > memory:
                s_list.pop(0), y_list.pop(0)
        theta, loss, g = new_theta, new_loss, new_g
    return s_list, y_list, g0


def preconditioned_gradient(model: nn.Module, batches: list, layers, *, memory: int = 10,
                            steps: int = 10, loss_fn=None, bn: str = "train",
                            trained: set[int] | None = None) -> dict[str, torch.Tensor]:
    """``H ∇L(θ_0)`` per parameter of ``layers`` (L-BFGS over all of them jointly), in the
    training mode given by the batch-norm policy ``bn`` (see ``neuralign.finetune.bn``)."""
    from neuralign.finetune.bn import training_mode

    loss_fn = loss_fn or F.cross_entropy
    names = [n for layer in layers for n in layer.param_names]
    with training_mode(model, bn, trained):
        f, theta0, sizes, shapes = _flat_objective(model, batches, names, loss_fn)
        s_list, y_list, g0 = lbfgs_pairs(f, theta0, memory=memory, steps=steps)
    hg = two_loop(g0, s_list, y_list)
    return {n: t.view(s) for n, t, s in zip(names, hg.split(sizes), shapes)}
