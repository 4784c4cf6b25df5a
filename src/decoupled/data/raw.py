"""What every dataset reader shares: the raw data it returns, its spec, and the checks on files.

Every problem with the user's files raises ``UserError`` with one line naming the file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import Tensor

from decoupled.errors import UserError


@dataclass
class RawData:
    """A dataset as read from its raw files: uint8 images (N, C, H, W), int64 labels."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: list[str]
    source: str  # the directory the files were read from


@dataclass(frozen=True)
class DatasetSpec:
    """How to find a dataset's raw directory and how to read it.

    ``locate(root, download, download_dir)`` returns the directory holding the raw files;
    ``read(directory, checksums, verify_checksums)`` reads and checks them.
    """

    name: str
    classes: list[str]
    locate: Callable[[str | Path | None, bool, str | Path], Path]
    read: Callable[..., RawData]


def existing_dir(root: str | Path) -> Path:
    root = Path(root)
    if not root.exists():
        raise UserError(f"dataset root does not exist: {root}")
    if not root.is_dir():
        raise UserError(f"dataset root is not a directory: {root}")
    return root


def download(name: str, download_dir: str | Path, fetch: Callable[[], object]) -> None:
    """Run torchvision's download; failures are the network's or the disk's, not bugs."""
    Path(download_dir).mkdir(parents=True, exist_ok=True)
    try:
        fetch()
    except (OSError, RuntimeError) as e:
        raise UserError(f"could not download {name} into {download_dir}: {first_line(e)}") from None


def expected(table: Mapping[str, str], stem: str, verify: bool) -> str | None:
    if not verify:
        return None
    if stem not in table:
        raise UserError(f"no checksum known for {stem}; give one or turn checksum verification off")
    return table[stem]


def check_digest(path: Path, what: str, actual: str, expected: str) -> None:
    if actual != expected.lower():
        raise UserError(f"checksum mismatch for {path}: {what} is {actual}, expected {expected}")


def check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"{path} is corrupt: labels range {labels.min()}..{labels.max()}, expected 0..{num_classes - 1}")


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
