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
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from decoupled.credentials import redact, with_password, without_password
from decoupled.errors import EnvironmentFault, UserError, environment_cause

# Offline, MLflow's telemetry thread races on an environment variable and fails HTTP calls.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

PARENT_TAG = "decoupled.role"
# A child run's: the resolved run directory its job writes. One directory is trained by one
# process at a time, so a RUNNING run of a directory that no process is training is an orphan.
RUN_DIR_TAG = "decoupled.run_dir"
CONFIG_TAG = "decoupled.config"  # a parent run's: a digest of the experiment config it carries
# A parent run's: the run directories' folder of the workflow that last ran it. One workflow at a
# time runs in a folder (Snakemake locks it), so its other RUNNING parents were left so by a killed one.
PARENT_RUNS_DIR_TAG = "decoupled.runs_dir"
# A child run's: a digest of its resolved job config. A retrain of the same job in the same run
# directory supersedes the earlier FINISHED run: SUPERSEDED_TAG names the new run.
JOB_TAG = "decoupled.job"
SUPERSEDED_TAG = "decoupled.superseded_by"
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


def charts_page(ui: str, experiment_id: str) -> str:
    """The MLflow UI's address of an experiment's runs in the chart view: its first chart is the
    test accuracy (``epoch_metrics``), once the parent run's row is unfolded."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&compareRunsMode=CHART"


def how_to_browse(uri: str, experiment_id: str) -> str:
    """Where to see an experiment's runs: its links on an MLflow server, or the command that
    serves a store and the links it will then answer on."""
    if uri.startswith(("http://", "https://")):
        return f"runs {runs_page(uri, experiment_id)} ; charts {charts_page(uri, experiment_id)}"
    import shlex

    ui = f"http://127.0.0.1:{UI_PORT}"
    return (f"run `mlflow ui --backend-store-uri {shlex.quote(uri)} --port {UI_PORT}`, then open"
            f" runs {runs_page(ui, experiment_id)} ; charts {charts_page(ui, experiment_id)}")


UI_PORT = 5000  # mlflow ui's default


def tracking_uri(config: dict) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the config's ``tracking_uri``; without its password
    (``decoupled.credentials``: it reaches the store's client only)."""
    return without_password(os.environ.get("MLFLOW_TRACKING_URI") or config["tracking_uri"])


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
    """Raise ``error`` again, or, when the machine caused it or a server refuses the login, one
    line naming the store."""
    if getattr(error, "error_code", None) in ("UNAUTHENTICATED", "PERMISSION_DENIED") or re.search(r"error code 40[13]\b", str(error)):
        raise UserError(f"tracking store {redact(uri)}: the server refuses this login"
                        " (set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD; docs/tracking.md, Passwords)") from error
    cause = environment_cause(error)
    if cause is None:
        raise error
    raise EnvironmentFault(f"tracking store {redact(uri)}: {cause}") from error


class _StoreClient:
    """An ``MlflowClient`` whose faults of the machine (a full disk, a read-only store) are one
    line naming the store, ``EnvironmentFault``, instead of SQLAlchemy's traceback."""

    def __init__(self, uri: str):
        import logging

        from mlflow.tracking import MlflowClient

        # It logs every database error with its traceback before raising it; raised, it is ours to show.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
        self._uri = uri
        self._client = MlflowClient(tracking_uri=with_password(uri))

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
# a dataset row inserted twice at once: PostgreSQL's, SQLite's and MySQL's words for it
_DUPLICATE_DATASET = re.compile(r'"dataset_pk"|UNIQUE constraint failed: datasets\.|Duplicate entry .* for key .*dataset')


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
        try:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as e:
            raise UserError(f"{db} is not an SQLite database ({e})") from None
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
    """Create (or find) the store's schema, the experiment and a parent run; return their ids.

    ``described``, an experiment config: the parent run is the one of that config (``parent_run``:
    found by its digest, or made carrying it as params). Without one, the experiment's newest
    parent, or a new one without params.

    An http(s):// URI is an ``mlflow server``: the server owns the schema (the server's
    ``mlflow db upgrade``) and gives the experiment its artifact location. A SQLite store is
    locked meanwhile (``<db>.lock``), so that jobs started at once without ``init-tracking``
    (``decoupled train`` without ``--tracking``) on one machine take turns instead of racing.
    """
    uri = tracking_uri(config)
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    else:
        _check_database_server(uri)
    db = _sqlite_path(uri)
    artifact_location = None
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        artifact_location = _store_artifacts(db)
    with _store_lock(uri):
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
        info = {"tracking_uri": uri, "experiment": name, "experiment_id": experiment_id}
        if described is not None:
            parent_id = _parent_run(client, {**info, "parent_run_id": None}, described, "decoupled init-tracking")
        else:
            parents = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = 'parent'", max_results=1, order_by=["attributes.start_time DESC"])
            parent_id = parents[0].info.run_id if parents else _new_parent(client, experiment_id, name, None, "decoupled init-tracking")
    return {**info, "parent_run_id": parent_id}


