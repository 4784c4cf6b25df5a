"""The engine contract: what every engine offers the training loop (``train.fit``).

The defaults are those of a single process; the distributed engine, whose network is spread
over several processes, overrides them. How a job of an engine is run (processes, launcher,
config section, clock) is its file's ``SPEC`` (see ``decoupled.engines``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from decoupled.errors import UserError
from decoupled.evaluate import evaluate
from decoupled.model import SplitNet


def train_stream(data, job: dict, device: torch.device):
    """The job's training mini-batches (``data.train_stream``: from memory, or streamed from files)."""
    train = job["train"]
    return data.train_stream(train["batch_size"], job["run"]["seed"], train["augment"], device, train["loader_workers"])


class StopRequest:
    """A request to stop (SIGTERM: a preemption) that an engine honours between two steps.

    ``resume.sigterm_stops``' signal handler calls ``set()`` while ``between_steps`` (the engine is in
    its step loop); elsewhere it stops the job at once.
    """

    def __init__(self):
        self.requested = False
        self.between_steps = False

    def set(self) -> None:
        self.requested = True

    def is_set(self) -> bool:
        return self.requested


class EpochInterrupted(Exception):
    """The engine stopped inside an epoch on a ``StopRequest``; its state holds the epoch's progress."""


class Engine:
    """Schedules a method's module steps over the training data; never decides how a module learns.

    * ``setup(job) -> device`` (classmethod), before anything is built: join the job's other
      processes, if any; this process's device.
    * ``agreed(compute)`` (classmethod): ``compute()``'s value, the same in every process.
    * ``for_job(method, data, job, device)`` (classmethod): the engine for a job.
    * ``run_epoch() -> stats``: one pass over the training set; ``stats`` holds
      ``train_loss_per_module``, ``images`` and ``seconds`` (and what the engine measures
      besides: per-module steps, idle time, staleness, ...), the same on every process.
    * ``evaluate``, ``checkpoint_state`` / ``load_checkpoint_state``, ``close``: see below;
      ``is_main``: the process that prints, logs and writes; ``steps_per_epoch``.
    """

    is_main = True  # the process that prints progress, logs to MLflow and writes the outputs
    # Set by train.fit. The simulated engines stop between two steps when it is set, keeping
    # the epoch's progress in ``partial`` (part of their state), so that a checkpoint taken then
    # resumes inside the epoch; the distributed engine does not look at it.
    stop: StopRequest | None = None
    partial: dict | None = None
    # Set by train.fit on the main process when a progress bar is shown: called as
    # progress(done, total) as the epoch advances, in the engine's own steps.
    progress: Callable[[int, int], None] | None = None

    @classmethod
    def setup(cls, job: dict) -> torch.device:
        name = job["train"]["device"]
        if name == "cuda" and not torch.cuda.is_available():
            raise UserError("config key 'train.device': cuda, but torch sees no GPU here")
        return torch.device(name)

    @classmethod
    def agreed(cls, compute: Callable[[], object]):
        return compute()

    @classmethod
    def for_job(cls, method, data, job: dict, device: torch.device) -> "Engine":
        return cls(method, train_stream(data, job, device), job.get("async"))

    @contextlib.contextmanager
    def _stoppable(self):
        """While the step loop runs, a stop request waits for the end of the current step."""
        if self.stop is None:
            yield
            return
        self.stop.between_steps = True
        try:
            yield
        finally:
            self.stop.between_steps = False

    def _stop_requested(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    @property
    def steps_per_epoch(self) -> int:
        """Mini-batches in one pass over the training set (every engine reads them from ``self.batches``)."""
        return self.batches.batches_per_pass

    def evaluate(self, net: SplitNet, test, batch_size: int) -> dict:
        """The net's accuracies on ``test`` (``Dataset.test_set``'s, on the net's device)."""
        return evaluate(net, test.batches(batch_size))

    def checkpoint_state(self) -> dict:
        """What a checkpoint needs besides the network's weights."""
        return {"method": self.method.state_dict(), "engine": self.state_dict()}

    def load_checkpoint_state(self, state: dict) -> None:
        """Continue from ``checkpoint_state()``'s output (the network's weights are loaded apart)."""
        self.method.load_state_dict(state["method"])
        self.load_state_dict(state["engine"])

    def close(self) -> None:
        """Release what the engine holds once training is over."""
