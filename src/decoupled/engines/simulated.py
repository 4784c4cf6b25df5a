"""The single-process engine: deterministic, so figures can be regenerated exactly."""

from __future__ import annotations

import collections
import time

import torch

from decoupled.engines.base import Engine, EpochInterrupted
from decoupled.engines.batches import BatchStream
from decoupled.engines.losses import LossTally
from decoupled.methods.base import Method


class SimulatedEngine(Engine):
    """Sync mode: each step takes a mini-batch through modules 0..K-1 in order.

    Batches are slices of tensors held in memory (``BatchStream``), so the loop has no
    per-sample Python.
    """

    def __init__(self, method: Method, train_x: torch.Tensor, train_y: torch.Tensor, batch_size: int, seed: int, async_cfg: dict | None = None, augment: str = "none"):
        self.method = method
        self.batches = BatchStream(train_x, train_y, batch_size, seed, augment)
        self.step = 0  # global step count, the clock of gradient deliveries
        # gradients on their way down: in_flight[k] holds (due step, d loss / d outputs of module k)
        self.in_flight = [collections.deque() for _ in range(method.net.K - 1)]

    def run_epoch(self) -> dict:
        """One pass over the training set; returns mean losses per module, images seen and seconds."""
        K = self.method.net.K
        self.method.net.train()
        losses, done, seconds_before = LossTally(K), 0, 0.0
        if self.partial is not None:  # an epoch stopped part-way: go on where it stopped
            losses.load_state_dict(self.partial["losses"])
            done, seconds_before, self.partial = self.partial["done"], self.partial["seconds"], None
        start = time.perf_counter()
        with self._stoppable():
            for done in range(done, self.steps_per_epoch):
                if self._stop_requested():
                    self.partial = {"done": done, "losses": losses.state_dict(), "seconds": seconds_before + time.perf_counter() - start}
                    raise EpochInterrupted(f"step {done} of {self.steps_per_epoch}")
                h, labels = self.batches.next()
                for k in range(K):
                    h, loss, input_grad = self.method.module_step(k, h, labels)
                    losses.add(k, loss)
                    if input_grad is not None and k > 0:
                        self._send_gradient(k - 1, input_grad)
                self._deliver_gradients()
                self.step += 1
        seconds = seconds_before + time.perf_counter() - start
        return {"train_loss_per_module": losses.means(), "images": self.steps_per_epoch * self.batches.batch_size, "seconds": seconds}

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
        return {"batches": self.batches.state_dict(), "step": self.step, "in_flight": [list(q) for q in self.in_flight], "partial": self.partial}

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state["batches"])
        self.step = state["step"]
        self.in_flight = [collections.deque(q) for q in state["in_flight"]]
        self.partial = state["partial"]