SERVER_TIMEOUT_S = float(os.environ.get("DECOUPLED_TRACKING_TIMEOUT_S", "10"))


def _check_server(uri: str) -> None:
    """One line, within DECOUPLED_TRACKING_TIMEOUT_S (10 s), when an MLflow server does not
    answer, instead of the client's retries for minutes and their traceback."""
    import urllib.error
    import urllib.request

    scheme, _, rest = uri.partition("://")
    health = f"{scheme}://{rest.partition('/')[0].rpartition('@')[2]}/{rest.partition('/')[2]}".rstrip("/") + "/health"  # (no login in it)
    try:
        with urllib.request.urlopen(health, timeout=SERVER_TIMEOUT_S) as answer:
            answer.read()
    except urllib.error.HTTPError as e:
        raise UserError(f"tracking_uri {uri}: the MLflow server answers {e.code} {e.reason} to /health") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"tracking_uri {uri}: cannot reach the MLflow server ({reason})") from None


_DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


def _check_database_server(uri: str) -> None:
    """One line, within DECOUPLED_TRACKING_TIMEOUT_S, when a database server's port does not
    answer, instead of MLflow's retries of its connection for about 100 s."""
    import socket

    scheme, sep, rest = uri.partition("://")
    host_port = rest.partition("/")[0].rpartition("@")[2]
    port = _DATABASE_PORTS.get(scheme.split("+")[0])
    if not sep or port is None or not host_port:  # SQLite, or a server on a Unix socket
        return
    host, colon, given = host_port.rpartition(":") if not host_port.endswith("]") else (host_port, "", "")
    if not colon or not given.isdigit():
        host, given = host_port, str(port)
    try:
        socket.create_connection((host.strip("[]"), int(given)), timeout=SERVER_TIMEOUT_S).close()
    except OSError as e:
        raise UserError(f"tracking_uri {uri}: cannot reach the database server at {host}:{given} ({e})") from None


def check_store(experiment: dict[str, str], tracking_file: str | Path) -> None:
    """A UserError, one line saying what to do, when the store that ``tracking_file`` (written by
    init-tracking, ``experiment``) names no longer holds its experiment and parent run: deleted,
    or replaced by another. A SQLite store is read directly (no MLflow: the workflow asks this
    when it starts, before every dry run too); any other through MLflow."""
    uri = experiment["tracking_uri"]
    db = _sqlite_path(uri)
    problem = _sqlite_store_problem(db, experiment) if db is not None else _store_problem(experiment)
    if problem is not None:
        elsewhere = ", or made from another working directory" if db is not None and not db.is_absolute() else ""
        raise UserError(f"the MLflow store {uri} of {tracking_file} {problem} (deleted or replaced{elsewhere}?): put it back, or delete {tracking_file}"
                        " to log to a new store (finished runs are then logged to it again from their resume.pt, not retrained)")


