"""Local Learning with Neuron Groups (GN-DGL; Patel et al., code: adeetyapatel12/GN-DGL).

DGL with each module's width split into ``model.groups`` G neuron groups (``model``'s
``GroupedModule``): group g of module k is trained only by its own aux head's loss, so the G
groups of a module can train on G workers, beyond the depth-wise limit of K modules. The
module's loss, as the authors' code has it: the sum of its groups' cross-entropies plus
``train.div_weight`` times the diversity penalty of its heads (``diversity``); the last module
adds the network's classifier, trained on its detached output. With ``model.group_detach``
(the code's ``--detach``) head g sees the other groups' channels too, detached. Each group has
its own optimizer (the code's one SGD over all parameters makes the same updates: no gradient
crosses from one group's loss into another group's weights). G = 1 is DGL.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from decoupled.methods.base import ModuleStep
from decoupled.methods.dgl import DGL
from decoupled.optim import make_optimizer

TRAITS = {"input_buffer": "replay", "reads": ["model.groups", "model.group_detach", "train.div_weight", "train.div_temp"], "report_order": 6}


def diversity(logits: list[torch.Tensor], labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """The GN-DGL code's diversity penalty (``div_loss_calc``) of one module's G heads: the mean
    cosine similarity, over samples and ordered pairs of distinct heads, of the heads' softmax
    (at ``temperature``) over the classes other than the true one. 0 for one head."""
    G = len(logits)
    if G < 2:
        return logits[0].new_zeros(())
    p = torch.stack([F.softmax(z / temperature, 1) for z in logits])  # (G, B, classes)
    p = p * (1 - F.one_hot(labels, p.shape[-1]).to(p.dtype))
    p = p / (p.sum(-1, keepdim=True) + 1e-8)
    p = F.normalize(p, dim=-1)
    similarity = torch.einsum("kbc,lbc->bkl", p, p)
    off_diagonal = similarity.sum() - similarity.diagonal(dim1=1, dim2=2).sum()
    return off_diagonal / (labels.shape[0] * G * (G - 1))


class GNDGL(DGL):
    name = "gn_dgl"

    def __init__(self, net, train_cfg, total_steps):
        if net.groups == 1:
            super().__init__(net, train_cfg, total_steps)
            return
        self.net, self.train_cfg, self.total_steps = net, train_cfg, total_steps
        self.div_weight, self.div_temp = train_cfg["div_weight"], train_cfg["div_temp"]
        # per module: G (group g's branch + head g), then the last module's classifier
        self.group_optimizers: list[list] = []
        self.optimizers, self.schedulers = [], []
        for k, (block, heads) in enumerate(zip(net.blocks, net.heads)):
            parts = [list(branch.parameters()) + list(head.parameters()) for branch, head in zip(block.branches, heads.group_heads)]
            if heads.final is not None:
                parts.append(list(heads.final.parameters()))
            pairs = [make_optimizer(params, train_cfg, total_steps) for params in parts]
            self.group_optimizers.append(list(range(len(self.optimizers), len(self.optimizers) + len(pairs))))
            self.optimizers += [o for o, _ in pairs]
            self.schedulers += [s for _, s in pairs]

    def module_step(self, k: int, inputs: torch.Tensor, labels: torch.Tensor) -> ModuleStep:
        if self.net.groups == 1:
            return super().module_step(k, inputs, labels)
        mine = self.group_optimizers[k]
        for i in mine:
            self.optimizers[i].zero_grad(set_to_none=True)
        outputs = self.net.blocks[k](inputs.detach())
        heads = self.net.heads[k]
        logits = heads.group_logits(outputs)
        loss = sum(F.cross_entropy(z, labels) for z in logits) + self.div_weight * diversity(logits, labels, self.div_temp)
        if heads.final is not None:
            loss = loss + F.cross_entropy(heads.final(outputs.detach()), labels)
        loss.backward()
        for i in mine:
            self.optimizers[i].step()
            self.schedulers[i].step()
        return ModuleStep(outputs.detach(), loss.detach())


    def group_step(self, k: int, g: int, inputs: torch.Tensor, labels: torch.Tensor, exchange) -> ModuleStep:
        """Group g of module k alone, as its own worker: ``exchange(t)`` returns every group's
        ``t`` (in group order) from the module's other workers. The groups share their outputs
        (what the detached heads read) and their heads' logits (the diversity penalty): each
        worker computes the gradients of its own group exactly as ``module_step`` does. Returns
        the group's output channels and its part of the module's loss (the diversity penalty
        and the classifier's loss in group 0's)."""
        heads, mine = self.net.heads[k], self.group_optimizers[k]
        optimizers = [mine[g]] + ([mine[-1]] if heads.final is not None and g == 0 else [])
        for i in optimizers:
            self.optimizers[i].zero_grad(set_to_none=True)
        own = self.net.blocks[k].branches[g](inputs.detach())
        outputs = exchange(own.detach())
        seen = torch.cat([own if j == g else o for j, o in enumerate(outputs)], 1) if heads.detach else own
        logits = heads.group_heads[g](seen)
        every = exchange(logits.detach())
        every[g] = logits
        penalty = self.div_weight * diversity(every, labels, self.div_temp)
        own_loss = F.cross_entropy(logits, labels)
        loss = own_loss + penalty
        reported = loss.detach() if g == 0 else own_loss.detach()  # the penalty counted once per module
        if heads.final is not None and g == 0:
            final = F.cross_entropy(heads.final(torch.cat(outputs, 1)), labels)
            loss, reported = loss + final, reported + final.detach()
        loss.backward()
        for i in optimizers:
            self.optimizers[i].step()
            self.schedulers[i].step()
        return ModuleStep(own.detach(), reported)


METHOD = GNDGL
