"""Images as training sees them: uint8 pixels to floats normalized per channel, the same for
images held in memory (``prepared.py``) and images read from files (``folders.py``)."""

from __future__ import annotations

import torch
from torch import Tensor


def normalize(x: Tensor, mean: list[float], std: list[float]) -> Tensor:
    """uint8 images (N, C, H, W), on any device, to float32 (x / 255 - mean) / std per channel."""
    shape = (1, -1, 1, 1)
    out = x.to(torch.float32).div_(255)
    per_channel = lambda values: torch.tensor(values, dtype=torch.float32, device=x.device).view(shape)  # noqa: E731
    return out.sub_(per_channel(mean)).div_(per_channel(std))
