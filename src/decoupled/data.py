"""Datasets: read the raw files, check them, and store them once as tensors.

Experiments must be reproducible from the data as published, so this module reads each
dataset from its real raw format (IDX for Fashion-MNIST, the pickled batches for CIFAR-10)
and refuses files whose checksum differs from the known one. ``prepare`` then writes a
single ``torch.save`` file per dataset (optionally a class-balanced subset), and
``load_prepared`` turns it into normalized float tensors that training keeps in memory.

Every problem with the user's files raises ``UserError`` with one line naming the file.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from decoupled.errors import UserError
from decoupled.files import save_torch

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DEFAULT_DOWNLOAD_DIR = "results/data/downloads"

# sha256 of the *decompressed* IDX files: Debian recompresses the .gz files, so only the
# content (which is the upstream data) has a stable digest.
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

# md5 of each batch file of the python version, as torchvision publishes them.
CIFAR10_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip

CIFAR10_DIR_NAME = "cifar-10-batches-py"


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


# ---------------------------------------------------------------------------------------
# Public entry points


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
) -> dict:
    """Read dataset ``name``, optionally subset it, and write it to ``out_path`` atomically.

    The normalization statistics are computed here, over the (subset) training set, so that
    every run loading this file normalizes identically. Returns a short summary.
    """
    raw = read_raw(
        name, root, download=download, download_dir=download_dir,
        checksums=checksums, verify_checksums=verify_checksums,
    )  # fmt: skip
    train_x, train_y, test_x, test_y = raw.train_x, raw.train_y, raw.test_x, raw.test_y
    if subset_per_class is not None:
        train_x, train_y = balanced_subset(train_x, train_y, subset_per_class, seed)
    if test_subset_per_class is not None:
        test_x, test_y = balanced_subset(test_x, test_y, test_subset_per_class, seed)
    mean, std = channel_stats(train_x)
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


@dataclass
class Dataset:
    """A prepared dataset in memory: normalized float32 images (N, C, H, W), int64 labels."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: list[str]
    num_classes: int
    in_channels: int
    image_size: int
    name: str


_PREPARED_KEYS = ("name", "train_x", "train_y", "test_x", "test_y", "classes", "mean", "std")


def load_prepared(path: str | Path) -> Dataset:
    """Load a file written by ``prepare`` and normalize its images once, up front."""
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
    train_x = _normalize(stored["train_x"], mean, std)
    return Dataset(
        train_x=train_x,
        train_y=stored["train_y"].long(),
        test_x=_normalize(stored["test_x"], mean, std),
        test_y=stored["test_y"].long(),
        classes=classes,
        num_classes=len(classes),
        in_channels=train_x.shape[1],
        image_size=train_x.shape[2],
        name=stored["name"],
    )


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


def dataset_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise UserError(f"unknown dataset '{name}' (known: {', '.join(DATASETS)})") from None


# ---------------------------------------------------------------------------------------
# Fashion-MNIST: gzip-compressed IDX files

