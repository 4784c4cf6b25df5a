"""MLflow: one parent run per experiment, one child run per training job.

Creating a store, an experiment or a parent run is racy when many jobs do it at once (a fresh
SQLite store opened by 8 jobs lost runs and broke its schema; jobs setting one new experiment
name at once put runs in "Default"). So ``init_experiment`` does all of it once, before any
training job starts (the workflow's ``init_tracking`` rule), and writes what it made to a JSON
file; training jobs only attach to it. Metrics go in one batch per epoch: a single metric
costs ~20 ms on SQLite.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from decoupled.errors import UserError

# Offline, MLflow's telemetry thread races on an environment variable and fails HTTP calls.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

PARENT_TAG = "decoupled.role"


def tracking_uri(config: dict) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the config's ``tracking_uri``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or config["tracking_uri"]


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def init_experiment(config: dict) -> dict[str, str]:
    """Create (or find) the store's schema, the experiment and its parent run; return their ids.

    An http(s):// URI is an ``mlflow server``: the server owns the schema (the server's
    ``mlflow db upgrade``) and gives the experiment its artifact location. A SQLite store is
    locked meanwhile (``<db>.lock``), so that jobs started at once without ``init-tracking``
    (``decoupled train`` without ``--tracking``) on one machine take turns instead of racing.
    """
    uri = tracking_uri(config)
    db = _sqlite_path(uri)
    artifact_location = None
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        artifact_location = (db.parent / "artifacts").resolve().as_uri()
    with _locked(db.parent / f"{db.name}.lock" if db is not None else None):
        if uri.split(":", 1)[0].split("+")[0] in ("sqlite", "postgresql", "mysql", "mssql"):
            _upgrade_schema(uri)
        client = _client(uri)
        name = config["experiment"]
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name, artifact_location=artifact_location)
        parents = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = 'parent'", max_results=1)
        if parents:
            parent_id = parents[0].info.run_id
        else:
            parent_id = client.create_run(experiment_id, run_name=name, tags={PARENT_TAG: "parent"}).info.run_id
    return {"tracking_uri": uri, "experiment": name, "experiment_id": experiment_id, "parent_run_id": parent_id}


@contextlib.contextmanager
def _locked(path: Path | None):
    """An exclusive lock on ``path`` (created if need be) while the block runs; none for None."""
    if path is None:
        yield
        return
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def _upgrade_schema(uri: str) -> None:
    """Bring an existing database to the installed MLflow's schema; create a fresh one."""
    result = subprocess.run([sys.executable, "-m", "mlflow", "db", "upgrade", uri], capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if "Error:" in line or "Exception:" in line]
        raise UserError(f"tracking_uri {uri}: mlflow db upgrade failed: {(errors or lines or ['no message'])[-1]}")


def git_commit() -> str:
    """The commit of the code that runs (this package's checkout), not of the working directory."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=Path(__file__).parent)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


class ChildRun:
    """One training job's MLflow run under the experiment's parent run."""

    def __init__(self, experiment: dict[str, str], run_id: str):
        self.experiment = experiment
        self.run_id = run_id
        self.client = _client(experiment["tracking_uri"])

    @classmethod
    def start(cls, experiment: dict[str, str], name: str, params: dict[str, Any], tags: dict[str, str]) -> "ChildRun":
        from mlflow.entities import Param

        from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID

        commit = git_commit()
        all_tags = {MLFLOW_PARENT_RUN_ID: experiment["parent_run_id"], PARENT_TAG: "child", "git_commit": commit, MLFLOW_GIT_COMMIT: commit, **tags}
        client = _client(experiment["tracking_uri"])
        run = client.create_run(experiment["experiment_id"], run_name=name, tags=all_tags)
        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run.info.run_id, params=items[i : i + 100])
        return cls(experiment, run.info.run_id)

    @classmethod
    def attach(cls, experiment: dict[str, str], run_id: str) -> "ChildRun":
        return cls(experiment, run_id)

    @classmethod
    def reopen(cls, experiment: dict[str, str], run_id: str, after_epoch: int) -> "ChildRun | None":
        """The run of a job that resumes after ``after_epoch``, RUNNING again; None if the store
        no longer has it in this experiment (then the job starts a new run)."""
        from mlflow.exceptions import MlflowException

        client = _client(experiment["tracking_uri"])
        try:
            stored = client.get_run(run_id)
        except MlflowException:
            return None
        if stored.info.experiment_id != experiment["experiment_id"] or stored.info.lifecycle_stage != "active":
            return None
        client.update_run(run_id, status="RUNNING")
        run = cls(experiment, run_id)
        tags = stored.data.tags
        if "error" in tags:  # what stopped the last attempt; the run goes on
            client.delete_tag(run_id, "error")
        resumes = int(tags.get("resumes", "0")) + 1
        run.set_tag("resumes", str(resumes))
        run.set_tag("resumed_after_epoch", str(after_epoch))
        return run

    def logged_steps(self, metric: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.run_id, metric)}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def set_tag(self, name: str, value: str) -> None:
        self.client.set_tag(self.run_id, name, value)

    def log_artifact(self, path: str | Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)

    def fail(self, message: str) -> None:
        self.set_tag("error", message[:5000])
        self.finish("FAILED")


def log_to_parent(experiment: dict[str, str], paths: list[Path], finish: bool = True) -> None:
    """Attach the report's tables and figures to the parent run (under tables/ and figures/)."""
    client = _client(experiment["tracking_uri"])
    for path in paths:
        client.log_artifact(experiment["parent_run_id"], str(path), artifact_path=Path(path).parent.name)
    if finish:
        client.set_terminated(experiment["parent_run_id"], "FINISHED")
