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
# Settings that only some methods read, with the methods that read them. A job's config keeps
# them for those methods only, so that its MLflow params show, and a change to them re-runs,
# only what applies to it. (Every other train setting applies to every method; the async
# section applies to async jobs only, train.gradient_delay to sync jobs only.)
SETTINGS_OF = {
    "train.probe_heads": {"backprop", "dni", "cdni", "ddg", "fdg"},  # no aux loss of their own to train the heads
    "train.beta": USES_BETA,
    "train.gradient_delay": set(GRADIENT_DELAY),
    "train.delayed_grad_weights": {"ddg", "fdg"},
    "train.synth_label_input": {"cdni"},
    **{f"train.synth_{name}": {"dni", "cdni"} for name in ("hidden", "lr", "layers", "kernel", "batchnorm", "target", "zero_bias")},
    "async.max_reuse": {"dgl"},  # the methods whose inputs come from a replay buffer (input_buffer "replay")
}


def get(name: str):
    from decoupled.grid import method_names

    if name not in method_names():
        raise UserError(f"unknown method '{name}' (known: {', '.join(method_names())})")
    return importlib.import_module(f"decoupled.methods.{name}").METHOD
