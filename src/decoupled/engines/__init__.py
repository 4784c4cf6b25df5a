"""Engines schedule a method's module steps; they never decide how a module learns.

``simulated``: one process, deterministic. Sync mode runs modules 0..K-1 on each batch in
lockstep.
"""

from decoupled.engines.simulated import SimulatedEngine

ENGINES = {"simulated": SimulatedEngine}
