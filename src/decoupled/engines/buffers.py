"""What passes activations from module k-1 to module k in async mode.

``ReplayBuffer`` (DGL async): the last M activations; a module may train on an entry several
times while the module below is slow. ``FifoQueue`` (DNI, DDG, FDG): each activation is used
once and in order, because a gradient for it travels back and must meet the right stored
state; when full, the producer waits (back-pressure), so memory stays bounded.
Entries carry the producer's step count, so the engine can measure staleness.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch


@dataclass
class Entry:
    inputs: torch.Tensor
    labels: torch.Tensor
    produced_at: int  # the producing module's step count when it made this
    uses: int = 0
    ready_at: float = 0.0  # simulated parallel time at which the producer finished it


class ReplayBuffer:
    """At most ``size`` entries; sampling picks, among the least-used entries, the most recent."""

    def __init__(self, size: int, max_reuse: int | None = None):
        self.size, self.max_reuse = size, max_reuse
        self.entries: collections.deque[Entry] = collections.deque()

    def full(self) -> bool:
        return False  # the oldest entry makes room: the producer never waits

    def put(self, entry: Entry) -> None:
        if len(self.entries) == self.size:
            self.entries.popleft()
        self.entries.append(entry)

    def take(self) -> Entry | None:
        if not self.entries:
            return None
        fewest = min(e.uses for e in self.entries)
        entry = next(e for e in reversed(self.entries) if e.uses == fewest)
        entry.uses += 1
        if self.max_reuse is not None and entry.uses >= self.max_reuse:
            self.entries.remove(entry)
        return entry

    def __len__(self) -> int:
        return len(self.entries)


class FifoQueue:
    """A bounded first-in first-out queue; each entry is taken once."""

    def __init__(self, size: int):
        self.size = size
        self.entries: collections.deque[Entry] = collections.deque()
        self.take_times: collections.deque[float] = collections.deque(maxlen=size)  # of the last takes

    def slot_free_at(self) -> float:
        """When the slot the next put fills was freed: the (simulated) time of the take ``size``
        puts before it; 0 while the queue has never been full."""
        i = len(self.entries) - self.size + len(self.take_times)
        return self.take_times[i] if i >= 0 else 0.0

    def full(self) -> bool:
        return len(self.entries) >= self.size

    def put(self, entry: Entry) -> None:
        assert not self.full(), "the producer must wait while the queue is full"
        self.entries.append(entry)

    def take(self) -> Entry | None:
        return self.entries.popleft() if self.entries else None

    def __len__(self) -> int:
        return len(self.entries)
