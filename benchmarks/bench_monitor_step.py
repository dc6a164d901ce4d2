"""Cost of GradientMonitor.observe (the callback's work on every optimizer step) against a training step.

ResNet-20 on CPU: the median time of ``observe`` (fused norms, the running median, the spike and ceiling counters,
the loss) over its gradients, and of one forward + backward + SGD step at batch 128, interleaved rounds in one
process, so that the ratio holds on a busy machine. The full callback, logging steps included, is measured by
``bench_callback_overhead.py``; this isolates the per-step part the explosion rules added to.

    python benchmarks/bench_monitor_step.py            # ~30 s on 2 cores
    python benchmarks/bench_monitor_step.py --smoke    # seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.nn import functional as F

from stabilize.health import GradientMonitor, HealthCriteria, LayerIndex
from stabilize.models import ResNet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10, help="training steps per round")
    parser.add_argument("--observes", type=int, default=200, help="observe calls per round")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.steps, args.observes, args.batch_size = 2, 2, 20, 8
    torch.manual_seed(0)
    net = ResNet(depth=20)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(args.batch_size, 3, 32, 32), torch.randint(0, 10, (args.batch_size,))
    monitor = GradientMonitor(HealthCriteria())
    monitor.attach(LayerIndex.build(net, list(net.parameters())))

    def train_step() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
        return loss.detach()

    loss = train_step()
    step_ms, observe_ms = [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        for _ in range(args.steps):
            loss = train_step()
        step_ms.append((time.perf_counter() - start) / args.steps * 1e3)
        start = time.perf_counter()
        for step in range(args.observes):
            monitor.observe(step, loss=loss)
        observe_ms.append((time.perf_counter() - start) / args.observes * 1e3)
    figures = {
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "step_ms": round(statistics.median(step_ms), 3),
        "observe_ms": round(statistics.median(observe_ms), 4),
    }
    figures["observe_fraction_of_step"] = round(figures["observe_ms"] / figures["step_ms"], 5)
    print(f"ResNet-20, batch {args.batch_size}, {figures['threads']} threads: step {figures['step_ms']} ms,")
    print(f"observe {figures['observe_ms']} ms = {figures['observe_fraction_of_step']:.2%} of a step")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
