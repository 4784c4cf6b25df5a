"""Datasets streamed from image folders (torchvision's ``ImageFolder`` layout), for those too
large to hold in memory (ImageNet's 1.28 M full-size images).

A streamed dataset's prepared file holds no images: the list of its files (relative to its root),
their labels, its classes, the normalization and the transforms' sizes. ``FolderDataset`` reads
the images as training needs them, in a ``DataLoader`` with worker processes:

* training (``FolderStream``): each pass over the data in a permutation drawn from the run's seed,
  as ``BatchStream`` draws it, so every engine, sync or async, simulated or distributed, sees the
  same images in the same order; each image's random crop and flip drawn from a seed of its own,
  itself drawn from the run's seed, so the augmentation does not depend on which loader worker
  decodes it, nor on how many there are;
* evaluation (``FolderTestSet``): the test images in order, resized and centre-cropped.

The transforms are the ImageNet code's (the DGL code's ``imagenet_dgl/``, as PyTorch's ImageNet
example): ``RandomResizedCrop(crop)`` and a horizontal flip for training, ``Resize(resize)`` and
``CenterCrop(crop)`` for evaluation. Workers send uint8 images; they are normalized on the
network's device, as the in-memory datasets are (``pixels.normalize``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from decoupled.data.batches import PassOrder
from decoupled.data.pixels import normalize
from decoupled.dataset_traits import check_augment
from decoupled.errors import UserError


@dataclass
class FolderIndex:
    """What a streamed dataset's reader returns: its image files (paths relative to ``root``),
    labels and classes, and the normalization its authors use."""

    root: str
    train_files: list[str]
    train_y: Tensor
    test_files: list[str]
    test_y: Tensor
    classes: list[str]
    mean: list[float]
    std: list[float]
    source: str


class FolderImages(torch.utils.data.Dataset):
    """Images read from files: item ``(i, seed)`` is file i through the transform, the random
    ones drawn from ``seed``; a file that cannot be read is returned as its error, not raised
    (a worker's exception would reach the user as a traceback, not one line naming the file)."""

    def __init__(self, root: str, files: list[str], transform):
        self.root, self.files, self.transform = Path(root), files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]):
        from PIL import Image

        index, seed = item
        path = self.root / self.files[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except (OSError, SyntaxError, ValueError) as e:  # missing, unreadable, not an image (PIL's UnidentifiedImageError is an OSError)
            return f"cannot read image {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        # the transform's draws come from the item's seed, without touching the process's own stream
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image)


def collate(items: list) -> Tensor | str:
    """Stack the images of a batch (uint8), or return the first unreadable file's message."""
    for item in items:
        if isinstance(item, str):
            return item
    return torch.stack(items)


def transforms(kind: str, crop: int, resize: int):
    """The training (``resized_crop_flip``) or evaluation (``none``) transform, to uint8 (C, H, W).
    The crops and resizes are PIL's, on the decoded image, as the authors' (torchvision's v1
    transforms on PIL images); only then is it a tensor."""
    from torchvision.transforms import v2

    if kind == "resized_crop_flip":
        steps = [v2.RandomResizedCrop(crop), v2.RandomHorizontalFlip()]
    else:
        steps = [v2.Resize(resize), v2.CenterCrop(crop)]
    return v2.Compose([*steps, v2.PILToTensor()])


class FolderStream:
    """Endless mini-batches of a folder's images, each pass in a new seeded permutation; the last
    incomplete batch of a pass is dropped (as ``BatchStream``). The loader starts at the first
    ``next()``: a process that never draws a batch (a distributed worker other than the first)
    starts none."""

    def __init__(self, data: "FolderDataset", batch_size: int, seed: int, augment: str, device: torch.device, workers: int):
        check_augment(data.name, augment)  # as the grid checked the job
        self.images = FolderImages(data.root, data.train_files, transforms(augment, data.crop_size, data.resize_size))
        self.labels, self.normalize = data.train_y, data.normalizer(device)
        self.batch_size, self.device, self.workers = batch_size, device, workers
        self.input_shape = data.input_shape
        self.passes = PassOrder(len(self.labels), batch_size, seed)  # BatchStream's order
        self.augment_rng = torch.Generator().manual_seed(seed + 2)  # apart from the order's stream, as BatchStream's
        self.seeds: Tensor | None = None  # each image's transform seed, this pass
        self.loader: Iterator | None = None

    @property
    def batches_per_pass(self) -> int:
        return self.passes.batches_per_pass

    def next(self) -> tuple[Tensor, Tensor]:
        indices, new_pass = self.passes.take()
        if new_pass:
            self.seeds = torch.randint(0, 2**62, (len(self.labels),), generator=self.augment_rng)
            self.loader = None
        if self.loader is None:
            self.loader = self._load_from(self.passes.position - 1)  # from the batch just taken
        return self.normalize(_checked(next(self.loader))), self.labels[indices].to(self.device)

    def _load_from(self, position: int) -> Iterator:
        """The pass's batches from ``position`` on, read ahead by the loader's workers."""
        b = self.batch_size
        items = list(zip(self.passes.order.tolist(), self.seeds.tolist()))
        batches = [items[i * b : (i + 1) * b] for i in range(position, self.batches_per_pass)]
        return iter(_loader(self.images, batches, self.workers, self.device))

    def state_dict(self) -> dict:
        return {**self.passes.state_dict(), "augment_rng": self.augment_rng.get_state(), "seeds": self.seeds}

    def load_state_dict(self, state: dict) -> None:
        self.passes.load_state_dict(state)
        self.augment_rng.set_state(state["augment_rng"])
        self.seeds = state["seeds"]
        self.loader = None  # read again from the saved position


