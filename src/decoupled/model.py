"""A network split into K modules, each with a classifier head.

``SplitNet.blocks[k]`` is module k (``blocks`` because ``nn.Module.modules`` is taken) and
``SplitNet.heads[k]`` reads its output. For k < K-1 the head is module k's auxiliary
classifier; ``heads[K-1]`` is the network's final head, so in DGL the last module's aux head
*is* the output layer, as in the DGL paper. Every method trains the same SplitNet, built from
the same seed, so methods differ only in how they update it.

With ``model.groups`` G > 1 (GN-DGL), each module's width is split into G neuron groups: the
module is G branches side by side (``GroupedModule``), branch g computing channels
[g C/G, (g+1) C/G) of every layer from the module's whole input (so the first convolution after
a boundary sees all groups' outputs) and then only from its own channels (a grouped
convolution, as separate tensors so that each group has its own optimizer and worker), and
``heads[k]`` holds one aux head per group (``GroupHeads``). G = 1 builds exactly the DGL network.

Which layers go to which module is ``model.split``: ``"even"`` (``split_layers``), an explicit
list of layer counts, or ``"balanced"``, whose counts come from timing the layers
(``decoupled.profile.resolve_split``) and so must be handed to ``build``.
"""

from __future__ import annotations

import torch
from torch import nn

from decoupled.networks import archs, shapes
from decoupled.networks.cnn import conv_layer
from decoupled.networks.heads import AuxHead, ConvAuxHead, DGLAuxHead, StridedConvHead
from decoupled.networks.resnet import he_fan_out
from decoupled.networks.shapes import split_layers


class GroupedModule(nn.Module):
    """A module of G neuron groups: branch g's output is channels [g C/G, (g+1) C/G) of the module's."""

    def __init__(self, branches: list[nn.Module]):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], 1)


class GroupHeads(nn.Module):
    """GN-DGL's G aux heads of one module, head g trained by group g's loss.

    ``detach`` (the GN-DGL code's ``--detach``, which all its experiments use): head g reads
    the module's whole output with the other groups' channels detached, so its loss reaches
    only group g's weights; otherwise it reads only group g's channels. As a classifier
    (``forward``, for evaluation) the module predicts the mean of its heads' softmaxes (the
    code's ensemble within a module), or, for the last module, with ``final``, the network's
    classifier, which is trained on the detached output (the code's final ``head``).
    """

    def __init__(self, heads: list[nn.Module], detach: bool, final: nn.Module | None = None):
        super().__init__()
        self.group_heads = nn.ModuleList(heads)
        self.detach = detach
        self.final = final

    def group_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        G = len(self.group_heads)
        width = x.shape[1] // G
        logits = []
        for g, head in enumerate(self.group_heads):
            own = x[:, g * width : (g + 1) * width]
            seen = torch.cat([x[:, : g * width].detach(), own, x[:, (g + 1) * width :].detach()], 1) if self.detach else own
            logits.append(head(seen))
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.final is not None:
            return self.final(x)
        probs = torch.stack([torch.softmax(z, 1) for z in self.group_logits(x)]).mean(0)
        return probs.clamp_min(1e-30).log()


