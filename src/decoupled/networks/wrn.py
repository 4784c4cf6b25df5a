"""Wide ResNets (Zagoruyko and Komodakis 2016), as the FDG code builds WRN-28-10.

Depth 6n+4, widen factor k: a 3x3 stem conv (16 channels, with bias, no BN), three stages of n
pre-activation blocks (BN-ReLU-conv-dropout-BN-ReLU-conv, biases on, the stride on the second
conv, a 1x1 conv shortcut where the shape changes) at 16k, 32k and 64k channels, then BN-ReLU,
average pooling and a linear layer. The split counts the 3n blocks, the stem going with the
first: the FDG code's cuts of WRN-28-10 (K=2, 3, 4) are ``model.split: even``. As that code:
PyTorch's default initialization (its ``conv_init`` is never applied) and the final BN's
momentum 0.9 (``model.wrn_final_bn_momentum``; 0.1 is PyTorch's default).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from decoupled.networks.heads import PoolLinear
from decoupled.networks.resnet import stem, with_stem
from decoupled.networks.shapes import stage_widths


class WideBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=True)
        self.dropout = nn.Dropout(dropout)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride, 1, bias=True)
        changes = stride != 1 or in_channels != out_channels
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=True) if changes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(self.conv1(F.relu(self.bn1(x))))
        return self.conv2(F.relu(self.bn2(out))) + self.shortcut(x)


class WideResNet:
    def __init__(self, model_cfg: dict):
        self.cfg = model_cfg
        self.base, self.widths, self.n = stage_widths(model_cfg)

    def layers(self, in_channels: int) -> list[nn.Module]:
        first = stem(in_channels, self.base, bias=True, bn_relu=False)
        layers, channels = [], self.base
        for stage, width in enumerate(self.widths):
            for i in range(self.n):
                layers.append(WideBlock(channels, width, 2 if stage > 0 and i == 0 else 1, self.cfg.get("dropout", 0.0)))
                channels = width
        return with_stem(first, layers, self.cfg)

    def classifier(self, channels: int, num_classes: int) -> nn.Module:
        bn = nn.BatchNorm2d(channels, momentum=self.cfg.get("wrn_final_bn_momentum", 0.9))
        return PoolLinear(channels, num_classes, self.cfg.get("classifier_pool"), pre=[bn, nn.ReLU()])
