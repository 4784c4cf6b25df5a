"""MLflow: one parent run per experiment, one child run per training job.

Creating a store, an experiment or a parent run is racy when many jobs do it at once (a fresh
SQLite store opened by 8 jobs lost runs and broke its schema; jobs setting one new experiment
name at once put runs in "Default"). So ``init_experiment`` does all of it once, before any
training job starts (the workflow's ``init_tracking`` rule), and writes what it made to a JSON
file; training jobs only attach to it. Metrics go in one batch per epoch: on SQLite every
call is a transaction, so a metric logged alone costs as much as a batch of them.
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

from decoupled.errors import EnvironmentFault, UserError, environment_cause

# Offline, MLflow's telemetry thread races on an environment variable and fails HTTP calls.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

PARENT_TAG = "decoupled.role"
# A child run's: the resolved run directory its job writes. One directory is trained by one
# process at a time, so a RUNNING run of a directory that no process is training is an orphan.
RUN_DIR_TAG = "decoupled.run_dir"
CONFIG_TAG = "decoupled.config"  # a parent run's: a digest of the experiment config it carries
# An experiment whose artifacts live beside its SQLite store (<store dir>/artifacts): its
# artifact locations follow the store when results/ is moved or copied (see relocate).
STORE_ARTIFACTS_TAG = "decoupled.artifacts_beside_store"
# Set on the experiments this package creates: MLflow's own mark of a model-training (not GenAI)
# experiment. MLflow 3.17's UI does not read it to pick the page an experiment opens on (its
# global "workflow type" decides: the URL's workflowType, else the browser's last choice, else
# GenAI), so the links this package prints carry the workflow type: runs_page.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def runs_page(ui: str, experiment_id: str) -> str:
    """The MLflow UI's address of an experiment's runs table (MLflow 3's "Model training" view)."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def tracking_uri(config: dict) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the config's ``tracking_uri``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or config["tracking_uri"]


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def _client(uri: str) -> "_StoreClient":
    db = _sqlite_path(uri)
    if db is not None and db not in _relocated and db.is_file():
        try:
            relocate(db)  # a moved or copied results/ writes its artifacts beside itself
        except Exception as e:
            _raise_store_fault(uri, e)
        _relocated.add(db)
    return _StoreClient(uri)


def _raise_store_fault(uri: str, error: Exception):
    """Raise ``error`` again, or, when the machine caused it, one line naming the store."""
    cause = environment_cause(error)
    if cause is None:
        raise error
    raise EnvironmentFault(f"tracking store {uri}: {cause}") from error


class _StoreClient:
    """An ``MlflowClient`` whose faults of the machine (a full disk, a read-only store) are one
    line naming the store, ``EnvironmentFault``, instead of SQLAlchemy's traceback."""

    def __init__(self, uri: str):
        import logging

        from mlflow.tracking import MlflowClient

        # It logs every database error with its traceback before raising it; raised, it is ours to show.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
        self._uri = uri
        self._client = MlflowClient(tracking_uri=uri)

    def __getattr__(self, name: str):
        method = getattr(self._client, name)
        if not callable(method):
            return method

        def call(*args, **kwargs):
            try:
                return method(*args, **kwargs)
            except Exception as e:
                _raise_store_fault(self._uri, e)

        return call


_relocated: set[Path] = set()  # stores checked by this process


def _store_artifacts(db: Path) -> str:
    """Where the artifacts of a SQLite store's experiments live: beside it, in artifacts/."""
    return (db.parent / "artifacts").resolve().as_uri()


def relocate(db: str | Path) -> int:
    """Point the artifact locations of a SQLite store's experiments (those this package created,
    with their artifacts beside the store) at the store's own folder, wherever it now is.

    MLflow records absolute artifact URIs: after ``results/`` is moved or copied, the store
    would still read and write the artifacts at the old place. Returns how many experiments
    were pointed elsewhere (0 when the store has not moved). Every command of this package
    that opens a SQLite store calls it first; ``decoupled relocate`` does it by hand, e.g.
    before ``mlflow ui`` on a copy.
    """
    import sqlite3

    db = Path(db)
    here = _store_artifacts(db)
    moved = 0
    with contextlib.closing(sqlite3.connect(db, timeout=60)) as con, con:
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"experiments", "experiment_tags", "runs"} <= tables:
            return 0  # not (yet) an MLflow store
        rows = con.execute(
            "SELECT e.experiment_id, e.artifact_location FROM experiments e JOIN experiment_tags t"
            " ON t.experiment_id = e.experiment_id WHERE t.key = ? AND e.artifact_location != ?", (STORE_ARTIFACTS_TAG, here)
        ).fetchall()
        for experiment_id, old in rows:
            con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?", (here, experiment_id))
            for table, column in (("runs", "artifact_uri"), ("logged_models", "artifact_location")):
                if table in tables:
                    con.execute(
                        f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE experiment_id = ? AND substr({column}, 1, ?) = ?",
                        (here, len(old) + 1, experiment_id, len(old), old),
                    )
            moved += 1
    return moved


