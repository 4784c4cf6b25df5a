"""Async mode in one deterministic process: modules advance at their own pace.

A schedule (``engines.schedule``) picks which worker advances at each tick. Worker 0 reads
the next mini-batch; worker k > 0 reads from the buffer that worker k-1 fills (a replay
buffer for DGL, a bounded FIFO queue for methods whose gradients travel back). A worker
with no input, or whose output queue is full, idles for that tick. Gradients sent down
(DNI's true gradients, DDG's delayed ones) wait in the lower worker's inbox until that
worker is next scheduled, so they are exactly as stale as the schedule makes them.

How long a run is (``async.budget``):

* ``updates`` (as the DGL code, where each layer counts its own epochs): every worker makes
  ``method.total_steps`` steps (train.epochs x batches per epoch, as in sync mode), each on its
  own LR schedule. An epoch ends once every worker has made that epoch's steps; a faster
  worker goes on meanwhile, up to its own total. A worker that is done keeps forwarding,
  without learning, for replay buffers above it whose workers are not. A slowed worker thus
  finishes later, and the run ends when the last one is done.
* ``time``: every epoch is the same schedule time (``steps_per_epoch`` steps of a normal
  worker), so a slowed worker makes fewer steps, and so do the workers waiting on it.

Per worker it counts steps, idle ticks and the staleness of what it consumed: for an input,
how many steps its producer has taken since making it; for a gradient, how many steps the
receiving worker has taken since the forward it belongs to. A ``ParallelClock`` gives the
simulated parallel time of the run: each worker's measured work, slowed S times on the slowed
worker, on a worker of its own, waits included.
"""

from __future__ import annotations

import collections

import torch

from decoupled.data.batches import Batches
from decoupled.engines import boundary
from decoupled.engines.base import Engine, EpochInterrupted, train_stream
from decoupled.engines.buffers import Entry, FifoQueue, ReplayBuffer
from decoupled.engines.clock import ParallelClock, settled_time
from decoupled.engines.losses import LossTally
from decoupled.engines.schedule import SCHEDULES, durations
from decoupled.engines.staleness import staleness_summary
from decoupled.methods.base import Method


