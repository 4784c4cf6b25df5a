"""ImageNet (ILSVRC 2012), streamed from its files (``data/folders.py``), read by torchvision's own
readers, in either of two layouts under ``dataset.root``:

* ``train/`` and ``val/``, a folder of images per class in each (the layout PyTorch's ImageNet
  example and the DGL code's ``imagenet_dgl/`` read with ``ImageFolder``; ``val/`` sorted into
  class folders, not the archive's 50 000 files side by side);
* the three archives as image-net.org distributes them (``ILSVRC2012_img_train.tar``,
  ``ILSVRC2012_img_val.tar``, ``ILSVRC2012_devkit_t12.tar.gz``): ``torchvision.datasets.ImageNet``
  checks their MD5 (always: ``dataset.verify_checksums`` cannot turn it off) and unpacks them
  into that layout, once.

The class folders' names (WordNet ids) are the classes, in sorted order, as ``ImageFolder``
numbers them. No checksums are published for the unpacked files; decoding a JPEG runs no code
of the file's, so they are read as they are. The normalization is the fixed ImageNet constants
of the authors' code, not the training set's (computing those would decode 1.28 M images).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from decoupled.data.folders import FolderIndex
from decoupled.data.raw import DatasetSpec, existing_dir, first_line
from decoupled.errors import UserError

IMAGENET_URL = "https://image-net.org/download-images.php"
IMAGENET_MEAN = [0.485, 0.456, 0.406]  # the DGL code's (and PyTorch's ImageNet example's) Normalize
IMAGENET_STD = [0.229, 0.224, 0.225]
_SPLITS = {"train": "train", "test": "val"}
_ARCHIVES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz")
_LAYOUT = f"train/ and val/ with a folder of images per class in each, or ImageNet's archives ({', '.join(_ARCHIVES)})"


def locate_imagenet(root: str | Path | None, download: bool, download_dir: str | Path) -> Path:
    """``root``: the directory of ``train/`` and ``val/``, or of the archives. Never downloaded
    (its licence asks each user to get it from image-net.org), whatever ``download`` says."""
    if root is not None:
        return existing_dir(root)
    raise UserError(f"imagenet not found: no root given, and it cannot be downloaded automatically; get ILSVRC 2012 from {IMAGENET_URL} "
                    f"and set dataset.root to a directory holding {_LAYOUT}")


def read_imagenet(directory: str | Path, *, checksums: Mapping[str, str] | None = None, verify_checksums: bool = True) -> FolderIndex:
    """Index the training and validation (test split) images below ``directory``."""
    directory = Path(directory)
    folders = {split: directory / name for split, name in _SPLITS.items()}
    if not all(f.is_dir() for f in folders.values()):
        if not any((directory / a).exists() for a in _ARCHIVES):
            raise UserError(f"{directory} is not an ImageNet directory: expected {_LAYOUT}")
        unpack_archives(directory)
    indexed = {split: index_folder(folder) for split, folder in folders.items()}
    (train_classes, train), (test_classes, test) = indexed["train"], indexed["test"]
    if test_classes != train_classes:
        only = sorted(set(train_classes) ^ set(test_classes))
        raise UserError(f"{folders['test']}: its class folders are not train/'s ({len(only)} differ, e.g. {only[0]})")
    relative = lambda samples: [str(Path(p).relative_to(directory)) for p, _ in samples]  # noqa: E731
    labels = lambda samples: torch.tensor([c for _, c in samples], dtype=torch.long)  # noqa: E731
    return FolderIndex(str(directory.resolve()), relative(train), labels(train), relative(test), labels(test), train_classes,
                       list(IMAGENET_MEAN), list(IMAGENET_STD), str(directory))


def index_folder(folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """torchvision's ``ImageFolder`` index of ``folder``: its classes and (path, label) samples."""
    from torchvision.datasets import ImageFolder

    try:
        found = ImageFolder(str(folder))
    except FileNotFoundError as e:  # no class folder; a class folder without images
        flat = any(p.is_file() for p in folder.iterdir())
        why = "it holds images but no class folders (sort the validation images into class folders, or give ImageNet's archives)" if flat else first_line(e)
        raise UserError(f"{folder} is not an image folder: {why}") from None
    return list(found.classes), list(found.samples)


def unpack_archives(directory: Path) -> None:
    """torchvision's ImageNet: check the archives' MD5 and unpack them into train/ and val/."""
    from torchvision.datasets import ImageNet

    for split in ("train", "val"):
        try:
            ImageNet(str(directory), split=split)
        except RuntimeError as e:  # "The archive X is not present in the root directory or is corrupted. ..."
            named = re.search(r"archive (\S+) is not present", str(e))
            if named is None:
                raise UserError(f"{directory}: torchvision could not unpack ImageNet's archives: {first_line(e)}") from None
            path = directory / named.group(1)
            why = "missing" if not path.exists() else "its MD5 is not the one torchvision knows for it (damaged or not ImageNet's)"
            raise UserError(f"{path}: {why}") from None


TRAITS = {"storage": "streamed"}  # a list of files, read as training needs them (decoupled.dataset_traits)
SPEC = DatasetSpec("imagenet", [], locate_imagenet, read_imagenet)
