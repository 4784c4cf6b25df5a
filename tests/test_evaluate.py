"""`decoupled evaluate`: every run of an experiment in one process; a run whose checkpoint cannot be read is left out."""

import json
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO

from decoupled import config, grid, tracking
from decoupled.job import run_job


@pytest.fixture(scope="module")
def two_runs(fashion_subset, tmp_path_factory):
    """Two finished one-epoch jobs (DGL fp32, DDG in bf16 and channels_last) in one MLflow experiment."""
    root = tmp_path_factory.mktemp("evaluate")
    cfg = config.validate({"experiment": "evaluate", "tracking_uri": f"sqlite:///{root}/mlflow.db", "model": {"widths": [8, 16]},
                           "train": {"epochs": 1, "batch_size": 50}, "grid": {"methods": ["dgl", "ddg"], "K": [2], "modes": ["sync"]}})
    experiment = tracking.init_experiment(cfg, described=cfg)
    (root / "experiment.json").write_text(json.dumps(experiment))
    runs = {}
    for key in grid.runs(cfg):
        job = grid.job_config(cfg, key)
        if key.method == "ddg":
            job["train"].update(precision="bf16", memory_format="channels_last")
        runs[root / key.method] = run_job(job, fashion_subset, root / key.method, experiment, {})
    return root, runs


def evaluate(root, data, runs, outs):
    command = [sys.executable, "-m", "decoupled", "evaluate", "--data", str(data), "--tracking", str(root / "experiment.json"),
               "--run", *map(str, runs), "--out", *map(str, outs)]
    return subprocess.run(command, capture_output=True, text=True, env={"PYTHONPATH": str(REPO / "src"), "MLFLOW_DISABLE_TELEMETRY": "true"})


def test_one_process_evaluates_every_run_and_logs_each_to_its_own_run(two_runs, fashion_subset):
    root, runs = two_runs
    outs = [run / "eval.json" for run in runs]
    result = evaluate(root, fashion_subset, runs, outs)
    assert result.returncode == 0, result.stderr
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    for (run, metrics), out in zip(runs.items(), outs, strict=True):
        evaluated = json.loads(out.read_text())
        # the checkpoint's network, in its own numerics, gives what the last epoch measured
        assert evaluated["method"] == metrics["method"]
        assert evaluated["test_acc_per_module"] == metrics["epochs"][-1]["test_acc_per_module"]
        assert client.get_run(metrics["mlflow_run_id"]).data.metrics["final/test_acc"] == 100 * evaluated["test_acc"]


def test_when_no_checkpoint_can_be_read_nothing_is_written(two_runs, fashion_subset, tmp_path):
    # (one bad checkpoint among good ones is left out, the others evaluated: test_safety.py)
    root, runs = two_runs
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken/checkpoint.pt").write_bytes(b"not a checkpoint")
    outs = [tmp_path / "eval.json"]
    result = evaluate(root, fashion_subset, [tmp_path / "broken"], outs)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        (f"decoupled: warning: cannot read checkpoint {tmp_path}/broken/checkpoint.pt: UnpicklingError; the report leaves that run out:"
         f" delete {tmp_path}/broken/checkpoint.pt and run the workflow again (with its --configfile) to make it again"),
        "decoupled: error: evaluate: none of the 1 runs has a readable checkpoint"]
    assert not any(out.exists() for out in outs)
    result = evaluate(root, fashion_subset, [*runs, tmp_path / "broken"], outs[:1] * 2)
    assert result.returncode == 2 and "3 --run directories but 2 --out files" in result.stderr
