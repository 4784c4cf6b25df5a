"""The method registry: every ``<name>.py`` in this folder (but ``base``) is a method, and so is
every ``<name>.py`` in the folders that ``DECOUPLED_METHOD_DIRS`` lists (``os.pathsep``-separated:
a method of your own, outside the package).

A method's file defines a ``methods.base.Method`` subclass, ends with ``METHOD = ThatClass``,
and declares its traits near the top as a literal ``TRAITS = {...}`` (the fields of ``Traits``
below, those that differ from the defaults). The traits are read from the file's text, without
running it, so that the grid, the workflow and the report know a method without importing
torch; ``get(name)`` imports the file and returns its class. Adding
a method = its file + its name in a config's ``grid.methods``: nothing else names it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from decoupled.declared import declared
from decoupled.errors import UserError

METHOD_DIRS_ENV = "DECOUPLED_METHOD_DIRS"


@dataclass(frozen=True)
class Traits:
    """What the grid, the engines and the report must know about a method."""

    sync_only: bool = False  # no async form (backprop: its modules wait for one backward pass)
    sweeps_beta: bool = False  # grid.beta sweeps train.beta for it (FDG's gradient shrinking)
    # sync mode: steps a gradient takes to cross one boundary when train.gradient_delay is null
    # (None: the method applies no delayed gradients)
    gradient_delay: int | None = None
    # gradients travel down between modules (DNI's true ones for the synthesizers, DDG's delayed
    # ones), so each activation sent up is used once, in order; async: a FIFO queue between modules
    sends_gradients: bool = False
    # async: "fifo" (each input once, in order) or "replay" (a replay buffer may serve an input again)
    input_buffer: str = "fifo"
    # the settings only some methods read ("train.synth_lr", ...): a job keeps them for the
    # methods that read them, so that its MLflow params show, and a change re-runs, only those
    # (async.max_reuse follows from input_buffer "replay")
    reads: tuple[str, ...] = ()
    report_order: int | None = None  # its place in the tables and its colour in the figures (None: after, by name)


@cache
def _files() -> dict[str, Path]:
    dirs = [Path(__file__).parent] + [Path(d) for d in os.environ.get(METHOD_DIRS_ENV, "").split(os.pathsep) if d]
    found: dict[str, Path] = {}
    for folder in dirs:
        for path in sorted(folder.glob("*.py")):
            if not path.stem.startswith("_") and path.stem != "base":
                found.setdefault(path.stem, path)  # the package's own first
    return found


def names() -> list[str]:
    """The registered methods, by name."""
    return sorted(_files())


def file_of(name: str) -> Path:
    check(name)
    return _files()[name]


def check(name: str) -> None:
    if name not in _files():
        raise UserError(f"unknown method '{name}' (known: {', '.join(names())})")


@cache
def traits(name: str) -> Traits:
    """The method's ``TRAITS``, read from its file without running it."""
    found = declared(file_of(name), "TRAITS", Traits) or {}
    return Traits(**{k: tuple(v) if k == "reads" else v for k, v in found.items()})


def get(name: str):
    """The method's class (its instances read their ``traits`` from the registry by name)."""
    path = file_of(name)
    if path.parent == Path(__file__).parent:
        module = importlib.import_module(f"decoupled.methods.{name}")
    else:  # a method of one's own, from its file
        module_name = f"decoupled_method_{name}"
        module = sys.modules.get(module_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
    return module.METHOD


def report_order() -> list[str]:
    """The methods with a ``report_order``, in that order (the others follow, by name)."""
    placed = [(traits(n).report_order, n) for n in names() if traits(n).report_order is not None]
    return [n for _, n in sorted(placed)]


# Settings that the engines read for a method because of a trait, not the method itself.
_ENGINE_READS = {"async.max_reuse": lambda t: t.input_buffer == "replay"}  # the replay buffer's


def settings_of() -> dict[str, set[str]]:
    """Each setting that only some methods read (theirs, or the engines' for them), with the
    methods that read it."""
    readers: dict[str, set[str]] = {setting: set() for setting in _ENGINE_READS}
    for name in names():
        for setting in traits(name).reads:
            readers.setdefault(setting, set()).add(name)
        for setting, applies in _ENGINE_READS.items():
            if applies(traits(name)):
                readers[setting].add(name)
    return readers

