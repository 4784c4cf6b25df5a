"""Mini-batches drawn from tensors in memory, reshuffled at every pass over the data; the test
set's batches, in order."""

from __future__ import annotations

from typing import Protocol

import torch

# train.augment: the padding of crop_flip's crops (zeros, as the FDG/DDG/DGL code; reflected, as the InfoPro code)
PADDING_MODES = {"crop_flip": "constant", "crop_flip_reflect": "reflect"}


class Batches(Protocol):
    """What an engine draws its training mini-batches from (``BatchStream`` here, from memory;
    ``folders.FolderStream``, from image files): ``next()`` gives the next (images, labels) on
    ``device``, endlessly, ``batches_per_pass`` to a pass over the data; its state (order,
    position, random streams) goes into checkpoints."""

    batch_size: int
    device: torch.device
    input_shape: tuple[int, ...]  # of one image

    @property
    def batches_per_pass(self) -> int: ...

    def next(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class PassOrder:
    """The order a training set of ``n`` items is read in, the same for data in memory and data
    read from files: at each pass a new permutation, drawn from the run's seed; ``take()`` gives
    the next batch's indices (on the CPU, the same on every device) and whether a pass began
    with it. The last incomplete batch of a pass is dropped."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.rng = torch.Generator().manual_seed(seed)
        self.order: torch.Tensor | None = None
        self.position = 0  # batches taken from the current pass

    @property
    def batches_per_pass(self) -> int:
        return self.n // self.batch_size

    def take(self) -> tuple[torch.Tensor, bool]:
        new_pass = self.order is None or self.position == self.batches_per_pass
        if new_pass:
            self.order = torch.randperm(self.n, generator=self.rng)
            self.position = 0
        indices = self.order[self.position * self.batch_size : (self.position + 1) * self.batch_size]
        self.position += 1
        return indices, new_pass

    def state_dict(self) -> dict:
        return {"rng": self.rng.get_state(), "order": self.order, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.rng.set_state(state["rng"])
        self.order, self.position = state["order"], state["position"]


class BatchStream:
    """Endless shuffled mini-batches; each pass over the data uses a new permutation.

    The last incomplete batch of a pass is dropped: every step sees ``batch_size`` images,
    which keeps BatchNorm statistics comparable between methods.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, augment: str = "none"):
        self.x, self.y = x, y
        self.device, self.input_shape = x.device, tuple(x.shape[1:])
        self.batch_size = batch_size
        self.passes = PassOrder(len(x), batch_size, seed)
        if augment != "none" and augment not in PADDING_MODES:
            raise ValueError(f"unknown augment {augment!r}: none, {', '.join(PADDING_MODES)}")
        self.augment = augment
        self.augment_rng = torch.Generator().manual_seed(seed + 2)  # apart from the order's stream

    @property
    def batches_per_pass(self) -> int:
        return self.passes.batches_per_pass

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.passes.take()[0].to(self.x.device)  # a batch's indices go to the data
        x = self.x[idx]
        if self.augment != "none":
            x = crop_flip(x, self.augment_rng, mode=PADDING_MODES[self.augment])
        return x, self.y[idx]

    def state_dict(self) -> dict:
        return {**self.passes.state_dict(), "augment_rng": self.augment_rng.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.passes.load_state_dict(state)
        self.augment_rng.set_state(state["augment_rng"])


class TensorTestSet:
    """A test set held as tensors (on the network's device): its batches in order, as views.
    ``part=(rank, world)``: every world-th image from the rank-th (a distributed worker's share)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def batches(self, batch_size: int, part: tuple[int, int] = (0, 1)):
        rank, world = part
        x, y = self.x[rank::world], self.y[rank::world]
        for start in range(0, len(x), batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]


def crop_flip(x: torch.Tensor, rng: torch.Generator, padding: int = 4, mode: str = "constant") -> torch.Tensor:
    """Random crops of padded images (zeros, or ``mode="reflect"``) and random horizontal flips, for a whole batch at once."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4, mode=mode)
    # drawn by the CPU generator (the same crops on every device), then taken to the images' device
    top = torch.randint(0, 2 * padding + 1, (n,), generator=rng).to(x.device)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=rng).to(x.device)
    flip = (torch.rand(n, generator=rng) < 0.5).to(x.device)
    rows = (top[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    cropped = padded[torch.arange(n, device=x.device)[:, None, None, None], torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)
