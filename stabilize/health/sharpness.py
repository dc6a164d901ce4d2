"""Sharpness (the largest eigenvalue of the loss's Hessian) and the learning rate's stability limit, in plain torch.

Gradient descent on a quadratic is stable only while the sharpness stays below ``2 / lr`` (``(2 + 2 beta) / lr``
with heavy-ball momentum ``beta``); Cohen et al. (ICLR 2021) showed full-batch training drives the sharpness up to
that limit and then hovers there (the Edge of Stability). :func:`top_eigenvalue` finds the sharpness by power
iteration on Hessian-vector products (double backward, no Hessian built), warm-started from the previous
eigenvector so that a few iterations suffice between measurements.
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

    Raises:
        ValueError: If ``iterations`` is not positive or ``tolerance`` is not positive.
    """
    if iterations < 1 or not tolerance > 0:
        raise ValueError(f"iterations must be positive and tolerance positive, got {iterations}, {tolerance}.")
    params = list(params)
    gradients = torch.autograd.grad(loss(), params, create_graph=True)
    if start is None:
        vector = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
    else:
        vector = [v.detach().clone() for v in start]
    vector = _normalized(vector)
    value, converged, done = math.nan, False, 0
    while done < iterations:
        done += 1
        product = hessian_vector_product(gradients, params, vector)
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
    return Sharpness(value, [v.detach() for v in vector], done, converged)


def stability_limit(optimizer: torch.optim.Optimizer) -> float | None:
    """The sharpness above which gradient descent with this optimizer's (first group's) learning rate diverges on a
    quadratic: ``2 / lr`` for SGD, ``(2 + 2 momentum) / lr`` with heavy-ball momentum (Nesterov: the same bound is
    used as an approximation). ``None`` for adaptive optimizers (Adam, RMSprop...), whose limit is on the
    preconditioned Hessian, which is not measured here."""
    if not isinstance(optimizer, torch.optim.SGD):
        return None
    group = optimizer.param_groups[0]
    lr = float(group["lr"])
    if lr <= 0:
        return None
    return (2.0 + 2.0 * float(group.get("momentum", 0.0))) / lr


def _normalized(vector: list[Tensor]) -> list[Tensor]:
    norm = math.sqrt(float(sum(v.square().sum() for v in vector)))
    return [v / norm for v in vector] if norm > 0 else vector
