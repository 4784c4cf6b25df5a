"""ImageNet ResNets (He et al. 2016, bottleneck blocks), as the DGL code's
``imagenet_dgl/models/resnet.py`` (torchvision's, the stride on each bottleneck's 3x3 conv).

``imagenet_resnet<50|101|152>``: a stem (7x7 conv of stride 2, BN, ReLU, 3x3 max-pool of stride
2), then four stages of bottleneck blocks (1x1, 3x3, 1x1 convs, BN after each; out channels 4x
64, 128, 256, 512, ``model.base_width`` scaling them) whose first block projects its shortcut
(1x1 conv with stride, BN) and, from stage 2 on, halves the resolution; then the classifier
(global average pooling, linear). The layers the split counts are the stem and each block, as
that code's ``base_blocks`` (ResNet-152: 51); its cut of ResNet-152 into K=2 is ``model.split:
[26, 25]`` (``split_points`` 2: ceil(51 / 2) units to the first module). Initialization as that
code: convs He normal (fan out), BN 1 and 0, in the aux heads too (``init_head``); linear layers
PyTorch's default.
"""

from __future__ import annotations

import torch
from torch import nn

from decoupled.networks.heads import PoolLinear
from decoupled.networks.shapes import imagenet_resnet_stages


class Bottleneck(nn.Module):
    def __init__(self, in_channels: int, planes: int, stride: int):
        super().__init__()
        out_channels = 4 * planes
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, planes, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
            nn.Conv2d(planes, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        projects = stride != 1 or in_channels != out_channels
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)) if projects else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.convs(x) + self.shortcut(x))


class ImageNetResNet:
    def __init__(self, model_cfg: dict):
        self.base, self.blocks = imagenet_resnet_stages(model_cfg)

    def layers(self, in_channels: int) -> list[nn.Module]:
        stem = nn.Sequential(nn.Conv2d(in_channels, self.base, 7, 2, 3, bias=False), nn.BatchNorm2d(self.base), nn.ReLU(inplace=True),
                             nn.MaxPool2d(3, 2, 1))
        layers, channels = [stem], self.base
        for stage, n in enumerate(self.blocks):
            planes = self.base * 2**stage
            for i in range(n):
                layers.append(Bottleneck(channels, planes, 2 if stage > 0 and i == 0 else 1))
                channels = 4 * planes
        for layer in layers:
            initialize(layer)
        return layers

    def classifier(self, channels: int, num_classes: int) -> nn.Module:
        return PoolLinear(channels, num_classes)

    def init_head(self, head: nn.Module) -> nn.Module:
        return initialize(head)  # that code's loop runs over its aux nets too


def initialize(module: nn.Module) -> nn.Module:
    """That code's initialization: convs He normal (fan out), BN2d 1 and 0; nothing else."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module
