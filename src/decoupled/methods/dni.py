"""Decoupled Neural Interfaces with synthetic gradients (Jaderberg et al., 2017).

Between module k and k+1 sits a synthesizer that predicts d loss / d h_k from h_k alone.
Module k updates at once with that prediction instead of waiting for the true gradient;
when module k+1 has processed h_k, it sends the true gradient back and the synthesizer is
regressed onto it (MSE). Module k+1's "true" gradient is itself computed from its own
synthetic gradient (bootstrapping). With ``train.synth_last_block`` (the DGL code's
``dni_comparisons/``, whose backward interfaces follow every conv block) a synthesizer also
sits between the last block and the network's classifier: the last block steps on its
prediction, the classifier learns from the true loss on the block's detached output, and that
synthesizer is fitted to the classifier's gradient of the same batch, so the true loss reaches
no block directly. Without it the last block trains with the classifier on the true loss.
The synthesizers' last layer starts at zero, so training begins with zero synthetic
gradients, as in the paper.
"""

from __future__ import annotations

import collections
import math

import torch
import torch.nn.functional as F
from torch import nn

from decoupled import optim
from decoupled.methods.base import Method, ModuleStep
from decoupled.optim import make_optimizer

TRAITS = {"sends_gradients": True, "reads": ["train.probe_heads", "train.synth_hidden", "train.synth_lr", "train.synth_layers", "train.synth_kernel", "train.synth_batchnorm", "train.synth_target", "train.synth_zero_bias", "train.synth_last_block"], "report_order": 2}


