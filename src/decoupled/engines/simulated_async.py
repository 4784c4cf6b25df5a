"""Async mode in one deterministic process: modules advance at their own pace.

A schedule (``engines.schedule``) picks which worker advances at each tick. Worker 0 reads
the next mini-batch; worker k > 0 reads from the buffer that worker k-1 fills (a replay
buffer for DGL, a bounded FIFO queue for methods whose gradients travel back). A worker
with no input, or whose output queue is full, idles for that tick. Gradients sent down
(DNI's true gradients, DDG's delayed ones) wait in the lower worker's inbox until that
worker is next scheduled, so they are exactly as stale as the schedule makes them.

Per worker it counts steps, idle ticks and the staleness of what it consumed: for an input,
how many steps its producer has taken since making it; for a gradient, how many steps the
receiving worker has taken since the forward it belongs to.
"""

from __future__ import annotations

import collections
import time

import torch

from decoupled.engines.base import Engine, EpochInterrupted
from decoupled.engines.batches import BatchStream
from decoupled.engines.buffers import Entry, FifoQueue, ReplayBuffer
from decoupled.engines.losses import LossTally
from decoupled.engines.schedule import SCHEDULES, durations
from decoupled.methods.base import Method


class AsyncSimulator(Engine):
    def __init__(self, method: Method, train_x: torch.Tensor, train_y: torch.Tensor, batch_size: int, seed: int, async_cfg: dict, augment: str = "none"):
        K = method.net.K
        self.method = method
        self.batches = BatchStream(train_x, train_y, batch_size, seed, augment)
        slowed = async_cfg["slowed_module"]
        if slowed is not None and slowed >= K:
            raise ValueError(f"slowed module {slowed} does not exist with K={K}")
        self.schedule = SCHEDULES[async_cfg["schedule"]](durations(K, async_cfg["slowdown_factor"], slowed), seed)
        if method.input_buffer == "replay":
            self.buffers = [ReplayBuffer(async_cfg["buffer_size"], async_cfg["max_reuse"]) for _ in range(K)]
        else:
            self.buffers = [FifoQueue(async_cfg["buffer_size"]) for _ in range(K)]
        self.inbox = [collections.deque() for _ in range(K)]  # gradients for module k's outputs
        self.forwarded_at = [collections.deque() for _ in range(K)]  # step count of each forward awaiting a gradient
        self.steps = [0] * K
        self.idle = [0] * K
        self.input_staleness = [collections.Counter() for _ in range(K)]
        self.grad_staleness = [collections.Counter() for _ in range(K)]

    def run_epoch(self) -> dict:
        K = self.method.net.K
        self.method.net.train()
        losses = LossTally(K)
        if self.partial is None:
            # the whole epoch's order up front (it does not depend on training), so that an
            # epoch stopped part-way can go on with the rest of it
            ticks, seconds_before = list(self.schedule.epoch(self.steps_per_epoch)), 0.0
            steps_before, idle_before = list(self.steps), list(self.idle)
        else:
            ticks, seconds_before = self.partial["ticks"], self.partial["seconds"]
            steps_before, idle_before = self.partial["steps_before"], self.partial["idle_before"]
            losses.load_state_dict(self.partial["losses"])
            self.partial = None
        start = time.perf_counter()
        with self._stoppable():
            for i, k in enumerate(ticks):
                if self._stop_requested():
                    self.partial = {"ticks": ticks[i:], "seconds": seconds_before + time.perf_counter() - start,
                                    "steps_before": steps_before, "idle_before": idle_before, "losses": losses.state_dict()}
                    raise EpochInterrupted(f"tick {i} of {len(ticks)}")
                losses.add(k, self.worker_tick(k))
        seconds = seconds_before + time.perf_counter() - start
        steps = [a - b for a, b in zip(self.steps, steps_before)]
        return {
            "train_loss_per_module": losses.means(),
            "images": steps[-1] * self.batches.batch_size,  # what reached the network's output
            "seconds": seconds,
            "steps_per_module": steps,
            "idle_per_module": [a - b for a, b in zip(self.idle, idle_before)],
            "input_staleness": [staleness_summary(c) for c in self.input_staleness],
            "grad_staleness": [staleness_summary(c) for c in self.grad_staleness],
        }

    def worker_tick(self, k: int) -> torch.Tensor | None:
        """Let worker k advance once: first the gradients it was sent, then one mini-batch."""
        self._receive_gradients(k)
        K = self.method.net.K
        if k < K - 1 and self.buffers[k + 1].full():
            self.idle[k] += 1  # back-pressure: the next module has not caught up
            return None
        if k == 0:
            inputs, labels = self.batches.next()
        else:
            entry = self.buffers[k].take()
            if entry is None:
                self.idle[k] += 1
                return None
            inputs, labels = entry.inputs, entry.labels
            self.input_staleness[k][self.steps[k - 1] - 1 - entry.produced_at] += 1
        outputs, loss, input_grad = self.method.module_step(k, inputs, labels)
        if input_grad is not None and k > 0:
            self.inbox[k - 1].append(input_grad)
        if k < K - 1:
            self.buffers[k + 1].put(Entry(outputs, labels, self.steps[k]))
            if self.method.input_buffer == "fifo":
                self.forwarded_at[k].append(self.steps[k])
        self.steps[k] += 1
        return loss

    def _receive_gradients(self, k: int) -> None:
        while self.inbox[k]:
            self.grad_staleness[k][self.steps[k] - 1 - self.forwarded_at[k].popleft()] += 1
            passed_down = self.method.receive_gradient(k, self.inbox[k].popleft())
            if passed_down is not None and k > 0:
                self.inbox[k - 1].append(passed_down)

    def state_dict(self) -> dict:
        return {
            "batches": self.batches.state_dict(),
            "schedule": self.schedule.state_dict(),
            "buffers": [[(e.inputs, e.labels, e.produced_at, e.uses) for e in b.entries] for b in self.buffers],
            "inbox": [list(q) for q in self.inbox],
            "forwarded_at": [list(q) for q in self.forwarded_at],
            "steps": list(self.steps),
            "idle": list(self.idle),
            "input_staleness": [dict(c) for c in self.input_staleness],
            "grad_staleness": [dict(c) for c in self.grad_staleness],
            "partial": self.partial,
        }

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state["batches"])
        self.schedule.load_state_dict(state["schedule"])
        for buffer, entries in zip(self.buffers, state["buffers"]):
            buffer.entries = collections.deque(Entry(*e) for e in entries)
        self.inbox = [collections.deque(q) for q in state["inbox"]]
        self.forwarded_at = [collections.deque(q) for q in state["forwarded_at"]]
        self.steps, self.idle = list(state["steps"]), list(state["idle"])
        self.input_staleness = [collections.Counter(c) for c in state["input_staleness"]]
        self.grad_staleness = [collections.Counter(c) for c in state["grad_staleness"]]
        self.partial = state["partial"]


def staleness_summary(counts: collections.Counter) -> dict:
    """Mean, max and the histogram {staleness: count} of everything consumed so far."""
    n = sum(counts.values())
    if not n:
        return {"mean": None, "max": None, "histogram": {}}
    return {
        "mean": sum(s * c for s, c in counts.items()) / n,
        "max": max(counts),
        "histogram": {str(s): c for s, c in sorted(counts.items())},
    }
