"""The two networks of a DCGAN for 32x32 images (Radford et al., 2016) and the three adversarial losses.

The discriminator returns raw logits, one per image; every loss below is written on logits (``softplus`` instead
of ``log(sigmoid)``), which keeps the saturating case finite and shows why it saturates.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as apply_spectral_norm

GANLoss = Literal["minimax", "non_saturating", "hinge"]


class DCGANGenerator(nn.Sequential):
    """Noise ``(N, latent_dim)`` to images ``(N, channels, 32, 32)`` in ``[-1, 1]``: a 4x4 transposed convolution from
    the noise, then three that double the size (4 -> 8 -> 16 -> 32), with BatchNorm and ReLU between (DCGAN).

    Args:
        latent_dim: Size of the noise vector.
        ngf: Width of the last hidden layer; the widths are ``4 * ngf``, ``2 * ngf``, ``ngf``.
        channels: Image channels.
        batch_norm: BatchNorm after each hidden transposed convolution (the DCGAN recipe).
    """

    def __init__(self, latent_dim: int = 100, ngf: int = 64, channels: int = 3, batch_norm: bool = True) -> None:
        widths = [4 * ngf, 2 * ngf, ngf]
        layers: list[nn.Module] = []
        in_channels = latent_dim
        for index, width in enumerate(widths):
            stride, padding = (1, 0) if index == 0 else (2, 1)
            layers.append(nn.ConvTranspose2d(in_channels, width, 4, stride, padding, bias=not batch_norm))
            layers += [nn.BatchNorm2d(width)] if batch_norm else []
            layers.append(nn.ReLU(inplace=True))
            in_channels = width
        layers += [nn.ConvTranspose2d(in_channels, channels, 4, 2, 1), nn.Tanh()]
        super().__init__(*layers)
        self.latent_dim = latent_dim
        init_dcgan(self)

    def forward(self, z: Tensor) -> Tensor:
        return super().forward(z.view(len(z), self.latent_dim, 1, 1))


class DCGANDiscriminator(nn.Sequential):
    """Images ``(N, channels, 32, 32)`` to one logit per image: three stride-2 4x4 convolutions (32 -> 16 -> 8 -> 4)
    with LeakyReLU(0.2), then a 4x4 convolution to one value.

    Args:
        ndf: Width of the first layer; the widths are ``ndf``, ``2 * ndf``, ``4 * ndf``.
        channels: Image channels.
        batch_norm: BatchNorm after the second and third convolutions (DCGAN); SN-GAN uses none.
        spectral_norm: Divide every convolution's weight by its largest singular value, estimated by one power
            iteration per forward pass (Miyato et al., 2018; ``torch.nn.utils.parametrizations.spectral_norm``):
            each layer is then 1-Lipschitz, which bounds the discriminator's gradients.
    """

    def __init__(self, ndf: int = 64, channels: int = 3, batch_norm: bool = True, spectral_norm: bool = False) -> None:
        widths = [ndf, 2 * ndf, 4 * ndf]
        layers: list[nn.Module] = []
        in_channels = channels
        for index, width in enumerate(widths):
            norm = batch_norm and index > 0
            layers.append(nn.Conv2d(in_channels, width, 4, 2, 1, bias=not norm))
            layers += [nn.BatchNorm2d(width)] if norm else []
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            in_channels = width
        layers += [nn.Conv2d(in_channels, 1, 4, 1, 0), nn.Flatten(0)]
        super().__init__(*layers)
        init_dcgan(self)
        if spectral_norm:
            for module in self:
                if isinstance(module, nn.Conv2d):
                    apply_spectral_norm(module)


def init_dcgan(network: nn.Module) -> None:
    """DCGAN's initialisation: convolution weights from N(0, 0.02), BatchNorm scales from N(1, 0.02), biases 0."""
    for module in network.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(module.weight, 0.0, 0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.zeros_(module.bias)


def discriminator_loss(loss: GANLoss, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """The discriminator's loss: ``-log D(x) - log(1 - D(G(z)))`` for minimax and non-saturating (they differ only
    for the generator), ``relu(1 - D(x)) + relu(1 + D(G(z)))`` for hinge."""
    if loss == "hinge":
        return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(loss: GANLoss, fake_logits: Tensor) -> Tensor:
    """The generator's loss on the discriminator's logits for its images.

    ``minimax`` minimises ``log(1 - D(G(z))) = -softplus(logit)``, whose gradient ``-sigmoid(logit)`` vanishes when
    the discriminator rejects the fakes confidently (logit << 0): the saturation Goodfellow et al. (2014) describe.
    ``non_saturating`` minimises ``-log D(G(z)) = softplus(-logit)``, whose gradient ``-sigmoid(-logit)`` is largest
    exactly then. ``hinge`` minimises ``-logit`` (a constant gradient).
    """
    if loss == "minimax":
        return -F.softplus(fake_logits).mean()
    if loss == "non_saturating":
        return F.softplus(-fake_logits).mean()
    return -fake_logits.mean()
