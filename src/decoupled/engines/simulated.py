"""The single-process engine: deterministic, so figures can be regenerated exactly."""

from __future__ import annotations

import time

import torch

from decoupled.methods.base import Method


class SimulatedEngine:
    """Feeds shuffled mini-batches through the modules in order (sync mode).

    Batches are slices of tensors held in memory, so the loop has no per-sample Python.
    The last incomplete batch of an epoch is dropped: every step sees ``batch_size`` images,
    which keeps BatchNorm statistics comparable between methods.
    """

    def __init__(self, method: Method, train_x: torch.Tensor, train_y: torch.Tensor, batch_size: int, seed: int):
        self.method = method
        self.train_x, self.train_y = train_x, train_y
        self.batch_size = batch_size
        self.order_rng = torch.Generator().manual_seed(seed)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_x) // self.batch_size

    def run_epoch(self) -> dict:
        """One pass over the training set; returns mean losses per module, images seen and seconds."""
        K = self.method.net.K
        self.method.net.train()
        loss_sums, loss_counts = [0.0] * K, [0] * K
        order = torch.randperm(len(self.train_x), generator=self.order_rng)
        start = time.perf_counter()
        for step in range(self.steps_per_epoch):
            idx = order[step * self.batch_size : (step + 1) * self.batch_size]
            h, labels = self.train_x[idx], self.train_y[idx]
            for k in range(K):
                h, loss = self.method.module_step(k, h, labels)
                if loss is not None:
                    loss_sums[k] += loss.item()
                    loss_counts[k] += 1
        seconds = time.perf_counter() - start
        losses = [total / count if count else None for total, count in zip(loss_sums, loss_counts)]
        return {"train_loss_per_module": losses, "images": self.steps_per_epoch * self.batch_size, "seconds": seconds}

    def state_dict(self) -> dict:
        return {"order_rng": self.order_rng.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.order_rng.set_state(state["order_rng"])