class SplitNet(nn.Module):
    def __init__(self, blocks: list[nn.Module], heads: list[nn.Module], quantizers: list[nn.Module] | None = None, ensemble: str = "none"):
        super().__init__()
        self.ensemble = ensemble  # model.eval_ensemble: what ``evaluate`` reports as the test accuracy
        assert len(blocks) == len(heads)
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(heads)
        self.groups = len(blocks[0].branches) if isinstance(blocks[0], GroupedModule) else 1
        # boundary k's quantizer (``decoupled.quantize``: what module k+1 receives), or Identity
        self.quantizers = nn.ModuleList(quantizers if quantizers is not None else [nn.Identity() for _ in blocks[1:]])

    @property
    def K(self) -> int:
        return len(self.blocks)

    def quantizer(self, k: int):
        """Boundary k's ``Quantizer`` (between modules k and k+1), or None if it sends floats."""
        q = self.quantizers[k] if k < self.K - 1 else None
        return None if isinstance(q, nn.Identity) else q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all_heads(x, heads=False)

    def forward_all_heads(self, x: torch.Tensor, heads: bool = True) -> list[torch.Tensor]:
        """Logits of every head, module by module (for layer-wise evaluation); each head reads
        its module's output, the next module what crosses the boundary."""
        logits = []
        for k, block in enumerate(self.blocks):
            x = block(x)
            if heads or k == self.K - 1:
                logits.append(self.heads[k](x))
            if k < self.K - 1:
                x = self.quantizers[k](x)
        return logits if heads else logits[-1]

    @torch.no_grad()
    def layerwise_ensemble(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities of the GN-DGL code's ``--ensemble-type layerwise``: its entries are
        each module's softmax (the mean of its group heads'), then, where the last module's heads
        and the classifier differ (groups), the classifier's; entry i of L weighs 2^i / (2^L - 1)."""
        entries = []
        for k, block in enumerate(self.blocks):
            x = block(x)
            head = self.heads[k]
            if isinstance(head, GroupHeads):
                entries.append(torch.stack([torch.softmax(z, 1) for z in head.group_logits(x)]).mean(0))
                if head.final is not None:
                    entries.append(torch.softmax(head.final(x), 1))
            else:
                entries.append(torch.softmax(head(x), 1))
            if k < self.K - 1:
                x = self.quantizers[k](x)
        weights = [2.0**i / (2 ** len(entries) - 1) for i in range(len(entries))]
        return sum(w * p for w, p in zip(weights, entries)) / len(entries)


def configured_counts(model_cfg: dict, K: int) -> list[int]:
    """Layers per module as ``model.split`` fixes them without measuring: "even" or an explicit list."""
    split = model_cfg.get("split", "even")
    if split == "even":
        return split_layers(n_layers(model_cfg), K)
    if split == "balanced":
        raise ValueError("model.split 'balanced' needs measured counts: pass build(..., counts=profile.resolve_split(...)[0])")
    return check_counts(split, n_layers(model_cfg), K)


def layer_channels(model_cfg: dict) -> list[int]:
    """Output channels of each layer of ``model.arch`` (``decoupled.networks``), the units a split counts."""
    return shapes.channels(model_cfg)


def n_layers(model_cfg: dict) -> int:
    return len(layer_channels(model_cfg))


def check_counts(counts: list[int], n_layers: int, K: int) -> list[int]:
    """``counts`` if it cuts ``n_layers`` layers into K non-empty modules, else ValueError."""
    if len(counts) != K or sum(counts) != n_layers or min(counts) < 1:
        raise ValueError(f"layer counts {counts} do not cut {n_layers} layers into K={K} non-empty modules")
    return list(counts)


def build(model_cfg: dict, K: int, in_channels: int, num_classes: int, counts: list[int] | None = None) -> SplitNet:
    """The network of ``model_cfg`` (``model.arch``) cut into K modules; parameters drawn from torch's global RNG.

    ``counts``: layers per module; None = as ``model.split`` says (see ``configured_counts``).
    The layers' parameters do not depend on the counts; the heads' do (one per module, on
    its last width). Quantizers (``model.quantize``) draw their seeds last, so a quantized net
    starts from the same weights as the same net unquantized.
    """
    counts = configured_counts(model_cfg, K) if counts is None else check_counts(counts, n_layers(model_cfg), K)
    G = model_cfg.get("groups", 1)
    if G > 1 and shapes.parse(model_cfg)[0] not in ("cnn", "resnet"):
        raise ValueError(f"model.groups {G}: neuron groups are built for model.arch cnn and resnet only, not {model_cfg['arch']!r}")
    if G > 1 and shapes.parse(model_cfg)[0] == "resnet" and model_cfg.get("shortcut", "A") != "B":
        raise ValueError(f"model.groups {G}: grouped ResNets project their shortcuts (model.shortcut B, as the GN-DGL code)")
    blocks, heads = _grouped(model_cfg, counts, in_channels, num_classes, G) if G > 1 else _plain(model_cfg, counts, in_channels, num_classes)
    return SplitNet(blocks, heads, _quantizers(model_cfg, counts), model_cfg.get("eval_ensemble", "none"))


def _plain(model_cfg: dict, counts: list[int], in_channels: int, num_classes: int) -> tuple[list, list]:
    arch, K = archs.of(model_cfg), len(counts)
    widths, layers = layer_channels(model_cfg), arch.layers(in_channels)
    blocks, heads, start = [], [], 0
    for k, count in enumerate(counts):
        blocks.append(nn.Sequential(*layers[start : start + count]))
        start += count
        last = k == K - 1
        if last:
            heads.append(arch.classifier(widths[start - 1], num_classes))
        else:  # an arch whose authors draw the aux heads as their network says how
            head = _head(model_cfg, widths[start - 1], num_classes, last=False)
            heads.append(arch.init_head(head) if hasattr(arch, "init_head") else head)
    return blocks, heads