class FolderTestSet:
    """The test images in order, resized and centre-cropped; ``part=(rank, world)``: every
    world-th image from the rank-th (a distributed worker's share)."""

    def __init__(self, data: "FolderDataset", device: torch.device, workers: int):
        self.images = FolderImages(data.root, data.test_files, transforms("none", data.crop_size, data.resize_size))
        self.labels, self.normalize = data.test_y, data.normalizer(device)
        self.device, self.workers = device, workers

    def batches(self, batch_size: int, part: tuple[int, int] = (0, 1)) -> Iterator[tuple[Tensor, Tensor]]:
        rank, world = part
        share = list(range(rank, len(self.labels), world))
        batches = [[(i, 0) for i in share[s : s + batch_size]] for s in range(0, len(share), batch_size)]
        for items, images in zip(batches, _loader(self.images, batches, self.workers, self.device)):
            yield self.normalize(_checked(images)), self.labels[[i for i, _ in items]].to(self.device)


@dataclass
class FolderDataset(FolderIndex):
    """A prepared streamed dataset: its index, the transforms' sizes, and what ``Dataset`` tells
    training (``n_train``, ``input_shape``, classes) and gives it (``train_stream``, ``test_set``)."""

    crop_size: int
    resize_size: int
    name: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def n_train(self) -> int:
        return len(self.train_y)

    @property
    def n_test(self) -> int:
        return len(self.test_y)

    @property
    def in_channels(self) -> int:
        return 3

    @property
    def image_size(self) -> int:
        return self.crop_size

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.crop_size, self.crop_size)

    def train_stream(self, batch_size: int, seed: int, augment: str, device: torch.device, workers: int) -> FolderStream:
        return FolderStream(self, batch_size, seed, augment, device, workers)

    def test_set(self, device: torch.device, workers: int) -> FolderTestSet:
        return FolderTestSet(self, device, workers)

    def normalizer(self, device: torch.device):
        return lambda images: normalize(images.to(device, non_blocking=True), self.mean, self.std)


def _loader(images: FolderImages, batches: list[list[tuple[int, int]]], workers: int, device: torch.device) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(images, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                                       pin_memory=torch.device(device).type == "cuda", multiprocessing_context=_workers_context() if workers else None)


@functools.cache
def _workers_context():
    """Workers forked from a fork server, not from the training process: a fork of it would
    inherit what its other threads hold at that moment (the MLflow thread's store lock, held by
    the children once the parent lets go, deadlocked the next run's start). The server imports
    torch and this module once; each worker forked from it starts at once."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "PIL.Image", "torchvision.transforms.v2", __name__])
    return context


def _checked(images: Tensor | str) -> Tensor:
    if isinstance(images, str):
        raise UserError(images)
    return images


def write_image_folder(raw, root: str | Path) -> None:
    """Write ``raw``'s images (a dataset read in memory) as JPEG files in the ``train/`` and
    ``val/`` class-folder layout that ``ImageFolder`` reads: a small stand-in for ImageNet, so
    that a CPU run takes the streamed path end to end. All or nothing: the folder appears only
    once every file is written."""
    import shutil

    from PIL import Image

    root = Path(root)
    tmp = root.with_name(f".{root.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    digits = len(str(len(raw.classes) - 1))
    for split, x, y in (("train", raw.train_x, raw.train_y), ("val", raw.test_x, raw.test_y)):
        for c in range(len(raw.classes)):
            (tmp / split / f"{c:0{digits}d}").mkdir(parents=True)  # every class, so that train/ and val/ agree
        for i, (image, label) in enumerate(zip(x, y.tolist())):
            pixels = image.permute(1, 2, 0).numpy()
            picture = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
            picture.save(tmp / split / f"{label:0{digits}d}" / f"{i:06d}.jpg", quality=95)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(root)
