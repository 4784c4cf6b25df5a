"""Shared by the MLflow concurrency tests: start many real training jobs at one moment, then
read back from the tracking store that every run arrived whole.

``jobs`` builds distinct job configs (every method, sync and async); ``init_tracking`` runs
``decoupled init-tracking`` (``attached`` reads the same from a store made without it);
``run_concurrently`` starts one ``python -m decoupled train`` process per job, holds them at a
gate until all have imported torch and MLflow, then opens it, so that their first MLflow calls
(store, run, params) land together; ``check_runs`` compares the store with each job's
``config.json`` and ``metrics.json``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FASHION_DIR

from decoupled import config, grid
from decoupled.compute import as_params
from decoupled.grid import params_of
from decoupled.files import read_json

# Imports what a training job imports, waits for the gate file, then runs the CLI exactly as
# `python -m decoupled ARGS...` does.
GATE = """
import os, runpy, sys, time
from pathlib import Path
import decoupled.cli, decoupled.job, decoupled.tracking, mlflow.tracking, mlflow.entities
ready, gate = Path(sys.argv[1]), Path(sys.argv[2])
ready.touch()
while not gate.exists():
    time.sleep(0.01)
sys.argv = ["decoupled", *sys.argv[3:]]
runpy.run_module("decoupled", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Real Fashion-MNIST images, 20 per class (10 per class to test on): the jobs' own work is
    small beside their start-up, so many fit on two cores."""
    if not FASHION_DIR.is_dir():
        pytest.skip("Fashion-MNIST not installed (scripts/setup.sh installs dataset-fashion-mnist)")
    from decoupled.data import prepare

    out = tmp_path_factory.mktemp("data") / "fashion_mnist.pt"
    prepare("fashion_mnist", out, subset_per_class=20, test_subset_per_class=10)
    return out


def jobs(n: int, experiment: str = "concurrency", epochs: int = 2) -> list[dict]:
    """``n`` distinct tiny jobs (every method, sync then async, then more seeds), one thread each."""
    methods = ["backprop", "dgl", "dni", "cdni", "ddg", "fdg"]
    seeds = list(range(n // 11 + 1))  # 11 method x mode pairs per seed
    cfg = config.validate(
        {
            "experiment": experiment,
            "model": {"widths": [8, 16], "aux_hidden": 32},
            "train": {"epochs": epochs, "batch_size": 50, "lr": 0.05, "threads": 1},
            "async": {"buffer_size": 4},
            "grid": {"methods": methods, "modes": ["sync", "async"], "K": [2], "seeds": seeds},
        }
    )
    keys = sorted(grid.runs(cfg), key=lambda k: (k.seed, k.mode != "sync", methods.index(k.method)))
    return [grid.job_config(cfg, key) for key in keys[:n]]


def init_tracking(uri: str, out: Path, experiment: str = "concurrency") -> dict:
    """``decoupled init-tracking`` (in this process: MLflow is imported already), as the
    workflow's init_tracking rule runs it before any job; returns what it wrote."""
    from decoupled.cli import main

    assert main(["init-tracking", "--experiment", experiment, "--tracking-uri", uri, "--out", str(out)]) == 0
    return read_json(out)


def attached(uri: str, experiment: str = "concurrency") -> dict:
    """What init-tracking would have written, read from the store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    parents = client.search_runs([experiment_id], filter_string="tags.`decoupled.role` = 'parent'")
    assert len(parents) == 1, f"{len(parents)} parent runs"
    return {"tracking_uri": uri, "experiment": experiment, "experiment_id": experiment_id, "parent_run_id": parents[0].info.run_id}


def run_concurrently(job_list: list[dict], data: Path, tracking_json: Path | None, workdir: Path, env: dict | None = None, timeout: float = 300) -> dict[str, Path]:
    """Train every job in its own process, all released at once; return {MLflow run name: run dir}.
    Without ``tracking_json`` each job opens its config's ``tracking_uri`` itself."""
    workdir.mkdir(parents=True, exist_ok=True)
    gate = workdir / "go"
    procs, dirs, run_names = {}, {}, {}
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})}
    try:
        for job in job_list:
            key = grid.RunKey.of(job["run"])
            name, run_names[key.name] = key.name, key.run_name
            dirs[name] = workdir / "runs" / name
            command = [sys.executable, "-c", GATE, str(workdir / f"{name}.ready"), str(gate),
                       "train", "--job-json", json.dumps(job), "--data", str(data), "--out", str(dirs[name]),
                       *(["--tracking", str(tracking_json)] if tracking_json else [])]  # fmt: skip
            log = open(workdir / f"{name}.log", "w")
            procs[name] = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
            log.close()
        deadline = time.monotonic() + timeout
        while not all((workdir / f"{name}.ready").exists() for name in procs):
            failed = {name: p.returncode for name, p in procs.items() if p.poll() is not None}
            assert not failed, f"jobs ended before the gate: {failed}\n{_logs(workdir, failed)}"
            assert time.monotonic() < deadline, "jobs did not reach the gate in time"
            time.sleep(0.05)
        gate.touch()
        for name, p in procs.items():
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        failed = {name: p.returncode for name, p in procs.items() if p.returncode != 0}
        assert not failed, f"jobs failed: {failed}\n{_logs(workdir, failed)}"
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    return {run_names[name]: run_dir for name, run_dir in dirs.items()}


