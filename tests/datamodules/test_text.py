from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import seed_everything

from stabilize.datamodules import CharTextDataModule
from stabilize.errors import ConfigurationError, DataError, DataNotFoundError
from stabilize.models import TransformerLM
from tests.helpers.trainer import quiet_trainer

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 40


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_vocabulary_split_and_windows(text_file: Path) -> None:
    data = CharTextDataModule(str(text_file), context=16, batch_size=4)
    data.setup()
    assert data.vocabulary == "".join(sorted(set(TEXT))) and data.vocab_size == len(set(TEXT))
    cut = int(len(TEXT) * 0.9)  # nanoGPT's split: the first 90% trains
    assert data.decode(data._splits["train"]) == TEXT[:cut] and data.decode(data._splits["val"]) == TEXT[cut:]
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next characters
    for row_x, row_y in zip(x, y):
        window = data.decode(row_x) + data.decode(row_y[-1:])
        assert window in TEXT[:cut]
    assert len(data.val_dataloader()) == 20


def test_batches_are_seeded_per_epoch_and_index(text_file: Path) -> None:
    first = [b[0] for b in CharTextDataModule(str(text_file), context=8, train_batches=3).train_dataloader()]
    again = [b[0] for b in CharTextDataModule(str(text_file), context=8, train_batches=3).train_dataloader()]
    other = [b[0] for b in CharTextDataModule(str(text_file), context=8, train_batches=3, seed=1).train_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and not torch.equal(first[0], other[0])


def test_missing_text_and_bad_arguments_name_themselves(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="No text at"):
        CharTextDataModule(str(tmp_path / "none.txt")).setup()
    short = tmp_path / "short.txt"
    short.write_text("abc")
    with pytest.raises(DataError, match="fewer than one window"):
        CharTextDataModule(str(short), context=8).setup()
    with pytest.raises(ConfigurationError, match="train_fraction"):
        CharTextDataModule(train_fraction=1.0)


def fit(text_file: Path, root: Path, callbacks: list, ckpt_path: Path | None = None) -> TransformerLM:
    seed_everything(0)
    data = CharTextDataModule(str(text_file), context=16, batch_size=4, train_batches=5, val_batches=0)
    model = TransformerLM(vocab_size=data.vocab_size, context=16, depth=2, width=32, heads=2, scheduler="constant")
    trainer = quiet_trainer(root, max_epochs=2, callbacks=callbacks, enable_model_summary=True)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model


def test_a_run_resumed_mid_epoch_draws_the_same_windows(text_file: Path, tmp_path: Path) -> None:
    import signal

    from stabilize.callbacks import InterruptCheckpoint
    from tests.helpers.signals import SignalAtStep

    reference = fit(text_file, tmp_path / "a", [])
    with pytest.raises(SystemExit):
        fit(text_file, tmp_path / "b", [InterruptCheckpoint(), SignalAtStep(7, int(signal.SIGTERM))])
    checkpoint = tmp_path / "b" / "checkpoints" / "interrupted.ckpt"
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["CharTextDataModule"]["vocabulary"] == "".join(sorted(set(TEXT)))
    resumed = fit(text_file, tmp_path / "b", [], ckpt_path=checkpoint)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)