def init_experiment(config: dict, described: dict | None = None) -> dict[str, str]:
    """Create (or find) the store's schema, the experiment and its parent run; return their ids.

    ``described``, an experiment config, is what a new parent run carries as params (its grid
    included); an existing parent is taken as it is (the newest, when a changed config gave
    the experiment several: see ``parent_for``).

    An http(s):// URI is an ``mlflow server``: the server owns the schema (the server's
    ``mlflow db upgrade``) and gives the experiment its artifact location. A SQLite store is
    locked meanwhile (``<db>.lock``), so that jobs started at once without ``init-tracking``
    (``decoupled train`` without ``--tracking``) on one machine take turns instead of racing.
    """
    uri = tracking_uri(config)
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    db = _sqlite_path(uri)
    artifact_location = None
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        artifact_location = _store_artifacts(db)
    with _locked(db.parent / f"{db.name}.lock" if db is not None else None):
        if uri.split(":", 1)[0].split("+")[0] in ("sqlite", "postgresql", "mysql", "mssql"):
            _upgrade_schema(uri)
        client = _client(uri)
        name = config["experiment"]
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            tags = {**EXPERIMENT_TAGS, **({STORE_ARTIFACTS_TAG: "true"} if artifact_location else {})}
            experiment_id = client.create_experiment(name, artifact_location=artifact_location, tags=tags)
        else:
            experiment_id = experiment.experiment_id
        parents = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = 'parent'", max_results=1, order_by=["attributes.start_time DESC"])
        parent_id = parents[0].info.run_id if parents else _new_parent(client, experiment_id, name, described, "decoupled init-tracking")
    return {"tracking_uri": uri, "experiment": name, "experiment_id": experiment_id, "parent_run_id": parent_id}


SERVER_TIMEOUT_S = float(os.environ.get("DECOUPLED_TRACKING_TIMEOUT_S", "10"))


def _check_server(uri: str) -> None:
    """One line, within DECOUPLED_TRACKING_TIMEOUT_S (10 s), when an MLflow server does not
    answer, instead of the client's retries for minutes and their traceback."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=SERVER_TIMEOUT_S) as answer:
            answer.read()
    except urllib.error.HTTPError as e:
        raise UserError(f"tracking_uri {uri}: the MLflow server answers {e.code} {e.reason} to /health") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"tracking_uri {uri}: cannot reach the MLflow server ({reason})") from None


def _described(config: dict | None) -> dict[str, str]:
    """An experiment config as a parent run's params (where the outputs go is not one)."""
    from decoupled.config import flatten

    return {k: str(v) for k, v in flatten(config).items() if k != "output_dir"} if config is not None else {}


def _digest(params: dict[str, str]) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def _new_parent(client, experiment_id: str, name: str, described: dict | None, command: str) -> str:
    params = _described(described)
    tags = {PARENT_TAG: "parent", **source_tags(command), **({CONFIG_TAG: _digest(params)} if described is not None else {})}
    parent_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    _log_params(client, parent_id, params)
    return parent_id


def parent_for(experiment: dict[str, str], described: dict, children: list[str]) -> str:
    """The parent run that carries the experiment config ``described``, with ``children`` (run
    ids: the report's runs) under it; returns its id.

    MLflow never changes a param: when the config is not the one the experiment's parent run
    was created with, a parent run is made for it (or the one made for it before is taken),
    and the runs are moved under it. The earlier parent keeps its params, and the runs of its
    config that this one does not have. A parent created without a config gets this one.
    """
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    client = _client(experiment["tracking_uri"])
    params = _described(described)
    digest = _digest(params)
    current = client.get_run(experiment["parent_run_id"])
    if current.data.tags.get(CONFIG_TAG) == digest:
        parent_id = current.info.run_id
    elif CONFIG_TAG not in current.data.tags and not current.data.params:  # made without a config: it takes this one
        parent_id = current.info.run_id
        client.set_tag(parent_id, CONFIG_TAG, digest)
        _log_params(client, parent_id, params)
    else:
        parent_id = _parent_with(client, experiment, digest) or _new_parent(client, experiment["experiment_id"], experiment["experiment"], described, "decoupled report")
    for run_id in children:
        if client.get_run(run_id).data.tags.get(MLFLOW_PARENT_RUN_ID) != parent_id:
            client.set_tag(run_id, MLFLOW_PARENT_RUN_ID, parent_id)
    return parent_id


