"""Decoupled Parallel Backpropagation with delayed gradients, DDG (Huo et al., 2018).

Backprop cut at module boundaries and pipelined: module k keeps the graph of each batch it
has forwarded and, when the gradient of that batch's loss w.r.t. its output comes back from
module k+1, back-propagates it through the stored graph, updates, and passes the gradient
w.r.t. its input on down. The forward pass stays locked (every module forwards the same batch
in a step) and a gradient takes ``train.gradient_delay`` steps per boundary (1, as in the
authors' code): module k applies, after forwarding batch t, the gradient of batch t-(K-1-k).

Which weights the delayed gradient is taken at (``train.delayed_grad_weights``):

* ``current`` (the authors' code): back-propagating the stored graph after the optimizer has
  updated the weights in place through ``.data`` (PyTorch 0.4/1.0, which autograd did not
  track) uses the module's weights *as they are now* in every Jacobian, with the activations,
  BatchNorm statistics and ReLU masks of the forward. Not a recomputation of the forward.
* ``forward`` (DDG's equations): the weights that produced the stored output.

Either way each forward runs on a detached copy of the weights (``torch.func.functional_call``)
so that the live weights can be updated meanwhile (torch 2.x refuses to back-propagate through
saved tensors changed in place); ``current`` writes the live weights into that copy, untracked,
just before the backward. The gradient is applied to the live weights. Nothing is recomputed.
"""

from __future__ import annotations

import collections

import torch
import torch.nn.functional as F
from torch.func import functional_call

from decoupled.methods.base import Method, ModuleStep
from decoupled.optim import make_optimizer

# DDG (slowbull/DDG) keeps the forward pass locked: a gradient takes one step per boundary
TRAITS = {"gradient_delay": 1, "sends_gradients": True, "reads": ["train.probe_heads", "train.gradient_delay", "train.delayed_grad_weights"], "report_order": 4}


class DDG(Method):
    name = "ddg"

    def __init__(self, net, train_cfg, total_steps):
        super().__init__(net, train_cfg, total_steps)
        delay = train_cfg.get("gradient_delay")  # absent in async mode, where the engine's queues delay gradients
        self.delay_per_boundary = self.traits.gradient_delay if delay is None else delay
        self.at_current_weights = train_cfg["delayed_grad_weights"] == "current"
        self.probe_heads = train_cfg["probe_heads"]
        K = net.K
        pairs = [make_optimizer(list(net.blocks[k].parameters()) + (list(net.heads[k].parameters()) if k == K - 1 else []), train_cfg, total_steps) for k in range(K)]
        if self.probe_heads:  # heads on detached features, stepped with each forward
            pairs += [make_optimizer(net.heads[k].parameters(), train_cfg, total_steps) for k in range(K - 1)]
        self.optimizers = [o for o, _ in pairs]
        self.schedulers = [s for _, s in pairs]
        # (inputs, outputs, weight copies) of batches forwarded by module k, awaiting their gradient
        self.pending: list[collections.deque] = [collections.deque() for _ in range(K - 1)]

    def gradient_delay(self, k):
        return self.delay_per_boundary * (self.net.K - 1 - k)

    def shrink(self, grad: torch.Tensor) -> torch.Tensor:
        """What the gradient sent down a boundary becomes (FDG scales it)."""
        return grad

    def module_step(self, k, inputs, labels):
        K = self.net.K
        inputs = inputs.detach().requires_grad_(k > 0)
        if k == K - 1:  # the loss is here: no delay, an ordinary backward
            outputs, loss = self.train_on_own_loss(k, inputs, labels)
            return ModuleStep(outputs, loss, None if inputs.grad is None else self.shrink(inputs.grad))
        block = self.net.blocks[k]
        weights = {name: p.detach().clone().requires_grad_() for name, p in block.named_parameters()}
        outputs = functional_call(block, weights, (inputs,))
        self.pending[k].append((inputs, outputs, weights))
        loss = self._train_probe(k, outputs.detach(), labels) if self.probe_heads else None
        return ModuleStep(outputs.detach(), loss)  # its gradient to module k-1 comes with the delayed one

    def receive_gradient(self, k, grad):
        inputs, outputs, weights = self.pending[k].popleft()
        if self.at_current_weights:  # through .data: the graph keeps the forward's activations
            for w, p in zip(weights.values(), self.net.blocks[k].parameters()):
                w.data.copy_(p.detach())
        targets = list(weights.values()) + ([inputs] if k > 0 else [])
        grads = torch.autograd.grad(outputs, targets, grad)
        optimizer = self.optimizers[k]
        optimizer.zero_grad(set_to_none=True)
        for p, g in zip(self.net.blocks[k].parameters(), grads):
            p.grad = g
        optimizer.step()
        self.schedulers[k].step()
        return self.shrink(grads[-1]) if k > 0 else None

    def _train_probe(self, k, features, labels):
        i = self.net.K + k  # the probe heads' optimizers follow the modules'
        self.optimizers[i].zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.net.heads[k](features), labels)
        loss.backward()
        self.optimizers[i].step()
        self.schedulers[i].step()
        return loss.detach()

    def state_dict(self):
        # graphs cannot be saved: keep what rebuilds them (inputs and weight copies)
        pending = [[(i.detach(), {n: w.detach() for n, w in ws.items()}) for i, _, ws in q] for q in self.pending]
        return {**super().state_dict(), "pending": pending}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.pending = [collections.deque() for _ in self.pending]
        for k, queue in enumerate(state["pending"]):
            for inputs, weights in queue:
                inputs = inputs.requires_grad_(k > 0)
                weights = {n: w.clone().requires_grad_() for n, w in weights.items()}
                # on copies of the BatchNorm buffers: re-forwarding must not count a batch twice
                buffers = {n: b.clone() for n, b in self.net.blocks[k].named_buffers()}
                outputs = functional_call(self.net.blocks[k], {**weights, **buffers}, (inputs,))
                self.pending[k].append((inputs, outputs, weights))


METHOD = DDG
