from __future__ import annotations

import functools
import hashlib
import http.server
import pickle
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback

from stabilize.datamodules import CIFAR10_MEAN, CIFAR10_STD, CIFAR10DataModule
from stabilize.datamodules.batching import BatchPermutationSampler
from stabilize.datamodules.cifar10_files import standardized_training_images
from stabilize.errors import DataError
from stabilize.models import ResNet
from tests.helpers.cifar import TINY_TEST, write_cifar_pickle
from tests.helpers.trainer import quiet_trainer


def make(data_dir: Path, **kwargs) -> CIFAR10DataModule:
    kwargs.setdefault("val_size", 40)
    kwargs.setdefault("batch_size", 32)
    datamodule = CIFAR10DataModule(str(data_dir), **kwargs)
    datamodule.setup()
    return datamodule


def first_batch(loader) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(loader))


# ------------------------------------------------------------------------------------------------ data and splits
@pytest.mark.parametrize("subfolder", [False, True])
def test_reads_the_folder_itself_or_its_parent(tiny_cifar: Path, subfolder: bool) -> None:
    data_dir = tiny_cifar / "cifar-10-batches-py" if subfolder else tiny_cifar
    datamodule = make(data_dir)
    assert datamodule.split_sizes() == {"train": 160, "val": 40, "test": TINY_TEST}


