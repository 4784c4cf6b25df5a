"""CIFAR ResNets (He et al. 2016, section 4.2), as the FDG and DDG code builds them.

Depth 6n+2: a 3x3 stem conv (16 channels, BN, ReLU), then three stages of n basic blocks at
16, 32 and 64 channels (``model.base_width`` scales them), the first block of stages 2 and 3
halving the resolution; then the classifier (average pooling, linear). Shortcuts are option A:
identity, or subsampling by 2 and zero-padding the new channels, so the network has no
parameters outside its convolutions, BNs and classifier (ResNet-56: 0.85 M); ``model.shortcut:
B`` projects instead (1x1 conv with stride, BN), as the InfoPro and GN-DGL code. The layers the
split counts are the 3n blocks, the stem going with the first: the FDG code's cuts (ResNet-56
K=2: stem and 13 blocks | 14 blocks) are then ``model.split: even`` or an explicit list. With
``model.stem: own`` the stem is a layer of its own (3n + 1): InfoPro's cuts of ResNet-32
(K=16: the stem alone, then a block per module) are then ``even``.
Parameters keep PyTorch's default initialization, as the FDG code (its ``_weights_init`` is
commented out); ``model.init: he_fan_out`` draws the convs from N(0, 2 / (9 x out channels)) and
sets BN to 1 and 0, as the DDG code (and the DGL code's ``ddg_comparison/``), classifier untouched.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from decoupled.networks.heads import PoolLinear
from decoupled.networks.shapes import stage_widths


class PadShortcut(nn.Module):
    """Option A: take every other pixel and zero-pad the channels, from ``in_channels`` to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.extra = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


def projection(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """Option B: a strided 1x1 conv and BN."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))


class OwnChannels(nn.Module):
    """The identity shortcut of one neuron group: its own ``width`` channels of a whole input."""

    def __init__(self, group: int, width: int):
        super().__init__()
        self.start, self.width = group * width, width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.start : self.start + self.width]


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str | nn.Module = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if isinstance(shortcut, nn.Module):
            self.shortcut = shortcut
        elif stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = PadShortcut(in_channels, out_channels) if shortcut == "A" else projection(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def stem(in_channels: int, width: int, bias: bool = False, bn_relu: bool = True) -> nn.Sequential:
    conv = nn.Conv2d(in_channels, width, 3, 1, 1, bias=bias)
    return nn.Sequential(conv, nn.BatchNorm2d(width), nn.ReLU()) if bn_relu else nn.Sequential(conv)


class ResNet:
    def __init__(self, model_cfg: dict):
        self.cfg = model_cfg
        _, self.widths, self.n = stage_widths(model_cfg)

    def layers(self, in_channels: int) -> list[nn.Module]:
        first = stem(in_channels, self.widths[0])
        layers, channels = [], self.widths[0]
        for stage, width in enumerate(self.widths):
            for i in range(self.n):
                layers.append(BasicBlock(channels, width, 2 if stage > 0 and i == 0 else 1, self.cfg.get("shortcut", "A")))
                channels = width
        layers = with_stem(first, layers, self.cfg)
        if self.cfg.get("init", "pytorch") == "he_fan_out":
            for layer in layers:
                he_fan_out(layer)
        return layers

    def classifier(self, channels: int, num_classes: int) -> nn.Module:
        return PoolLinear(channels, num_classes, self.cfg.get("classifier_pool"))

    def group_branch(self, in_channels: int, units: range, G: int, g: int) -> nn.Sequential:
        """Neuron group g of G of the layers ``units`` (GN-DGL, as its code's grouped ResNet):
        every conv at 1/G of the width, the first one reading the module's whole input (the
        stem, or the first block's conv1 and, where the shape changes, its projection; its identity
        shortcut is the group's own channels), the later ones only the group's own channels.
        Needs ``model.shortcut: B``. Unit 0 is the stem (with the first block unless ``model.stem:
        own``), so module 0's groups each own 1/G of the stem's channels."""
        parts = [("stem", in_channels, self.widths[0], 1)]  # the layers' parts in order: kind, in, out, stride
        channels = self.widths[0]
        for stage, width in enumerate(self.widths):
            for i in range(self.n):
                parts.append(("block", channels, width, 2 if stage > 0 and i == 0 else 1))
                channels = width
        own_stem = self.cfg.get("stem", "with_first") == "own"
        unit_of = [0] + [j + (1 if own_stem else 0) for j in range(len(parts) - 1)]  # part -> the unit a split counts
        mine = [part for part, unit in zip(parts, unit_of) if unit in units]
        layers = []
        for i, (kind, cin, cout, stride) in enumerate(mine):
            seen = cin if i == 0 else cin // G  # what this part reads: the module's whole input, or its group's
            if kind == "stem":
                layers.append(stem(seen, cout // G))
            elif i == 0:
                shortcut = OwnChannels(g, cout // G) if stride == 1 and cin == cout else projection(cin, cout // G, stride)
                layers.append(BasicBlock(seen, cout // G, stride, shortcut))
            else:
                layers.append(BasicBlock(seen, cout // G, stride, "B"))
        branch = nn.Sequential(*layers)
        if self.cfg.get("init", "pytorch") == "he_fan_out":
            he_fan_out(branch, groups=G)
        return branch


def with_stem(first: nn.Module, blocks: list[nn.Module], model_cfg: dict) -> list[nn.Module]:
    """The layers a split counts: the stem fused into the first block, or (``model.stem: own``) a layer of its own."""
    if model_cfg.get("stem", "with_first") == "own":
        return [first, *blocks]
    return [nn.Sequential(first, blocks[0]), *blocks[1:]]


def he_fan_out(module: nn.Module, groups: int = 1) -> None:
    """Convs from N(0, 2 / (k x k x out channels x ``groups``)), BN to 1 and 0. ``groups``: each conv is
    one neuron group's 1/G of a layer, drawn as the whole layer is (the GN-DGL code's grouped convs)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels * groups)))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
