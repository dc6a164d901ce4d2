"""The pathology zoo's cases on models nobody here wrote: timm's ViT and ResNet, Hugging Face's GPT-2, litgpt's GPT.

Small configurations of the libraries' own classes (no download: random initialisation), trained for 200 steps on
synthetic data: a ViT on the zoo's quadrant images at 16x16, the language models on a random Markov chain over 64
tokens (4 successors per token: a model that learned reaches ln 4 = 1.39 nats; guessing, ln 64 = 4.16). The cases
need the libraries, which the optional ``zoo`` extra installs (``pip install -e '.[zoo]'``); without one, its cases
are skipped, saying so. See ``pathology_zoo.py``.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

VOCABULARY, CONTEXT = 64, 32
IMAGE_CLASSES = 4


def markov_text(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` sequences of a fixed random Markov chain (each token has 4 equally likely successors): inputs, and the
    next tokens as targets."""
    successors = torch.randint(0, VOCABULARY, (VOCABULARY, 4), generator=torch.Generator().manual_seed(1234))
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.empty(n, CONTEXT + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, VOCABULARY, (n,), generator=generator)
    for t in range(CONTEXT):
        tokens[:, t + 1] = successors[tokens[:, t], torch.randint(0, 4, (n,), generator=generator)]
    return tokens[:, :-1], tokens[:, 1:]


def quadrant_images(n: int, seed: int = 0, size: int = 16) -> tuple[Tensor, Tensor]:
    """RGB ``size`` x ``size`` images whose class is the quadrant holding a bright square, under noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, IMAGE_CLASSES, (n,), generator=generator)
    images = torch.randn(n, 3, size, size, generator=generator) * 0.5
    half = size // 2
    for label in range(IMAGE_CLASSES):
        row, col = divmod(label, 2)
        images[labels == label, :, row * half + 2 : row * half + half - 2, col * half + 2 : col * half + half - 2] += 1
    return images, labels


class Logits(nn.Module):
    """A Hugging Face model returning its ``logits`` tensor, as the zoo's training step expects."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor) -> Tensor:
        return self.model(input_ids=tokens).logits


def timm_vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=16, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=IMAGE_CLASSES)


def timm_resnet() -> nn.Module:
    import timm

    return timm.create_model("resnet10t", num_classes=IMAGE_CLASSES, pretrained=False)


def hf_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCABULARY,
        n_positions=CONTEXT,
        n_embd=64,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return Logits(GPT2LMHeadModel(config))


def litgpt_gpt(init_std: float | None = None) -> nn.Module:
    from litgpt import GPT, Config

    model = GPT(
        Config(block_size=CONTEXT, vocab_size=VOCABULARY, padded_vocab_size=VOCABULARY, n_layer=2, n_head=4, n_embd=64)
    )
    if init_std is not None:  # every parameter near zero: the gradient grows from ~1e-4 as the model starts to learn
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_(0.0, init_std)
    return model


def held_out_text_loss(at_most: float | None = None, at_least: float | None = None) -> Any:
    """An outcome check: the language model's held-out loss at most ``at_most`` (healthy) or at least ``at_least``
    or non-finite (failing)."""
    tokens, targets = markov_text(512, seed=7)

    def check(module: LightningModule) -> tuple[bool, str]:
        module.eval()
        with torch.no_grad():
            logits = module(tokens)
        loss = F.cross_entropy(logits.reshape(-1, VOCABULARY), targets.reshape(-1)).item()
        return against_bar(loss, f"held-out loss {loss:.3f} nats (learned: 1.39; guessing: 4.16", at_most, at_least)

    return check


def against_bar(value: float, words: str, at_most: float | None, at_least: float | None) -> tuple[bool, str]:
    """An outcome against its bar: at most ``at_most`` (healthy), or at least ``at_least`` or non-finite (failing);
    ``words`` (an open parenthesis) get the bar and a closing one."""
    if at_most is not None:
        return value <= at_most, f"{words}; healthy needs <= {at_most})"
    assert at_least is not None
    return not math.isfinite(value) or value >= at_least, f"{words}; failing needs >= {at_least} or non-finite)"


#: The library each foreign network needs.
NEEDS = {timm_vit: "timm", timm_resnet: "timm", hf_gpt2: "transformers", litgpt_gpt: "litgpt"}


def available(network: Callable[..., nn.Module]) -> bool:
    return importlib.util.find_spec(NEEDS[network]) is not None


def text_data() -> TensorDataset:
    return TensorDataset(*markov_text(4096))


def image_data() -> TensorDataset:
    return TensorDataset(*quadrant_images(4096))
