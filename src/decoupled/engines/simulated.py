"""The single-process engine: deterministic, so figures can be regenerated exactly."""

from __future__ import annotations

import collections

import torch

from decoupled.data.batches import Batches
from decoupled.engines import boundary
from decoupled.engines.base import Engine, EpochInterrupted
from decoupled.engines.boundary import Traffic
from decoupled.engines.clock import ParallelClock, settled_time
from decoupled.engines.losses import LossTally
from decoupled.engines.staleness import staleness_summary
from decoupled.methods.base import Method


# One process runs every module; its seconds are the simulated parallel clock's.
SPEC = {"name": "simulated", "classes": {"sync": "simulated:SimulatedEngine", "async": "simulated_async:AsyncSimulator"}}


class SimulatedEngine(Engine):
    """Sync mode: each step takes a mini-batch through modules 0..K-1 in order.

    The gradient of the batch of step b reaches module k at the end of step
    b + ``method.gradient_delay(k)``. Batches come whole from ``batches`` (slices of tensors
    held in memory, or a loader's, read ahead), so the loop has no per-sample Python. The
    ``ParallelClock`` times the run as K workers in a pipeline would take it; a locked method
    (backprop) cannot start a batch before the last one's backward is done.
    """

    def __init__(self, method: Method, batches: Batches, async_cfg: dict | None = None):
        K = method.net.K
        self.method = method
        self.batches = batches
        self.device = batches.device  # where the modules compute: the clock waits for it
        self.step = 0  # global step count = the batch index, the clock of gradient deliveries
        # gradients on their way down: in_flight[k] holds (due step, batch step, sent at, d loss / d outputs of module k)
        self.in_flight = [collections.deque() for _ in range(K - 1)]
        self.locked = method.traits.sync_only
        self.clock = ParallelClock([1.0] * K)
        self.grad_staleness = [collections.Counter() for _ in range(K)]
        self.traffic = Traffic(method.net)

    def run_epoch(self) -> dict:
        """One pass over the training set; returns mean losses per module, images seen and seconds."""
        K = self.method.net.K
        self.method.net.train()
        losses, done, seconds_before = LossTally(K), 0, 0.0
        if self.partial is not None:  # an epoch stopped part-way: go on where it stopped
            losses.load_state_dict(self.partial["losses"])
            done, seconds_before, self.partial = self.partial["done"], self.partial["seconds"], None
        start = settled_time(self.device)
        with self._stoppable():
            for done in range(done, self.steps_per_epoch):
                if self._stop_requested():
                    self.partial = {"done": done, "losses": losses.state_dict(), "seconds": seconds_before + settled_time(self.device) - start}
                    raise EpochInterrupted(f"step {done} of {self.steps_per_epoch}")
                h, labels = self.batches.next()
                ready = self.clock.free_at[K - 1] if self.locked else 0.0  # backprop: after the last backward
                for k in range(K):
                    began = settled_time(self.device)
                    h, loss, input_grad = self.method.module_step(k, h, labels)
                    if k < K - 1:
                        self.traffic.forward(k, h, labels)
                        h = boundary.cross(self.method.net, k, h)
                    _, ready = self.clock.run(k, settled_time(self.device) - began, ready)
                    losses.add(k, loss)
                    if input_grad is not None and k > 0:
                        self._send_gradient(k - 1, self.step, input_grad, ready)
                self._deliver_gradients()
                self.step += 1
                if self.progress is not None:
                    self.progress(done + 1, self.steps_per_epoch)
        seconds = seconds_before + settled_time(self.device) - start
        return {
            "train_loss_per_module": losses.means(),
            "images": self.steps_per_epoch * self.batches.batch_size,
            "seconds": seconds,
            **self.traffic.epoch_stats(self.steps_per_epoch * self.batches.batch_size),
            "steps_per_module": [self.steps_per_epoch] * K,
            "sim_time_s": self.clock.now(),
            "finish_time_s_per_module": list(self.clock.free_at),
            "grad_staleness": [staleness_summary(c) for c in self.grad_staleness],
        }

    def _send_gradient(self, k: int, batch: int, grad: torch.Tensor, sent_at: float) -> None:
        self.traffic.backward(k + 1, grad)
        self.in_flight[k].append((batch + self.method.gradient_delay(k), batch, sent_at, grad))

    def _deliver_gradients(self) -> None:
        """Hand every gradient due by now to its module, top module first, so that with no delay
        a gradient passed down in this step still arrives in this step."""
        for k in reversed(range(len(self.in_flight))):
            queue = self.in_flight[k]
            while queue and queue[0][0] <= self.step:
                _, batch, sent_at, grad = queue.popleft()
                self.grad_staleness[k][self.step - batch] += 1
                began = settled_time(self.device)
                passed_down = self.method.receive_gradient(k, grad)
                _, done = self.clock.run(k, settled_time(self.device) - began, sent_at)
                if passed_down is not None and k > 0:
                    self._send_gradient(k - 1, batch, passed_down, done)

    def state_dict(self) -> dict:
        return {"batches": self.batches.state_dict(), "step": self.step, "in_flight": [list(q) for q in self.in_flight], "partial": self.partial,
                "clock": self.clock.state_dict(), "grad_staleness": [dict(c) for c in self.grad_staleness],
                "traffic": self.traffic.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state["batches"])
        self.step = state["step"]
        self.in_flight = [collections.deque(q) for q in state["in_flight"]]
        self.partial = state["partial"]
        self.clock.load_state_dict(state["clock"])
        self.grad_staleness = [collections.Counter(c) for c in state["grad_staleness"]]
        self.traffic.load_state_dict(state["traffic"])

