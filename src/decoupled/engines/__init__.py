"""Engines schedule a method's module steps; they never decide how a module learns.

``simulated``: one process, deterministic. In sync mode (``SimulatedEngine``) each step
takes a batch through modules 0..K-1 in lockstep; in async mode (``AsyncSimulator``) a
schedule lets each module advance at its own pace, through buffers between modules.
``distributed`` (``DistributedEngine``): one process per module on torch.distributed, the
same two modes with real parallel workers.
"""

from functools import partial

from decoupled.engines.distributed import DistributedEngine
from decoupled.engines.simulated import SimulatedEngine
from decoupled.engines.simulated_async import AsyncSimulator

ENGINES = {
    ("simulated", "sync"): SimulatedEngine,
    ("simulated", "async"): AsyncSimulator,
    ("distributed", "sync"): partial(DistributedEngine, asynchronous=False),
    ("distributed", "async"): partial(DistributedEngine, asynchronous=True),
}
