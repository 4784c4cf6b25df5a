"""Simulated parallel time: when each module's work would end if every module had a worker of its own.

The simulated engines run every module in one process, so their wall-clock seconds add up all
modules' work. ``ParallelClock`` replays that work as K workers would do it: each operation of
module k (a step, a delayed gradient applied, a forward without learning) costs the seconds it
took here, times the worker's slowdown, and starts once its worker is free and what it needs
exists (the input from the module below, a free slot in a bounded queue above, the gradient
from the module above). Sending between workers is taken to be free.
"""

from __future__ import annotations

import time

import torch


def settled_time(device: torch.device) -> float:
    """``time.perf_counter()`` once the work queued on ``device`` is done: a GPU runs kernels
    after the host has returned from launching them, and a module's seconds must include them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class ParallelClock:
    def __init__(self, slowdown: list[float]):
        self.slowdown = list(slowdown)
        self.free_at = [0.0] * len(slowdown)  # when each worker ends its last operation

    def run(self, k: int, seconds: float, ready: float) -> tuple[float, float]:
        """Worker k does ``seconds`` of (unslowed) work once ``ready``; returns its start and end."""
        start = max(self.free_at[k], ready)
        self.free_at[k] = start + seconds * self.slowdown[k]
        return start, self.free_at[k]

    def now(self) -> float:
        """When the last worker ends its last operation."""
        return max(self.free_at)

    def state_dict(self) -> dict:
        return {"free_at": list(self.free_at)}

    def load_state_dict(self, state: dict) -> None:
        self.free_at = list(state["free_at"])