def _parent_with(client, experiment: dict[str, str], digest: str) -> str | None:
    """The newest parent run made for the experiment config of this digest, if any."""
    found = client.search_runs([experiment["experiment_id"]], filter_string=f"tags.`{PARENT_TAG}` = 'parent' and tags.`{CONFIG_TAG}` = '{digest}'",
                               max_results=1, order_by=["attributes.start_time DESC"])
    return found[0].info.run_id if found else None


def _parent_of(client, experiment: dict[str, str], described: dict | None) -> str:
    """The parent run of the experiment config ``described`` (see ``parent_for``); the
    experiment's parent when it has none yet (or ``described`` is None)."""
    found = _parent_with(client, experiment, _digest(_described(described))) if described is not None else None
    return found or experiment["parent_run_id"]


def mark_parent(experiment: dict[str, str], described: dict | None, status: str, reason: str | None = None) -> str:
    """Give the parent run of ``described`` the state of the workflow that runs its jobs:
    RUNNING when it starts, FINISHED or FAILED (tag ``error``: ``reason``) when it ends. Returns its id."""
    client = _client(experiment["tracking_uri"])
    parent_id = _parent_of(client, experiment, described)
    tags = client.get_run(parent_id).data.tags
    if status == "FAILED":
        client.set_tag(parent_id, "error", (reason or "the workflow failed")[:5000])
    elif "error" in tags:
        client.delete_tag(parent_id, "error")
    if status == "RUNNING":
        client.update_run(parent_id, status="RUNNING")
    else:
        client.set_terminated(parent_id, status)
    return parent_id


def fail_orphans(experiment: dict[str, str], run_dir: str | Path, why: str, keep: str | None = None) -> list[str]:
    """Mark FAILED (tag ``error``: ``why``) every RUNNING child run whose run directory is
    ``run_dir`` or lies under it, but ``keep``: runs whose process died without closing them
    (killed, out of memory, a full disk that the store shared). Returns their ids."""
    client = _client(experiment["tracking_uri"])
    root = str(Path(run_dir).resolve())
    running = client.search_runs([experiment["experiment_id"]], filter_string=f"tags.`{PARENT_TAG}` = 'child' and attributes.status = 'RUNNING'")
    orphans = []
    for run in running:
        where = run.data.tags.get(RUN_DIR_TAG)
        if run.info.run_id != keep and where is not None and (where == root or where.startswith(root + os.sep)):
            ChildRun(experiment, run.info.run_id).fail(why)
            orphans.append(run.info.run_id)
    return orphans


def _log_params(client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[i : i + 100])


def source_tags(command: str) -> dict[str, str]:
    """MLflow's own fields for a run of this package: who ran it, what and at which commit."""
    import getpass

    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_USER

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (some containers)
        user = str(os.getuid())
    return {MLFLOW_USER: user, MLFLOW_SOURCE_NAME: command, MLFLOW_SOURCE_TYPE: "LOCAL", MLFLOW_GIT_COMMIT: git_commit()}


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
        cause = environment_cause(result.stderr)
        if cause is not None:
            raise EnvironmentFault(f"tracking store {uri}: {cause}")
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


def _stored_run(client, experiment: dict[str, str], run_id: str):
    """The run ``run_id`` if the store still has it, active, in this experiment; else None."""
    from mlflow.exceptions import MlflowException

    try:
        stored = client.get_run(run_id)
    except MlflowException:
        return None
    if stored.info.experiment_id != experiment["experiment_id"] or stored.info.lifecycle_stage != "active":
        return None
    return stored


