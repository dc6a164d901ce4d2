"""stabilize: see, and stop, vanishing and exploding gradients in PyTorch Lightning."""

__version__ = "0.1.0"
