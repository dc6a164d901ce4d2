"""Lanczos against power iteration for the sharpness: the estimate after k Hessian-vector products, on ResNet-20.

A ResNet trained a few steps on a fixed random batch (so that it is away from its initialisation), in eval mode; the
reference is Lanczos run to a residual bound of 1e-7. For k products: each method's estimate and its relative error;
then each with its stopping rule (tolerance 1e-3: Lanczos's residual bound, power iteration's relative change
between iterations; and Lanczos at SharpnessMonitor's 1e-2; at most 20 products), cold from a random vector and
warm-started from the previous measurement's eigenvector after one more training step.

    python benchmarks/bench_sharpness_methods.py            # ResNet-20, batch 128, ~1 minute on 2 cores
    python benchmarks/bench_sharpness_methods.py --smoke    # seconds: checks the script runs
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from stabilize.health.sharpness import top_eigenvalue
from stabilize.models import ResNet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--products", type=int, nargs="+", default=[3, 5, 8, 12, 20])
    parser.add_argument("--reference-products", type=int, default=80)
    parser.add_argument("--smoke", action="store_true", help="ResNet-8 on 8 images, a few products: checks it runs")
    args = parser.parse_args()
    if args.smoke:
        args.depth, args.batch_size, args.train_steps = 8, 8, 3
        args.products, args.reference_products = [3, 5], 20
    torch.manual_seed(0)
    model = ResNet(depth=args.depth)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    images, labels = torch.randn(args.batch_size, 3, 32, 32), torch.randint(0, 10, (args.batch_size,))

    def train(steps: int) -> None:
        model.train()
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
        model.eval()  # the monitor's mode: BatchNorm's running statistics, a fixed function of the weights

    def measure(method: str, iterations: int, tolerance: float, start=None):
        return top_eigenvalue(
            lambda: F.cross_entropy(model(images), labels),
            [p for p in model.parameters() if p.requires_grad],
            iterations,
            tolerance,
            start=start,
            generator=torch.Generator().manual_seed(3),
            method=method,
        )

    train(args.train_steps)
    reference = measure("lanczos", args.reference_products, 1e-7)
    figures: dict = {"reference": reference.value, "reference_products": reference.iterations, "by_products": {}}
    print(f"ResNet-{args.depth}, batch {args.batch_size}, {args.train_steps} steps from init, eval mode")
    print(f"reference (Lanczos to a residual bound of 1e-7): {reference.value:.6g} in {reference.iterations} products")
    for products in args.products:
        row = {m: measure(m, products, 1e-12).value for m in ("lanczos", "power")}
        figures["by_products"][products] = {m: v / reference.value - 1 for m, v in row.items()}
        print(
            f"{products:2d} products: Lanczos {row['lanczos']:.6g} ({row['lanczos'] / reference.value - 1:+.1e}),"
            f" power iteration {row['power']:.6g} ({row['power'] / reference.value - 1:+.1e})"
        )
    # The stopping rules at 1e-3 (top_eigenvalue's default) and 1e-2 (SharpnessMonitor's), as "lanczos" and
    # "lanczos_1e-2" (the residual bound guarantees the tolerance; the estimate is often far closer).
    rules = {"lanczos": ("lanczos", 1e-3), "power": ("power", 1e-3), "lanczos_1e-2": ("lanczos", 1e-2)}
    cold = {name: measure(method, 20, tolerance) for name, (method, tolerance) in rules.items()}
    train(1)
    again = measure("lanczos", args.reference_products, 1e-7)
    warm = {name: measure(method, 20, tolerance, start=reference.vector) for name, (method, tolerance) in rules.items()}
    for name, runs, truth in (("cold", cold, reference.value), ("warm", warm, again.value)):
        for method, found in runs.items():
            error = found.value / truth - 1
            figures[f"{name}_{method}"] = {"products": found.iterations, "relative_error": error}
            rule = f"{name}, stopping rule at {rules[method][1]:g}: {method:12s}"
            print(f"{rule} {found.iterations:2d} products, error {error:+.1e}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