_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def locate_fashion_mnist(root: str | Path | None, download: bool, download_dir: str | Path) -> Path:
    """``root`` if given, else the Debian package's directory, else a torchvision download."""
    if root is not None:
        return _existing_dir(root)
    if Path(DEFAULT_FASHION_MNIST_DIR).is_dir():
        return Path(DEFAULT_FASHION_MNIST_DIR)
    if download:
        from torchvision import datasets

        _download("fashion_mnist", download_dir, lambda: datasets.FashionMNIST(str(download_dir), train=True, download=True))
        return Path(download_dir) / "FashionMNIST" / "raw"
    raise UserError(
        f"fashion_mnist not found: no root given, {DEFAULT_FASHION_MNIST_DIR} does not exist "
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
        images = read_idx(images_path, 3, expected_sha256=_expected(table, images_stem, verify_checksums))
        labels = read_idx(labels_path, 1, expected_sha256=_expected(table, labels_stem, verify_checksums))
        if len(images) != len(labels):
            raise UserError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
        _check_labels(labels, len(FASHION_MNIST_CLASSES), labels_path)
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
    content = _read_bytes(path)
    if path.suffix == ".gz":
        try:
            content = gzip.decompress(content)
        except (OSError, EOFError, zlib.error) as e:
            raise UserError(f"{path} is corrupt: not a complete gzip file ({_first_line(e)})") from None
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
        _check_digest(path, "sha256 of its content", hashlib.sha256(content).hexdigest(), expected_sha256)
    return np.frombuffer(content, dtype=np.uint8, offset=header_len).reshape(dims)


def _idx_path(directory: Path, stem: str) -> Path:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    raise UserError(f"missing dataset file: {directory / stem}.gz (nor uncompressed {stem}) in {directory}")


# ---------------------------------------------------------------------------------------
# CIFAR-10: the python version's pickled batches

_CIFAR_TRAIN = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"]
_CIFAR_TEST = ["test_batch"]


def locate_cifar10(root: str | Path | None, download: bool, download_dir: str | Path) -> Path:
    """``root`` (the batches directory or its parent) if given, else a torchvision download."""
    if root is not None:
        root = _existing_dir(root)
        inner = root / CIFAR10_DIR_NAME
        return inner if inner.is_dir() else root
    if download:
        from torchvision import datasets

        _download("cifar10", download_dir, lambda: datasets.CIFAR10(str(download_dir), train=True, download=True))
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
        batches = [read_cifar_batch(directory / s, expected_md5=_expected(table, s, verify_checksums)) for s in stems]
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
    content = _read_bytes(path)
    if expected_md5 is not None:
        _check_digest(path, "md5 of the file", hashlib.md5(content).hexdigest(), expected_md5)
    try:
        batch = pickle.loads(content, encoding="bytes")  # the batches were pickled by Python 2
    except Exception as e:  # a damaged pickle can fail in many ways
        raise UserError(f"{path} is corrupt: cannot unpickle it ({type(e).__name__}: {_first_line(e)})") from None
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
    _check_labels(labels, len(CIFAR10_CLASSES), path)
    # rows are stored channel-major (1024 red, 1024 green, 1024 blue), so this is (N, C, H, W)
    return data.reshape(-1, 3, 32, 32), labels


# ---------------------------------------------------------------------------------------
# Shared helpers


def _existing_dir(root: str | Path) -> Path:
    root = Path(root)
    if not root.exists():
        raise UserError(f"dataset root does not exist: {root}")
    if not root.is_dir():
        raise UserError(f"dataset root is not a directory: {root}")
    return root


def _download(name: str, download_dir: str | Path, fetch: Callable[[], object]) -> None:
    """Run torchvision's download; failures are the network's or the disk's, not bugs."""
    Path(download_dir).mkdir(parents=True, exist_ok=True)
    try:
        fetch()
    except (OSError, RuntimeError) as e:
        raise UserError(f"could not download {name} into {download_dir}: {_first_line(e)}") from None


def _expected(table: Mapping[str, str], stem: str, verify: bool) -> str | None:
    if not verify:
        return None
    if stem not in table:
        raise UserError(f"no checksum known for {stem}; give one or turn checksum verification off")
    return table[stem]


def _check_digest(path: Path, what: str, actual: str, expected: str) -> None:
    if actual != expected.lower():
        raise UserError(f"checksum mismatch for {path}: {what} is {actual}, expected {expected}")


def _check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"{path} is corrupt: labels range {labels.min()}..{labels.max()}, expected 0..{num_classes - 1}")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def _normalize(x: Tensor, mean: list[float], std: list[float]) -> Tensor:
    shape = (1, -1, 1, 1)
    out = x.to(torch.float32).div_(255)
    return out.sub_(torch.tensor(mean, dtype=torch.float32).view(shape)).div_(torch.tensor(std, dtype=torch.float32).view(shape))


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


DATASETS: dict[str, DatasetSpec] = {
    "fashion_mnist": DatasetSpec("fashion_mnist", FASHION_MNIST_CLASSES, locate_fashion_mnist, read_fashion_mnist),
    "cifar10": DatasetSpec("cifar10", CIFAR10_CLASSES, locate_cifar10, read_cifar10),
}
