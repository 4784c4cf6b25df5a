"""What every engine offers the training loop (``train.fit``) besides ``run_epoch``.

The defaults are those of a single process; the distributed engine, whose network is spread
over several processes, overrides them.
"""

from __future__ import annotations

import torch

from decoupled.evaluate import evaluate
from decoupled.model import SplitNet


class Engine:
    is_main = True  # the process that prints progress, logs to MLflow and writes the outputs

    @property
    def steps_per_epoch(self) -> int:
        """Mini-batches in one pass over the training set (every engine reads them from ``self.batches``)."""
        return self.batches.batches_per_pass

    def evaluate(self, net: SplitNet, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> dict:
        return evaluate(net, x, y, batch_size)

    def checkpoint_state(self) -> dict:
        """What a checkpoint needs besides the network's weights."""
        return {"method": self.method.state_dict(), "engine": self.state_dict()}

    def load_checkpoint_state(self, state: dict) -> None:
        """Continue from ``checkpoint_state()``'s output (the network's weights are loaded apart)."""
        self.method.load_state_dict(state["method"])
        self.load_state_dict(state["engine"])

    def close(self) -> None:
        """Release what the engine holds once training is over."""
