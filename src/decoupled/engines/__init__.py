"""Engines schedule a method's module steps; they never decide how a module learns.

``simulated``: one process, deterministic. In sync mode (``SimulatedEngine``) each step
takes a batch through modules 0..K-1 in lockstep; in async mode (``AsyncSimulator``) a
schedule lets each module advance at its own pace, through buffers between modules.
``distributed`` (``DistributedEngine``): one process per module on torch.distributed, the
same two modes with real parallel workers.

The registry: an engine is a file of this folder that declares, as a literal ``SPEC = {...}``
(the fields of ``EngineSpec``), how a job of it is run: how many processes, how they are
launched, which config section is its own, what its seconds are, and its class for each mode.
The spec is read from the file's text without running it, so that the grid, the workflow and
the report know an engine without importing torch; nothing outside this folder asks which
engine a job has. Adding an engine = its file here + its name in the schema's ``engine``.
The contract of the classes is ``base.Engine``'s docstring.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from decoupled.declared import declared
from decoupled.errors import UserError


@dataclass(frozen=True)
class EngineSpec:
    name: str
    # "one": a single process; "per_module": K processes, worker k owning module k
    processes: str = "one"
    # "python": `python -m decoupled`; "torchrun": torchrun starts the processes on this machine
    launcher: str = "python"
    section: str | None = None  # the config section that only this engine reads (others drop it)
    # what its seconds are: "simulated parallel" (each module's measured work on a worker of its
    # own) or "wall clock" (real workers)
    clock: str = "simulated parallel"
    runs_locked: bool = True  # runs a sync-only method (backprop: its modules wait for one backward pass)
    # with one process per module: the mode in which each neuron group of a module (GN-DGL's
    # model.groups > 1) gets a process of its own, K x G in all (None: no such engine)
    group_workers: str | None = None
    classes: dict[str, str] = field(default_factory=dict)  # mode -> "module:Class" in this folder

    def process_count(self, job: dict[str, Any]) -> int:
        """Processes a job runs: 1, or one per module (per neuron group of each module)."""
        return job["run"]["K"] * job.get("model", {}).get("groups", 1) if self.processes == "per_module" else 1

    def gpus(self, job: dict[str, Any]) -> int:
        """GPUs a job uses: one per process on cuda."""
        return self.process_count(job) if job["train"]["device"] == "cuda" else 0

    def launch_args(self, job: dict[str, Any]) -> list[str]:
        """The launcher's options (torchrun's: one process per module on this machine)."""
        return ["--standalone", "--nnodes=1", f"--nproc-per-node={self.process_count(job)}"] if self.launcher == "torchrun" else []

    def command(self, job: dict[str, Any]) -> list[str]:
        """What starts a job of this engine (each of its processes then runs the same CLI command)."""
        return ["torchrun", *self.launch_args(job), "-m", "decoupled"] if self.launcher == "torchrun" else ["python", "-m", "decoupled"]

    def is_launched(self) -> bool:
        """Whether this process is one the launcher started (False: it must start them itself)."""
        return self.launcher != "torchrun" or "RANK" in os.environ

    def is_main_process(self) -> bool:
        """The process that logs to MLflow, prints progress and writes the outputs."""
        return self.launcher != "torchrun" or os.environ.get("RANK", "0") == "0"

    def modules(self) -> set[str]:
        """The modules of this folder that hold its classes."""
        return {ref.split(":")[0] for ref in self.classes.values()}

    def engine_class(self, mode: str):
        module, name = self.classes[mode].split(":")
        return getattr(importlib.import_module(f"decoupled.engines.{module}"), name)


@cache
def _specs() -> dict[str, EngineSpec]:
    specs = (declared(path, "SPEC", EngineSpec) for path in sorted(Path(__file__).parent.glob("*.py")))
    return {spec["name"]: EngineSpec(**spec) for spec in specs if spec is not None}


def names() -> list[str]:
    return sorted(_specs())


def spec(name: str) -> EngineSpec:
    if name not in _specs():
        raise UserError(f"unknown engine '{name}' (known: {', '.join(names())})")
    return _specs()[name]


def of(job: dict[str, Any]) -> EngineSpec:
    """The spec of a job's engine."""
    return spec(job["engine"])
