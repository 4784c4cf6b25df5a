"""The method registry: every ``<name>.py`` in this folder (but ``base``) is a method.

``get(name)`` imports ``decoupled.methods.<name>`` and returns its ``METHOD`` class. Names are
found from the file names alone (see ``decoupled.grid.method_names``), so the workflow can
check a config without importing torch.
"""

from __future__ import annotations

import importlib

from decoupled.errors import UserError

# What the grid must know about a method without importing torch (decoupled.grid):
SYNC_ONLY = {"backprop"}  # the locked baseline has no async form
USES_BETA = {"fdg"}  # grid.beta sweeps these methods only
# Delayed-gradient methods: steps a gradient takes to cross one module boundary in sync mode,
# as in their authors' code (train.gradient_delay: null). DDG (slowbull/DDG) keeps the forward
# pass locked: one step per boundary. FDG (ZHUANGHP/FDG) unlocks it too: a module forwards what
# the one below produced a step earlier, so a gradient needs two steps per boundary.
GRADIENT_DELAY = {"ddg": 1, "fdg": 2}


def get(name: str):
    from decoupled.grid import method_names

    if name not in method_names():
        raise UserError(f"unknown method '{name}' (known: {', '.join(method_names())})")
    return importlib.import_module(f"decoupled.methods.{name}").METHOD
