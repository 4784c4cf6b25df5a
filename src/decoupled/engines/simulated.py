"""The single-process engine: deterministic, so figures can be regenerated exactly."""

from __future__ import annotations

import collections
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
        self.step = 0  # global step count, the clock of gradient deliveries
        # gradients on their way down: in_flight[k] holds (due step, d loss / d outputs of module k)
        self.in_flight = [collections.deque() for _ in range(method.net.K - 1)]

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
                h, loss, input_grad = self.method.module_step(k, h, labels)
                if loss is not None:
                    loss_sums[k] += loss.item()
                    loss_counts[k] += 1
                if input_grad is not None and k > 0:
                    self._send_gradient(k - 1, input_grad)
            self._deliver_gradients()
            self.step += 1
        seconds = time.perf_counter() - start
        losses = [total / count if count else None for total, count in zip(loss_sums, loss_counts)]
        return {"train_loss_per_module": losses, "images": self.steps_per_epoch * self.batch_size, "seconds": seconds}

    def _send_gradient(self, k: int, grad: torch.Tensor) -> None:
        self.in_flight[k].append((self.step + self.method.gradient_delay, grad))

    def _deliver_gradients(self) -> None:
        """Hand every gradient due by now to its module, top module first, so that with no delay
        a gradient passed down in this step still arrives in this step."""
        for k in reversed(range(len(self.in_flight))):
            queue = self.in_flight[k]
            while queue and queue[0][0] <= self.step:
                passed_down = self.method.receive_gradient(k, queue.popleft()[1])
                if passed_down is not None and k > 0:
                    self._send_gradient(k - 1, passed_down)

    def state_dict(self) -> dict:
        return {"order_rng": self.order_rng.get_state(), "step": self.step, "in_flight": [list(q) for q in self.in_flight]}

    def load_state_dict(self, state: dict) -> None:
        self.order_rng.set_state(state["order_rng"])
        self.step = state["step"]
        self.in_flight = [collections.deque(q) for q in state["in_flight"]]