def test_batches_are_uint8_images_and_int64_labels(tiny_cifar: Path) -> None:
    datamodule = make(tiny_cifar)
    images, labels = first_batch(datamodule.train_dataloader())
    assert images.shape == (32, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (32,) and labels.dtype == torch.int64
    assert len(datamodule.train_dataloader()) == 5  # 160 / 32
    assert sum(len(y) for _, y in datamodule.val_dataloader()) == 40
    assert sum(len(y) for _, y in datamodule.test_dataloader()) == TINY_TEST
    assert sum(len(y) for _, y in datamodule.predict_dataloader()) == TINY_TEST


def test_pixels_and_labels_match_the_pickles(tiny_cifar: Path) -> None:
    with open(tiny_cifar / "cifar-10-batches-py" / "test_batch", "rb") as file:
        entry = pickle.load(file, encoding="bytes")
    datamodule = make(tiny_cifar)
    images, labels = first_batch(datamodule.test_dataloader())
    expected = torch.from_numpy(entry[b"data"][:32].reshape(32, 3, 32, 32))
    torch.testing.assert_close(images, expected)
    assert labels.tolist() == entry[b"labels"][:32]


def test_standardized_training_images_are_the_first_ones_of_the_pickles(tiny_cifar: Path, tmp_path: Path) -> None:
    with open(tiny_cifar / "cifar-10-batches-py" / "data_batch_1", "rb") as file:
        entry = pickle.load(file, encoding="bytes")
    images, labels = standardized_training_images(tiny_cifar, 5)
    pixels = torch.from_numpy(entry[b"data"][:5].reshape(5, 3, 32, 32)).float() / 255
    mean, std = torch.tensor(CIFAR10_MEAN).view(3, 1, 1), torch.tensor(CIFAR10_STD).view(3, 1, 1)
    torch.testing.assert_close(images, (pixels - mean) / std)
    assert labels.tolist() == entry[b"labels"][:5]
    with pytest.raises(DataError, match="No CIFAR-10 in"):
        standardized_training_images(tmp_path, 5)


@pytest.mark.parametrize(("val_size", "expected"), [(40, 40), (0.25, 50), (0, 0)])
def test_val_size_as_count_fraction_or_zero(tiny_cifar: Path, val_size, expected: int) -> None:
    datamodule = make(tiny_cifar, val_size=val_size)
    sizes = datamodule.split_sizes()
    assert sizes.get("val", 0) == expected and sizes["train"] == 200 - expected
    if expected == 0:
        assert datamodule.val_dataloader() == []


def test_split_is_seeded_and_reproducible(tiny_cifar: Path) -> None:
    def val_images(seed: int) -> torch.Tensor:
        return make(tiny_cifar, seed=seed).split("val")[0]

    torch.testing.assert_close(val_images(1), val_images(1))
    assert not torch.equal(val_images(1), val_images(2))
    train = make(tiny_cifar, seed=1).split("train")[0]
    all_images = {img.numpy().tobytes() for img in torch.cat([train, val_images(1)])}
    assert len(all_images) == 200  # disjoint and complete


def test_shuffling_changes_per_epoch_and_is_reproducible() -> None:
    sampler = BatchPermutationSampler(100, 10, shuffle=True, drop_last=False, seed=3)
    epoch0 = torch.cat([idx for idx, _ in sampler])
    assert sorted(epoch0.tolist()) == list(range(100))
    torch.testing.assert_close(torch.cat([idx for idx, _ in sampler]), epoch0)
    sampler.set_epoch(1)
    assert not torch.equal(torch.cat([idx for idx, _ in sampler]), epoch0)


@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_shards_across_ranks_like_distributed_sampler(drop_last: bool) -> None:
    ranks = [BatchPermutationSampler(103, 8, True, drop_last, seed=0, num_replicas=2, rank=r) for r in (0, 1)]
    shards = [torch.cat([idx for idx, _ in sampler]).tolist() for sampler in ranks]
    assert len(ranks[0]) == len(ranks[1]) == (6 if drop_last else 7)  # 52 indices per rank
    if not drop_last:
        assert set(shards[0]) | set(shards[1]) == set(range(103))
        assert len(set(shards[0]) & set(shards[1])) == 1  # one index padded by wrapping around, as DDP does


# ---------------------------------------------------------------------------------------------------- augmentation
def constant_batch(value: int = 100, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((n, 3, 32, 32), value, dtype=torch.uint8), torch.zeros(n, dtype=torch.long)


def test_normalization_is_exact(tiny_cifar: Path) -> None:
    datamodule = make(tiny_cifar)
    images, _ = datamodule.transform_batch(constant_batch(100), train=False)
    expected = [(100 / 255 - m) / s for m, s in zip(CIFAR10_MEAN, CIFAR10_STD)]
    assert images.dtype == torch.float32
    torch.testing.assert_close(images[0, :, 0, 0], torch.tensor(expected))
    unnormalized, _ = make(tiny_cifar, normalize=False).transform_batch(constant_batch(255), train=False)
    assert torch.all(unnormalized == 1.0)


def test_normalized_training_data_has_zero_mean_unit_std_without_augmentation(tiny_cifar: Path) -> None:
    # Images drawn to have exactly the CIFAR-10 statistics come out with mean 0 and std 1 per channel.
    generator = torch.Generator().manual_seed(0)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    # Uniform on mean +- sqrt(3) std has exactly that std and (almost) stays inside 0..1.
    uniform = torch.rand(512, 3, 32, 32, generator=generator) * 2 - 1
    raw = (mean + 3**0.5 * std * uniform).clamp(0, 1) * 255
    images, _ = make(tiny_cifar, augment=False).transform_batch((raw.round().to(torch.uint8), None), train=True)
    torch.testing.assert_close(images.mean((0, 2, 3)), torch.zeros(3), atol=0.02, rtol=0)
    torch.testing.assert_close(images.std((0, 2, 3)), torch.ones(3), atol=0.03, rtol=0)


def test_validation_and_test_batches_are_never_augmented(tiny_cifar: Path, tmp_path: Path) -> None:
    datamodule = make(tiny_cifar)
    seen: dict[str, list[torch.Tensor]] = {"train": [], "val": [], "test": []}

    class Capture(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            seen["train"].append(batch[0])

        def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
            seen["val"].append(batch[0])

        def on_test_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
            seen["test"].append(batch[0])

    trainer = quiet_trainer(
        tmp_path, max_steps=2, limit_val_batches=1, num_sanity_val_steps=0, val_check_interval=2, callbacks=[Capture()]
    )
    trainer.fit(ResNet(depth=8, scheduler="constant"), datamodule)
    trainer.test(ResNet(depth=8), datamodule, verbose=False)
    val_raw, _ = first_batch(datamodule.val_dataloader())
    test_raw, _ = first_batch(datamodule.test_dataloader())
    torch.testing.assert_close(seen["val"][0], datamodule.augmentation.normalize(val_raw))
    torch.testing.assert_close(seen["test"][0], datamodule.augmentation.normalize(test_raw))
    train_batch = seen["train"][0]
    assert train_batch.dtype == torch.float32 and train_batch.shape == (32, 3, 32, 32)
    assert not any(
        torch.allclose(train_batch, datamodule.augmentation.normalize(x)) for x, _ in datamodule.train_dataloader()
    )


def test_augmentation_is_reproducible_for_a_seed(tiny_cifar: Path) -> None:
    batch = first_batch(make(tiny_cifar).train_dataloader())
    a = make(tiny_cifar, seed=5).transform_batch(batch, train=True)[0]
    b = make(tiny_cifar, seed=5).transform_batch(batch, train=True)[0]
    c = make(tiny_cifar, seed=6).transform_batch(batch, train=True)[0]
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)


def marker_images(n: int, points: list[tuple[int, int]]) -> torch.Tensor:
    images = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    for row, col in points:
        images[:, :, row, col] = 255
    return images


def centroids(images: torch.Tensor) -> torch.Tensor:
    """(row, col) intensity centroid of channel 0 of each unnormalized image."""
    weights = images[:, 0]
    rows = torch.arange(weights.shape[-2], dtype=torch.float32)
    cols = torch.arange(weights.shape[-1], dtype=torch.float32)
    total = weights.sum((1, 2))
    return torch.stack([(weights.sum(2) * rows).sum(1) / total, (weights.sum(1) * cols).sum(1) / total], 1)


def augmented(tiny_cifar: Path, images: torch.Tensor, **kwargs) -> torch.Tensor:
    datamodule = make(tiny_cifar, normalize=False, **kwargs)
    return datamodule.transform_batch((images, None), train=True)[0]


def test_every_image_gets_its_own_parameters(tiny_cifar: Path) -> None:
    out = augmented(tiny_cifar, marker_images(64, [(10, 12)]))
    distinct = {tuple(c.round(decimals=3).tolist()) for c in centroids(out)}
    # 9x9 shifts x 2 flips x continuous scales: a single shared draw would give exactly one.
    assert len(distinct) > 40


def test_flip_fraction_is_near_one_half(tiny_cifar: Path) -> None:
    out = augmented(tiny_cifar, marker_images(4000, [(16, 5)]), scale=None, translate=0)
    flipped = (out[:, 0, 16, 26] == 1.0).float().mean().item()
    assert torch.all((out[:, 0, 16, 5] == 1.0) ^ (out[:, 0, 16, 26] == 1.0))  # exactly one of the two
    assert 0.47 < flipped < 0.53


def test_translation_moves_whole_pixels_within_bounds(tiny_cifar: Path) -> None:
    out = augmented(tiny_cifar, marker_images(3000, [(16, 16)]), scale=None, flip=False, translate=3)
    # Integer shifts at scale 1 move the marker without blurring it.
    assert torch.all(out.amax((1, 2, 3)) == 1.0) and torch.all((out > 0).sum((2, 3))[:, 0] == 1)
    shifts = centroids(out) - 16
    assert shifts.abs().max() <= 3
    assert set(shifts[:, 0].round().int().tolist()) == set(range(-3, 4))
    assert set(shifts[:, 1].round().int().tolist()) == set(range(-3, 4))


def test_scale_stays_within_its_range(tiny_cifar: Path) -> None:
    # Two markers 16 px apart around the centre: their distance measures each image's scale factor.
    out = augmented(
        tiny_cifar,
        marker_images(2000, [(15, 8), (16, 8), (15, 23), (16, 23)]),
        scale=(0.8, 1.2),
        translate=0,
        flip=False,
    )
    left, right = centroids(out[..., :16]), centroids(out[..., 16:])
    scale = (right[:, 1] + 16 - left[:, 1]) / 15
    assert scale.min() >= 0.8 - 1e-3 and scale.max() <= 1.2 + 1e-3
    assert scale.min() < 0.82 and scale.max() > 1.18  # the whole range is used
    assert abs(scale.mean().item() - 1.0) < 0.02


def test_cutout_zeroes_one_square_per_image(tiny_cifar: Path) -> None:
    out = augmented(tiny_cifar, constant_batch(200, 64)[0], scale=None, translate=0, flip=False, cutout=8)
    zeroed = (out[:, 0] == 0).sum((1, 2))
    assert zeroed.max() == 64 and zeroed.min() >= 16  # clipped at the border to at least a 4x4 corner


def test_alternating_flip_flips_each_image_in_every_other_epoch(tiny_cifar: Path) -> None:
    datamodule = make(tiny_cifar, alternate_flip=True, val_size=0)
    batches = datamodule._splits["train"]
    sampler = BatchPermutationSampler(len(batches), 200, shuffle=False, drop_last=False, seed=0)
    epoch0 = batches[next(iter(sampler))][0]
    sampler.set_epoch(1)
    epoch1 = batches[next(iter(sampler))][0]
    original = batches.images
    flipped0 = (epoch0 != original).flatten(1).any(1)
    assert torch.all(torch.where(flipped0.view(-1, 1, 1, 1), epoch0.flip(-1), epoch0) == original)
    torch.testing.assert_close(epoch1, torch.where(flipped0.view(-1, 1, 1, 1), original, original.flip(-1)))
    assert 0.3 < flipped0.float().mean() < 0.7


# ------------------------------------------------------------------------------------------------------- errors
def test_missing_data_names_the_directory_and_both_fixes(tmp_path: Path) -> None:
    datamodule = CIFAR10DataModule(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as error:
        datamodule.setup()
    message = str(error.value)
    assert str((tmp_path / "nowhere").resolve()) in message
    assert "--data.data_dir" in message and "--data.download true" in message


def test_offline_download_fails_with_one_clear_error(tmp_path: Path) -> None:
    datamodule = CIFAR10DataModule(str(tmp_path), download=True)
    datamodule.url = "http://127.0.0.1:9/cifar-10-python.tar.gz"  # nothing listens on the discard port
    with pytest.raises(RuntimeError, match="Could not download CIFAR-10") as error:
        datamodule.prepare_data()
    assert str(tmp_path) in str(error.value) and "--data.data_dir" in str(error.value)


def make_archive(tiny: Path, target: Path) -> tuple[Path, str]:
    archive = target / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tiny / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        return None


class QuietServer(http.server.ThreadingHTTPServer):
    """A client that hangs up early (the downloader probing the URL) is normal here, not a traceback on stderr."""

    def handle_error(self, request: object, client_address: object) -> None:
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]


@pytest.fixture
def http_root(tmp_path: Path):
    """Serve ``tmp_path / "www"`` on a loopback port; yields (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(QuietHandler, directory=str(root))
    server = QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def test_download_verifies_the_archive_checksum_then_reads_it(tiny_cifar: Path, tmp_path: Path, http_root) -> None:
    www, base_url = http_root
    archive, md5 = make_archive(tiny_cifar, www)
    datamodule = CIFAR10DataModule(str(tmp_path / "downloaded"), download=True, val_size=0)
    datamodule.url, datamodule.archive_md5 = f"{base_url}/{archive.name}", md5
    datamodule.prepare_data()
    datamodule.setup()
    assert datamodule.split_sizes()["train"] == 200

    corrupted = CIFAR10DataModule(str(tmp_path / "corrupted"), download=True)
    corrupted.url, corrupted.archive_md5 = datamodule.url, "0" * 32
    with pytest.raises(RuntimeError, match="Could not download"):
        corrupted.prepare_data()


def test_offline_copy_with_other_checksums_is_accepted(tiny_cifar: Path) -> None:
    # The tiny copy's md5s are not torchvision's; only downloaded archives are checksummed.
    assert make(tiny_cifar).split_sizes()["test"] == TINY_TEST


def test_truncated_pickle_names_the_file(tiny_cifar_copy: Path) -> None:
    path = tiny_cifar_copy / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"data_batch_3.*not a readable CIFAR-10 batch file"):
        make(tiny_cifar_copy)


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        (np.zeros((40, 3, 16, 16), np.uint8), [0] * 40, r"shape \(N, 3072\)"),
        (np.zeros((40, 3, 32, 32), np.float32), [0] * 40, "uint8"),
        (np.zeros((40, 3, 32, 32), np.uint8), [0] * 39 + [10], r"labels must be in 0\.\.9"),
        (np.zeros((40, 3, 32, 32), np.uint8), [0] * 30, "40 images but labels"),
    ],
)
def test_malformed_batches_name_the_file(tiny_cifar_copy: Path, images, labels, message: str) -> None:
    write_cifar_pickle(tiny_cifar_copy / "cifar-10-batches-py" / "test_batch", images, labels)
    with pytest.raises(ValueError, match=f"test_batch.*{message}"):
        make(tiny_cifar_copy)


def test_pickles_cannot_run_code(tiny_cifar_copy: Path) -> None:
    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tiny_cifar_copy / "cifar-10-batches-py" / "data_batch_1", "wb") as file:
        pickle.dump({b"data": Exploit(), b"labels": []}, file, protocol=2)
    with pytest.raises(ValueError, match=r"data_batch_1.*refusing to load .*print"):
        make(tiny_cifar_copy)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"val_size": -1}, "val_size must be non-negative"),
        ({"val_size": 50_000}, "not smaller than the 50000"),
        ({"val_size": 2.5}, "whole count or a fraction"),
        ({"scale": (1.1, 0.9)}, "0 < low <= high"),
        ({"translate": -1}, "translate must be in"),
        ({"cutout": 40}, "cutout must be in"),
        ({"num_workers": -2}, "num_workers must be at least 0"),
        ({"device": "tpu"}, "device must be"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CIFAR10DataModule(**kwargs)


def test_val_size_larger_than_the_data_found_fails_at_setup(tiny_cifar: Path) -> None:
    with pytest.raises(ValueError, match="leaves no training images"):
        make(tiny_cifar, val_size=200)


# ------------------------------------------------------------------------------------------------ cache and device
def test_cache_file_round_trip_is_keyed_to_its_source(tiny_cifar_copy: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "cifar10.pt"
    first = make(tiny_cifar_copy, cache_file=str(cache))
    assert cache.is_file()
    for pickle_file in (tiny_cifar_copy / "cifar-10-batches-py").glob("*_batch*"):
        pickle_file.unlink()
    second = make(tiny_cifar_copy, cache_file=str(cache))  # same data_dir: the cache alone suffices
    torch.testing.assert_close(second.split("train")[0], first.split("train")[0])
    with pytest.raises(FileNotFoundError, match=r"built from .*tiny|built from .*data"):
        make(tmp_path / "elsewhere", cache_file=str(cache))  # another, empty data_dir: not silently the cache


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"train_x": torch.zeros(3)}, "not a CIFAR-10 cache"),
        (
            {
                "train_x": torch.zeros(2, 3, 32, 32, dtype=torch.uint8),
                "train_y": torch.tensor([0, 10]),
                "test_x": torch.zeros(1, 3, 32, 32, dtype=torch.uint8),
                "test_y": torch.tensor([0]),
            },
            "labels must be int64 in 0..9",
        ),
    ],
)
def test_a_bad_cache_names_the_file(tiny_cifar: Path, tmp_path: Path, content: dict, message: str) -> None:
    cache = tmp_path / "cifar10.pt"
    torch.save(content, cache)
    with pytest.raises(ValueError, match=message):
        make(tiny_cifar, cache_file=str(cache))


def test_an_unusable_cache_path_is_named_before_reading_the_data(tiny_cifar: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"cache_file {tmp_path} is not a file"):
        make(tiny_cifar, cache_file=str(tmp_path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on machines without a GPU")
def test_gpu_resident_data_falls_back_to_host_memory_with_a_warning(tiny_cifar: Path) -> None:
    with pytest.warns(UserWarning, match="no GPU is available"):
        datamodule = make(tiny_cifar, device="cuda")
    assert datamodule.split("train")[0].device.type == "cpu"
    assert isinstance(datamodule.train_dataloader(), torch.utils.data.DataLoader)


@pytest.mark.filterwarnings("ignore:.*pin_memory.*:UserWarning")
def test_trainer_fits_with_workers_and_pinned_memory(tiny_cifar: Path, tmp_path: Path) -> None:
    datamodule = CIFAR10DataModule(str(tiny_cifar), val_size=40, batch_size=32, num_workers=1, pin_memory=True)
    trainer = quiet_trainer(tmp_path, max_epochs=1)
    trainer.fit(ResNet(depth=8, scheduler="constant"), datamodule)
    assert trainer.global_step == 5


# ------------------------------------------------------------------------------------------------------ real data
def test_real_cifar10_counts_and_channel_means(real_cifar_dir: Path) -> None:
    datamodule = CIFAR10DataModule(str(real_cifar_dir), val_size=0)
    tensors = datamodule.load_tensors()
    assert tensors["train_x"].shape == (50_000, 3, 32, 32) and tensors["test_x"].shape == (10_000, 3, 32, 32)
    assert torch.bincount(tensors["train_y"], minlength=10).tolist() == [5000] * 10
    assert torch.bincount(tensors["test_y"], minlength=10).tolist() == [1000] * 10
    means = tensors["train_x"].float().mean((0, 2, 3)) / 255
    torch.testing.assert_close(means, torch.tensor([0.491, 0.482, 0.447]), atol=2e-3, rtol=0)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        pytest.param([0.5] * 40, "labels must be integers", id="float"),
        pytest.param(["cat"] * 40, "labels must be integers", id="string"),
        pytest.param([None] * 40, "labels must be integers", id="none"),
    ],
)
def test_labels_that_are_not_integers_name_the_file(tiny_cifar_copy: Path, labels: list, message: str) -> None:
    entry = {b"data": np.zeros((40, 3072), np.uint8), b"labels": labels}
    (tiny_cifar_copy / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(ValueError, match=f"test_batch.*{message}"):
        make(tiny_cifar_copy)


def test_protocol_5_pickles_are_read(tiny_cifar_copy: Path) -> None:
    images = np.arange(40 * 3072, dtype=np.int64).astype(np.uint8).reshape(40, 3072)
    entry = {"data": images, "labels": np.arange(40) % 10}
    (tiny_cifar_copy / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(entry, protocol=5))
    datamodule = make(tiny_cifar_copy)
    x, y = datamodule.split("test")
    assert torch.equal(x.reshape(40, -1), torch.from_numpy(images)) and y.tolist() == [i % 10 for i in range(40)]


@pytest.mark.parametrize("reflect", [False, True])
@pytest.mark.parametrize("flip", [False, True])
def test_integer_shift_fast_path_equals_the_resampling_matrices(flip: bool, reflect: bool) -> None:
    from stabilize.datamodules.augment import resampling_matrices, shift_and_flip

    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    shift = torch.randint(-4, 5, (2, 16), generator=torch.Generator().manual_seed(1))
    mirror = torch.rand(16, generator=torch.Generator().manual_seed(2)) < 0.5 if flip else None
    ones = torch.ones(16)
    rows = resampling_matrices(32, ones, shift[0].float(), reflect=reflect)
    cols = resampling_matrices(32, ones, shift[1].float(), mirror, reflect=reflect)
    expected = torch.matmul(rows.unsqueeze(1), images.float() @ cols.transpose(1, 2).unsqueeze(1))
    torch.testing.assert_close(shift_and_flip(images, shift, mirror, 4, reflect).float(), expected, rtol=0, atol=0)


def test_reflect_padding_equals_a_crop_of_the_reflect_padded_image() -> None:
    """The speed runs' augmentation: pad by 2 with torch's reflect mode, take a random 32x32 crop."""
    from stabilize.datamodules.augment import shift_and_flip

    images = torch.rand(8, 3, 32, 32)
    shift = torch.randint(-2, 3, (2, 8), generator=torch.Generator().manual_seed(3))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), mode="reflect")
    crops = [padded[n, :, 2 - dy : 34 - dy, 2 - dx : 34 - dx] for n, (dy, dx) in enumerate(shift.T.tolist())]
    torch.testing.assert_close(shift_and_flip(images, shift, None, 2, reflect=True), torch.stack(crops))


@pytest.mark.parametrize("scale", [None, (0.9, 1.1)])
def test_reflect_padding_shows_no_black_border(tiny_cifar: Path, scale: tuple[float, float] | None) -> None:
    images = make(tiny_cifar).split("train")[0][:64].clamp(min=1)  # no black pixel of their own
    black = {}
    for padding in ("zeros", "reflect"):
        datamodule = make(tiny_cifar, scale=scale, translate=2, padding=padding, normalize=False)
        black[padding] = int((datamodule.transform_images(images, train=True) == 0).sum())
    assert black["zeros"] > 0 and black["reflect"] == 0
    with pytest.raises(ValueError, match="padding must be"):
        make(tiny_cifar, padding="edge")


def test_train_subset_is_class_balanced_seeded_and_disjoint_from_validation(tiny_cifar: Path) -> None:
    first, again = make(tiny_cifar, train_subset=50), make(tiny_cifar, train_subset=50)
    images, labels = first.split("train")
    assert len(labels) == 50 and torch.bincount(labels, minlength=10).tolist() == [5] * 10
    torch.testing.assert_close(again.split("train")[0], images)
    val_images = first.split("val")[0].flatten(1)
    assert not (images.flatten(1)[:, None, :] == val_images[None]).all(-1).any()


def test_train_subset_larger_than_a_class_allows_names_the_class(tiny_cifar: Path) -> None:
    with pytest.raises(ValueError, match="train_subset=160 needs 16 images of class"):
        make(tiny_cifar, train_subset=160)


def test_drop_last_with_a_batch_larger_than_the_training_set_says_why(tiny_cifar: Path) -> None:
    datamodule = make(tiny_cifar, batch_size=200, drop_last=True)
    with pytest.raises(ValueError, match=r"Zero training batches: drop_last=True .*160 training images"):
        datamodule.train_dataloader()
