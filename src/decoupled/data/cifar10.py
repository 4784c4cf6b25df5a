"""CIFAR-10: the python version's five pickled training batches and its test batch, each checked
against its md5 before it is unpickled. The batch layout (a dict holding a uint8 (N, 3072) array
and its labels) is shared with CIFAR-100 and downsampled ImageNet, whose readers use the
helpers here."""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from decoupled.data.raw import DatasetSpec, RawData, check_digest, existing_dir, expected, first_line, read_bytes
from decoupled.data.raw import download as fetch
from decoupled.errors import UserError

# md5 of each batch file of the python version, as torchvision publishes them.
CIFAR10_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip

CIFAR10_DIR_NAME = "cifar-10-batches-py"

_CIFAR_TRAIN = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"]
_CIFAR_TEST = ["test_batch"]


def batches_locator(name: str, dir_name: str, torchvision_class: str):
    """The ``locate`` of a dataset torchvision downloads as a folder ``dir_name`` of pickled
    batches (CIFAR-10, CIFAR-100): ``root`` (that folder or its parent) if given, else a
    torchvision download."""

    def locate(root: str | Path | None, download: bool, download_dir: str | Path) -> Path:
        if root is not None:
            root = existing_dir(root)
            inner = root / dir_name
            return inner if inner.is_dir() else root
        if download:
            from torchvision import datasets

            fetch(name, download_dir, lambda: getattr(datasets, torchvision_class)(str(download_dir), train=True, download=True))
            return Path(download_dir) / dir_name
        raise UserError(f"{name} not found: no root given (a {dir_name} directory or its parent) and download is off")

    return locate


locate_cifar10 = batches_locator("cifar10", CIFAR10_DIR_NAME, "CIFAR10")


def read_cifar10(
    directory: str | Path,
    *,
    checksums: Mapping[str, str] | None = None,
    verify_checksums: bool = True,
) -> RawData:
    """Read the five training batches and the test batch from a ``cifar-10-batches-py`` dir."""
    directory = Path(directory)
    table = CIFAR10_MD5 if checksums is None else checksums

    def read_all(stems: list[str]) -> tuple[Tensor, Tensor]:
        batches = [read_cifar_batch(directory / s, expected_md5=expected(table, s, verify_checksums)) for s in stems]
        x = np.concatenate([b[0] for b in batches])
        y = np.concatenate([b[1] for b in batches])
        return torch.from_numpy(x), torch.from_numpy(y)

    train_x, train_y = read_all(_CIFAR_TRAIN)
    test_x, test_y = read_all(_CIFAR_TEST)
    return RawData(train_x, train_y, test_x, test_y, list(CIFAR10_CLASSES), str(directory))


def read_cifar_batch(
    path: str | Path,
    *,
    expected_md5: str | None = None,
    label_key: bytes = b"labels",
    num_classes: int = len(CIFAR10_CLASSES),
) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> (uint8 images (N, 3, 32, 32), int64 labels (N,)).

    The checksum is checked *before* unpickling because unpickling can run arbitrary code;
    with ``expected_md5=None`` the caller trusts the file. ``label_key`` picks the labels
    (CIFAR-100's batches hold b'fine_labels' and b'coarse_labels').
    """
    path = Path(path)
    content = read_batch_file(path)
    if expected_md5 is not None:
        check_digest(path, "md5 of the file", hashlib.md5(content).hexdigest(), expected_md5)
    batch = unpickle(path, content, encoding="bytes")  # the batches were pickled by Python 2
    return batch_arrays(batch, path, data_key=b"data", label_key=label_key, num_classes=num_classes)


def read_batch_file(path: Path) -> bytes:
    if not path.is_file():
        raise UserError(f"missing dataset file: {path}")
    return read_bytes(path)


def unpickle(path: Path, content: bytes, *, encoding: str = "ASCII") -> object:
    """Unpickle a file's bytes; only for bytes whose checksum was checked, or that are trusted."""
    try:
        return pickle.loads(content, encoding=encoding)
    except Exception as e:  # a damaged pickle can fail in many ways
        raise UserError(f"{path} is corrupt: cannot unpickle it ({type(e).__name__}: {first_line(e)})") from None


def batch_arrays(
    batch: object,
    path: Path,
    *,
    data_key: bytes | str,
    label_key: bytes | str,
    num_classes: int,
    first_label: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A batch dict in the CIFAR layout -> (uint8 images (N, 3, 32, 32), int64 labels 0.. (N,)).

    The layout CIFAR-10, CIFAR-100 and downsampled ImageNet share: ``data_key`` a uint8
    (N, 3072) array, ``label_key`` N integers from ``first_label`` (ImageNet32 counts from 1);
    the labels returned count from 0.
    """
    if not isinstance(batch, Mapping) or data_key not in batch or label_key not in batch:
        raise UserError(f"{path} is corrupt: not an image batch (a dict with {data_key!r} and {label_key!r})")
    data = batch[data_key]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3 * 32 * 32):
        raise UserError(f"{path} is corrupt: {data_key!r} is not a uint8 array of shape (N, 3072)")
    try:
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{path} is corrupt: {label_key!r} is not a list of integers") from None
    if labels.shape != (len(data),):
        raise UserError(f"{path} is corrupt: {len(data)} images but {labels.size} labels")
    last = first_label + num_classes - 1
    if labels.size and (labels.min() < first_label or labels.max() > last):
        raise UserError(f"{path} is corrupt: labels range {labels.min()}..{labels.max()}, expected {first_label}..{last}")
    # rows are stored channel-major (1024 red, 1024 green, 1024 blue), so this is (N, C, H, W)
    return data.reshape(-1, 3, 32, 32), labels - first_label


TRAITS = {"storage": "memory"}  # prepared as tensors (decoupled.dataset_traits)
SPEC = DatasetSpec("cifar10", CIFAR10_CLASSES, locate_cifar10, read_cifar10)
