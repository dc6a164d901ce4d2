"""The GAN losses side by side: minimax vs non-saturating vs hinge + spectral norm, as GradientHealthCallback sees
each network, with a classifier-FID and a sample grid per run. Writes ``<out>/report.md``, ``results.json``, and
``<run>/samples.png``, ``<run>/gradient_health.json`` and TensorBoard logs per run.

    python examples/gan_losses.py --data-dir ../shared/cifar10 --fid-checkpoint resnet20.ckpt
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from torchvision.utils import save_image

from stabilize.callbacks import GradientHealthCallback, SampleQuality
from stabilize.datamodules import CIFAR10DataModule
from stabilize.health import verdict
from stabilize.models import DCGAN

RUNS: dict[str, dict[str, Any]] = {
    "minimax": {"loss": "minimax"},
    "non-saturating": {"loss": "non_saturating"},
    "hinge-spectral-norm": {
        "loss": "hinge",
        "spectral_norm": True,
        "discriminator_batch_norm": False,
        "betas": (0.0, 0.9),
    },
}


class LastMeans(Callback):
    """Means of ``gan/d_real`` and ``gan/d_fake`` over the last ``window`` training batches (kept on the device,
    read once at the end)."""

    def __init__(self, window: int = 200) -> None:
        self.window = window
        self.values: dict[str, list[torch.Tensor]] = {"gan/d_real": [], "gan/d_fake": []}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        latest = pl_module.latest_train_values()
        for key, values in self.values.items():
            if key in latest:
                values.append(latest[key])
                del values[: -self.window]

    def means(self) -> dict[str, float]:
        return {key: torch.stack(v).double().mean().item() for key, v in self.values.items() if v}


def run_one(name: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    seed_everything(args.seed, verbose=False)
    model = DCGAN(
        ngf=args.width,
        ndf=args.width,
        sample_every_n_steps=args.sample_every,
        **RUNS[name],
    )
    data = CIFAR10DataModule(
        args.data_dir, batch_size=args.batch_size, val_size=0, normalize=False, augment=False, drop_last=True
    )
    health = GradientHealthCallback(log_every_n_steps=args.log_every, verbose=False)
    means = LastMeans()
    trainer = Trainer(
        accelerator="cpu",
        max_steps=2 * args.batches,  # optimizer steps: one per network and batch
        logger=TensorBoardLogger(out, name=name, version="tensorboard"),
        callbacks=[
            health,
            means,
            *([SampleQuality(args.fid_checkpoint, args.fid_samples)] if args.fid_checkpoint else []),
        ],
        log_every_n_steps=args.log_every,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    tested = trainer.test(model, data, verbose=False)[0] if args.fid_checkpoint else {}
    run_dir = out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    save_image(model.sample(), run_dir / "samples.png", nrow=8, padding=2)
    health.save_json(run_dir / "gradient_health.json")
    summaries = health.summary()
    (run_dir / "diagnosis.txt").write_text(health.diagnosis(model) + "\n")
    return {
        "name": name,
        "model_args": {key: list(v) if isinstance(v, tuple) else v for key, v in RUNS[name].items()},
        "batches": args.batches,
        "wall_time_s": seconds,
        "classifier_fid": tested.get("gan/classifier_fid"),
        "classifier_is": tested.get("gan/classifier_is"),
        **{f"mean_{key.split('/')[1]}_last_200": value for key, value in means.means().items()},
        "verdicts": {network: verdict(summary) for network, summary in summaries.items()},
        "median_global_norm": {
            network: _median([r["global_norm"] for r in health.history_of(i)]) for i, network in enumerate(summaries)
        },
    }


def _median(values: list[float]) -> float | None:
    values = sorted(v for v in values if v == v)
    return values[len(values) // 2] if values else None


def write_report(results: list[dict[str, Any]], args: argparse.Namespace, out: Path, command: str) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1))
    header = (
        "| run | classifier-FID | classifier-IS | D(x) | D(G(z)) | generator | discriminator |"
        " median grad norm G / D | time |\n|---|---:|---:|---:|---:|---|---|---:|---:|"
    )
    rows = []
    for r in results:
        fid = f"{r['classifier_fid']:.2f}" if r["classifier_fid"] is not None else "-"
        score = f"{r['classifier_is']:.2f}" if r["classifier_is"] is not None else "-"
        norms = r["median_global_norm"]
        rows.append(
            f"| {r['name']} | {fid} | {score} | {r.get('mean_d_real_last_200', float('nan')):.2f} |"
            f" {r.get('mean_d_fake_last_200', float('nan')):.2f} | {r['verdicts'].get('generator')} |"
            f" {r['verdicts'].get('discriminator')} | {norms.get('generator', 0):.2e} /"
            f" {norms.get('discriminator', 0):.2e} | {r['wall_time_s'] / 60:.1f} min |"
        )
    machine = f"{platform.machine()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}"
    lines = [
        "# GAN losses: minimax vs non-saturating vs hinge + spectral norm",
        "",
        f"DCGAN networks of width {args.width} (ngf = ndf), batch {args.batch_size}, {args.batches} batches per run"
        f" (one discriminator and one generator step each), seed {args.seed}. Machine: {machine}."
        f" Date: {date.today().isoformat()}. Command: `{command}`.",
        "",
        header,
        *rows,
        "",
        f"classifier-FID / -IS: on the features / logits of `{args.fid_checkpoint}` over {args.fid_samples} test"
        " images and as many generated ones (comparable only between runs with this checkpoint). D(x), D(G(z)):"
        " mean sigmoid of the discriminator's logits over the last 200 batches. Verdicts: GradientHealthCallback's"
        " one-line summary per network.",
        "",
        *[f"![{r['name']}]({r['name']}/samples.png)" for r in results],
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("STABILIZE_CIFAR10_DIR"))
    parser.add_argument("--fid-checkpoint", help="a ResNet checkpoint of this project (configs/resnet20.yaml)")
    parser.add_argument("--fid-samples", type=int, default=5000)
    parser.add_argument("--batches", type=int, default=2500)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--sample-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--out", default="docs/results/gan")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python examples/gan_losses.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}"
        for k, v in vars(args).items()
        if v is not None and k not in ("out",)
    )
    results = []
    for name in args.runs:
        results.append(run_one(name, args, out))
        print(json.dumps(results[-1]), flush=True)
        write_report(results, args, out, command)


if __name__ == "__main__":
    main()
