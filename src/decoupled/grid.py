"""The experiment grid: which training jobs an experiment config asks for, and each job's config.

An experiment config names lists under ``grid`` (methods × modes × K × seeds) and may give
per-method ``overrides``. A *job* config is one point of that grid with the overrides applied:
the shared sections (dataset, model, train, ...) plus ``run: {method, mode, K, seed}``.
Snakemake imports this module to expand its wildcards and the CLI uses it to resolve and
re-check a job, so both agree on every job. It must not import torch: Snakemake's own
environment may not have it.
"""

from __future__ import annotations

import pkgutil
from dataclasses import dataclass
from typing import Any

from decoupled import config as config_lib
from decoupled.errors import UserError


def method_names() -> list[str]:
    """The registered methods: one file each in ``decoupled/methods/`` (found without importing torch)."""
    from decoupled import methods

    return sorted(m.name for m in pkgutil.iter_modules(methods.__path__) if not m.name.startswith("_") and m.name != "base")


@dataclass(frozen=True, order=True)
class RunKey:
    method: str
    mode: str
    K: int
    seed: int

    @property
    def path(self) -> str:
        """Where the run's outputs live, relative to the results directory."""
        return f"runs/{self.method}/{self.mode}/K{self.K}/seed{self.seed}"

    @property
    def name(self) -> str:
        return f"{self.method}-{self.mode}-K{self.K}-seed{self.seed}"


def runs(config: dict[str, Any]) -> list[RunKey]:
    """Every job of the grid, after checking that each one can be built."""
    config = config_lib.validate(config)
    grid = config["grid"]
    keys = [
        RunKey(method, mode, K, seed)
        for method in grid["methods"]
        for mode in grid["modes"]
        for K in grid["K"]
        for seed in grid["seeds"]
    ]
    for key in keys:
        job_config(config, key)  # raises on the first job that cannot run
    return keys


def job_config(config: dict[str, Any], key: RunKey) -> dict[str, Any]:
    """The resolved, validated config of one job."""
    known = method_names()
    if key.method not in known:
        raise UserError(f"unknown method '{key.method}' (known: {', '.join(known)})")
    shared = {k: v for k, v in config.items() if k not in ("grid", "overrides")}
    merged = config_lib.deep_merge(shared, config.get("overrides", {}).get(key.method, {}))
    job = _validate_job_sections(merged, key)
    n_layers = len(job["model"]["widths"])
    if key.K > n_layers:
        raise UserError(f"config key 'grid.K': K={key.K} modules need at least {key.K} layers, model.widths has {n_layers}")
    job["run"] = {"method": key.method, "mode": key.mode, "K": key.K, "seed": key.seed}
    return job


def check_job(job: dict[str, Any]) -> dict[str, Any]:
    """Re-validate a job config handed to the CLI (e.g. by a Snakemake rule, or written by hand)."""
    if not isinstance(job, dict) or not isinstance(job.get("run"), dict):
        raise UserError("job config needs a 'run' mapping with method, mode, K and seed")
    run = job["run"]
    missing = [k for k in ("method", "mode", "K", "seed") if k not in run]
    if missing:
        raise UserError(f"job config key 'run' lacks {', '.join(missing)}")
    key = RunKey(run["method"], run["mode"], run["K"], run["seed"])
    config = {k: v for k, v in job.items() if k != "run"}
    config["grid"] = {"methods": [key.method], "modes": [key.mode], "K": [key.K], "seeds": [key.seed]}
    return job_config(config_lib.validate(config), key)


def _validate_job_sections(merged: dict[str, Any], key: RunKey) -> dict[str, Any]:
    """Validate the merged sections as a one-point experiment, so overrides get the same checks."""
    as_experiment = dict(merged, grid={"methods": [key.method], "modes": [key.mode], "K": [key.K], "seeds": [key.seed]})
    try:
        validated = config_lib.validate(as_experiment)
    except UserError as e:
        raise UserError(f"{e} (in the job {key.name}, after overrides.{key.method})") from None
    del validated["grid"], validated["overrides"]
    return validated
