from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from stabilize.callbacks import SampleQuality
from stabilize.datamodules import CIFAR10DataModule
from stabilize.errors import ConfigurationError
from stabilize.metrics import ClassifierFeatures, classifier_quality_metrics
from stabilize.models import DCGAN, ResNet
from tests.helpers.trainer import quiet_trainer


@pytest.fixture(scope="module")
def classifier_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_cifar: Path) -> Path:
    folder = tmp_path_factory.mktemp("classifier")
    seed_everything(0)
    saver = ModelCheckpoint(dirpath=folder, filename="resnet8")
    data = CIFAR10DataModule(str(tiny_cifar), val_size=0, batch_size=50)
    quiet_trainer(folder, max_steps=2, callbacks=[saver], enable_checkpointing=True).fit(ResNet(depth=8), data)
    return folder / "resnet8.ckpt"


def test_features_are_the_input_of_the_last_linear_layer(classifier_checkpoint: Path) -> None:
    features = ClassifierFeatures.from_checkpoint(classifier_checkpoint)
    logits = ClassifierFeatures.from_checkpoint(classifier_checkpoint, "logits")
    images = torch.rand(6, 3, 32, 32)
    out = features(images)
    assert out.shape == (6, features.num_features) and features.num_features == 64
    torch.testing.assert_close(logits(images), features.head(out))
    assert not any(p.requires_grad for p in features.parameters()) and not features.train().training


def test_classifier_fid_is_zero_for_the_same_images_and_grows_with_noise(classifier_checkpoint: Path) -> None:
    torch.manual_seed(0)
    images = torch.rand(200, 3, 32, 32)
    scores = []
    for noise in (0.0, 0.3):
        fid = classifier_quality_metrics(classifier_checkpoint)["classifier_fid"]
        fid.update(images, real=True)
        fid.update((images + noise * torch.randn_like(images)).clamp(0, 1), real=False)
        scores.append(float(fid.compute()))
    assert abs(scores[0]) < 1e-3 and scores[1] > 100 * max(abs(scores[0]), 1e-6)


def test_a_checkpoint_of_another_kind_is_refused(tmp_path: Path) -> None:
    torch.save({"hyper_parameters": {"latent_dim": 8}, "state_dict": {}}, tmp_path / "gan.ckpt")
    with pytest.raises(ConfigurationError, match="not a checkpoint of an image classifier"):
        ClassifierFeatures.from_checkpoint(tmp_path / "gan.ckpt")


def test_sample_quality_logs_classifier_fid_and_score_of_a_dcgan(
    classifier_checkpoint: Path, tiny_cifar: Path, tmp_path: Path
) -> None:
    model = DCGAN(latent_dim=16, ngf=8, ndf=8)
    data = CIFAR10DataModule(str(tiny_cifar), val_size=0, batch_size=20, normalize=False, augment=False)
    quality = SampleQuality(str(classifier_checkpoint), samples=30)
    trainer = quiet_trainer(tmp_path, max_steps=2, callbacks=[quality])
    trainer.fit(model, data)
    result = trainer.test(model, data, verbose=False)[0]
    # IS = exp(mean KL) >= 1 exactly; torchmetrics sums the KL terms in float32, so a generator whose samples all get
    # the same class probabilities (two steps of training) can land a few float32 ulps below 1 (0.99999994 seen).
    assert result["gan/classifier_fid"] > 0 and result["gan/classifier_is"] >= 1.0 - 1e-6
    assert quality.measured == 30  # two batches of 20, the second cut to 10
    assert not any("classifier" in key for key in trainer.lightning_module.state_dict())
    trainer.save_checkpoint(tmp_path / "gan.ckpt")
    assert not any("classifier" in key for key in torch.load(tmp_path / "gan.ckpt", weights_only=False)["state_dict"])


def test_sample_quality_names_what_a_module_lacks(tiny_cifar: Path, tmp_path: Path) -> None:
    data = CIFAR10DataModule(str(tiny_cifar), val_size=0, batch_size=20, normalize=False, augment=False)
    trainer = quiet_trainer(tmp_path, callbacks=[SampleQuality()])
    with pytest.raises(ConfigurationError, match="ResNet has no generate_images"):
        trainer.test(ResNet(depth=8), data, verbose=False)


@pytest.mark.parametrize("samples", [0, -3, 2.5, True])
def test_sample_quality_refuses_a_sample_count_that_is_not_a_positive_integer(samples: object) -> None:
    with pytest.raises(ConfigurationError, match="positive integer number of samples"):
        SampleQuality(samples=samples)  # type: ignore[arg-type]


def test_models_never_import_the_metrics() -> None:
    # The quality metrics are an evaluation concern (SampleQuality): stabilize.models must stay importable without
    # stabilize.metrics, which imports ImageClassifier from stabilize.models (no import cycle).
    code = "import sys, stabilize.models; print('stabilize.metrics' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_standard_inception_metrics_say_what_they_need_when_it_is_missing() -> None:
    from stabilize.metrics import quality_metrics

    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigurationError, match="torch-fidelity"):
            quality_metrics("inception")
    else:
        pytest.skip("torch-fidelity is installed here")


def test_the_shipped_classifier_is_found_by_name() -> None:
    from stabilize.metrics import SHIPPED_CLASSIFIER, shipped_classifier

    assert shipped_classifier().is_file()
    features = ClassifierFeatures.from_checkpoint(SHIPPED_CLASSIFIER)
    images = torch.rand(4, 3, 32, 32)
    assert features(images).shape == (4, features.num_features) and features.num_features == 64
