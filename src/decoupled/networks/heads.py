"""Classifier heads: what reads a module's output (its aux head) or the network's (its classifier)."""

from __future__ import annotations

import torch
from torch import nn


class AuxHead(nn.Sequential):
    """Spatial pooling, a small MLP, then a linear layer to the classes (as the DGL code's aux nets);
    ``hidden`` 0: pooling and a linear layer."""

    def __init__(self, channels: int, num_classes: int, pool: int, hidden: int):
        features = channels * pool * pool
        mlp = [nn.Linear(features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)] if hidden else [nn.Linear(features, num_classes)]
        super().__init__(nn.AdaptiveAvgPool2d(pool), nn.Flatten(), *mlp)


class ConvAuxHead(nn.Module):
    """The DGL code's aux head of its DNI comparison (``dni_comparisons/cifar_dgl.py``): three
    convolutions at the module's width and resolution, BatchNorm and ReLU after the first two,
    the last one's weights zero at the start; then global average pooling and a linear layer.
    """

    def __init__(self, channels: int, num_classes: int, kernel_size: int):
        super().__init__()
        conv = lambda: nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)  # noqa: E731
        self.convs = nn.Sequential(conv(), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                                   conv(), nn.BatchNorm2d(channels), nn.ReLU(inplace=True), conv())
        nn.init.zeros_(self.convs[-1].weight)  # only the weights, as theirs
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.convs(x))


class PoolLinear(nn.Sequential):
    """The CIFAR ResNets' classifier: average pooling, then a linear layer. ``pool_kernel`` None:
    global; an int: ``AvgPool2d`` of that size (stride the same, rounding down), e.g. the FDG
    code's 6 on ResNets' 8x8 maps (which averages their top-left 6x6 only)."""

    def __init__(self, channels: int, num_classes: int, pool_kernel: int | None = None, pre: list[nn.Module] | None = None):
        pool = nn.AdaptiveAvgPool2d(1) if pool_kernel is None else nn.AvgPool2d(pool_kernel)
        super().__init__(*(pre or []), pool, nn.Flatten(), nn.Linear(channels, num_classes))


class DGLAuxHead(nn.Module):
    """The DGL code's ``auxillary_classifier2`` (its CIFAR aux nets; ``ddg_comparison/`` uses
    ``n_lin`` 3 and ``mlp_layers`` 3): average pooling to a quarter of the resolution (rounded
    up), ``n_lin`` 1x1 convs (no bias) each with BN and ReLU, average pooling to 2x2, then
    ``mlp_layers`` linear layers of 4C units each with BatchNorm1d and ReLU, and a linear layer to
    the classes (with no MLP: BN, then that linear layer)."""

    def __init__(self, channels: int, num_classes: int, n_lin: int, mlp_layers: int, first_pool: int | None = None):
        super().__init__()
        self.first_pool = first_pool  # None: a quarter of the input's side
        self.convs = nn.Sequential(*(nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())
                                     for _ in range(n_lin)))
        features = 4 * channels
        mlp = [layer for _ in range(mlp_layers) for layer in (nn.Linear(features, features), nn.BatchNorm1d(features), nn.ReLU(True))]
        self.bn = nn.Identity() if mlp_layers else nn.BatchNorm2d(channels)
        self.classifier = nn.Sequential(*mlp, nn.Linear(features, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quarter = (-(-x.shape[-2] // 4), -(-x.shape[-1] // 4)) if self.first_pool is None else self.first_pool
        out = nn.functional.adaptive_avg_pool2d(x, quarter)
        out = nn.functional.adaptive_avg_pool2d(self.convs(out), 2)
        return self.classifier(self.bn(out).flatten(1))


class StridedConvHead(nn.Sequential):
    """InfoPro's aux classifier ``1c2f`` (its code's ``AuxClassifier``, cross-entropy mode), which
    the GN-DGL code uses for its aux heads and its classifier: a 3x3 conv of stride 2 doubling the
    channels (no bias), BN, ReLU, global average pooling, a linear layer to ``hidden`` units, ReLU,
    and a linear layer to the classes."""

    def __init__(self, channels: int, num_classes: int, hidden: int):
        super().__init__(nn.Conv2d(channels, 2 * channels, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * channels), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * channels, hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, num_classes))