class AsyncSimulator(Engine):
    @classmethod
    def for_job(cls, method, data, job, device):
        return cls(method, train_stream(data, job, device), job["run"]["seed"], job["async"])

    def __init__(self, method: Method, batches: Batches, seed: int, async_cfg: dict):
        K = method.net.K
        self.method = method
        self.batches = batches
        self.device = batches.device  # where the modules compute: the clock waits for it
        slowed = async_cfg["slowed_module"]
        if slowed is not None and slowed >= K:
            raise ValueError(f"slowed module {slowed} does not exist with K={K}")
        step_durations = durations(K, async_cfg["slowdown_factor"], slowed)
        self.schedule = SCHEDULES[async_cfg["schedule"]](step_durations, seed)
        self.budget = async_cfg["budget"]
        self.replay = method.traits.input_buffer == "replay"
        if self.replay:
            self.buffers = [ReplayBuffer(async_cfg["buffer_size"], async_cfg["max_reuse"]) for _ in range(K)]
        else:
            self.buffers = [FifoQueue(async_cfg["buffer_size"]) for _ in range(K)]
        self.inbox = [collections.deque() for _ in range(K)]  # (gradient for module k's outputs, sent at)
        self.forwarded_at = [collections.deque() for _ in range(K)]  # step count of each forward awaiting a gradient
        self.steps = [0] * K
        self.idle = [0] * K
        self.epochs_done = 0
        self.clock = ParallelClock(step_durations)
        self.input_staleness = [collections.Counter() for _ in range(K)]
        self.grad_staleness = [collections.Counter() for _ in range(K)]
        self.traffic = boundary.Traffic(method.net)
        self.images_read = 0  # by module 0, this epoch

    def run_epoch(self) -> dict:
        K = self.method.net.K
        self.method.net.train()
        losses = LossTally(K)
        if self.partial is None:
            # budget time: the whole epoch's order up front (it does not depend on training), so
            # that an epoch stopped part-way can go on with the rest of it; budget updates draws
            # lazily, and the schedule's state is where a stopped epoch goes on from
            ticks = list(self.schedule.epoch(self.steps_per_epoch)) if self.budget == "time" else None
            seconds_before, steps_before, idle_before = 0.0, list(self.steps), list(self.idle)
        else:
            ticks, seconds_before = self.partial["ticks"], self.partial["seconds"]
            steps_before, idle_before = self.partial["steps_before"], self.partial["idle_before"]
            losses.load_state_dict(self.partial["losses"])
            self.partial = None
        target = min((self.epochs_done + 1) * self.steps_per_epoch, self.method.total_steps)
        start = settled_time(self.device)
        with self._stoppable():
            i = 0
            while i < len(ticks) if ticks is not None else min(self.steps) < target:
                if self._stop_requested():
                    self.partial = {"ticks": ticks[i:] if ticks is not None else None, "seconds": seconds_before + settled_time(self.device) - start,
                                    "steps_before": steps_before, "idle_before": idle_before, "losses": losses.state_dict()}
                    raise EpochInterrupted(f"tick {i} of {len(ticks)}" if ticks is not None else f"tick {i}")
                k = ticks[i] if ticks is not None else self.schedule.next()
                i += 1
                losses.add(k, self.worker_tick(k))
                if self.progress is not None:  # ticks, or the slowest module's updates
                    self.progress(*((i, len(ticks)) if ticks is not None else (min(self.steps) - min(steps_before), target - min(steps_before))))
        self.epochs_done += 1
        self.images_read, images_read = 0, self.images_read
        seconds = seconds_before + settled_time(self.device) - start
        steps = [a - b for a, b in zip(self.steps, steps_before)]
        return {
            "train_loss_per_module": losses.means(),
            "images": steps[-1] * self.batches.batch_size,  # what reached the network's output
            "seconds": seconds,
            **self.traffic.epoch_stats(images_read),
            "steps_per_module": steps,
            "idle_per_module": [a - b for a, b in zip(self.idle, idle_before)],
            "sim_time_s": self.clock.now(),
            "finish_time_s_per_module": list(self.clock.free_at),
            "input_staleness": [staleness_summary(c) for c in self.input_staleness],
            "grad_staleness": [staleness_summary(c) for c in self.grad_staleness],
        }

    def worker_tick(self, k: int) -> torch.Tensor | None:
        """Let worker k advance once: first the gradients it was sent, then one mini-batch."""
        self._receive_gradients(k)
        K = self.method.net.K
        if self.budget == "updates" and self.steps[k] >= self.method.total_steps:
            self._forward_without_learning(k)
            return None
        ready = 0.0
        if k < K - 1 and self.buffers[k + 1].full():
            self.idle[k] += 1  # back-pressure: the next module has not caught up
            return None
        if k < K - 1 and isinstance(self.buffers[k + 1], FifoQueue):
            ready = self.buffers[k + 1].slot_free_at()
        if k == 0:
            inputs, labels = self.batches.next()
            self.images_read += len(labels)
        else:
            entry = self.buffers[k].take()
            if entry is None:
                self.idle[k] += 1
                return None
            inputs, labels, ready = entry.inputs, entry.labels, max(ready, entry.ready_at)
            self.input_staleness[k][self.steps[k - 1] - 1 - entry.produced_at] += 1
        began = settled_time(self.device)
        outputs, loss, input_grad = self.method.module_step(k, inputs, labels)
        started, done = self.clock.run(k, settled_time(self.device) - began, ready)
        if k > 0 and isinstance(self.buffers[k], FifoQueue):
            self.buffers[k].take_times.append(started)
        if input_grad is not None and k > 0:
            self._send_gradient(k, input_grad, done)
        if k < K - 1:
            self.traffic.forward(k, outputs, labels)
            outputs = boundary.cross(self.method.net, k, outputs)
            self.buffers[k + 1].put(Entry(outputs, labels, self.steps[k], ready_at=done))
            if not self.replay:
                self.forwarded_at[k].append(self.steps[k])
        self.steps[k] += 1
        return loss

    def _forward_without_learning(self, k: int) -> None:
        """A worker that has made all its steps feeds the replay buffer above it while a worker
        above still learns (as the DGL code, where a finished layer keeps forwarding)."""
        if not self.replay or all(s >= self.method.total_steps for s in self.steps[k + 1 :]):
            return
        if k == 0:
            (inputs, labels), ready = self.batches.next(), 0.0
            self.images_read += len(labels)
        else:
            entry = self.buffers[k].take()
            if entry is None:
                return
            inputs, labels, ready = entry.inputs, entry.labels, entry.ready_at
        began = settled_time(self.device)
        outputs = self.method.frozen_forward(k, inputs)
        self.traffic.forward(k, outputs, labels)
        outputs = boundary.cross(self.method.net, k, outputs, learn=False)
        _, done = self.clock.run(k, settled_time(self.device) - began, ready)
        # made by the producer's final weights: as fresh as its newest step's output
        self.buffers[k + 1].put(Entry(outputs, labels, self.steps[k] - 1, ready_at=done))

    def _receive_gradients(self, k: int) -> None:
        while self.inbox[k]:
            grad, sent_at = self.inbox[k].popleft()
            self.grad_staleness[k][self.steps[k] - 1 - self.forwarded_at[k].popleft()] += 1
            began = settled_time(self.device)
            passed_down = self.method.receive_gradient(k, grad)
            _, done = self.clock.run(k, settled_time(self.device) - began, sent_at)
            if passed_down is not None and k > 0:
                self._send_gradient(k, passed_down, done)

    def _send_gradient(self, k: int, grad: torch.Tensor, sent_at: float) -> None:
        """Module k sends d loss / d inputs down to module k-1."""
        self.traffic.backward(k, grad)
        self.inbox[k - 1].append((grad, sent_at))

    def state_dict(self) -> dict:
        return {
            "batches": self.batches.state_dict(),
            "schedule": self.schedule.state_dict(),
            "buffers": [[(e.inputs, e.labels, e.produced_at, e.uses, e.ready_at) for e in b.entries] for b in self.buffers],
            "take_times": [list(b.take_times) if isinstance(b, FifoQueue) else [] for b in self.buffers],
            "inbox": [list(q) for q in self.inbox],
            "forwarded_at": [list(q) for q in self.forwarded_at],
            "steps": list(self.steps),
            "idle": list(self.idle),
            "epochs_done": self.epochs_done,
            "clock": self.clock.state_dict(),
            "input_staleness": [dict(c) for c in self.input_staleness],
            "grad_staleness": [dict(c) for c in self.grad_staleness],
            "partial": self.partial,
            "traffic": self.traffic.state_dict(),
            "images_read": self.images_read,
        }

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state["batches"])
        self.schedule.load_state_dict(state["schedule"])
        for buffer, entries, take_times in zip(self.buffers, state["buffers"], state["take_times"]):
            buffer.entries = collections.deque(Entry(*e) for e in entries)
            if isinstance(buffer, FifoQueue):
                buffer.take_times.extend(take_times)
        self.inbox = [collections.deque(q) for q in state["inbox"]]
        self.forwarded_at = [collections.deque(q) for q in state["forwarded_at"]]
        self.steps, self.idle = list(state["steps"]), list(state["idle"])
        self.epochs_done = state["epochs_done"]
        self.clock.load_state_dict(state["clock"])
        self.input_staleness = [collections.Counter(c) for c in state["input_staleness"]]
        self.grad_staleness = [collections.Counter(c) for c in state["grad_staleness"]]
        self.partial = state["partial"]
        self.traffic.load_state_dict(state["traffic"])
        self.images_read = state["images_read"]