# An epoch record (train.fit's) as MLflow metrics, logged once per epoch (step = epoch).
def epoch_metrics(record: dict) -> dict[str, float]:
    """The flat per-epoch metrics of an epoch record: per-module lists become ``name_m{k}``."""
    flat = {k: record[k] for k in ("train_loss", "test_acc", "test_acc_classifier", "epoch_time_s", "wall_time_s", "images_per_s", "sim_time_s", "bytes_per_image") if record.get(k) is not None}
    for k, loss in enumerate(record["train_loss_per_module"]):
        if loss is not None:
            flat[f"train_loss_m{k}"] = loss
    for k, acc in enumerate(record["test_acc_per_module"]):
        flat[f"test_acc_m{k}"] = acc
    for name, short in PER_WORKER_METRICS.items():
        for k, value in enumerate(record.get(name, [])):
            flat[f"{short}_m{k}"] = value
    for name in ("vq_recon_error", "vq_perplexity"):  # per quantized boundary b (between modules b and b+1)
        for b, value in enumerate(record.get(f"{name}_per_boundary", [])):
            if value is not None:
                flat[f"{name}_b{b}"] = value
    for kind in ("input", "grad"):
        for k, summary in enumerate(record.get(f"{kind}_staleness", [])):
            if summary["mean"] is not None:
                flat[f"{kind}_staleness_mean_m{k}"] = summary["mean"]
    return flat


# per-module lists in an epoch record -> MLflow metric names (suffixed _m0, _m1, ...)
PER_WORKER_METRICS = {
    "steps_per_module": "steps",
    "images_per_s_per_module": "images_per_s",
    "idle_per_module": "idle",  # the async simulator's idle ticks
    "busy_s_per_module": "busy_s",  # the distributed engine's seconds
    "idle_s_per_module": "idle_s",
    "busy_frac_per_module": "busy_frac",
    "queue_depth_per_module": "queue_depth",
    "bytes_sent_per_module": "bytes_sent",
    "finish_time_s_per_module": "finish_time_s",  # when each worker ended its last step so far (simulated parallel or wall seconds)
}


class ChildRun:
    """One training job's MLflow run under the experiment's parent run."""

    def __init__(self, experiment: dict[str, str], run_id: str):
        self.experiment = experiment
        self.run_id = run_id
        self.client = _client(experiment["tracking_uri"])

    @classmethod
    def start(cls, experiment: dict[str, str], name: str, params: dict[str, Any], tags: dict[str, str]) -> "ChildRun":
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        all_tags = {MLFLOW_PARENT_RUN_ID: experiment["parent_run_id"], PARENT_TAG: "child", **source_tags("decoupled train"), **tags}
        client = _client(experiment["tracking_uri"])
        run = client.create_run(experiment["experiment_id"], run_name=name, tags=all_tags)
        _log_params(client, run.info.run_id, params)
        return cls(experiment, run.info.run_id)

    @classmethod
    def attach(cls, experiment: dict[str, str], run_id: str) -> "ChildRun":
        return cls(experiment, run_id)

    @classmethod
    def reopen(cls, experiment: dict[str, str], run_id: str, after_epoch: int) -> "ChildRun | None":
        """The run of a job that resumes after ``after_epoch``, RUNNING again; None if the store
        no longer has it in this experiment (then the job starts a new run)."""
        client = _client(experiment["tracking_uri"])
        stored = _stored_run(client, experiment, run_id)
        if stored is None:
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

    @classmethod
    def abandon(cls, experiment: dict[str, str], run_id: str, why: str) -> None:
        """Mark the run of an attempt that no attempt will go on with FAILED, saying why (if it
        is still in this experiment's store and not ended)."""
        stored = _stored_run(_client(experiment["tracking_uri"]), experiment, run_id)
        if stored is not None and stored.info.status in ("RUNNING", "SCHEDULED"):
            cls(experiment, run_id).fail(why)

    def logged_steps(self, metric: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.run_id, metric)}

    def log_epoch(self, record: dict) -> None:
        self.log_metrics(epoch_metrics(record), step=record["epoch"])

    def log_params(self, params: dict[str, Any]) -> None:
        _log_params(self.client, self.run_id, params)

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


def log_to_parent(experiment: dict[str, str], paths: list[Path], finish: bool = True, parent_id: str | None = None) -> None:
    """Attach the report's tables and figures to the parent run (under tables/ and figures/):
    ``parent_id``, or the experiment's."""
    client = _client(experiment["tracking_uri"])
    parent_id = parent_id or experiment["parent_run_id"]
    for path in paths:
        client.log_artifact(parent_id, str(path), artifact_path=Path(path).parent.name)
    if finish:
        client.set_terminated(parent_id, "FINISHED")
