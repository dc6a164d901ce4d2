"""How many examples a sharpness measurement needs: ResNet-20 on CIFAR-10, the sharpness of samples of 32, 64 and 128
examples against 512, and the spread between batches of 128.

The sharpness of a mini-batch is an estimate of the training loss's; ``SharpnessMonitor(examples=...)`` sets its
sample size, and a measurement's cost is proportional to it. ResNet-20 trains with SGD (lr 0.1, momentum 0.9, weight
decay 5e-4, batch 128) on the first 8,000 training images; at three steps, in eval mode, the top eigenvalue (Lanczos
to a residual bound of 1e-3, 30 products at most, the same random start) of the loss on the first 32, 64, 128 and
512 of 2,000 held-out training images, and on three other batches of 128 from them.

    STABILIZE_CIFAR10_DIR=../shared/cifar10 python benchmarks/bench_sharpness_sample.py   # ~12 minutes, one thread
    python benchmarks/bench_sharpness_sample.py --smoke    # seconds, random images: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from stabilize.datamodules.cifar10_files import standardized_training_images
from stabilize.errors import DataError
from stabilize.health.sharpness import top_eigenvalue
from stabilize.models import ResNet

SAMPLES = (32, 64, 128, 512)
#: Three other batches of 128 after the first 512 held-out images.
OTHER_BATCHES = 3


def images(smoke: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if smoke:
        generator = torch.Generator().manual_seed(0)
        return torch.randn(200, 3, 16, 16, generator=generator), torch.randint(0, 10, (200,), generator=generator)
    try:
        return standardized_training_images(os.environ.get("STABILIZE_CIFAR10_DIR", "data"), 10_000)
    except DataError as error:
        raise SystemExit(f"{error} Set STABILIZE_CIFAR10_DIR to it.") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 300, 600])
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    x, y = images(args.smoke)
    # The smoke run: ResNet-8, every size divided by 16, a few products.
    depth, train_size, shrink, products = (8, 100, 16, 5) if args.smoke else (20, 8000, 1, 30)
    steps = [2, 4] if args.smoke else args.steps
    samples = [size // shrink for size in SAMPLES]
    held_x, held_y = x[train_size:], y[train_size:]
    model = ResNet(depth=depth)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    batches = torch.Generator().manual_seed(0)

    def sharpness(start: int, size: int) -> float:
        model.eval()
        sample_x, sample_y = held_x[start : start + size], held_y[start : start + size]
        measured = top_eigenvalue(
            lambda: F.cross_entropy(model(sample_x), sample_y),
            list(model.parameters()),
            iterations=products,
            tolerance=1e-3,
            generator=torch.Generator().manual_seed(1),
        )
        model.train()
        return measured.value

    rows = []
    print(f"ResNet-{depth}, SGD lr 0.1 momentum 0.9, batch 128; sharpness of held-out samples (eval mode)")
    for step in range(max(steps) + 1):
        if step in steps:
            by_size = {size: sharpness(0, size) for size in samples}
            batch = samples[2]
            others = [sharpness(samples[-1] + i * batch, batch) for i in range(OTHER_BATCHES)]
            reference = by_size[samples[-1]]
            rows.append({"step": step, "by_size": by_size, "other_batches": others})
            relative = ", ".join(f"{n}: {value:.4g} ({value / reference - 1:+.0%})" for n, value in by_size.items())
            spread = ", ".join(f"{value:.4g} ({value / reference - 1:+.0%})" for value in others)
            print(f"step {step}: {relative}; other batches of {batch}: {spread}", flush=True)
        chosen = torch.randint(0, train_size, (128 // shrink,), generator=batches)
        optimizer.zero_grad()
        F.cross_entropy(model(x[chosen]), y[chosen]).backward()
        optimizer.step()
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
