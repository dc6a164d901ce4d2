"""Sharpness (the largest eigenvalue of the loss's Hessian) and the learning rate's stability limit, in plain torch.

Gradient descent on a quadratic is stable only while the sharpness stays below ``2 / lr`` (``(2 + 2 beta) / lr``
with heavy-ball momentum ``beta``); Cohen et al. (ICLR 2021) showed full-batch training drives the sharpness up to
that limit and then hovers there (the Edge of Stability). :func:`top_eigenvalue` finds the sharpness by power
iteration on Hessian-vector products (double backward, no Hessian built), warm-started from the previous
eigenvector so that a few iterations suffice between measurements.

Adaptive optimizers (Adam, AdamW) take preconditioned steps ``P^-1 g`` with ``P = diag(sqrt(v_hat) + eps)``; for them
the quantity with a stability limit is the *preconditioned* sharpness, the largest eigenvalue of ``P^-1 H``, and the
limit is ``(2 + 2 beta1) / ((1 - beta1) lr)`` (38 / lr at beta1 = 0.9; Cohen et al. 2022, "Adaptive Gradient Methods
at the Edge of Stability"). :func:`adam_preconditioner` reads ``P`` from the optimizer's state and
:func:`top_eigenvalue` takes it as ``preconditioner``: it iterates on the symmetric ``P^-1/2 H P^-1/2``, which has the
eigenvalues of ``P^-1 H``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Sharpness:
    """One measurement: the eigenvalue of largest magnitude, its unit eigenvector (one tensor per parameter), the
    power iterations it took and whether the relative change fell below the tolerance."""

    value: float
    vector: list[Tensor]
    iterations: int
    converged: bool


def hessian_vector_product(
    gradients: Sequence[Tensor], params: Sequence[Tensor], vector: Sequence[Tensor]
) -> list[Tensor]:
    """``H v`` from ``gradients`` built with ``create_graph=True`` (the graph is kept for the next product)."""
    products = torch.autograd.grad(gradients, params, grad_outputs=vector, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if h is None else h for h, p in zip(products, params)]


def top_eigenvalue(
    loss: Callable[[], Tensor],
    params: Sequence[Tensor],
    iterations: int = 20,
    tolerance: float = 1e-3,
    start: Sequence[Tensor] | None = None,
    generator: torch.Generator | None = None,
    preconditioner: Sequence[Tensor] | None = None,
) -> Sharpness:
    """The Hessian eigenvalue of largest magnitude of ``loss()`` with respect to ``params``, by power iteration.

    At a minimum and along training the top eigenvalue is positive and dominant, so this is the sharpness; a
    negative value means the most curved direction is a descent direction (a saddle).

    Args:
        loss: Computes the scalar loss (called once per measurement; its graph serves every iteration).
        params: The parameters the Hessian is taken over.
        iterations: Most power iterations.
        tolerance: Stop once the estimate changes by less than this fraction between iterations.
        start: The previous eigenvector (warm start); a random unit vector when ``None``.
        generator: Source of the random start.
        preconditioner: ``P`` per parameter (positive, the parameter's shape): the eigenvalue of ``P^-1 H`` instead
            (:func:`adam_preconditioner`); the eigenvector is then that of ``P^-1/2 H P^-1/2``.

    Raises:
        ValueError: If ``iterations`` is not positive or ``tolerance`` is not positive.
    """
    if iterations < 1 or not tolerance > 0:
        raise ValueError(f"iterations must be positive and tolerance positive, got {iterations}, {tolerance}.")
    everything = list(params)
    all_gradients = torch.autograd.grad(loss(), everything, create_graph=True, allow_unused=True)
    # Parameters the loss does not use (the generator, for a discriminator's loss) have zero Hessian rows: left out
    # of the iteration, and zero in the returned eigenvector so that it can warm-start the next measurement.
    used = [i for i, g in enumerate(all_gradients) if g is not None]
    params = [everything[i] for i in used]
    gradients = [all_gradients[i] for i in used]
    scale = None if preconditioner is None else [preconditioner[i].rsqrt() for i in used]
    if start is None:
        vector = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
    else:
        vector = [start[i].detach().clone() for i in used]
    vector = _normalized(vector)
    value, converged, done = math.nan, False, 0
    while done < iterations:
        done += 1
        if scale is None:
            product = hessian_vector_product(gradients, params, vector)
        else:  # P^-1/2 H P^-1/2 v: symmetric, so power iteration and the Rayleigh quotient still apply
            product = hessian_vector_product(gradients, params, [s * v for s, v in zip(scale, vector)])
            product = [s * h for s, h in zip(scale, product)]
        estimate = float(sum((h * v).sum() for h, v in zip(product, vector)))  # Rayleigh quotient, |v| = 1
        norm = math.sqrt(float(sum(h.square().sum() for h in product)))
        if norm == 0:
            value, converged = 0.0, True
            break
        vector = [h / norm for h in product]
        if math.isfinite(value) and abs(estimate - value) <= tolerance * abs(estimate):
            value, converged = estimate, True
            break
        value = estimate
    full = [torch.zeros_like(p) for p in everything]
    for i, v in zip(used, vector):
        full[i] = v.detach()
    return Sharpness(value, full, done, converged)


def stability_limit(optimizer: torch.optim.Optimizer) -> float | None:
    """The sharpness above which this optimizer's (first group's) learning rate diverges on a quadratic: ``2 / lr``
    for SGD, ``(2 + 2 momentum) / lr`` with heavy-ball momentum (Nesterov: the same bound is used as an
    approximation); for Adam and AdamW the limit of the *preconditioned* sharpness, ``(2 + 2 beta1) / ((1 - beta1)
    lr)``. ``None`` for other optimizers (RMSprop, Adagrad...) and a zero learning rate."""
    group = optimizer.param_groups[0]
    lr = float(group["lr"])
    if lr <= 0:
        return None
    if isinstance(optimizer, torch.optim.SGD):
        return (2.0 + 2.0 * float(group.get("momentum", 0.0))) / lr
    if is_adam(optimizer):
        beta1 = float(group["betas"][0])
        return (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr)
    return None


def is_adam(optimizer: torch.optim.Optimizer) -> bool:
    """Adam or AdamW (AdamW is a subclass of Adam in recent torch, not in all)."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


def adam_preconditioner(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[Tensor] | None:
    """Adam's ``P = sqrt(v_hat) + eps`` for each of ``params`` (``v_hat``: the bias-corrected second moment of its
    state), or ``None`` before the optimizer's first step or for another optimizer. A parameter the optimizer has no
    state for gets ``eps`` (its steps would be ``g / eps``: the most sensitive direction, not hidden)."""
    if not is_adam(optimizer):
        return None
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    result, stepped = [], False
    for param in params:
        group = groups.get(id(param))
        if group is None:
            return None
        state = optimizer.state.get(param, {})
        eps = float(group["eps"])
        if "exp_avg_sq" not in state:
            result.append(torch.full_like(param, eps))
            continue
        stepped = True
        step = float(state["step"])
        beta2 = float(group["betas"][1])
        v_hat = state["exp_avg_sq"] / (1.0 - beta2**step)
        result.append((v_hat.sqrt() + eps).to(param.dtype))
    return result if stepped else None


def _normalized(vector: list[Tensor]) -> list[Tensor]:
    norm = math.sqrt(float(sum(v.square().sum() for v in vector)))
    return [v / norm for v in vector] if norm > 0 else vector
