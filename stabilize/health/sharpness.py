"""Sharpness (the largest eigenvalue of the loss's Hessian) and the learning rate's stability limit, in plain torch.

Gradient descent on a quadratic is stable only while the sharpness stays below ``2 / lr`` (``(2 + 2 beta) / lr``
with heavy-ball momentum ``beta``, ``(2 + 2 beta) / ((1 + 2 beta) lr)`` with Nesterov's: `stability_limit`);
Cohen et al. (ICLR 2021) showed full-batch training drives the sharpness up to that limit and then hovers there (the
Edge of Stability). `top_eigenvalue` finds the sharpness by the Lanczos method on Hessian-vector products
(double backward, no Hessian built; Cohen et al. use Lanczos too), or by power iteration where memory is short,
warm-started from the previous eigenvector so that a few iterations suffice between measurements.

Adaptive optimizers (Adam, AdamW) take preconditioned steps ``P^-1 g`` with ``P = diag(sqrt(v_hat) + eps)``; for them
the quantity with a stability limit is the *preconditioned* sharpness, the largest eigenvalue of ``P^-1 H``, and the
limit is ``(2 + 2 beta1) / ((1 - beta1) lr)`` (38 / lr at beta1 = 0.9; Cohen et al. 2022, "Adaptive Gradient Methods
at the Edge of Stability"). `adam_preconditioner` reads ``P`` from the optimizer's state and
`top_eigenvalue` takes it as ``preconditioner``: it iterates on the symmetric ``P^-1/2 H P^-1/2``, which has the
eigenvalues of ``P^-1 H``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

#: The methods of `top_eigenvalue`.
METHODS = ("lanczos", "power")


@dataclass(frozen=True)
class Sharpness:
    """One measurement: the eigenvalue of largest magnitude, its unit eigenvector (one tensor per parameter), the
    Hessian-vector products it took and whether it met the tolerance before the cap on iterations."""

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
    method: Literal["lanczos", "power"] = "lanczos",
) -> Sharpness:
    """The Hessian eigenvalue of largest magnitude of ``loss()`` with respect to ``params``.

    At a minimum and along training the top eigenvalue is positive and dominant, so this is the sharpness; a
    negative value means the most curved direction is a descent direction (a saddle).

    ``method="lanczos"`` (the default) builds a Krylov basis from the start vector, one Hessian-vector product per
    iteration, and takes the extreme eigenvalue of its tridiagonal projection: after ``k`` products it is as good as
    power iteration after far more when the top eigenvalue is close to the next (power iteration converges as
    ``(lambda_2 / lambda_1)^k``, slowly for the Hessians of networks). It keeps every basis vector (reorthogonalised
    against all of them): up to ``iterations + 1`` copies of the parameters. ``method="power"`` keeps two.

    Args:
        loss: Computes the scalar loss (called once per measurement; its graph serves every iteration).
        params: The parameters the Hessian is taken over.
        iterations: Most Hessian-vector products.
        tolerance: Lanczos stops once its residual bound puts the estimate within this fraction of the eigenvalue;
            power iteration once the estimate changes by less than this fraction between iterations.
        start: The previous eigenvector (warm start); a random unit vector when ``None``.
        generator: Source of the random start.
        preconditioner: ``P`` per parameter (positive, the parameter's shape): the eigenvalue of ``P^-1 H`` instead
            (`adam_preconditioner`); the eigenvector is then that of ``P^-1/2 H P^-1/2``.
        method: ``"lanczos"`` or ``"power"``.

    Raises:
        ValueError: If ``iterations`` is not positive, ``tolerance`` is not positive or ``method`` is unknown.
    """
    if iterations < 1 or not tolerance > 0:
        raise ValueError(f"iterations must be positive and tolerance positive, got {iterations}, {tolerance}.")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    everything = list(params)
    all_gradients = torch.autograd.grad(loss(), everything, create_graph=True, allow_unused=True)
    # Parameters the loss does not use (the generator, for a discriminator's loss) have zero Hessian rows: left out
    # of the iteration, and zero in the returned eigenvector so that it can warm-start the next measurement.
    used = [i for i, g in enumerate(all_gradients) if g is not None]
    used_params = [everything[i] for i in used]
    gradients = [all_gradients[i] for i in used]
    scale = None if preconditioner is None else [preconditioner[i].rsqrt() for i in used]

    def product(vector: list[Tensor]) -> list[Tensor]:
        if scale is None:
            return hessian_vector_product(gradients, used_params, vector)
        # P^-1/2 H P^-1/2 v: symmetric, with the eigenvalues of P^-1 H.
        scaled = hessian_vector_product(gradients, used_params, [s * v for s, v in zip(scale, vector)])
        return [s * h for s, h in zip(scale, scaled)]

    if start is None:
        vector = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in used_params]
    else:
        vector = [start[i].detach().clone() for i in used]
    vector = _normalized(vector)
    run = _lanczos if method == "lanczos" else _power_iteration
    value, vector, done, converged = run(product, vector, iterations, tolerance)
    full = [torch.zeros_like(p) for p in everything]
    for i, v in zip(used, vector):
        full[i] = v.detach()
    return Sharpness(value, full, done, converged)


Operator = Callable[[list[Tensor]], list[Tensor]]


def _power_iteration(
    product: Operator, vector: list[Tensor], iterations: int, tolerance: float
) -> tuple[float, list[Tensor], int, bool]:
    value, done = math.nan, 0
    while done < iterations:
        done += 1
        image = product(vector)
        estimate = _dot(image, vector)  # Rayleigh quotient, |v| = 1
        norm = math.sqrt(_dot(image, image))
        if norm == 0:
            return 0.0, vector, done, True
        vector = [h / norm for h in image]
        if math.isfinite(value) and abs(estimate - value) <= tolerance * abs(estimate):
            return estimate, vector, done, True
        value = estimate
    return value, vector, done, False


def _lanczos(
    product: Operator, vector: list[Tensor], iterations: int, tolerance: float
) -> tuple[float, list[Tensor], int, bool]:
    basis = [vector]
    diagonal: list[float] = []
    off_diagonal: list[float] = []
    value, converged, ritz = math.nan, False, torch.ones(1, dtype=torch.float64)
    for done in range(1, iterations + 1):
        current = basis[-1]
        image = product(current)
        diagonal.append(_dot(image, current))
        # Full reorthogonalisation (twice, as Kahan's "twice is enough"): in floating point the plain three-term
        # recurrence loses orthogonality and returns copies of the top eigenvalue.
        for _ in range(2):
            for previous in basis:
                overlap = _dot(image, previous)
                image = [h - overlap * q for h, q in zip(image, previous)]
        tridiagonal = torch.diag(torch.tensor(diagonal, dtype=torch.float64))
        if off_diagonal:
            steps = torch.tensor(off_diagonal, dtype=torch.float64)
            tridiagonal += torch.diag(steps, 1) + torch.diag(steps, -1)
        eigenvalues, eigenvectors = torch.linalg.eigh(tridiagonal)
        top = int(eigenvalues.abs().argmax())
        estimate, ritz = float(eigenvalues[top]), eigenvectors[:, top]
        residual = math.sqrt(_dot(image, image))
        # ||H y - theta y|| = residual * |last entry of the Ritz vector| bounds the estimate's error (H symmetric):
        # a guarantee, where a small change between iterations can also mean slow progress (power iteration's
        # criterion stops 0.7% short on ResNet-20: benchmarks/bench_sharpness_methods.py). An exhausted Krylov space
        # (the start vector lay in an invariant subspace) gives a zero bound.
        value = estimate
        if residual * abs(float(ritz[-1])) <= tolerance * abs(estimate):
            converged = True
            break
        if done < iterations:
            off_diagonal.append(residual)
            basis.append([h / residual for h in image])
    # The Ritz vector of the top eigenvalue: the basis combined with the eigenvector of the tridiagonal matrix.
    combined = [sum(float(c) * q[j] for c, q in zip(ritz, basis)) for j in range(len(vector))]
    return value, _normalized([torch.as_tensor(v) for v in combined]), done, converged


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return float(sum((x * y).sum() for x, y in zip(a, b)))


def stability_limit(optimizer: torch.optim.Optimizer) -> float | None:
    """The sharpness above which this optimizer's (first group's) learning rate diverges on a quadratic; ``None`` for
    a zero learning rate and for optimizers without a known limit (RMSprop, Adagrad...).

    SGD (`sgd_critical_step` for the derivation): ``c / lr - weight_decay`` with ``c = 2`` without momentum,
    ``(2 + 2 beta) / (1 - dampening)`` with heavy-ball momentum ``beta`` and ``(2 + 2 beta) / (1 + 2 beta)``
    with Nesterov momentum (1.357 at beta = 0.9, not heavy ball's 3.8). Adam and AdamW: the limit of the
    *preconditioned* sharpness, ``(2 + 2 beta1) / ((1 - beta1) lr)``.

    Raises:
        ValueError: For SGD with ``maximize=True``, which ascends: no step size is stable.
    """
    group = optimizer.param_groups[0]
    lr = float(group["lr"])
    if lr <= 0:
        return None
    if isinstance(optimizer, torch.optim.SGD):
        if group.get("maximize", False):
            raise ValueError("SGD with maximize=True ascends the loss: it has no stability limit (every step grows).")
        critical = sgd_critical_step(
            float(group.get("momentum", 0.0)), float(group.get("dampening", 0.0)), bool(group.get("nesterov", False))
        )
        return critical / lr - float(group.get("weight_decay", 0.0))
    if is_adam(optimizer):
        beta1 = float(group["betas"][0])
        return (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr)
    return None


def sgd_critical_step(momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False) -> float:
    """The largest stable ``lr * lambda`` of ``torch.optim.SGD`` on a quadratic of curvature ``lambda``.

    With ``x = lr * lambda`` and the buffer ``b_t = beta b_{t-1} + (1 - d) lambda w_t`` (PyTorch's; its first step
    sets ``b = g`` undamped, a transient that does not change stability):

    - heavy ball, ``w_{t+1} = w_t - lr b_t``: ``b`` is ``(1 - d)`` times the undamped buffer, so the step is
      ``lr (1 - d)`` and the classic ``x (1 - d) < 2 + 2 beta`` holds: ``x < (2 + 2 beta) / (1 - d)``;
    - Nesterov, ``w_{t+1} = w_t - lr (g_t + beta b_t)``: the state ``(w_t, lr b_{t-1})`` evolves by
      ``[[1 - x (1 + beta (1 - d)), -beta^2], [(1 - d) x, beta]]``, trace ``1 + beta - x (1 + beta (1 - d))``,
      determinant ``beta (1 - x)``; the eigenvalue first leaves the unit circle at -1, where
      ``1 + trace + det = 0``: ``x = (2 + 2 beta) / (1 + beta (2 - d))`` (PyTorch allows Nesterov only with
      ``d = 0``: ``(2 + 2 beta) / (1 + 2 beta)``).

    Without momentum, dampening does nothing (PyTorch keeps no buffer): ``x < 2``.
    """
    if momentum == 0:
        return 2.0
    if nesterov:
        return (2.0 + 2.0 * momentum) / (1.0 + momentum * (2.0 - dampening))
    if dampening >= 1:
        return math.inf  # a buffer of zeros after the first step: the weights stop moving
    return (2.0 + 2.0 * momentum) / (1.0 - dampening)


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
    norm = math.sqrt(_dot(vector, vector))
    return [v / norm for v in vector] if norm > 0 else vector