def _store_problem(experiment: dict[str, str]) -> str | None:
    """What is wrong with a store that should hold ``experiment``, asked through MLflow; None: nothing."""
    from mlflow.exceptions import MlflowException

    client = _client(experiment["tracking_uri"])
    try:
        found = client.get_experiment(experiment["experiment_id"])
    except MlflowException:
        found = None
    if found is None or found.name != experiment["experiment"] or found.lifecycle_stage != "active":
        return f"has no experiment '{experiment['experiment']}' of id {experiment['experiment_id']}"
    if _stored_run(client, experiment, experiment["parent_run_id"]) is None:
        return f"has no parent run {experiment['parent_run_id']}"
    return None


def _sqlite_store_problem(db: Path, experiment: dict[str, str]) -> str | None:
    import sqlite3

    if not db.is_file():  # (a relative path is relative to the working directory: another one has another store)
        return "is missing" if db.is_absolute() else f"is missing from {Path.cwd()}, where its relative path points"
    try:
        with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=60)) as con:
            row = con.execute("SELECT name, lifecycle_stage FROM experiments WHERE experiment_id = ?", (int(experiment["experiment_id"]),)).fetchone()
            parent = con.execute("SELECT lifecycle_stage FROM runs WHERE run_uuid = ?", (experiment["parent_run_id"],)).fetchone()
    except sqlite3.DatabaseError as e:  # not an MLflow store (no such table), or not a database at all
        return f"is not the MLflow store it was ({e})"
    if row is None or row[0] != experiment["experiment"] or row[1] != "active":
        return f"has no experiment '{experiment['experiment']}' of id {experiment['experiment_id']}"
    if parent is None or parent[0] != "active":
        return f"has no parent run {experiment['parent_run_id']}"
    return None


def _described(config: dict | None) -> dict[str, str]:
    """An experiment config as a parent run's params (where the outputs go is not one)."""
    from decoupled.config import flatten

    return {k: str(v) for k, v in flatten(config).items() if k != "output_dir"} if config is not None else {}


def digest(params: dict) -> str:
    """A short digest of a JSON value (a config, a job): what tells two of them apart."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def job_digest(job: dict) -> str:
    """What tells a job's configurations apart (``JOB_TAG``): a digest of its resolved config."""
    return digest(job)


def parent_description(described: dict | None, main_table: str | None = None, claims_table: str | None = None) -> str:
    """The parent run's description (Markdown, the UI's run page): the experiment, its grid,
    and once the report has run its main table and the claims checked."""
    if described is None:
        return "The parent run of this experiment's training runs (made without its config)."
    grid = described["grid"]
    axes = {name: grid[name] for name in ("slowdown", "buffer_size", "budget", "beta", "groups", "quantize", "synth_last_block") if grid.get(name)}
    lines = [
        f"**{described['experiment']}**: {', '.join(grid['methods'])} on {described['dataset']['name']}, model {described['model']['arch']},"
        f" {described['train']['epochs']} epochs, engine {described['engine']}.",
        "",
        f"Grid: modes {', '.join(grid['modes'])}; K {', '.join(map(str, grid['K']))}; seeds {', '.join(map(str, grid['seeds']))}"
        + "".join(f"; {name} {value}" for name, value in axes.items()) + f" (design: {grid['design']}).",
        "",
        "Its training runs are the child runs under it, named method, mode, what the grid varies and seed (group them by the tag `group`).",
    ]
    if main_table is not None:
        lines += ["", "**Main table** (the report's `tables/main.md`; as an MLflow table, `main_table.json`):", "", main_table.strip()]
    if claims_table is not None:
        lines += ["", "**Claims checked** (the report's `tables/claims.md`; as an MLflow table, `claims_table.json`):", "", claims_table.strip()]
    return "\n".join(lines)


# The report's tables that the parent run shows: in its description and as MLflow tables.
PARENT_TABLES = ("main", "claims")


