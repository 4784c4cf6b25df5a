"""Decoupled Greedy Learning (Belilovsky et al., 2020).

Module k learns only from its own aux head's loss on its own output; its input is detached,
so no gradient crosses a module boundary, and each module has its own optimizer. In sync
mode the engine runs the modules on the same batch in lockstep; in async mode each module
reads its inputs from a replay buffer filled by the module below.
"""

from __future__ import annotations

import torch

from decoupled.methods.base import Method, ModuleStep
from decoupled.optim import make_optimizer

# async: a replay buffer, so that modules above a slow one keep training on recent inputs
TRAITS = {"input_buffer": "replay", "report_order": 1}


class DGL(Method):
    name = "dgl"

    def __init__(self, net, train_cfg, total_steps):
        super().__init__(net, train_cfg, total_steps)
        pairs = [
            make_optimizer(list(block.parameters()) + list(head.parameters()), train_cfg, total_steps)
            for block, head in zip(net.blocks, net.heads)
        ]
        self.optimizers = [o for o, _ in pairs]
        self.schedulers = [s for _, s in pairs]

    def module_step(self, k: int, inputs: torch.Tensor, labels: torch.Tensor) -> ModuleStep:
        # the greedy cut: module k never sees gradients from above
        return ModuleStep(*self.train_on_own_loss(k, inputs.detach(), labels))


METHOD = DGL
