"""The default network: conv-BN-ReLU-pool layers of ``model.widths``, one layer per width."""

from __future__ import annotations

from torch import nn

from decoupled.networks.heads import AuxHead


def conv_layer(in_channels: int, out_channels: int, kernel_size: int = 3, pool: str | None = None) -> nn.Sequential:
    """conv - BN - ReLU - pool.

    ``pool`` None: max-pool 2, rounding odd sizes up (28 -> 14 -> 7 -> 4), so no border pixel is
    lost; else e.g. "avg3": that pooling with PyTorch's usual rounding down, as papers' code has it.
    """
    if pool is None:
        pooling = nn.MaxPool2d(2, ceil_mode=True)
    else:
        kind, size = pool[:3], int(pool[3:])
        pooling = nn.MaxPool2d(size) if kind == "max" else nn.AvgPool2d(size)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        pooling,
    )


class CNN:
    def __init__(self, model_cfg: dict):
        self.cfg = model_cfg

    def layers(self, in_channels: int) -> list[nn.Module]:
        pools = self.cfg.get("pools") or [None] * len(self.cfg["widths"])
        layers, channels = [], in_channels
        for width, pool in zip(self.cfg["widths"], pools):
            layers.append(conv_layer(channels, width, self.cfg.get("kernel_size", 3), pool))
            channels = width
        return layers

    def classifier(self, channels: int, num_classes: int) -> nn.Module:
        """The aux heads' MLP (``model.aux_pool``, ``model.aux_hidden``): in DGL the last module's aux head is the output layer."""
        return AuxHead(channels, num_classes, self.cfg["aux_pool"], self.cfg["aux_hidden"])
