"""VGG-11/13/16/19 with BatchNorm, cut by conv layers as the DGL code's ``imagenet_dgl/models/vgg.py``.

Each layer the split counts is one conv-BN-ReLU, a max-pool that precedes it in the VGG
configuration going with it (as in that code, where ``block_size`` b is ``model.split`` of
b-layer modules). Channels 64-128-256-512-512 (``model.base_width`` scales them). The
classifier (``model.vgg_classifier``) is ours for CIFAR-sized images, the last max-pool, global
average pooling and a linear layer; or that code's for ImageNet, the last max-pool and the
4096-unit MLP on its 7x7 maps (with ``model.dropout``, torchvision's, which the authors' baseline
trains). Initialization as that code, which draws its aux nets so too (``init_head``): He
normal (fan out) for convs, BN 1 and 0, linear N(0, 0.01), biases 0.
"""

from __future__ import annotations

from torch import nn

from decoupled.networks.shapes import vgg_config

class VGG:
    def __init__(self, model_cfg: dict):
        self.config = vgg_config(model_cfg)
        self.head = model_cfg.get("vgg_classifier", "pool_linear")
        self.hidden = model_cfg.get("vgg_classifier_hidden", 4096)
        self.dropout = model_cfg.get("dropout", 0.0)

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
        if self.head == "mlp":
            hidden = lambda n_in: [nn.Linear(n_in, self.hidden), nn.ReLU(inplace=True), *([nn.Dropout(self.dropout)] if self.dropout else [])]  # noqa: E731
            head = nn.Sequential(nn.MaxPool2d(2, 2), nn.AdaptiveAvgPool2d(7), nn.Flatten(), *hidden(channels * 7 * 7), *hidden(self.hidden),
                                 nn.Linear(self.hidden, num_classes))
        else:
            head = nn.Sequential(nn.MaxPool2d(2, 2, ceil_mode=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
        return initialize(head)


    def init_head(self, head: nn.Module) -> nn.Module:
        return initialize(head)


def initialize(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:  # the aux heads' 1x1 convs have none
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return module
