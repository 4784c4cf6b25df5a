"""Which worker advances next, in the async simulator.

Time is counted in steps of a normal worker: in one epoch's worth of time each worker may
take ``steps_per_epoch`` steps, and the slowed one ``steps_per_epoch / S``. ``epoch`` yields
the workers of one epoch of that time (``async.budget: time``); ``next`` gives one worker at a
time, for as long as the engine asks (``async.budget: updates``, where each worker goes on
until it has made its updates).

* ``categorical`` (as the DGL code): each tick draws one worker, with weight 1 each and 1/S
  for the slowed one; an epoch is ``steps_per_epoch x (sum of weights)`` ticks. Seeded.
* ``event``: a discrete-event clock; worker k's steps take ``S_k`` time units and the worker
  whose step ends first goes next (ties: lower module first). With no slowdown this is the
  lockstep order 0, 1, ..., K-1, 0, 1, ... of sync mode.
"""

from __future__ import annotations

import torch


def durations(K: int, slowdown_factor: float, slowed_module: int | None) -> list[float]:
    return [slowdown_factor if k == slowed_module else 1.0 for k in range(K)]


class CategoricalSchedule:
    def __init__(self, step_durations: list[float], seed: int):
        self.weights = torch.tensor([1.0 / d for d in step_durations], dtype=torch.float64)
        self.rng = torch.Generator().manual_seed(seed + 1)  # not the data order's stream

    def epoch(self, steps_per_epoch: int):
        """The workers to advance during one epoch of schedule time, in order."""
        ticks = round(steps_per_epoch * float(self.weights.sum()))
        yield from torch.multinomial(self.weights, ticks, replacement=True, generator=self.rng).tolist()

    def next(self) -> int:
        """The next worker to advance, with no end in view (``async.budget: updates``)."""
        return int(torch.multinomial(self.weights, 1, generator=self.rng))

    def state_dict(self) -> dict:
        return {"rng": self.rng.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.set_state(state["rng"])


class EventSchedule:
    def __init__(self, step_durations: list[float], seed: int):
        self.step_durations = step_durations
        self.next_done = list(step_durations)  # when each worker's current step ends
        self.now = 0.0

    def epoch(self, steps_per_epoch: int):
        end = self.now + steps_per_epoch
        while True:
            k = self._first_done()
            if self.next_done[k] > end + 1e-9:
                self.now = end
                return
            self.next_done[k] += self.step_durations[k]
            yield k

    def next(self) -> int:
        k = self._first_done()
        self.now = self.next_done[k]
        self.next_done[k] += self.step_durations[k]
        return k

    def _first_done(self) -> int:
        return min(range(len(self.next_done)), key=lambda i: (self.next_done[i], i))

    def state_dict(self) -> dict:
        return {"next_done": list(self.next_done), "now": self.now}

    def load_state_dict(self, state: dict) -> None:
        self.next_done, self.now = list(state["next_done"]), state["now"]


SCHEDULES = {"categorical": CategoricalSchedule, "event": EventSchedule}
