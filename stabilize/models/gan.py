"""DCGAN / SN-GAN on 32x32 images: two networks, two optimizers, manual optimization."""

from __future__ import annotations

from typing import Any, get_args

import torch
from torch import Tensor
from torchvision.utils import make_grid
from typing_extensions import override

from stabilize.errors import ConfigurationError, DataError, check_integers
from stabilize.models.epoch_means import DeviceLoggedModule
from stabilize.models.gan_networks import (
    DCGANDiscriminator,
    DCGANGenerator,
    GANLoss,
    discriminator_loss,
    generator_loss,
)
from stabilize.models.variants import Variant


class DCGAN(DeviceLoggedModule):
    """A DCGAN (Radford et al., 2016) for 32x32 images, with the SN-GAN discriminator as an option (Miyato et al.,
    2018): the reference module for GANs in this collection, and the case where two networks' gradients fight.

    Each training batch takes one discriminator step; every ``n_critic`` batches the generator takes one step too.
    Optimization is manual (two Adam optimizers, generator first); Lightning's ``toggle_optimizer`` freezes the other
    network while one steps, so `GradientHealthCallback` reads only the stepping
    network's layers and names its keys ``generator/`` and ``discriminator/``.

    Args:
        latent_dim: Size of the noise vector.
        ngf: Generator width (its last hidden layer; see `DCGANGenerator`).
        ndf: Discriminator width (its first layer).
        loss: ``"minimax"`` (the original, saturating for the generator when the discriminator wins),
            ``"non_saturating"`` (the DCGAN default) or ``"hinge"`` (SN-GAN). See
            `generator_loss`.
        spectral_norm: Spectral normalization of every discriminator convolution.
        generator_batch_norm: BatchNorm in the generator.
        discriminator_batch_norm: BatchNorm in the discriminator (DCGAN); SN-GAN uses none.
        n_critic: Discriminator steps per generator step.
        lr_generator: Adam learning rate of the generator.
        lr_discriminator: Adam learning rate of the discriminator.
        betas: Adam betas of both: ``(0.5, 0.999)`` for DCGAN, ``(0.0, 0.9)`` for SN-GAN.
        gradient_clip_val: Clip each network's gradient norm to this value (through ``self.clip_gradients``: the
            Trainer's own ``gradient_clip_val`` does not apply under manual optimization). ``None``: no clipping.
        sample_every_n_steps: Every this many generator steps, log a grid of images generated from a fixed noise
            batch (``gan/samples``, TensorBoard). 0 disables it.
        num_samples: Images in that grid (the fixed noise is part of the checkpoint).

    Data: images in ``[0, 1]`` (``CIFAR10DataModule(normalize=False)``; labels are ignored); they are mapped to the
    generator's ``[-1, 1]``.

    Raises:
        ConfigurationError: If an argument is out of range or names an unknown loss.

    Example:
        ```python
        model = DCGAN(loss="hinge", spectral_norm=True, discriminator_batch_norm=False, betas=(0.0, 0.9))
        data = CIFAR10DataModule(normalize=False, augment=False, val_size=0)
        Trainer(max_steps=20_000, callbacks=[GradientHealthCallback()]).fit(model, data)
        images = model.sample()  # (64, 3, 32, 32) in [0, 1], from the fixed noise
        Trainer(callbacks=[SampleQuality("cifar10-resnet20")]).test(model, data)  # gan/classifier_fid, _is
        ```

    Logged keys (at logging steps unless noted, as ``self.log(on_step=True)`` would log them; see
    `log_train`): ``gan/d_loss`` and ``gan/g_loss`` (the latest
    generator step's; ``_step`` and ``_epoch`` for the step values and the epoch means), ``gan/d_real`` and
    ``gan/d_fake`` (mean ``sigmoid`` of the discriminator's logits on real and generated images: how sure it is;
    every step's in `latest_train_values`), ``gan/samples`` (image grid). The quality of the samples is
    measured by `SampleQuality` (``gan/classifier_fid``, ``gan/classifier_is``) through
    `generate_images`.
    """

    def __init__(
        self,
        latent_dim: int = 100,
        ngf: int = 64,
        ndf: int = 64,
        loss: GANLoss = "non_saturating",
        spectral_norm: bool = False,
        generator_batch_norm: bool = True,
        discriminator_batch_norm: bool = True,
        n_critic: int = 1,
        lr_generator: float = 2e-4,
        lr_discriminator: float = 2e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        gradient_clip_val: float | None = None,
        sample_every_n_steps: int = 500,
        num_samples: int = 64,
    ) -> None:
        super().__init__()
        if loss not in get_args(GANLoss):
            raise ConfigurationError(f"loss must be one of {', '.join(get_args(GANLoss))}; got {loss!r}.")
        check_integers(
            1,
            latent_dim=latent_dim,
            ngf=ngf,
            ndf=ndf,
            n_critic=n_critic,
            num_samples=num_samples,
        )
        check_integers(0, sample_every_n_steps=sample_every_n_steps)
        if lr_generator <= 0 or lr_discriminator <= 0 or not all(0 <= b < 1 for b in betas):
            raise ConfigurationError("learning rates must be positive and betas in [0, 1).")
        if gradient_clip_val is not None and gradient_clip_val <= 0:
            raise ConfigurationError(f"gradient_clip_val must be positive or None, got {gradient_clip_val}.")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.generator = DCGANGenerator(latent_dim, ngf, batch_norm=generator_batch_norm)
        self.discriminator = DCGANDiscriminator(ndf, batch_norm=discriminator_batch_norm, spectral_norm=spectral_norm)
        self.fixed_noise: Tensor
        self.register_buffer(
            "fixed_noise", torch.randn(num_samples, latent_dim, generator=torch.Generator().manual_seed(0))
        )
        self.last_sample_grid: Tensor | None = None
        self._input_checked = False
        self._generator_steps = 0  # in this process (the sample cadence)

    def forward(self, z: Tensor) -> Tensor:
        """Generated images in ``[-1, 1]`` for noise ``z`` of shape ``(N, latent_dim)``."""
        return self.generator(z)

    @torch.no_grad()
    def sample(self, z: Tensor | None = None) -> Tensor:
        """Images in ``[0, 1]`` from noise ``z`` (default: the fixed noise), generated in eval mode (BatchNorm with
        its running statistics, so the same noise gives the same images)."""
        was_training = self.generator.training
        self.generator.eval()
        try:
            images = self.generator(self.fixed_noise if z is None else z)
        finally:
            self.generator.train(was_training)
        return images.add(1).div(2).clamp(0, 1)

    def noise(self, n: int) -> Tensor:
        return torch.randn(n, self.hparams["latent_dim"], device=self.device)

    def generate_images(self, count: int) -> Tensor:
        """``count`` images in ``[0, 1]`` from fresh noise (`ImageGenerator`:
        what `SampleQuality` measures)."""
        return self.sample(self.noise(count))

    # ------------------------------------------------------------------------------------------------- training
    @override
    def training_step(self, batch: Any, batch_idx: int) -> None:
        real = self._real_images(batch)
        opt_generator, opt_discriminator = self.optimizers()  # type: ignore[attr-defined]
        hp = self.hparams

        self.toggle_optimizer(opt_discriminator)
        fake = self.generator(self.noise(len(real)))
        real_logits, fake_logits = self.discriminator(real), self.discriminator(fake.detach())
        d_loss = discriminator_loss(hp["loss"], real_logits, fake_logits)
        self._step(opt_discriminator, d_loss)
        self.untoggle_optimizer(opt_discriminator)
        self.log_train("gan/d_loss", d_loss, len(real))
        self.log_train("gan/d_real", torch.sigmoid(real_logits.detach()).mean(), len(real), epoch=False)
        self.log_train("gan/d_fake", torch.sigmoid(fake_logits.detach()).mean(), len(real), epoch=False)

        if (batch_idx + 1) % hp["n_critic"] == 0:
            self.toggle_optimizer(opt_generator)
            g_loss = generator_loss(hp["loss"], self.discriminator(self.generator(self.noise(len(real)))))
            self._step(opt_generator, g_loss)
            self.untoggle_optimizer(opt_generator)
            self.log_train("gan/g_loss", g_loss, len(real))
            self._generator_steps += 1
            every = hp["sample_every_n_steps"]
            if every and (self._generator_steps - 1) % every == 0:
                self.log_sample_grid()

    def _step(self, optimizer: Any, loss: Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.hparams["gradient_clip_val"] is not None:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.hparams["gradient_clip_val"], gradient_clip_algorithm="norm"
            )
        optimizer.step()

    def _real_images(self, batch: Any) -> Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not self._input_checked:  # one host read, at the first batch
            low, high = float(images.min()), float(images.max())
            if low < -1e-3 or high > 1 + 1e-3:
                raise DataError(
                    f"DCGAN expects images in [0, 1], got values in [{low:.2f}, {high:.2f}]: use"
                    " CIFAR10DataModule(normalize=False) (--data.normalize false)."
                )
            self._input_checked = True
        return images * 2 - 1

    @torch.no_grad()
    def log_sample_grid(self) -> Tensor:
        """Log the images of the fixed noise as one grid (``gan/samples``) to every logger that takes images."""
        grid = make_grid(self.sample(), nrow=8, padding=2)
        self.last_sample_grid = grid.cpu()
        for logger in self.loggers:
            add_image = getattr(getattr(logger, "experiment", None), "add_image", None)
            if add_image is not None:
                add_image("gan/samples", grid, self.global_step)
        return grid

    @override
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        betas = tuple(hp["betas"])
        return [
            torch.optim.Adam(self.generator.parameters(), lr=hp["lr_generator"], betas=betas),
            torch.optim.Adam(self.discriminator.parameters(), lr=hp["lr_discriminator"], betas=betas),
        ]

    # ---------------------------------------------------------------------------------------------- evaluation
    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Only checks the images: testing a GAN is measuring its samples, which
        `SampleQuality` does against these batches."""
        self._real_images(batch)

    # ------------------------------------------------------------------------------------------------ diagnosis
    def stabilize_variants(self) -> dict[str, Variant]:
        """The structural changes ``stabilize doctor`` may try: the non-saturating loss for a minimax GAN, spectral
        normalization of the discriminator."""
        variants = {}
        if self.hparams["loss"] == "minimax":
            words = "the non-saturating generator loss (maximise log D(G(z)))"
            variants["non_saturating_loss"] = Variant(words, {"loss": "non_saturating"})
        if not self.hparams["spectral_norm"]:
            variants["normalization"] = Variant("spectral normalization of the discriminator", {"spectral_norm": True})
        return variants

    def gradient_health_hints(self) -> dict[str, str]:
        """Per-network advice for `GradientHealthCallback` (keys ``"<network>/<kind>"``)."""
        hp = self.hparams
        better_loss = "--model.loss non_saturating" if hp["loss"] == "minimax" else None
        spectral = None if hp["spectral_norm"] else "--model.spectral_norm true on the discriminator"
        generator_vanishing = (
            "the discriminator wins and the generator's loss gives it nothing to follow: "
            + " or ".join(o for o in (better_loss, spectral, "a lower --model.lr_discriminator") if o)
        )
        discriminator_options = [
            o
            for o in (
                spectral,
                "--model.loss hinge" if hp["loss"] != "hinge" else None,
                "a lower --model.n_critic" if hp["n_critic"] > 1 else None,
            )
            if o
        ] or ["a lower --model.lr_discriminator"]
        discriminator_vanishing = (
            "the discriminator is saturated (it separates real from fake too easily): "
            + " or ".join(discriminator_options)
        )
        exploding = "clip with --model.gradient_clip_val 1.0" + (f" or {spectral}" if spectral else "")
        return {
            "generator/vanishing": generator_vanishing,
            "discriminator/vanishing": discriminator_vanishing,
            "discriminator/exploding": exploding,
            "generator/exploding": "clip with --model.gradient_clip_val 1.0 or lower --model.lr_generator",
        }
