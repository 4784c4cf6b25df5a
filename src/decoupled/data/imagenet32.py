"""ImageNet32: the downsampled ImageNet 32x32 of Chrabaszcz, Loshchilov and Hutter (2017), as
image-net.org distributes it ("Downsampled ImageNet 32x32": Imagenet32_train, Imagenet32_val).

Ten training batches ``train_data_batch_1`` .. ``train_data_batch_10`` and ``val_data`` (the test
split here), each a Python-3 pickle (or, from the ``_npz`` archives, the same name + ``.npz``) of
a dict in the CIFAR layout: 'data' uint8 (N, 3072), channel-major, and 'labels' 1..1000, which
are read as 0..999 (the training batches' 'mean' is not used). The archive names no classes, so
class ``i`` is named ``str(i)``.

No checksums are published for these files, so there is no table to check them against: with
checksum verification on (the default) a file is read only if the caller gives its sha256
(``checksums``, per file name without ``.npz``); otherwise the user must turn verification off,
accepting the files as they are. A pickle whose checksum was not checked is never unpickled
while verification is on, since unpickling can run code. Shape, dtype and label range are
always checked.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from decoupled.data.cifar10 import batch_arrays, read_batch_file, unpickle
from decoupled.data.raw import DatasetSpec, RawData, check_digest, existing_dir, first_line
from decoupled.errors import UserError

IMAGENET32_SHA256: dict[str, str] = {}  # none published
IMAGENET32_CLASSES = [str(i) for i in range(1000)]
IMAGENET32_URL = "https://image-net.org/download-images.php"

_TRAIN = [f"train_data_batch_{i}" for i in range(1, 11)]
_TEST = ["val_data"]
# where the archives unpack, below the directory given
_SUBDIRS = {"train": ("Imagenet32_train", "Imagenet32_train_npz"), "val": ("Imagenet32_val", "Imagenet32_val_npz")}
_LAYOUT = "train_data_batch_1..10 and val_data, or its Imagenet32_train/ and Imagenet32_val/ folders"


def locate_imagenet32(root: str | Path | None, download: bool, download_dir: str | Path) -> Path:
    """``root``: the directory holding the files, or the parent of the unpacked archives' folders.

    There is nothing to download from (torchvision has no ImageNet32), whatever ``download`` says.
    """
    if root is not None:
        return existing_dir(root)
    raise UserError(
        f"imagenet32 not found: no root given, and it cannot be downloaded automatically; get "
        f"'Downsampled ImageNet 32x32' (Imagenet32_train, Imagenet32_val) from {IMAGENET32_URL} "
        f"and set dataset.root to a directory holding {_LAYOUT}"
    )


def read_imagenet32(
    directory: str | Path,
    *,
    checksums: Mapping[str, str] | None = None,
    verify_checksums: bool = True,
) -> RawData:
    """Read the ten training batches and ``val_data`` (as the test split) below ``directory``."""
    directory = Path(directory)
    table = IMAGENET32_SHA256 if checksums is None else checksums

    def read_all(stems: list[str]) -> tuple[Tensor, Tensor]:
        batches = [read_imagenet32_batch(find_file(directory, s), table, verify_checksums) for s in stems]
        x = np.concatenate([b[0] for b in batches])
        y = np.concatenate([b[1] for b in batches])
        return torch.from_numpy(x), torch.from_numpy(y)

    train_x, train_y = read_all(_TRAIN)
    test_x, test_y = read_all(_TEST)
    return RawData(train_x, train_y, test_x, test_y, list(IMAGENET32_CLASSES), str(directory))


def read_imagenet32_batch(path: Path, table: Mapping[str, str], verify: bool) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (uint8 images (N, 3, 32, 32), int64 labels 0..999 (N,))."""
    stem = path.name.removesuffix(".npz")
    if verify and stem not in table:
        raise UserError(
            f"no checksum known for {path} (none is published for ImageNet32): set dataset.verify_checksums: false "
            "to read files you trust (unpickling runs code), or give its sha256 in checksums"
        )
    content = read_batch_file(path)
    if verify:
        check_digest(path, "sha256 of the file", hashlib.sha256(content).hexdigest(), table[stem])
    batch = load_npz(path, content) if path.suffix == ".npz" else unpickle(path, content)
    return batch_arrays(batch, path, data_key="data", label_key="labels", num_classes=len(IMAGENET32_CLASSES), first_label=1)


def load_npz(path: Path, content: bytes) -> dict[str, np.ndarray]:
    """An ``.npz`` batch; ``allow_pickle=False``: plain arrays only, nothing in it runs code."""
    try:
        with np.load(io.BytesIO(content), allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except Exception as e:  # a damaged or foreign file fails in zipfile, numpy's header parser, ...
        raise UserError(f"{path} is corrupt: cannot read it as .npz ({type(e).__name__}: {first_line(e)})") from None


def find_file(directory: Path, stem: str) -> Path:
    """``stem`` or ``stem.npz`` in ``directory`` or in the folder its archive unpacks to."""
    folders = [directory] + [directory / sub for sub in _SUBDIRS["train" if stem.startswith("train") else "val"]]
    for folder in folders:
        for candidate in (folder / stem, folder / f"{stem}.npz"):
            if candidate.is_file():
                return candidate
    below = " nor ".join(f"{f.name}/" for f in folders[1:])
    raise UserError(f"missing dataset file: {directory / stem} (nor {stem}.npz, there or in {below})")


TRAITS = {"storage": "memory"}  # prepared as tensors (decoupled.dataset_traits)
SPEC = DatasetSpec("imagenet32", IMAGENET32_CLASSES, locate_imagenet32, read_imagenet32)
