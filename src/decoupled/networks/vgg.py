"""VGG-11/13/16/19 with BatchNorm, cut by conv layers as the DGL code's ``imagenet_dgl/models/vgg.py``.

Each layer the split counts is one conv-BN-ReLU, a max-pool that precedes it in the VGG
configuration going with it (as in that code, where ``block_size`` b is ``model.split`` of
b-layer modules). Channels 64-128-256-512-512 (``model.base_width`` scales them). The
classifier is ours for CIFAR-sized images: the last max-pool, global average pooling and a
linear layer (that code's is ImageNet's 4096-unit MLP). Initialization as that code: He normal
(fan out) for convs, BN 1 and 0, linear N(0, 0.01), biases 0.
"""

from __future__ import annotations

from torch import nn

from decoupled.networks.shapes import vgg_config

class VGG:
    def __init__(self, model_cfg: dict):
        self.config = vgg_config(model_cfg)

    def layers(self, in_channels: int) -> list[nn.Module]:
        layers, pending, channels = [], [], in_channels
        for v in self.config:
            if v == "M":
                pending = [nn.MaxPool2d(2, 2)]
                continue
            layers.append(nn.Sequential(*pending, nn.Conv2d(channels, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)))
            pending, channels = [], v
        for layer in layers:
            initialize(layer)
        return layers

    def classifier(self, channels: int, num_classes: int) -> nn.Module:
        head = nn.Sequential(nn.MaxPool2d(2, 2, ceil_mode=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
        return initialize(head)


def initialize(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return module