def _head(model_cfg: dict, channels: int, num_classes: int, last: bool, hidden: int | None = None) -> nn.Module:
    """Module k's aux head (``model.aux_head``); ``last``: the CNN's classifier."""
    kind = "mlp" if last else model_cfg.get("aux_head", "mlp")
    if kind == "cnn":
        return ConvAuxHead(channels, num_classes, model_cfg.get("kernel_size", 3))
    if kind == "dgl":
        return DGLAuxHead(channels, num_classes, model_cfg.get("aux_nlin", 3), model_cfg.get("aux_mlp_layers", 3), model_cfg.get("aux_first_pool"))
    if kind == "1c2f":
        head = StridedConvHead(channels, num_classes, model_cfg["aux_hidden"] if hidden is None else hidden)
        if model_cfg.get("init", "pytorch") == "he_fan_out":  # the InfoPro and GN-DGL code draw their aux nets' convs as the network's
            he_fan_out(head)
        return head
    return AuxHead(channels, num_classes, model_cfg["aux_pool"], model_cfg["aux_hidden"] if hidden is None else hidden)


def _grouped(model_cfg: dict, counts: list[int], in_channels: int, num_classes: int, G: int) -> tuple[list, list]:
    """GN-DGL's modules: G branches each, one aux head per group (see the module docstring)."""
    widths, K = layer_channels(model_cfg), len(counts)
    if any(w % G for w in widths):
        raise ValueError(f"model.groups {G} does not divide every width {widths} of the layers")
    resnet = archs.of(model_cfg) if shapes.parse(model_cfg)[0] == "resnet" else None
    detach = model_cfg.get("group_detach", True)
    blocks, heads, start, channels = [], [], 0, in_channels
    for k, count in enumerate(counts):
        mine = range(start, start + count)
        if resnet is not None:
            branches = [resnet.group_branch(channels, mine, G, g) for g in range(G)]
        else:
            branches = [_cnn_group_branch(model_cfg, channels, mine, G) for _ in range(G)]
        blocks.append(GroupedModule(branches))
        channels = widths[start + count - 1]
        start += count
        # detached: head g reads the whole width (the code's 128 features); else its channels (128/G)
        hidden = model_cfg["aux_hidden"] if detach else model_cfg["aux_hidden"] // G
        group_heads = [_head(model_cfg, channels if detach else channels // G, num_classes, last=False, hidden=hidden) for _ in range(G)]
        # the classifier: the CNN's; a ResNet's is its aux heads' form, as the GN-DGL code's head
        final = _head(model_cfg, channels, num_classes, last=resnet is None) if k == K - 1 else None
        heads.append(GroupHeads(group_heads, detach, final))
    return blocks, heads


def _cnn_group_branch(model_cfg: dict, channels: int, mine: range, G: int) -> nn.Sequential:
    """One group's layers ``mine`` of the CNN: its first conv sees every group's output."""
    widths, pools = model_cfg["widths"], model_cfg.get("pools") or [None] * len(model_cfg["widths"])
    layers, seen = [], channels
    for i in mine:
        layers.append(conv_layer(seen, widths[i] // G, model_cfg.get("kernel_size", 3), pools[i]))
        seen = widths[i] // G
    return nn.Sequential(*layers)


def quantize_settings(model_cfg: dict, K: int) -> list[dict | None]:
    """``model.quantize`` per boundary: None (floats) or {bits, dim, decay}."""
    setting = model_cfg.get("quantize")
    return list(setting) if isinstance(setting, list) else [setting] * (K - 1)


def _quantizers(model_cfg: dict, counts: list[int]) -> list[nn.Module]:
    from decoupled.quantize import Quantizer

    widths, quantizers, end = layer_channels(model_cfg), [], 0
    for k, setting in enumerate(quantize_settings(model_cfg, len(counts))):
        end += counts[k]
        if setting is None:
            quantizers.append(nn.Identity())
        else:
            seed = int(torch.randint(2**62, ()))
            quantizers.append(Quantizer(widths[end - 1], setting["bits"], setting["dim"], setting["decay"], seed))
    return quantizers
