"""MLflow: where runs go, and that bad input leaves no run behind."""

import subprocess
import sys

import pytest

from decoupled import tracking


def test_environment_variable_wins_over_config(monkeypatch):
    cfg = {"tracking_uri": "sqlite:///from-config.db"}
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(cfg) == "sqlite:///from-config.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///from-env.db")
    assert tracking.tracking_uri(cfg) == "sqlite:///from-env.db"


def test_init_experiment_is_idempotent(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = {"experiment": "e", "tracking_uri": f"sqlite:///{tmp_path}/m/mlflow.db"}
    first = tracking.init_experiment(cfg)
    second = tracking.init_experiment(cfg)
    assert first == second  # one experiment, one parent run, however often the rule runs
    from mlflow.tracking import MlflowClient

    runs = MlflowClient(cfg["tracking_uri"]).search_runs([first["experiment_id"]])
    assert [r.info.run_id for r in runs] == [first["parent_run_id"]]


@pytest.mark.parametrize("content", [b"", b"not a torch file"])
def test_train_on_a_corrupt_dataset_creates_no_run(tmp_path, content):
    (tmp_path / "data.pt").write_bytes(content)
    from conftest import REPO

    result = subprocess.run(
        [sys.executable, "-m", "decoupled", "train", "--config", str(REPO / "config/smoke.yaml"),
         "--method", "dgl", "--K", "2", "--seed", "0", "--data", "data.pt", "--out", "run"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.pt" in lines[0], result.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "results").exists()  # no outputs, no MLflow store
