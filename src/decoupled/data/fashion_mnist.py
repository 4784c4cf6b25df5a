"""Fashion-MNIST: four gzip-compressed IDX files (the Debian package's, a torchvision download's,
or any folder holding them), checked against the digests of their content."""

from __future__ import annotations

import gzip
import hashlib
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from decoupled.data.raw import DatasetSpec, RawData, check_digest, check_labels, existing_dir, expected, first_line, read_bytes
from decoupled.data.raw import download as fetch
from decoupled.errors import UserError

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist

# sha256 of the *decompressed* IDX files: Debian recompresses the .gz files, so only the
# content (which is the upstream data) has a stable digest.
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip

_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def locate_fashion_mnist(root: str | Path | None, download: bool, download_dir: str | Path) -> Path:
    """``root`` if given, else the Debian package's directory, else a torchvision download."""
    if root is not None:
        return existing_dir(root)
    if Path(DEFAULT_DIR).is_dir():
        return Path(DEFAULT_DIR)
    if download:
        from torchvision import datasets

        fetch("fashion_mnist", download_dir, lambda: datasets.FashionMNIST(str(download_dir), train=True, download=True))
        return Path(download_dir) / "FashionMNIST" / "raw"
    raise UserError(
        f"fashion_mnist not found: no root given, {DEFAULT_DIR} does not exist "
        "(install the Debian package dataset-fashion-mnist), and download is off"
    )


def read_fashion_mnist(
    directory: str | Path,
    *,
    checksums: Mapping[str, str] | None = None,
    verify_checksums: bool = True,
) -> RawData:
    """Read the four Fashion-MNIST IDX files (``.gz``, or uncompressed) from ``directory``."""
    directory = Path(directory)
    table = FASHION_MNIST_SHA256 if checksums is None else checksums
    splits = {}
    for split, (images_stem, labels_stem) in _FASHION_FILES.items():
        images_path = _idx_path(directory, images_stem)
        labels_path = _idx_path(directory, labels_stem)
        images = read_idx(images_path, 3, expected_sha256=expected(table, images_stem, verify_checksums))
        labels = read_idx(labels_path, 1, expected_sha256=expected(table, labels_stem, verify_checksums))
        if len(images) != len(labels):
            raise UserError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
        check_labels(labels, len(FASHION_MNIST_CLASSES), labels_path)
        # copies: frombuffer arrays are read-only, and tensors must own writable memory
        splits[split] = (torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
    (train_x, train_y), (test_x, test_y) = splits["train"], splits["test"]
    if train_x.shape[1:] != test_x.shape[1:]:
        raise UserError(f"training and test images in {directory} differ in size: {tuple(train_x.shape[2:])} vs {tuple(test_x.shape[2:])}")
    return RawData(train_x, train_y, test_x, test_y, list(FASHION_MNIST_CLASSES), str(directory))


def read_idx(path: str | Path, ndim: int, *, expected_sha256: str | None = None) -> np.ndarray:
    """Parse an unsigned-byte IDX file (gzip-compressed if its name ends in ``.gz``).

    Layout: magic 0x0000_08_<ndim>, then ``ndim`` big-endian int32 sizes, then exactly
    prod(sizes) bytes. The structure is checked before the checksum, so a truncated file is
    reported as corrupt rather than as merely different.
    """
    path = Path(path)
    content = read_bytes(path)
    if path.suffix == ".gz":
        try:
            content = gzip.decompress(content)
        except (OSError, EOFError, zlib.error) as e:
            raise UserError(f"{path} is corrupt: not a complete gzip file ({first_line(e)})") from None
    header_len = 4 + 4 * ndim
    if len(content) < header_len:
        raise UserError(f"{path} is corrupt: {len(content)} bytes, shorter than the {header_len}-byte IDX header")
    magic = int.from_bytes(content[:4], "big")
    if magic != 0x800 | ndim:
        raise UserError(f"{path} is corrupt: IDX magic number is 0x{magic:08x}, expected 0x{0x800 | ndim:08x}")
    dims = tuple(int(d) for d in np.frombuffer(content, dtype=">i4", count=ndim, offset=4))
    expected_len = header_len + int(np.prod(dims, dtype=np.int64))
    if len(content) != expected_len:
        raise UserError(
            f"{path} is corrupt: header says {dims} ({expected_len} bytes in all), the content has {len(content)} bytes"
        )
    if expected_sha256 is not None:
        check_digest(path, "sha256 of its content", hashlib.sha256(content).hexdigest(), expected_sha256)
    return np.frombuffer(content, dtype=np.uint8, offset=header_len).reshape(dims)


def _idx_path(directory: Path, stem: str) -> Path:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    raise UserError(f"missing dataset file: {directory / stem}.gz (nor uncompressed {stem}) in {directory}")


TRAITS = {"storage": "memory"}  # prepared as tensors (decoupled.dataset_traits)
SPEC = DatasetSpec("fashion_mnist", FASHION_MNIST_CLASSES, locate_fashion_mnist, read_fashion_mnist)