def describe_parent(experiment: dict[str, str], parent_id: str, described: dict | None, tables_dir: Path) -> None:
    """The report's main table and claims table (where the config has claims) on the parent run:
    in its description, and each as an MLflow table (``{name}_table.json``); how many claims
    hold, fail and are undecided as its metrics ``claims/{verdict}``."""
    import pandas as pd
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

    client = _client(experiment["tracking_uri"])
    # a claims table from an earlier config's report may lie there: only this config's counts
    shown = [name for name in PARENT_TABLES if name != "claims" or (described or {}).get("report", {}).get("claims")]
    texts = {name: (tables_dir / f"{name}.md").read_text() if name in shown and (tables_dir / f"{name}.md").is_file() else None
             for name in PARENT_TABLES}
    description = parent_description(described, texts["main"], texts["claims"])
    if len(description) > MAX_TAG_VAL_LENGTH:  # a note is a tag: wide tables go to their MLflow tables alone
        description = parent_description(described, *(
            None if texts[name] is None else f"(too long for a run's description: see `{name}_table.json` and the artifact `tables/{name}.html`)"
            for name in PARENT_TABLES))
    client.set_tag(parent_id, MLFLOW_RUN_NOTE, description)
    for name in shown:
        if (tables_dir / f"{name}.csv").is_file():
            client.log_table(parent_id, data=pd.read_csv(tables_dir / f"{name}.csv"), artifact_file=f"{name}_table.json")
    if "claims" in shown and (tables_dir / "claims.csv").is_file():  # the verdicts at a glance: the run's metrics
        counts = pd.read_csv(tables_dir / "claims.csv")["verdict"].value_counts()
        from decoupled.claims import VERDICTS

        for verdict in VERDICTS:
            client.log_metric(parent_id, f"claims/{verdict}", int(counts.get(verdict, 0)))


def _new_parent(client, experiment_id: str, name: str, described: dict | None, command: str) -> str:
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

    params = _described(described)
    tags = {PARENT_TAG: "parent", MLFLOW_RUN_NOTE: parent_description(described), **source_tags(command),
            **({CONFIG_TAG: digest(params)} if described is not None else {})}
    parent_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    _log_params(client, parent_id, params)
    return parent_id


# One parent run per experiment config. MLflow never changes a param: a changed config gets a
# parent run of its own (made by the workflow's start, or init-tracking, before any job), and
# its jobs' runs go under it; the earlier parent keeps its params and the runs of its config.
def parent_run(experiment: dict[str, str], described: dict, command: str = "decoupled") -> str:
    """The id of the parent run of the experiment config ``described``: the one made for it (its
    digest), or the experiment's parent if that was made without a config (it takes this one),
    or a new one carrying it as params."""
    with _store_lock(experiment["tracking_uri"]):
        return _parent_run(_client(experiment["tracking_uri"]), experiment, described, command)


def _parent_run(client, experiment: dict[str, str], described: dict, command: str) -> str:
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

    params = _described(described)
    config_digest = digest(params)
    found = _parent_with(client, experiment, config_digest)
    if found is not None:
        return found
    if experiment.get("parent_run_id"):
        current = _stored_run(client, experiment, experiment["parent_run_id"])
        if current is not None and CONFIG_TAG not in current.data.tags and not current.data.params:  # made without a config
            client.set_tag(current.info.run_id, CONFIG_TAG, config_digest)
            client.set_tag(current.info.run_id, MLFLOW_RUN_NOTE, parent_description(described))
            _log_params(client, current.info.run_id, params)
            return current.info.run_id
    return _new_parent(client, experiment["experiment_id"], experiment["experiment"], described, command)


