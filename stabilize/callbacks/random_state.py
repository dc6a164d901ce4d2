"""Observers must not change the training they watch: every random generator left as it was found."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def preserved_random_state(devices: Sequence[torch.device] = ()) -> Iterator[None]:
    """Run the block, then restore the random state of torch (CPU and the CUDA ``devices``), Python's ``random``
    and NumPy's global generator: a measurement that draws a random start vector or calls a ``training_step`` with
    dropout must not shift the masks, noise and batch order of the steps that follow (a DataLoader draws its
    shuffling seed from torch's global generator at each epoch)."""
    cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"})
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=cuda, enabled=True):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
