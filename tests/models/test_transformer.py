from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import seed_everything

from stabilize.callbacks import GradientHealthCallback
from stabilize.datamodules import CharTextDataModule
from stabilize.errors import ConfigurationError, DataError
from stabilize.models import TransformerLM
from tests.helpers.trainer import quiet_trainer


def tiny(**kwargs) -> TransformerLM:
    return TransformerLM(**{"vocab_size": 11, "context": 8, "depth": 2, "width": 16, "heads": 2, **kwargs})


@pytest.mark.parametrize(
    "options", [{}, {"norm_position": "post"}, {"qk_norm": True}, {"tie_embeddings": False}, {"bias": False}]
)
def test_shapes_causality_and_tied_head(options: dict) -> None:
    torch.manual_seed(0)
    model = tiny(**options).eval()
    tokens = torch.randint(0, 11, (3, 8))
    logits = model(tokens)
    assert logits.shape == (3, 8, 11)
    changed = tokens.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 11
    # Causal: the logits of positions 0-4 do not depend on later tokens.
    torch.testing.assert_close(model(changed)[:, :5], logits[:, :5], rtol=1e-5, atol=1e-6)
    assert (model.head.weight is model.embed.weight) == options.get("tie_embeddings", True)


def test_gpt2_init_scales_the_residual_projections() -> None:
    torch.manual_seed(0)
    model = TransformerLM(depth=8, width=128, heads=4)
    # N(0, 0.02) everywhere, residual projections 1/sqrt(2 * depth) of it (16 layers' worth of 128x512 weights).
    assert model.blocks[0].qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert model.blocks[0].mlp[2].weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


def test_z_loss_adds_the_squared_log_normalizer() -> None:
    torch.manual_seed(0)
    plain, with_z = tiny(), tiny(z_loss=1e-2)
    with_z.load_state_dict(plain.state_dict())
    batch = (torch.randint(0, 11, (2, 8)), torch.randint(0, 11, (2, 8)))
    logits = plain(batch[0])
    expected = 1e-2 * torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(with_z._step(batch, "train") - plain._step(batch, "train"), expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"width": 30, "heads": 4}, "divisible by heads"),
        ({"norm_position": "middle"}, "norm_position"),
        ({"residual_scaling": "deepnorm"}, "post-LN"),
        ({"depth": 1.5}, "depth must be an integer"),
        ({"z_loss": -1.0}, "z_loss"),
    ],
)
def test_bad_arguments_name_themselves(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        TransformerLM(**kwargs)


def test_bad_input_and_generation() -> None:
    model = tiny()
    with pytest.raises(DataError, match="integer tokens"):
        model(torch.randn(2, 8))
    generator = torch.Generator().manual_seed(0)
    out = model.generate(torch.zeros(2, 3, dtype=torch.long), 10, generator=generator)
    assert out.shape == (2, 13) and int(out.max()) < 11 and model.training


def test_learns_a_tiny_text_and_the_callback_reads_tied_weights_once(tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("abcdefgh" * 300)  # fully predictable after one character
    seed_everything(0)
    data = CharTextDataModule(str(text), context=8, batch_size=8, train_batches=60, val_batches=2)
    model = TransformerLM(vocab_size=data.vocab_size, context=8, depth=2, width=32, heads=2, lr=3e-3)
    health = GradientHealthCallback(log_every_n_steps=10, verbose=False)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[health])
    trainer.fit(model, data)
    # ln 8 = 2.08 nats for a uniform guess; a deterministic sequence is learnt far below it in 60 steps.
    assert trainer.callback_metrics["val/loss"].item() < 0.5
    (summary,) = health.summary().values()
    assert summary["shared_parameters"] == {"embed.weight": ["head.weight"]}
    assert "head" not in health.history[-1]["layers"] and summary["explosions"] == []


def test_the_cosine_ends_at_the_final_lr_fraction(tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("abcdefgh" * 100)
    data = CharTextDataModule(str(text), context=8, batch_size=4, train_batches=10, val_batches=0)
    model = TransformerLM(
        vocab_size=data.vocab_size, context=8, depth=1, width=16, heads=2, lr=1e-3, final_lr_fraction=0.5
    )
    trainer = quiet_trainer(tmp_path, max_epochs=1)
    trainer.fit(model, data)
    # After the last of 10 steps the schedule stands at its end: half the peak (the cosine's floor), not zero.
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.5e-3, rel=1e-6)
    trainer.save_checkpoint(tmp_path / "lm.ckpt")
    assert TransformerLM.load_from_checkpoint(tmp_path / "lm.ckpt").hparams["final_lr_fraction"] == 0.5
