"""Parameters and multiply-accumulates (MACs) per module and per worker of a SplitNet.

MACs are those of one image's forward pass (as the GN-DGL code counts them, with ptflops; here
``torch.utils.flop_counter``, whose FLOPs are 2 per MAC of the convolutions and linear layers;
BatchNorm, ReLU and pooling are not counted). A worker is what one process would run:

* a locked method (backprop): one worker, the whole network with its classifier;
* otherwise one worker per module: module k and its aux head; with neuron groups (GN-DGL)
  one per group, group g's branch and head, and the network's classifier on worker (K-1, 0).

The bubble plot of the groups sweep and the scaling model read these.
"""

from __future__ import annotations

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from decoupled.eager import prebuild_guards
from decoupled.model import GroupHeads, SplitNet

# FlopCounterMode's dispatch mode: its __torch_dispatch__ would import torch._dynamo (decoupled.eager)
prebuild_guards(flop_counter._FlopCounterMode)


def count(net: SplitNet, image_shape: tuple[int, ...], locked: bool) -> dict:
    was_training = net.training
    net.eval()
    x = torch.zeros((1, *image_shape), device=next(net.parameters()).device)
    per_module, per_worker = [], []
    with torch.no_grad():
        for k, (block, head) in enumerate(zip(net.blocks, net.heads)):
            block_macs, out = _macs(block, x)
            if isinstance(head, GroupHeads):
                G = len(head.group_heads)
                own = [_macs(h, seen)[0] for h, seen in zip(head.group_heads, _seen(head, out))]
                final = _macs(head.final, out)[0] if head.final is not None else 0
                branches = [_macs(branch, x)[0] for branch in block.branches]
                params = [_params(branch) + _params(h) for branch, h in zip(block.branches, head.group_heads)]
                workers = [{"macs": branches[g] + own[g] + (final if g == 0 else 0), "params": params[g] + (_params(head.final) if g == 0 and head.final else 0)} for g in range(G)]
                head_macs = sum(own) + final
            else:
                head_macs = _macs(head, out)[0]
                workers = [{"macs": block_macs + head_macs, "params": _params(block) + _params(head)}]
            per_module.append({"macs": block_macs + head_macs, "params": _params(block) + _params(head)})
            per_worker += workers
            x = out  # (a quantizer's codebook search is not counted, nor run here: it would learn)
    net.train(was_training)
    if locked:
        per_worker = [{"macs": sum(m["macs"] for m in per_module), "params": sum(m["params"] for m in per_module)}]
    return {
        "params_per_module": [m["params"] for m in per_module],
        "macs_per_module": [m["macs"] for m in per_module],
        "params_per_worker": [w["params"] for w in per_worker],
        "macs_per_worker": [w["macs"] for w in per_worker],
        "workers": len(per_worker),
        "max_worker_macs": max(w["macs"] for w in per_worker),
    }


def _seen(head: GroupHeads, out: torch.Tensor) -> list[torch.Tensor]:
    """What each group head reads (``GroupHeads.group_logits``'s inputs)."""
    G = len(head.group_heads)
    width = out.shape[1] // G
    return [out if head.detach else out[:, g * width : (g + 1) * width] for g in range(G)]


def _macs(module: torch.nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    counter = FlopCounterMode(display=False)
    with counter:
        out = module(x)
    return counter.get_total_flops() // 2, out


def _params(module: torch.nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def as_params(counts: dict) -> dict[str, int]:
    """The counts as flat MLflow params."""
    flat = {"workers": counts["workers"], "max_worker_macs": counts["max_worker_macs"],
            "params_total": sum(counts["params_per_module"]), "macs_total": sum(counts["macs_per_module"])}
    for k, (params, macs) in enumerate(zip(counts["params_per_module"], counts["macs_per_module"])):
        flat[f"params_m{k}"], flat[f"macs_m{k}"] = params, macs
    for i, (params, macs) in enumerate(zip(counts["params_per_worker"], counts["macs_per_worker"])):
        flat[f"params_w{i}"], flat[f"macs_w{i}"] = params, macs
    return flat
