"""CIFAR-10: the python version's five pickled training batches and its test batch, each checked
against its md5 before it is unpickled."""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from decoupled.data.raw import DatasetSpec, RawData, check_digest, check_labels, existing_dir, expected, first_line, read_bytes
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


def locate_cifar10(root: str | Path | None, download: bool, download_dir: str | Path) -> Path:
    """``root`` (the batches directory or its parent) if given, else a torchvision download."""
    if root is not None:
        root = existing_dir(root)
        inner = root / CIFAR10_DIR_NAME
        return inner if inner.is_dir() else root
    if download:
        from torchvision import datasets

        fetch("cifar10", download_dir, lambda: datasets.CIFAR10(str(download_dir), train=True, download=True))
        return Path(download_dir) / CIFAR10_DIR_NAME
    raise UserError(f"cifar10 not found: no root given (a {CIFAR10_DIR_NAME} directory or its parent) and download is off")


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


def read_cifar_batch(path: str | Path, *, expected_md5: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> (uint8 images (N, 3, 32, 32), int64 labels (N,)).

    The checksum is checked *before* unpickling because unpickling can run arbitrary code;
    with ``expected_md5=None`` the caller trusts the file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing dataset file: {path}")
    content = read_bytes(path)
    if expected_md5 is not None:
        check_digest(path, "md5 of the file", hashlib.md5(content).hexdigest(), expected_md5)
    try:
        batch = pickle.loads(content, encoding="bytes")  # the batches were pickled by Python 2
    except Exception as e:  # a damaged pickle can fail in many ways
        raise UserError(f"{path} is corrupt: cannot unpickle it ({type(e).__name__}: {first_line(e)})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise UserError(f"{path} is corrupt: not a CIFAR batch (a dict with b'data' and b'labels')")
    data = batch[b"data"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3 * 32 * 32):
        raise UserError(f"{path} is corrupt: b'data' is not a uint8 array of shape (N, 3072)")
    try:
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (TypeError, ValueError):
        raise UserError(f"{path} is corrupt: b'labels' is not a list of integers") from None
    if labels.shape != (len(data),):
        raise UserError(f"{path} is corrupt: {len(data)} images but {labels.size} labels")
    check_labels(labels, len(CIFAR10_CLASSES), path)
    # rows are stored channel-major (1024 red, 1024 green, 1024 blue), so this is (N, C, H, W)
    return data.reshape(-1, 3, 32, 32), labels


SPEC = DatasetSpec("cifar10", CIFAR10_CLASSES, locate_cifar10, read_cifar10)
