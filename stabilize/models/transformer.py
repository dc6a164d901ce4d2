"""TransformerLM: a decoder-only language model whose stability knobs are arguments (normalization placement,
QK-norm, z-loss, residual scaling, initialisation)."""

from __future__ import annotations

import math
from typing import Any, Literal, cast, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from stabilize.errors import ConfigurationError, DataError, check_integers
from stabilize.models.recipe import OptimizerName, SchedulerName, TrainingRecipe
from stabilize.models.variants import Variant

NormPosition = Literal["pre", "post"]
ResidualScaling = Literal["none", "deepnorm"]
TransformerInit = Literal["gpt2", "default"]


class TransformerBlock(nn.Module):
    """One transformer block: causal self-attention and an MLP, each a residual branch, normalized before the branch
    (``"pre"``: ``x + f(LN(x))``) or after the sum (``"post"``: ``LN(a * x + f(x))``, with DeepNorm's ``a`` when
    residual scaling is on). ``qk_norm`` normalizes queries and keys per head before their dot product."""

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: int,
        norm_position: str,
        qk_norm: bool,
        residual_gain: float,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.heads, self.norm_position, self.residual_gain = heads, norm_position, residual_gain
        self.norm1, self.norm2 = nn.LayerNorm(width, bias=bias), nn.LayerNorm(width, bias=bias)
        self.qkv = nn.Linear(width, 3 * width, bias=bias)
        self.proj = nn.Linear(width, width, bias=bias)
        self.q_norm = nn.LayerNorm(width // heads, bias=bias) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(width // heads, bias=bias) if qk_norm else nn.Identity()
        hidden = mlp_ratio * width
        self.mlp = nn.Sequential(nn.Linear(width, hidden, bias=bias), nn.GELU(), nn.Linear(hidden, width, bias=bias))
        #: Set by the model for a measured forward pass: the largest attention logit is kept in ``logit_max``.
        self.measure = False
        self.logit_max: Tensor | None = None

    def attention(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads).unbind(2)
        q, k, v = self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2), v.transpose(1, 2)
        if self.measure:  # the fused kernel never forms the logits: form them once, for the measurement only
            with torch.no_grad():
                logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
                future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
                self.logit_max = logits.masked_fill(future, float("-inf")).amax()
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))

    def forward(self, x: Tensor) -> Tensor:
        if self.norm_position == "pre":
            x = x + self.attention(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = self.norm1(self.residual_gain * x + self.attention(x))
        return self.norm2(self.residual_gain * x + self.mlp(x))


class TransformerLM(TrainingRecipe):
    """A decoder-only transformer for next-token prediction (``(N, T)`` token indices in, ``(N, T, vocab)`` logits
    out), on `TrainingRecipe`'s optimizers and schedules (AdamW with betas
    (0.9, 0.95) and a warm-up by default, as nanoGPT). Logs ``train/loss``, ``val/loss`` (nats per token).

    The knobs the transformer-stability literature turns are arguments: ``norm_position`` (pre-LN trains without a
    warm-up; post-LN needs one, Xiong et al. 2020), ``qk_norm`` and ``z_loss`` (Wortsman et al. 2023: attention-logit
    growth and output-logit divergence at high learning rates), ``residual_scaling="deepnorm"`` (Wang et al. 2022:
    post-LN residuals scaled by ``(2 depth)^(1/4)``, branch weights by ``(8 depth)^(-1/4)``) and ``init="gpt2"``
    (N(0, 0.02), residual projections scaled by ``1/sqrt(2 depth)``).

    Args:
        vocab_size: Tokens in the vocabulary (``CharTextDataModule.vocab_size``).
        context: Longest sequence (positions are learned).
        depth: Transformer blocks.
        width: Model width.
        heads: Attention heads (``width`` divisible by it).
        mlp_ratio: MLP hidden width over ``width``.
        norm_position: ``"pre"`` or ``"post"``.
        qk_norm: LayerNorm on queries and keys per head.
        z_loss: Weight of ``log(Z)^2`` (the softmax normalizer of the output logits) added to the training loss.
        residual_scaling: ``"none"`` or ``"deepnorm"`` (post-LN only).
        init: ``"gpt2"`` or ``"default"`` (PyTorch's).
        tie_embeddings: Share the input embedding and the output head's weight.
        bias: Biases in the linear layers and LayerNorms (nanoGPT's default has none: ``False``).
        optimizer: The optimizer, as for `TrainingRecipe` (AdamW here).
        lr: Peak learning rate.
        momentum: SGD/RMSprop momentum.
        nesterov: Nesterov momentum for SGD.
        betas: Adam/AdamW betas ((0.9, 0.95) here).
        weight_decay: Decoupled weight decay of the matrices (0.1 here).
        scheduler: The learning-rate schedule (cosine here).
        warmup_fraction: Share of the steps warming the learning rate up (0.05 here).
        final_lr_fraction: Where the cosine ends, as a fraction of ``lr`` (nanoGPT: 0.1).

    Raises:
        ConfigurationError: For a size out of range, ``width`` not divisible by ``heads`` or an unknown option.

    Forward statistics (`ForwardStatisticsSource`, read by
    `ForwardStatisticsMonitor` at its logging steps): ``block_rms/<i>`` (the residual
    stream's RMS after block ``i``), ``attention_logit_max/<i>`` (block ``i``'s largest scaled query-key product,
    causal positions only; computed beside the fused attention kernel, so only when measured) and
    ``output_logit_max`` (the largest absolute output logit).
    """

    def __init__(
        self,
        vocab_size: int = 65,
        context: int = 64,
        depth: int = 4,
        width: int = 128,
        heads: int = 4,
        mlp_ratio: int = 4,
        norm_position: NormPosition = "pre",
        qk_norm: bool = False,
        z_loss: float = 0.0,
        residual_scaling: ResidualScaling = "none",
        init: TransformerInit = "gpt2",
        tie_embeddings: bool = True,
        bias: bool = True,
        optimizer: OptimizerName = "adamw",
        lr: float = 1e-3,
        momentum: float = 0.9,
        nesterov: bool = False,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.1,
        scheduler: SchedulerName = "cosine",
        warmup_fraction: float = 0.05,
        final_lr_fraction: float = 0.0,
    ) -> None:
        check_integers(
            1, vocab_size=vocab_size, context=context, depth=depth, width=width, heads=heads, mlp_ratio=mlp_ratio
        )
        if width % heads:
            raise ConfigurationError(f"width ({width}) must be divisible by heads ({heads}).")
        for name, value, kind in (
            ("norm_position", norm_position, NormPosition),
            ("residual_scaling", residual_scaling, ResidualScaling),
            ("init", init, TransformerInit),
        ):
            if value not in get_args(kind):
                raise ConfigurationError(f"{name} must be one of {', '.join(get_args(kind))}; got {value!r}.")
        if residual_scaling == "deepnorm" and norm_position != "post":
            raise ConfigurationError("residual_scaling='deepnorm' scales post-LN residuals: use norm_position='post'.")
        if not (math.isfinite(z_loss) and z_loss >= 0):
            raise ConfigurationError(f"z_loss must be a non-negative number, got {z_loss}.")
        if not 0.0 <= final_lr_fraction <= 1.0:
            raise ConfigurationError(f"final_lr_fraction must be in [0, 1], got {final_lr_fraction}.")
        super().__init__(optimizer, lr, momentum, nesterov, betas, weight_decay, scheduler, warmup_fraction)
        deepnorm = residual_scaling == "deepnorm"
        gain = (2 * depth) ** 0.25 if deepnorm else 1.0
        self.embed = nn.Embedding(vocab_size, width)
        self.position = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(
            TransformerBlock(width, heads, mlp_ratio, norm_position, qk_norm, gain, bias) for _ in range(depth)
        )
        # Pre-LN ends with a normalization of the residual stream; post-LN's last block already normalized it.
        self.final_norm = nn.LayerNorm(width, bias=bias) if norm_position == "pre" else nn.Identity()
        self.head = nn.Linear(width, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.embed.weight
        self._initialise(init, depth, (8 * depth) ** -0.25 if deepnorm else 1.0)
        self.record_forward_statistics = False
        self.forward_statistics: dict[str, Tensor] = {}

    def _initialise(self, init: str, depth: int, branch_scale: float) -> None:
        if init == "gpt2":
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, std=0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            assert isinstance(block, TransformerBlock)
            for projection in (block.proj, block.mlp[2]):
                assert isinstance(projection, nn.Linear)
                with torch.no_grad():
                    if init == "gpt2":
                        projection.weight.mul_(1 / math.sqrt(2 * depth))
                    projection.weight.mul_(branch_scale)

    @override
    def forward(self, tokens: Tensor) -> Tensor:
        context = self.hparams["context"]
        if tokens.ndim != 2 or tokens.is_floating_point() or tokens.shape[1] > context:
            raise DataError(
                f"TransformerLM expects integer tokens of shape (N, T) with T <= context = {context}; got"
                f" {tokens.dtype} of shape {tuple(tokens.shape)}."
            )
        x = self.embed(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        measure = self.record_forward_statistics and self.training
        statistics: dict[str, Tensor] = {}
        for index, block in enumerate(cast(list[TransformerBlock], self.blocks)):
            block.measure = measure
            x = block(x)
            if measure and block.logit_max is not None:
                statistics[f"block_rms/{index}"] = x.detach().float().square().mean().sqrt()
                statistics[f"attention_logit_max/{index}"] = block.logit_max
        logits = self.head(self.final_norm(x))
        if measure:
            statistics["output_logit_max"] = logits.detach().abs().amax()
            self.forward_statistics = statistics
        return logits

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        tokens, targets = batch
        logits = self(tokens)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        if stage == "train":
            self.log_train("train/loss", loss, len(tokens))
        else:
            self.log(f"{stage}/loss", loss.detach(), on_epoch=True, prog_bar=True, batch_size=len(tokens))
        if stage == "train" and self.hparams["z_loss"]:
            loss = loss + self.hparams["z_loss"] * torch.logsumexp(logits.float(), dim=-1).square().mean()
        return loss

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    @torch.no_grad()
    def generate(
        self, prompt: Tensor, new_tokens: int, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> Tensor:
        """``prompt`` ``(N, T)`` followed by ``new_tokens`` tokens sampled one at a time (the last ``context``
        tokens condition each), in eval mode."""
        was_training = self.training
        self.eval()
        tokens = prompt
        for _ in range(new_tokens):
            logits = self(tokens[:, -self.hparams["context"] :])[:, -1] / temperature
            probabilities = torch.softmax(logits.float(), dim=-1)
            tokens = torch.cat([tokens, torch.multinomial(probabilities, 1, generator=generator)], dim=1)
        self.train(was_training)
        return tokens

    @override
    def stabilize_variants(self) -> dict[str, Variant]:
        variants = super().stabilize_variants()
        if self.hparams["norm_position"] == "post":
            variants["pre_ln"] = Variant("pre-LN blocks instead of post-LN", {"norm_position": "pre"})
        if not self.hparams["qk_norm"]:
            variants["qk_norm"] = Variant("LayerNorm on queries and keys (QK-norm)", {"qk_norm": True})
        if self.hparams["z_loss"] == 0:
            variants["z_loss"] = Variant("z-loss 1e-4 on the output logits (PaLM's weight)", {"z_loss": 1e-4})
        return variants

    @override
    def gradient_health_hints(self) -> dict[str, Any]:
        hints = super().gradient_health_hints()
        advice = (
            "transformers: pre-LN (--model.norm_position pre) trains without a long warm-up; qk_norm and z_loss keep"
            " attention and output logits from growing at high learning rates"
        )
        hints["exploding"] = f"{hints['exploding']}; {advice}"
        if self.hparams["norm_position"] == "post":
            hints["vanishing"] = hints["stalled"] = (
                "post-LN transformers stall without a warm-up (Xiong et al. 2020): --model.warmup_fraction 0.05, or"
                " pre-LN (--model.norm_position pre), or a lower --model.lr"
            )
        return hints

    def forward_statistics_hints(self) -> dict[str, str]:
        """Advice for `ForwardStatisticsMonitor`'s findings, in this model's flags."""
        return {
            "attention_logits": "--model.qk_norm true (QK-norm) or a lower --model.lr",
            "output_logits": "--model.z_loss 1e-4 or a lower --model.lr",
        }