def parent_for(experiment: dict[str, str], described: dict, children: list[str]) -> str:
    """The parent run of the experiment config ``described`` with ``children`` (run ids: the
    report's runs) under it; returns its id. A run that the config shares with an earlier one
    (a job the edit did not change) moves under it."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    parent_id = parent_run(experiment, described, "decoupled report")
    client = _client(experiment["tracking_uri"])
    for run_id in children:
        if client.get_run(run_id).data.tags.get(MLFLOW_PARENT_RUN_ID) != parent_id:
            client.set_tag(run_id, MLFLOW_PARENT_RUN_ID, parent_id)
    return parent_id


def _parent_with(client, experiment: dict[str, str], digest: str) -> str | None:
    """The newest parent run made for the experiment config of this digest, if any."""
    found = client.search_runs([experiment["experiment_id"]], filter_string=f"tags.`{PARENT_TAG}` = 'parent' and tags.`{CONFIG_TAG}` = '{digest}'",
                               max_results=1, order_by=["attributes.start_time DESC"])
    return found[0].info.run_id if found else None


def mark_parent(experiment: dict[str, str], described: dict, status: str, reason: str | None = None, runs_dir: str | Path | None = None) -> str | None:
    """Give the parent run of ``described`` (and no other) the state of the workflow that runs its
    jobs: RUNNING when it starts (made if need be, tagged with the workflow's ``runs_dir``),
    FINISHED or FAILED (tag ``error``: ``reason``) when it ends. Returns its id; None at an end
    with no parent of this config (it never started)."""
    client = _client(experiment["tracking_uri"])
    if status == "RUNNING":
        parent_id = parent_run(experiment, described, "snakemake")
    else:
        parent_id = _parent_with(client, experiment, digest(_described(described)))
        if parent_id is None:
            return None
    tags = client.get_run(parent_id).data.tags
    if status == "FAILED":
        client.set_tag(parent_id, "error", (reason or "the workflow failed")[:5000])
    elif "error" in tags:
        client.delete_tag(parent_id, "error")
    if status == "RUNNING":
        if runs_dir is not None:
            client.set_tag(parent_id, PARENT_RUNS_DIR_TAG, str(Path(runs_dir).resolve()))
        client.update_run(parent_id, status="RUNNING")
    else:
        client.set_terminated(parent_id, status)
    return parent_id


def fail_abandoned_parents(experiment: dict[str, str], runs_dir: str | Path, keep: str | None) -> list[str]:
    """Mark FAILED the parent runs, but ``keep``, that a workflow of ``runs_dir`` left RUNNING:
    one workflow at a time runs there, so theirs was killed before it could close them."""
    client = _client(experiment["tracking_uri"])
    where = str(Path(runs_dir).resolve())
    running = client.search_runs([experiment["experiment_id"]], filter_string=f"tags.`{PARENT_TAG}` = 'parent' and attributes.status = 'RUNNING'")
    closed = []
    for run in running:
        if run.info.run_id != keep and run.data.tags.get(PARENT_RUNS_DIR_TAG) == where:
            client.set_tag(run.info.run_id, "error", "abandoned: its workflow ended without closing it (Snakemake killed?)")
            client.set_terminated(run.info.run_id, "FAILED")
            closed.append(run.info.run_id)
    return closed


def fail_orphans(experiment: dict[str, str], run_dir: str | Path, why: str, keep: str | None = None, live_ones: bool = True) -> list[str]:
    """Mark FAILED (tag ``error``: ``why``) every RUNNING child run whose run directory is
    ``run_dir`` or lies under it, but ``keep``: runs whose process died without closing them
    (killed, out of memory, a full disk that the store shared). Returns their ids. A run whose
    directory a live process trains (``decoupled.rundir``: it holds the lock) is no orphan;
    ``live_ones=False`` for a caller that holds ``run_dir``'s lock itself."""
    from decoupled import rundir

    client = _client(experiment["tracking_uri"])
    root = str(Path(run_dir).resolve())
    running = client.search_runs([experiment["experiment_id"]], filter_string=f"tags.`{PARENT_TAG}` = 'child' and attributes.status = 'RUNNING'")
    orphans = []
    for run in running:
        where = run.data.tags.get(RUN_DIR_TAG)
        if run.info.run_id == keep or where is None or not (where == root or where.startswith(root + os.sep)):
            continue
        if live_ones and rundir.is_held(where):
            continue
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


def _store_lock(uri: str):
    """A lock on a SQLite store (``<db>.lock``) while the block runs, so that processes on this
    machine take turns making its experiment and parent runs; none for other stores."""
    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    return _locked(db.parent / f"{db.name}.lock" if db is not None else None)


@contextlib.contextmanager
def _locked(path: Path | None):
    """An exclusive lock on ``path`` (created if need be) while the block runs; none for None, or
    where it cannot be made (a store one may only read)."""
    with contextlib.ExitStack() as stack:
        try:
            lock = stack.enter_context(open(path, "a")) if path is not None else None
        except OSError:  # a store one may only read: what it refuses to write, the store says
            lock = None
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def _upgrade_schema(uri: str) -> None:
    """Bring an existing database to the installed MLflow's schema; create a fresh one. (``mlflow
    db upgrade``, given the URI in its environment: a password must not be on a command line.)"""
    upgrade = "import os; from mlflow.db import commands; commands(['upgrade', os.environ['DECOUPLED_UPGRADE_URI']])"
    if not uri.startswith("sqlite:"):  # one try first: a refused login is said at once, not after MLflow's retries (~100 s)
        upgrade = "import os, sqlalchemy; sqlalchemy.create_engine(os.environ['DECOUPLED_UPGRADE_URI']).connect().close(); " + upgrade
    env = {**os.environ, "DECOUPLED_UPGRADE_URI": with_password(uri)}
    result = subprocess.run([sys.executable, "-c", upgrade], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        cause = environment_cause(result.stderr)
        if cause is not None:
            raise EnvironmentFault(f"tracking store {uri}: {cause}")
        lines = [line.strip() for line in redact(result.stderr).splitlines() if line.strip()]
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


# An epoch record (train.fit's) as MLflow metrics, logged once per epoch (step = epoch). The
# MLflow UI's chart view draws one section per prefix before "/", sections in alphabetical
# order: "acc" holds the test accuracy alone, so that it is the first chart a comparison opens
# on. Accuracies are in percent, as in every table and figure.
def epoch_metrics(record: dict) -> dict[str, float]:
    """The flat per-epoch metrics of an epoch record, by section: ``acc/test``, then per module
    ``acc_heads/test_m{k}``, ``loss/train_m{k}``, ``comm/bytes_sent_m{k}``, ``workers/…``, …"""
    flat = {name: scale * record[key] for key, (name, scale) in EPOCH_METRICS.items() if record.get(key) is not None}
    for k, loss in enumerate(record["train_loss_per_module"]):
        if loss is not None:
            flat[f"loss/train_m{k}"] = loss
    for k, acc in enumerate(record["test_acc_per_module"]):
        flat[f"acc_heads/test_m{k}"] = 100 * acc
    for key, name in PER_WORKER_METRICS.items():
        for k, value in enumerate(record.get(key, [])):
            flat[f"{name}_m{k}"] = value
    for key in ("vq_recon_error", "vq_perplexity"):  # per quantized boundary b (between modules b and b+1)
        for b, value in enumerate(record.get(f"{key}_per_boundary", [])):
            if value is not None:
                flat[f"vq/{key.removeprefix('vq_')}_b{b}"] = value
    for kind in ("input", "grad"):
        for k, summary in enumerate(record.get(f"{kind}_staleness", [])):
            if summary["mean"] is not None:
                flat[f"staleness/{kind}_mean_m{k}"] = summary["mean"]
    return flat


def final_metrics(evaluated: dict) -> dict[str, float]:
    """The final checkpoint's evaluation (eval.json) as MLflow metrics, logged at the last epoch."""
    final = {"final/test_acc": 100 * evaluated["test_acc"], "final/test_loss": evaluated["test_loss"]}
    return final | {f"final/test_acc_m{k}": 100 * acc for k, acc in enumerate(evaluated["test_acc_per_module"])}


# an epoch record's numbers -> (MLflow metric name, factor)
EPOCH_METRICS = {
    "test_acc": ("acc/test", 100),
    "test_acc_classifier": ("acc_heads/test_classifier", 100),  # the classifier alone, where the run's accuracy is an ensemble's
    "train_loss": ("loss/train", 1),
    "epoch_time_s": ("time/epoch_s", 1),
    "wall_time_s": ("time/wall_s", 1),
    "sim_time_s": ("time/simulated_parallel_s", 1),
    "images_per_s": ("speed/images_per_s", 1),
    "bytes_per_image": ("comm/bytes_per_image", 1),
}
# per-module lists in an epoch record -> MLflow metric names (suffixed _m0, _m1, ...)
PER_WORKER_METRICS = {
    "steps_per_module": "workers/steps",
    "images_per_s_per_module": "speed/images_per_s",
    "idle_per_module": "workers/idle_ticks",  # the async simulator's
    "busy_s_per_module": "workers/busy_s",  # the distributed engine's seconds
    "idle_s_per_module": "workers/idle_s",
    "busy_frac_per_module": "workers/busy_frac",
    "queue_depth_per_module": "workers/queue_depth",
    "bytes_sent_per_module": "comm/bytes_sent",
    "finish_time_s_per_module": "workers/finish_time_s",  # when each worker ended its last step so far (simulated parallel or wall seconds)
}
# the metric whose steps say which epochs a run has logged
EPOCHS_METRIC = EPOCH_METRICS["test_acc"][0]


class ChildRun:
    """One training job's MLflow run under the experiment's parent run."""

    def __init__(self, experiment: dict[str, str], run_id: str):
        self.experiment = experiment
        self.run_id = run_id
        self.client = _client(experiment["tracking_uri"])

    @classmethod
    def start(cls, experiment: dict[str, str], name: str, params: dict[str, Any], tags: dict[str, str], parent_id: str | None = None) -> "ChildRun":
        """A new run under ``parent_id`` (default: the experiment's parent run)."""
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        all_tags = {MLFLOW_PARENT_RUN_ID: parent_id or experiment["parent_run_id"], PARENT_TAG: "child", **source_tags("decoupled train"), **tags}
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

    def log_dataset(self, name: str, path: str | Path, profile: dict[str, Any]) -> None:
        """The prepared dataset file the run trains on, as the run's MLflow input (the runs
        table's Dataset column): its name, a digest of the file, where it is, its shape."""
        import hashlib
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        with open(path, "rb") as f:
            content = hashlib.file_digest(f, "sha256").hexdigest()[:12]
        dataset = Dataset(name, content, "local", Path(path).resolve().as_uri(), profile=json.dumps(profile))
        inputs = [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "train")])]
        for attempt in range(3):
            try:
                self.client.log_inputs(self.run_id, datasets=inputs)
                return
            except Exception as e:
                # The store looks the dataset up, then inserts it: two jobs of one experiment that
                # log it at once both insert, and the second breaks the table's unique key. Tried
                # again, it finds the row the first wrote and only links this run to it.
                if attempt == 2 or not _DUPLICATE_DATASET.search(str(e)):
                    raise

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def set_tag(self, name: str, value: str) -> None:
        self.client.set_tag(self.run_id, name, value)

    def log_artifact(self, path: str | Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: str = "FINISHED") -> None:
        if status == "FINISHED" and "error" in self.client.get_run(self.run_id).data.tags:  # what stopped an earlier attempt
            self.client.delete_tag(self.run_id, "error")
        self.client.set_terminated(self.run_id, status)

    def supersede_earlier(self) -> list[str]:
        """The earlier FINISHED runs of this run's job (``JOB_TAG``) in its run directory, now
        superseded by this one (the same job trained again, e.g. after a code change): each is
        tagged ``decoupled.superseded_by`` with a note saying so, and moved to MLflow's deleted
        runs (the runs table's "Deleted" filter shows it; ``mlflow runs restore`` brings it
        back). One FINISHED run per job and configuration stays. Returns their ids."""
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

        tags = self.client.get_run(self.run_id).data.tags
        if JOB_TAG not in tags:
            return []
        earlier = self.client.search_runs([self.experiment["experiment_id"]], filter_string=f"tags.`{JOB_TAG}` = '{tags[JOB_TAG]}' and attributes.status = 'FINISHED'")
        superseded = []
        for run in earlier:
            if run.info.run_id != self.run_id and run.data.tags.get(RUN_DIR_TAG) == tags.get(RUN_DIR_TAG):
                self.client.set_tag(run.info.run_id, SUPERSEDED_TAG, self.run_id)
                self.client.set_tag(run.info.run_id, MLFLOW_RUN_NOTE, f"Superseded by run {self.run_id}: the same job, trained again in the same run directory.")
                self.client.delete_run(run.info.run_id)
                superseded.append(run.info.run_id)
        return superseded

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
