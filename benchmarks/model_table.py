"""Print the README's table of model variants with their parameter and weight-layer counts (CPU, seconds).

python benchmarks/model_table.py
"""

from __future__ import annotations

from torch import nn

from stabilize.models import BatchNormCNN, DeepPlainCNN, FastCNN, FixupResNet, PlainCNN, ResNet

ROWS = [
    ("PlainCNN()", PlainCNN, {}, "the seed ConvNet: 5 convs + max-pools, trains fine because it is shallow"),
    (
        "DeepPlainCNN(depth=20, activation='sigmoid', init='small_normal')",
        DeepPlainCNN,
        {"depth": 20, "activation": "sigmoid", "init": "small_normal"},
        "vanishing gradients, by construction",
    ),
    ("DeepPlainCNN(depth=56)", DeepPlainCNN, {"depth": 56}, "the degradation problem of deep plain nets"),
    ("BatchNormCNN(depth=56)", BatchNormCNN, {"depth": 56}, "normalization alone keeps gradients alive"),
    ("ResNet(depth=20)", ResNet, {"depth": 20}, "residual connections (He et al. 2016), paper: 0.27M"),
    ("ResNet(depth=56)", ResNet, {"depth": 56}, "paper: 0.85M"),
    ("ResNet(depth=110)", ResNet, {"depth": 110}, "paper: 1.7M"),
    ("ResNet(depth=56, preact=True)", ResNet, {"depth": 56, "preact": True}, "pre-activation blocks (He et al. 2016b)"),
    ("FixupResNet(depth=56)", FixupResNet, {"depth": 56}, "residual net with no normalization (Fixup init)"),
    ("FastCNN()", FastCNN, {}, "the GPU speed-run network (issue 5)"),
]


def main() -> None:
    print("| variant | demonstrates | parameters | weight layers |")
    print("|---|---|---:|---:|")
    for label, cls, kwargs, purpose in ROWS:
        model = cls(**kwargs)
        params = sum(p.numel() for p in model.parameters())
        layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
        print(f"| `{label}` | {purpose} | {params:,} | {layers} |")


if __name__ == "__main__":
    main()
