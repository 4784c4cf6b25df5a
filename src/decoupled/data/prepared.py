"""The prepared-tensor format: one ``torch.save`` file per dataset (uint8 images, labels, classes
and the training set's per-channel statistics), and ``Dataset``, its normalized float tensors
that training keeps in memory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from decoupled.data.batches import BatchStream, TensorTestSet
from decoupled.data.pixels import normalize
from decoupled.errors import UserError

if TYPE_CHECKING:
    from decoupled.data.folders import FolderDataset

@dataclass
class Dataset:
    """A prepared dataset in memory: normalized float32 images (N, C, H, W), int64 labels.

    What training asks of any dataset (this one, or a streamed ``folders.FolderDataset``):
    ``n_train``, ``n_test``, ``input_shape``, its classes, ``train_stream`` (the mini-batches)
    and ``test_set`` (the test images, in order).
    """

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: list[str]
    num_classes: int
    in_channels: int
    image_size: int
    name: str

    @property
    def n_train(self) -> int:
        return len(self.train_y)

    @property
    def n_test(self) -> int:
        return len(self.test_y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def train_stream(self, batch_size: int, seed: int, augment: str, device: torch.device, workers: int = 0) -> BatchStream:
        """The shuffled mini-batches, drawn from the training set copied once to ``device`` (no loader: ``workers`` is unused)."""
        return BatchStream(self.train_x.to(device), self.train_y.to(device), batch_size, seed, augment)

    def test_set(self, device: torch.device, workers: int = 0) -> TensorTestSet:
        """The test set, copied once to ``device``: on a GPU no evaluation batch is copied from the host."""
        return TensorTestSet(self.test_x.to(device), self.test_y.to(device))


_PREPARED_KEYS = ("name", "train_x", "train_y", "test_x", "test_y", "classes", "mean", "std")


def load_prepared(path: str | Path) -> Dataset | FolderDataset:
    """Load a file written by ``prepare``: a dataset in memory, its images normalized once, up
    front; or a streamed one's index (``folders.FolderDataset``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prepared dataset not found: {path}")
    # The workflow does not rebuild a file that exists: say how to have it rebuilt.
    again = "delete it to have it prepared again"
    try:
        # weights_only: a prepared file holds only tensors and plain values, so nothing in it
        # needs (or may) run code when loaded.
        stored = torch.load(path, weights_only=True)
    except Exception as e:  # torch raises several types for a file that is not its own (its message: advice on weights_only)
        raise UserError(f"{path} is not a prepared dataset file (damaged or foreign: torch cannot read it, {type(e).__name__}); {again}") from None
    if isinstance(stored, dict) and stored.get("streamed"):
        return _streamed(path, stored, again)
    missing = [k for k in _PREPARED_KEYS if not isinstance(stored, dict) or k not in stored]
    if missing:
        raise UserError(f"{path} is not a prepared dataset file: missing {', '.join(missing)}; {again}")
    for key in ("train_x", "test_x"):
        x = stored[key]
        if not (isinstance(x, Tensor) and x.dtype == torch.uint8 and x.dim() == 4):
            raise UserError(f"{path} is not a prepared dataset file: {key} is not a uint8 (N, C, H, W) tensor; {again}")
    mean, std = stored["mean"], stored["std"]
    channels = stored["train_x"].shape[1]
    if len(mean) != channels or len(std) != channels:
        raise UserError(f"{path} is not a prepared dataset file: mean/std do not have one value per channel ({channels}); {again}")
    classes = list(stored["classes"])
    train_x = normalize(stored["train_x"], mean, std)
    return Dataset(
        train_x=train_x,
        train_y=stored["train_y"].long(),
        test_x=normalize(stored["test_x"], mean, std),
        test_y=stored["test_y"].long(),
        classes=classes,
        num_classes=len(classes),
        in_channels=train_x.shape[1],
        image_size=train_x.shape[2],
        name=stored["name"],
    )


_STREAMED_KEYS = ("name", "root", "train_files", "train_y", "test_files", "test_y", "classes", "mean", "std", "source", "crop_size", "resize_size")


def _streamed(path: Path, stored: dict, again: str) -> FolderDataset:
    from decoupled.data.folders import FolderDataset

    missing = [k for k in _STREAMED_KEYS if k not in stored]
    if missing:
        raise UserError(f"{path} is not a prepared dataset file: missing {', '.join(missing)}; {again}")
    if not Path(stored["root"]).is_dir():
        raise UserError(f"{path}: its images' folder {stored['root']} is gone; {again} from where the images are now")
    return FolderDataset(**{k: stored[k] for k in _STREAMED_KEYS if k not in ("train_y", "test_y", "classes")},
                         train_y=stored["train_y"].long(), test_y=stored["test_y"].long(), classes=list(stored["classes"]))


def balanced_subset(x: Tensor, y: Tensor, per_class: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Exactly ``per_class`` samples of every class 0..max(y), in a seeded shuffled order.

    Balanced so that small smoke runs still see every class equally; seeded so that the same
    config always selects the same images.
    """
    if per_class < 1:
        raise UserError(f"samples per class must be at least 1, got {per_class}")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(int(y.max()) + 1):
        members = (y == c).nonzero().flatten()
        if len(members) < per_class:
            raise UserError(f"cannot take {per_class} samples per class: class {c} has only {len(members)}")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    index = torch.cat(chosen)
    index = index[torch.randperm(len(index), generator=generator)]
    return x[index], y[index]


def channel_stats(x: Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of uint8 images on the 0..1 pixel scale.

    Counted through a 256-bin histogram: exact, and no float copy of the whole dataset.
    """
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).double()
        n = counts.sum()
        mean = (counts * values).sum() / n
        var = (counts * (values - mean) ** 2).sum() / n
        std = var.sqrt().item()
        means.append(mean.item())
        # a constant channel carries no information; dividing by 1 keeps it at 0, not NaN
        stds.append(std if std > 0 else 1.0)
    return means, stds
