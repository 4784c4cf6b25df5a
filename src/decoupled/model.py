"""A network split into K modules, each with a classifier head.

``SplitNet.blocks[k]`` is module k (``blocks`` because ``nn.Module.modules`` is taken) and
``SplitNet.heads[k]`` reads its output. For k < K-1 the head is module k's auxiliary
classifier; ``heads[K-1]`` is the network's final head, so in DGL the last module's aux head
*is* the output layer, as in the DGL paper. Every method trains the same SplitNet, built from
the same seed, so methods differ only in how they update it.

Which layers go to which module is ``model.split``: ``"even"`` (``split_layers``), an explicit
list of layer counts, or ``"balanced"``, whose counts come from timing the layers
(``decoupled.profile.resolve_split``) and so must be handed to ``build``.
"""

from __future__ import annotations

import torch
from torch import nn


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


class AuxHead(nn.Sequential):
    """Spatial pooling, a small MLP, then a linear layer to the classes (as the DGL code's aux nets)."""

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


def split_layers(n_layers: int, K: int) -> list[int]:
    """How many layers each of the K modules gets: as even as possible, the extra ones to the last modules."""
    if not 1 <= K <= n_layers:
        raise ValueError(f"cannot cut {n_layers} layers into K={K} modules")
    base, extra = divmod(n_layers, K)
    return [base + (1 if k >= K - extra else 0) for k in range(K)]


class SplitNet(nn.Module):
    def __init__(self, blocks: list[nn.Module], heads: list[nn.Module]):
        super().__init__()
        assert len(blocks) == len(heads)
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(heads)

    @property
    def K(self) -> int:
        return len(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.heads[-1](x)

    def forward_all_heads(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every head, module by module (for layer-wise evaluation)."""
        logits = []
        for block, head in zip(self.blocks, self.heads):
            x = block(x)
            logits.append(head(x))
        return logits


def configured_counts(model_cfg: dict, K: int) -> list[int]:
    """Layers per module as ``model.split`` fixes them without measuring: "even" or an explicit list."""
    split = model_cfg.get("split", "even")
    if split == "even":
        return split_layers(len(model_cfg["widths"]), K)
    if split == "balanced":
        raise ValueError("model.split 'balanced' needs measured counts: pass build(..., counts=profile.resolve_split(...)[0])")
    return check_counts(split, len(model_cfg["widths"]), K)


def check_counts(counts: list[int], n_layers: int, K: int) -> list[int]:
    """``counts`` if it cuts ``n_layers`` layers into K non-empty modules, else ValueError."""
    if len(counts) != K or sum(counts) != n_layers or min(counts) < 1:
        raise ValueError(f"layer counts {counts} do not cut {n_layers} layers into K={K} non-empty modules")
    return list(counts)


def build(model_cfg: dict, K: int, in_channels: int, num_classes: int, counts: list[int] | None = None) -> SplitNet:
    """The CNN of ``model_cfg`` cut into K modules; parameters drawn from torch's global RNG.

    ``counts``: layers per module; None = as ``model.split`` says (see ``configured_counts``).
    The conv layers' parameters do not depend on the counts; the heads' do (one per module, on its last width).
    """
    widths = model_cfg["widths"]
    counts = configured_counts(model_cfg, K) if counts is None else check_counts(counts, len(widths), K)
    pools = model_cfg.get("pools") or [None] * len(widths)
    layers, channels = [], in_channels
    for width, pool in zip(widths, pools):
        layers.append(conv_layer(channels, width, model_cfg.get("kernel_size", 3), pool))
        channels = width
    blocks, heads, start = [], [], 0
    for k, count in enumerate(counts):
        blocks.append(nn.Sequential(*layers[start : start + count]))
        start += count
        if k < K - 1 and model_cfg.get("aux_head", "mlp") == "cnn":
            heads.append(ConvAuxHead(widths[start - 1], num_classes, model_cfg.get("kernel_size", 3)))
        else:
            heads.append(AuxHead(widths[start - 1], num_classes, model_cfg["aux_pool"], model_cfg["aux_hidden"]))
    return SplitNet(blocks, heads)