def _logs(workdir: Path, names) -> str:
    return "\n".join(f"--- {name}\n{(workdir / f'{name}.log').read_text()[-3000:]}" for name in names)


def check_runs(experiment: dict, run_dirs: dict[str, Path]) -> list:
    """Every job is one FINISHED child run of the parent, in its experiment, with all its params
    and every per-epoch metric of its metrics.json; no run is missing, doubled or stray."""
    from mlflow.tracking import MlflowClient

    from decoupled.tracking import epoch_metrics

    client = MlflowClient(tracking_uri=experiment["tracking_uri"])
    everywhere = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=10000)
    names = [r.info.run_name for r in everywhere]
    assert sorted(names) == sorted([experiment["experiment"], *run_dirs]), f"runs in the store: {sorted(names)}"
    parent = client.get_run(experiment["parent_run_id"])
    assert parent.info.experiment_id == experiment["experiment_id"] and parent.data.tags["decoupled.role"] == "parent"
    children = {r.info.run_name: r for r in everywhere if r.info.run_id != experiment["parent_run_id"]}
    for name, run_dir in run_dirs.items():
        run = children[name]
        metrics = read_json(run_dir / "metrics.json")
        job = read_json(run_dir / "config.json")
        where = f"run {name} ({run.info.run_id})"
        assert run.info.run_id == metrics["mlflow_run_id"], where
        assert run.info.status == "FINISHED", f"{where}: {run.info.status}"
        assert run.info.experiment_id == experiment["experiment_id"], where
        assert run.data.tags["mlflow.parentRunId"] == experiment["parent_run_id"], where
        assert run.data.tags["decoupled.role"] == "child", where
        # the job's settings that apply to its network and schedule, and its parameter and MAC counts (decoupled.compute)
        assert run.data.params == {k: str(v) for k, v in {**params_of(job), **as_params(metrics["compute"])}.items()}, where
        [dataset] = run.inputs.dataset_inputs  # the prepared file it trained on
        assert dataset.dataset.name == job["dataset"]["name"] and json.loads(dataset.dataset.profile)["train_images"] > 0, where
        expected: dict[str, dict[int, float]] = {}
        for record in metrics["epochs"]:
            for key, value in epoch_metrics(record).items():
                expected.setdefault(key, {})[record["epoch"]] = value
        expected["time/train_s"] = {job["train"]["epochs"]: metrics["train_time_s"]}
        if "imbalance" in metrics["split"]:
            expected["split/predicted_imbalance"] = {job["train"]["epochs"]: metrics["split"]["imbalance"]}
        missing = set(expected) - set(run.data.metrics)
        assert not missing, f"{where}: metrics {sorted(missing)} missing"
        for key, by_step in expected.items():
            history = client.get_metric_history(run.info.run_id, key)
            logged = {m.step: m.value for m in history}
            assert len(history) == len(by_step) and logged.keys() == by_step.keys(), f"{where}: {key} steps {sorted(logged)} != {sorted(by_step)}"
            for step, value in by_step.items():
                assert math.isclose(logged[step], value, rel_tol=1e-12, abs_tol=1e-300), f"{where}: {key}[{step}] = {logged[step]} != {value}"
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"metrics.json", "config.json"} <= artifacts, f"{where}: artifacts {sorted(artifacts)}"
    return list(children.values())
