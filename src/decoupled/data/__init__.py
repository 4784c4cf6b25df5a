"""Datasets: read the raw files, check them, and store them once as tensors (or, for those too
large for memory, as a list of their image files: ``folders.py``, ``imagenet.py``).

Experiments must be reproducible from the data as published, so each dataset is read from its
real raw format (``fashion_mnist.py``: IDX; ``cifar10.py``, ``cifar100.py``: the pickled batches;
``imagenet32.py``: downsampled ImageNet's batches, in the same layout), and files whose checksum
differs from the known one are refused (ImageNet32 has none published: see its module). ``prepare`` then writes a single
``torch.save`` file per dataset (optionally a class-balanced subset), and ``load_prepared``
(``prepared.py``) turns it into normalized float tensors that training keeps in memory.
Adding a dataset = a file here with its ``TRAITS`` and ``SPEC`` + a row in ``DATASETS`` + its name in the schema.

Every problem with the user's files raises ``UserError`` with one line naming the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from decoupled.data import cifar10, cifar100, fashion_mnist, imagenet, imagenet32
from decoupled.data.cifar10 import CIFAR10_CLASSES, CIFAR10_DIR_NAME, CIFAR10_MD5, read_cifar10, read_cifar_batch
from decoupled.data.cifar100 import CIFAR100_CLASSES, CIFAR100_DIR_NAME, CIFAR100_MD5, read_cifar100
from decoupled.data.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_SHA256, read_fashion_mnist, read_idx
from decoupled.data.folders import FolderDataset, FolderIndex, write_image_folder
from decoupled.data.imagenet32 import IMAGENET32_CLASSES, read_imagenet32
from decoupled.data.prepared import Dataset, balanced_subset, channel_stats, load_prepared
from decoupled.data.raw import DatasetSpec, RawData
from decoupled.dataset_traits import traits
from decoupled.errors import UserError
from decoupled.files import save_torch

DEFAULT_DOWNLOAD_DIR = "results/data/downloads"
DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec for spec in (fashion_mnist.SPEC, cifar10.SPEC, cifar100.SPEC, imagenet32.SPEC, imagenet.SPEC)
}

__all__ = ["CIFAR100_CLASSES", "CIFAR100_DIR_NAME", "CIFAR100_MD5", "CIFAR10_CLASSES", "CIFAR10_DIR_NAME", "CIFAR10_MD5",
           "DATASETS", "DEFAULT_DOWNLOAD_DIR", "FASHION_MNIST_CLASSES", "FASHION_MNIST_SHA256", "IMAGENET32_CLASSES", "Dataset",
           "DatasetSpec", "FolderDataset", "FolderIndex", "RawData", "balanced_subset", "channel_stats", "dataset_spec", "fixed_stats", "load_prepared", "prepare",
           "read_cifar10", "read_cifar100", "read_cifar_batch", "read_fashion_mnist", "read_idx", "read_imagenet32", "read_raw"]


def read_raw(
    name: str,
    root: str | Path | None = None,
    *,
    download: bool = False,
    download_dir: str | Path = DEFAULT_DOWNLOAD_DIR,
    checksums: Mapping[str, str] | None = None,
    verify_checksums: bool = True,
) -> RawData:
    """Find dataset ``name`` (see each spec for where it looks), read it and check its files.

    ``checksums`` (file stem -> hex digest) replaces the module's table, e.g. for small test
    files; ``verify_checksums=False`` skips the check.
    """
    spec = dataset_spec(name)
    directory = spec.locate(root, download, download_dir)
    return spec.read(directory, checksums=checksums, verify_checksums=verify_checksums)


def prepare(
    name: str,
    out_path: str | Path,
    root: str | Path | None = None,
    *,
    download: bool = False,
    download_dir: str | Path = DEFAULT_DOWNLOAD_DIR,
    subset_per_class: int | None = None,
    test_subset_per_class: int | None = None,
    seed: int = 0,
    checksums: Mapping[str, str] | None = None,
    verify_checksums: bool = True,
    crop_size: int = 224,
    resize_size: int = 256,
    generate_from: str | None = None,
    normalize: Mapping[str, list[float]] | None = None,
) -> dict:
    """Read dataset ``name``, optionally subset it, and write it to ``out_path`` atomically.

    The normalization statistics are computed here, over the (subset) training set, so that
    every run loading this file normalizes identically, unless ``normalize`` (``{"mean": [...],
    "std": [...]}``, one value per channel) fixes them, as a paper's code does. Returns a short summary.

    A streamed dataset (``dataset_traits``) is written as the list of its files instead, with
    the sizes of its transforms' crops (``crop_size``) and resizes (``resize_size``) and its
    authors' normalization; with ``generate_from``, ``root`` is first written, where it does not
    exist, as an image folder of that in-memory dataset (``folders.write_image_folder``).
    """
    if traits(name).storage == "streamed":
        return _prepare_streamed(name, out_path, root, download, download_dir, subset_per_class, test_subset_per_class, seed,
                                 checksums, verify_checksums, crop_size, resize_size, generate_from, normalize)
    raw = read_raw(
        name, root, download=download, download_dir=download_dir,
        checksums=checksums, verify_checksums=verify_checksums,
    )  # fmt: skip
    train_x, train_y, test_x, test_y = raw.train_x, raw.train_y, raw.test_x, raw.test_y
    if subset_per_class is not None:
        train_x, train_y = balanced_subset(train_x, train_y, subset_per_class, seed)
    if test_subset_per_class is not None:
        test_x, test_y = balanced_subset(test_x, test_y, test_subset_per_class, seed)
    mean, std = fixed_stats(normalize, train_x.shape[1]) if normalize is not None else channel_stats(train_x)
    payload = {
        "name": name,
        "train_x": train_x.contiguous(),
        "train_y": train_y.contiguous(),
        "test_x": test_x.contiguous(),
        "test_y": test_y.contiguous(),
        "classes": list(raw.classes),
        "mean": mean,
        "std": std,
        "source": raw.source,
        "subset_per_class": subset_per_class,
        "test_subset_per_class": test_subset_per_class,
    }
    save_torch(payload, out_path)
    return {
        "name": name,
        "n_train": len(train_y),
        "n_test": len(test_y),
        "source": raw.source,
        "shape": list(train_x.shape[1:]),
    }


def _prepare_streamed(name, out_path, root, download, download_dir, subset_per_class, test_subset_per_class, seed,
                      checksums, verify_checksums, crop_size, resize_size, generate_from, normalize) -> dict:
    if generate_from is not None:
        if root is None:
            raise UserError(f"config key 'dataset.generate_from': {generate_from} needs dataset.root, the folder to write its images to")
        if not Path(root).exists():
            stand_in = read_raw(generate_from, None, download=download, download_dir=download_dir)
            if subset_per_class is not None:  # the folder holds only the images to be used
                stand_in.train_x, stand_in.train_y = balanced_subset(stand_in.train_x, stand_in.train_y, subset_per_class, seed)
            if test_subset_per_class is not None:
                stand_in.test_x, stand_in.test_y = balanced_subset(stand_in.test_x, stand_in.test_y, test_subset_per_class, seed)
            write_image_folder(stand_in, root)
    index = read_raw(name, root, download=download, download_dir=download_dir, checksums=checksums, verify_checksums=verify_checksums)
    train_files, train_y, test_files, test_y = index.train_files, index.train_y, index.test_files, index.test_y
    if subset_per_class is not None:
        train_files, train_y = _subset_files(train_files, train_y, subset_per_class, seed)
    if test_subset_per_class is not None:
        test_files, test_y = _subset_files(test_files, test_y, test_subset_per_class, seed)
    mean, std = fixed_stats(normalize, 3) if normalize is not None else (index.mean, index.std)
    payload = {"name": name, "streamed": True, "root": index.root, "train_files": train_files, "train_y": train_y, "test_files": test_files,
               "test_y": test_y, "classes": list(index.classes), "mean": mean, "std": std, "crop_size": crop_size,
               "resize_size": resize_size, "source": index.source, "subset_per_class": subset_per_class, "test_subset_per_class": test_subset_per_class}
    save_torch(payload, out_path)
    return {"name": name, "n_train": len(train_y), "n_test": len(test_y), "source": index.source, "shape": [3, crop_size, crop_size]}


def fixed_stats(normalize: Mapping[str, list[float]], channels: int) -> tuple[list[float], list[float]]:
    """``dataset.normalize``'s mean and std, checked to have one value per channel of the images."""
    for key in ("mean", "std"):
        if len(normalize[key]) != channels:
            raise UserError(f"config key 'dataset.normalize.{key}': {len(normalize[key])} values for images of {channels} channel(s)")
    return [float(v) for v in normalize["mean"]], [float(v) for v in normalize["std"]]


def _subset_files(files: list[str], labels, per_class: int, seed: int):
    """``balanced_subset`` of a file list: the same images it would pick of tensors."""
    import torch

    positions, labels = balanced_subset(torch.arange(len(files)), labels, per_class, seed)
    return [files[i] for i in positions.tolist()], labels


def dataset_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise UserError(f"unknown dataset '{name}' (known: {', '.join(DATASETS)})") from None
