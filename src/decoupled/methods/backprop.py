"""End-to-end backpropagation: the baseline every decoupled method is compared with.

Modules hand on activations that keep their graph; the last module computes the loss and
back-propagates through all of them, then one optimizer steps every parameter. With
``train.probe_heads`` the intermediate aux heads are trained on *detached* features, which
measures how linearly-decodable each module's output is without changing the network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from decoupled.methods.base import Method, ModuleStep
from decoupled.optim import make_optimizer

TRAITS = {"sync_only": True, "reads": ["train.probe_heads"], "report_order": 0}


class Backprop(Method):
    name = "backprop"

    def __init__(self, net, train_cfg, total_steps):
        super().__init__(net, train_cfg, total_steps)
        self.probe_heads = train_cfg["probe_heads"]
        params = list(net.blocks.parameters()) + list(net.heads[-1].parameters())
        if self.probe_heads:
            params += list(net.heads[:-1].parameters())
        optimizer, scheduler = make_optimizer(params, train_cfg, total_steps)
        self.optimizers, self.schedulers = [optimizer], [scheduler]

    def module_step(self, k: int, inputs: torch.Tensor, labels: torch.Tensor) -> ModuleStep:
        optimizer = self.optimizers[0]
        if k == 0:
            optimizer.zero_grad(set_to_none=True)
        outputs = self.net.blocks[k](inputs)
        if k < self.net.K - 1:
            if not self.probe_heads:
                return ModuleStep(outputs, None)
            probe_loss = F.cross_entropy(self.net.heads[k](outputs.detach()), labels)
            probe_loss.backward()
            return ModuleStep(outputs, probe_loss.detach())
        loss = F.cross_entropy(self.net.heads[k](outputs), labels)
        loss.backward()
        optimizer.step()
        self.schedulers[0].step()
        return ModuleStep(outputs.detach(), loss.detach())


METHOD = Backprop
