"""Mean training loss of each module over an epoch, as the engines report it."""

from __future__ import annotations

import torch


class LossTally:
    """Sums each module's per-step losses; a module that reports none (e.g. backprop's lower
    modules without probe heads) gets None."""

    def __init__(self, K: int):
        self.sums, self.counts = [0.0] * K, [0] * K

    def add(self, k: int, loss: torch.Tensor | None) -> None:
        if loss is not None:
            self.sums[k] += loss.item()
            self.counts[k] += 1

    def state_dict(self) -> dict:
        return {"sums": list(self.sums), "counts": list(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        self.sums, self.counts = list(state["sums"]), list(state["counts"])

    def means(self) -> list[float | None]:
        return [total / count if count else None for total, count in zip(self.sums, self.counts)]
