"""What a dataset declares of itself, read from its file's text without importing torch (as a
method's ``TRAITS``): ``TRAITS = {"storage": ...}`` in ``data/<name>.py``, beside its ``SPEC``.

``storage``: ``memory``, prepared once as tensors and held in memory (on the GPU, once per job)
by training; ``streamed``, prepared as a list of image files that a loader's worker processes
read as training needs them (``data/folders.py``), for datasets too large for memory. Which
``train.augment`` values a job may take follows from it (``AUGMENTS``): the grid checks them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

from decoupled.declared import declared
from decoupled.errors import UserError

# train.augment by storage. memory: none, or crops of padded images and flips (CIFAR's);
# streamed: none (resized and centre-cropped, as evaluated), or random-resized crops and flips (ImageNet's)
AUGMENTS = {"memory": ("none", "crop_flip", "crop_flip_reflect"), "streamed": ("none", "resized_crop_flip")}
DATA_DIR = Path(__file__).parent / "data"


@dataclass(frozen=True)
class DatasetTraits:
    storage: str = "memory"


@cache
def traits(name: str) -> DatasetTraits:
    path = DATA_DIR / f"{name}.py"
    if not path.is_file():
        known = sorted(p.stem for p in DATA_DIR.glob("*.py") if declared(p, "TRAITS", DatasetTraits) is not None)
        raise UserError(f"unknown dataset '{name}' (known: {', '.join(known)})")
    found = declared(path, "TRAITS", DatasetTraits)
    if found is None:
        raise UserError(f"{path}: a dataset's file must declare TRAITS = {{'storage': ...}}")
    value = DatasetTraits(**found)
    if value.storage not in AUGMENTS:
        raise UserError(f"{path}: TRAITS storage '{value.storage}' is not one of {', '.join(AUGMENTS)}")
    return value


def check_augment(name: str, augment: str) -> None:
    """A UserError naming ``train.augment`` when the dataset's storage has no such transform."""
    storage = traits(name).storage
    if augment not in AUGMENTS[storage]:
        held = "streamed from image files" if storage == "streamed" else "held in memory"
        raise UserError(f"config key 'train.augment': {augment} does not apply to {name}, which is {held} (it takes: {', '.join(AUGMENTS[storage])})")
