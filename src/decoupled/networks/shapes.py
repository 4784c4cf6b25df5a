"""Each arch's layers and their output channels, known without importing torch.

``decoupled.grid`` checks splits, groups and quantizers against them while Snakemake plans,
which must not import torch; the arch files build their layers from the same numbers.
"""

from __future__ import annotations

import re

ARCH = re.compile(r"^(cnn|resnet|wrn|vgg|imagenet_resnet)(?:(\d+)(?:_(\d+))?)?$")
# blocks per stage of the ImageNet ResNets (bottleneck blocks)
IMAGENET_RESNET_BLOCKS = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}

VGG_CONFIGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


def split_layers(n_layers: int, K: int) -> list[int]:
    """How many layers each of the K modules gets (``model.split: even``): as even as possible, the
    extra ones to the last modules."""
    if not 1 <= K <= n_layers:
        raise ValueError(f"cannot cut {n_layers} layers into K={K} modules")
    base, extra = divmod(n_layers, K)
    return [base + (1 if k >= K - extra else 0) for k in range(K)]


def parse(model_cfg: dict) -> tuple[str, list[int]]:
    """``model.arch`` as (family, [depth, k]); ValueError naming it if it is not one."""
    name = model_cfg.get("arch", "cnn")
    match = ARCH.match(name)
    family, depth, k = match.groups() if match else (None, None, None)
    if family is None or (family == "cnn") != (depth is None) or (family == "wrn") != (k is not None):
        raise ValueError(f"model.arch {name!r} is not one of cnn, resnet<depth>, wrn<depth>_<k>, vgg<depth>, imagenet_resnet<depth>")
    numbers = [int(v) for v in (depth, k) if v is not None]
    if family in ("resnet", "wrn"):
        extra = 2 if family == "resnet" else 4
        n, rest = divmod(numbers[0] - extra, 6)
        if rest or n < 1:
            raise ValueError(f"model.arch {name!r}: depth {numbers[0]} is not 6n+{extra} with n >= 1")
    if family == "vgg" and numbers[0] not in VGG_CONFIGS:
        raise ValueError(f"model.arch {name!r}: depth {numbers[0]} is not one of VGG's {sorted(VGG_CONFIGS)}")
    if family == "imagenet_resnet" and numbers[0] not in IMAGENET_RESNET_BLOCKS:
        raise ValueError(f"model.arch {name!r}: depth {numbers[0]} is not one of {sorted(IMAGENET_RESNET_BLOCKS)}")
    return family, numbers


def imagenet_resnet_stages(model_cfg: dict) -> tuple[int, list[int]]:
    """An ImageNet ResNet's stem width (64, or ``model.base_width``) and its blocks per stage."""
    return model_cfg.get("base_width") or 64, IMAGENET_RESNET_BLOCKS[parse(model_cfg)[1][0]]


def stage_widths(model_cfg: dict) -> tuple[int, list[int], int]:
    """A (wide) ResNet's stem width, its three stages' widths and its blocks per stage."""
    family, numbers = parse(model_cfg)
    base = model_cfg.get("base_width") or 16
    k = numbers[1] if family == "wrn" else 1
    n = (numbers[0] - (2 if family == "resnet" else 4)) // 6
    return base, [base * k, 2 * base * k, 4 * base * k], n


def vgg_config(model_cfg: dict) -> list:
    """The VGG configuration of ``model.arch``, its widths scaled by ``model.base_width`` / 64."""
    scale = (model_cfg.get("base_width") or 64) / 64
    return [v if v == "M" else max(1, round(v * scale)) for v in VGG_CONFIGS[parse(model_cfg)[1][0]]]


def channels(model_cfg: dict) -> list[int]:
    """Output channels of each layer the split counts."""
    family, _ = parse(model_cfg)
    if family == "cnn":
        return list(model_cfg["widths"])
    if family == "vgg":
        return [v for v in vgg_config(model_cfg) if v != "M"]
    if family == "imagenet_resnet":  # the stem, then each bottleneck block (4x its stage's planes)
        base, blocks = imagenet_resnet_stages(model_cfg)
        return [base] + [4 * base * 2**stage for stage, n in enumerate(blocks) for _ in range(n)]
    base, widths, n = stage_widths(model_cfg)
    stem = [base] if model_cfg.get("stem", "with_first") == "own" else []
    return stem + [w for w in widths for _ in range(n)]
