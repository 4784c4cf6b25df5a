"""CIFAR-100: the python version's pickled ``train`` and ``test`` batches, read with their 100 fine
labels (not the 20 coarse ones), and ``meta`` for the class names; every file is checked
against its md5 before it is unpickled."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch

from decoupled.data.cifar10 import batches_locator, read_batch_file, read_cifar_batch, unpickle
from decoupled.data.raw import DatasetSpec, RawData, check_digest, expected
from decoupled.errors import UserError

# md5 of each file of the python version, as torchvision publishes them.
CIFAR100_MD5 = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffe481b3d3cd2c",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}

# The fine label names in label order, as ``meta`` lists them (the spec needs them before any
# file is read; the names a read returns are meta's own).
CIFAR100_CLASSES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
]  # fmt: skip

CIFAR100_DIR_NAME = "cifar-100-python"


locate_cifar100 = batches_locator("cifar100", CIFAR100_DIR_NAME, "CIFAR100")


def read_cifar100(
    directory: str | Path,
    *,
    checksums: Mapping[str, str] | None = None,
    verify_checksums: bool = True,
) -> RawData:
    """Read ``train``, ``test`` (fine labels 0..99) and ``meta`` from a ``cifar-100-python`` dir."""
    directory = Path(directory)
    table = CIFAR100_MD5 if checksums is None else checksums
    splits = {}
    for stem in ("train", "test"):
        x, y = read_cifar_batch(
            directory / stem, expected_md5=expected(table, stem, verify_checksums),
            label_key=b"fine_labels", num_classes=len(CIFAR100_CLASSES),
        )  # fmt: skip
        splits[stem] = (torch.from_numpy(x), torch.from_numpy(y))
    classes = read_cifar100_meta(directory / "meta", expected_md5=expected(table, "meta", verify_checksums))
    (train_x, train_y), (test_x, test_y) = splits["train"], splits["test"]
    return RawData(train_x, train_y, test_x, test_y, classes, str(directory))


def read_cifar100_meta(path: str | Path, *, expected_md5: str | None = None) -> list[str]:
    """The 100 fine label names from ``meta``, md5-checked before it is unpickled."""
    path = Path(path)
    content = read_batch_file(path)
    if expected_md5 is not None:
        check_digest(path, "md5 of the file", hashlib.md5(content).hexdigest(), expected_md5)
    meta = unpickle(path, content, encoding="bytes")
    names = meta.get(b"fine_label_names") if isinstance(meta, dict) else None
    if not (isinstance(names, list) and len(names) == len(CIFAR100_CLASSES) and all(isinstance(n, bytes) for n in names)):
        raise UserError(f"{path} is corrupt: b'fine_label_names' is not a list of {len(CIFAR100_CLASSES)} names")
    try:
        return [n.decode("ascii") for n in names]
    except UnicodeDecodeError:
        raise UserError(f"{path} is corrupt: b'fine_label_names' holds a name that is not ASCII") from None


TRAITS = {"storage": "memory"}  # prepared as tensors (decoupled.dataset_traits)
SPEC = DatasetSpec("cifar100", CIFAR100_CLASSES, locate_cifar100, read_cifar100)
