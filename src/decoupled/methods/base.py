"""The interface every method implements: the contract is ``Method``'s docstring."""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from decoupled.methods import Traits, traits
from decoupled.model import SplitNet


class ModuleStep(NamedTuple):
    outputs: torch.Tensor  # what module k hands to module k+1
    loss: torch.Tensor | None  # module k's training loss on this batch (detached), if it has one
    input_grad: torch.Tensor | None = None  # d loss / d inputs, sent back to module k-1 (DNI, DDG)


class Method:
    """A rule for updating a SplitNet, one module at a time: the contract every method keeps.

    A method is one file ``decoupled/methods/<name>.py`` (or in a folder of
    ``DECOUPLED_METHOD_DIRS``) that declares its ``TRAITS`` (``decoupled.methods.Traits``:
    sync-only, sweeps β, delays gradients, sends gradients back, replays inputs, report order),
    defines a subclass with ``name = "<name>"`` and ends with ``METHOD = ThatClass``.

    * ``__init__(net, train_cfg, total_steps)`` builds ``self.optimizers`` and
      ``self.schedulers`` (lists; see ``optim.make_optimizer``).
    * ``module_step(k, inputs, labels) -> ModuleStep(outputs, loss, input_grad)``: advance module
      k on one batch (forward, and update whatever the method updates at this point); return
      the activations for module k+1, module k's loss (detached) or None, and d loss / d inputs
      for module k-1 or None.
    * ``receive_gradient(k, grad) -> Tensor | None``: module k gets d loss / d outputs for its
      oldest batch awaiting one (DNI's true gradient, DDG's delayed one); return what to pass
      on to module k-1.
    * ``gradient_delay(k)``, ``divergence_hint(losses)``, ``state_dict()`` /
      ``load_state_dict(state)``: see each below.

    The engine owns data, order and clock; it calls ``module_step`` for the modules in the
    order its schedule says and passes ``outputs`` on. When a step returns an ``input_grad``,
    the engine delivers it to module k-1 with ``receive_gradient``, in the order the gradients
    were sent; in sync mode, the gradient of the batch that module k forwarded at step b reaches
    it at the end of step b + ``gradient_delay(k)`` (a pipeline's backward travel time). The
    method owns the optimizers and decides what each module learns from.
    """

    name: ClassVar[str]  # the name of its file, which configs use

    @property
    def traits(self) -> Traits:
        """What the grid, the engines and the report know of the method: its file's ``TRAITS``."""
        return traits(self.name)

    def __init__(self, net: SplitNet, train_cfg: dict, total_steps: int):
        self.net = net
        self.train_cfg = train_cfg
        self.total_steps = total_steps

    def gradient_delay(self, k: int) -> int:
        """Sync mode: steps between module k's forward of a batch and the update with that
        batch's gradient (0: in the same step, as backprop). Only methods that send gradients
        between modules have one."""
        return 0

    def module_step(self, k: int, inputs: torch.Tensor, labels: torch.Tensor) -> ModuleStep:
        raise NotImplementedError

    def train_on_own_loss(self, k: int, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One update of module k and its head from the head's loss, with ``self.optimizers[k]``.

        Returns module k's outputs and its loss, both detached.
        """
        optimizer = self.optimizers[k]
        optimizer.zero_grad(set_to_none=True)
        outputs = self.net.blocks[k](inputs)
        loss = F.cross_entropy(self.net.heads[k](outputs), labels)
        loss.backward()
        optimizer.step()
        self.schedulers[k].step()
        return outputs.detach(), loss.detach()

    def frozen_forward(self, k: int, inputs: torch.Tensor) -> torch.Tensor:
        """Module k's output without learning (BatchNorm in eval mode): what a module that has
        made all its updates still sends to those above that have not (async mode)."""
        block = self.net.blocks[k]
        block.eval()
        with torch.no_grad():
            outputs = block(inputs)
        block.train()
        return outputs

    def receive_gradient(self, k: int, grad: torch.Tensor) -> torch.Tensor | None:
        """Module k gets d loss / d outputs for its oldest batch still waiting for one.

        Returns the gradient to pass on to module k-1, or None.
        """
        raise NotImplementedError(f"{self.name} sends no gradients between modules")

    def divergence_hint(self, losses: list[float | None]) -> str:
        """After a training loss went NaN or infinite (``losses``: the epoch's, per module):
        which setting to change, as far as the method can tell."""
        return "try a lower train.lr"

    def state_dict(self) -> dict:
        """Optimizer and scheduler states (the engine saves the network's own state)."""
        return {
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
        }

    def load_state_dict(self, state: dict) -> None:
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)
        for sch, s in zip(self.schedulers, state["schedulers"]):
            sch.load_state_dict(s)
