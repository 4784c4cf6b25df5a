"""The optimizer every method uses, so methods differ only in what gradients they feed it."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from decoupled import eager


SGD = eager.optimizer(torch.optim.SGD)
Adam = eager.optimizer(torch.optim.Adam)


def make_optimizer(params: Iterable[torch.nn.Parameter], train_cfg: dict, total_steps: int):
    """SGD with momentum (or Adam) and weight decay, plus a per-step learning-rate schedule."""
    if train_cfg.get("optimizer", "sgd") == "adam":
        optimizer = Adam(params, lr=train_cfg["lr"], weight_decay=train_cfg["weight_decay"])
    else:
        optimizer = SGD(params, lr=train_cfg["lr"], momentum=train_cfg["momentum"], weight_decay=train_cfg["weight_decay"],
                        nesterov=train_cfg.get("nesterov", False))
    if train_cfg["lr_schedule"] == "cosine":
        factor = lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))  # noqa: E731
    elif train_cfg["lr_schedule"] == "multistep":
        steps_per_epoch = total_steps // train_cfg["epochs"]
        milestones = [epoch * steps_per_epoch for epoch in train_cfg["lr_milestones"]]
        factor = lambda step: train_cfg["lr_gamma"] ** sum(step >= m for m in milestones)  # noqa: E731
    else:
        factor = lambda step: 1.0  # noqa: E731
    warmup_steps = train_cfg.get("lr_warmup_epochs", 0) * (total_steps // train_cfg["epochs"])
    if warmup_steps:
        # InfoPro's warm-up: a linear blend of a small constant lr into the schedule's, not a ramp from 0
        start, schedule = train_cfg.get("lr_warmup_start", 0.01) / train_cfg["lr"], factor
        factor = lambda step: schedule(step) if step >= warmup_steps else (step / warmup_steps) * schedule(step) + (1 - step / warmup_steps) * start  # noqa: E731
    if train_cfg["lr_schedule"] == "multistep" and train_cfg.get("lr_milestone_restart", False):
        return optimizer, RestartAtMilestones(optimizer, factor, milestones)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class RestartAtMilestones(torch.optim.lr_scheduler.LambdaLR):
    """The schedule, and the optimizer's state (momentum) cleared at each milestone step: the DGL
    code builds new optimizers at its milestones (``train.lr_milestone_restart``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, factor, milestone_steps: list[int]):
        self.milestone_steps = list(milestone_steps)
        super().__init__(optimizer, factor)

    def step(self) -> None:
        super().step()
        if self.last_epoch in self.milestone_steps:
            self.optimizer.state.clear()