class Synthesizer(nn.Module):
    """Resolution-preserving convolutions from the activations to a gradient of their shape.

    cDNI conditions on the label (``classes`` > 0; DNI passes 0 and None) as ``label_input`` says:
    ``maps``, one-hot label maps as extra input channels (which act as a learned per-class bias
    of the first conv); or ``linear``, a linear map of the one-hot label added to the first
    conv's output, before its BatchNorm (the DGL code's ``dni_comparisons/``, from
    koz4k/dni-pytorch).
    """

    def __init__(self, channels: int, hidden: int, *, layers: int, kernel: int, batchnorm: bool, zero_bias: bool,
                 classes: int, label_input: str | None):
        super().__init__()
        self.label_maps = classes if label_input == "maps" else 0
        self.first = nn.Conv2d(channels + self.label_maps, hidden, kernel, padding=kernel // 2)
        self.label = nn.Linear(classes, hidden) if classes and label_input == "linear" else None
        stack, width = [], hidden
        for i in range(layers - 1):
            if i > 0:
                stack.append(nn.Conv2d(width, hidden, kernel, padding=kernel // 2))
            stack += [nn.BatchNorm2d(hidden)] if batchnorm else []
            stack += [nn.ReLU(inplace=True)]
        stack.append(nn.Conv2d(width, channels, kernel, padding=kernel // 2))
        self.rest = nn.Sequential(*stack)
        nn.init.zeros_(self.rest[-1].weight)
        if zero_bias:
            nn.init.zeros_(self.rest[-1].bias)

    def forward(self, h: torch.Tensor, one_hot: torch.Tensor | None = None) -> torch.Tensor:
        if self.label_maps:
            h = torch.cat([h, one_hot[:, :, None, None].expand(-1, -1, *h.shape[2:])], dim=1)
        x = self.first(h)
        if self.label is not None:
            x = x + self.label(one_hot)[:, :, None, None]
        return self.rest(x)


class DNI(Method):
    name = "dni"
    conditioned = False  # cDNI: the synthesizer also sees the label

    def __init__(self, net, train_cfg, total_steps):
        super().__init__(net, train_cfg, total_steps)
        self.num_classes = net.heads[-1][-1].out_features
        self.probe_heads = train_cfg["probe_heads"]
        pairs = []
        for k, block in enumerate(net.blocks):
            params = list(block.parameters())
            if k == net.K - 1 or self.probe_heads:
                params += list(net.heads[k].parameters())
            pairs.append(make_optimizer(params, train_cfg, total_steps))
        self.optimizers = [o for o, _ in pairs]
        self.schedulers = [s for _, s in pairs]
        label = {"classes": self.num_classes, "label_input": train_cfg["synth_label_input"]} if self.conditioned else {"classes": 0, "label_input": None}
        # one synthesizer per boundary between blocks, and with synth_last_block one more above the last block
        self.last_block_synthesized = train_cfg["synth_last_block"]
        channels = [block_out_channels(b) for b in (net.blocks if self.last_block_synthesized else net.blocks[:-1])]
        shape = {k: train_cfg[f"synth_{k}"] for k in ("layers", "kernel", "batchnorm", "zero_bias")}
        self.per_sample = train_cfg["synth_target"] == "per_sample"
        self.synthesizers = nn.ModuleList(Synthesizer(c, train_cfg["synth_hidden"], **shape, **label) for c in channels)
        self.synth_optimizers = [optim.Adam(s.parameters(), lr=train_cfg["synth_lr"]) for s in self.synthesizers]
        # activations (and labels) of module k waiting for their true gradient, oldest first
        self.waiting: list[collections.deque] = [collections.deque() for _ in channels]
        # (h, labels, prediction with its graph) of synthesizer k's last prediction, until it steps
        self.kept: list[tuple | None] = [None for _ in channels]
        # when each loss first went NaN or infinite: each module's (at its step), the synthesizers'
        self.steps = [0] * net.K
        self.first_nonfinite: dict = {"modules": [None] * net.K, "synthesizer": None}

    def divergence_hint(self, losses):
        # Which went first does not tell the cause (a high train.lr can break a module on
        # synthetic gradients, or a synthesizer, first): the order is said, and both settings.
        firsts = [(step, f"module {k}") for k, step in enumerate(self.first_nonfinite["modules"]) if step is not None]
        if self.first_nonfinite["synthesizer"] is not None:
            firsts.append((self.first_nonfinite["synthesizer"], "the synthesizers"))
        order = ", ".join(f"{what} at step {step}" for step, what in sorted(firsts))
        return f"non-finite first: {order}; try a lower train.synth_lr or train.lr" if order else "try a lower train.synth_lr or train.lr"

    def predict(self, k: int, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Synthesizer k's output for activations ``h`` (and, for cDNI, their labels)."""
        one_hot = F.one_hot(labels, self.num_classes).to(h.dtype) if self.conditioned else None
        return self.synthesizers[k](h, one_hot)

    # The gradient of a batch-mean loss w.r.t. one activation is O(1/batch): tiny targets that
    # Adam's scale-free steps overshoot at once. With synth_target per_sample the synthesizers
    # predict the gradient times the batch size (that of the per-sample loss), fitted by mean
    # squared error, and the modules use it divided back; with batch_mean (koz4k/dni-pytorch,
    # which the DGL code's comparison uses) they predict the gradient itself, fitted by the sum
    # of squared errors over the batch size.
    def synthetic_gradient(self, k: int, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        prediction = self.predict(k, h, labels)
        self.kept[k] = (h, labels, prediction)
        return prediction.detach() / (len(h) if self.per_sample else 1)

    def prediction_for(self, k: int, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Synthesizer k's prediction for a waiting batch, to regress onto its true gradient, at
        the synthesizer's current weights: the one made for the module if the synthesizer has
        not stepped since (in sync mode, always), else made again (async: a later batch's gradient
        came first)."""
        kept, self.kept[k] = self.kept[k], None  # the synthesizer is about to step
        if kept is not None and kept[0] is h and kept[1] is labels:
            return kept[2]
        return self.predict(k, h, labels)

    def module_step(self, k, inputs, labels):
        inputs = inputs.detach().requires_grad_(k > 0)  # module k-1 wants d loss / d inputs
        optimizer = self.optimizers[k]
        optimizer.zero_grad(set_to_none=True)
        outputs = self.net.blocks[k](inputs)
        last = k == self.net.K - 1
        if last and not self.last_block_synthesized:
            loss = F.cross_entropy(self.net.heads[k](outputs), labels)
            loss.backward()
        else:
            h = outputs.detach()
            outputs.backward(self.synthetic_gradient(k, h, labels))
            loss = None
            if last:  # the classifier, on the true loss; its gradient at h is synthesizer k's target, now
                top = h.detach().requires_grad_()
                loss = F.cross_entropy(self.net.heads[k](top), labels)
                loss.backward()
                self.fit(k, self.prediction_for(k, h, labels), top.grad)
            else:
                self.waiting[k].append((h, labels))
                if self.probe_heads:  # heads on detached features measure the module, change nothing
                    loss = F.cross_entropy(self.net.heads[k](h), labels)
                    loss.backward()
        self.steps[k] += 1
        if loss is not None and self.first_nonfinite["modules"][k] is None and not math.isfinite(loss.item()):  # the engines read .item() per step too
            self.first_nonfinite["modules"][k] = self.steps[k]
        optimizer.step()
        self.schedulers[k].step()
        return ModuleStep(outputs.detach(), None if loss is None else loss.detach(), inputs.grad)

    def receive_gradient(self, k, grad):
        h, labels = self.waiting[k].popleft()
        self.fit(k, self.prediction_for(k, h, labels), grad)
        return None

    def fit(self, k: int, prediction: torch.Tensor, grad: torch.Tensor) -> None:
        """One step of synthesizer k towards the true gradient ``grad`` of its ``prediction``'s batch."""
        optimizer = self.synth_optimizers[k]
        optimizer.zero_grad(set_to_none=True)
        if self.per_sample:
            loss = F.mse_loss(prediction, grad * len(grad))
        else:
            loss = ((prediction - grad) ** 2).sum().div(len(grad))
        loss.backward()
        if self.first_nonfinite["synthesizer"] is None and not math.isfinite(loss.item()):
            self.first_nonfinite["synthesizer"] = min(self.steps)
        optimizer.step()

    def state_dict(self):
        return {
            **super().state_dict(),
            "synthesizers": self.synthesizers.state_dict(),
            "synth_optimizers": [o.state_dict() for o in self.synth_optimizers],
            "waiting": [list(q) for q in self.waiting],
        }

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.synthesizers.load_state_dict(state["synthesizers"])
        for o, s in zip(self.synth_optimizers, state["synth_optimizers"]):
            o.load_state_dict(s)
        self.waiting = [collections.deque(q) for q in state["waiting"]]
        self.kept = [None for _ in self.kept]  # made at the weights just replaced


def block_out_channels(block: nn.Module) -> int:
    """Channels of a block's output: those of its last convolution."""
    return [m for m in block.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


METHOD = DNI
