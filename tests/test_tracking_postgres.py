"""MLflow on PostgreSQL: many training jobs at one moment lose nothing, whether they write to
the database directly (a postgresql:// tracking_uri) or through `mlflow server` (http://).

PostgreSQL (and the server) are started by scripts/postgres-mlflow.sh in a fresh folder and
stopped by PID at the end of each test.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from mlflow_check import check_runs, init_tracking, jobs, run_concurrently, tiny_data  # noqa: F401 (a fixture)

from conftest import REPO, free_port, needs_fashion_mnist

SCRIPT = REPO / "scripts/postgres-mlflow.sh"
N_JOBS = 8


def _postgres_bin() -> Path | None:
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: [int(x) for x in p.parent.name.split(".") if x.isdigit()])
    if found:
        return found[-1]
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _why_postgres_cannot_run() -> str | None:
    pg = _postgres_bin()
    if pg is None or not (pg / "initdb").is_file():
        return "PostgreSQL's server binaries are missing (scripts/setup.sh --test-services installs Debian's postgresql)"
    command = [str(pg / "postgres"), "--version"]
    if os.geteuid() == 0:  # PostgreSQL refuses root; the script runs it as `postgres`
        command = ["runuser", "-u", os.environ.get("PG_USER", "postgres"), "--", *command]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"PostgreSQL cannot run here: {e}"
    if result.returncode != 0:
        return f"PostgreSQL cannot run here: {' '.join(command)}: {(result.stderr or result.stdout).strip()[:300]}"
    return None


_WHY_NOT = _why_postgres_cannot_run()
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=str(_WHY_NOT))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def services():
    """start(*options) runs scripts/postgres-mlflow.sh start in a fresh folder and returns it
    with the variables of its env file; the end of the test stops all it started, by PID."""
    # not under pytest's tmp_path: its folders are private to root, and PostgreSQL runs as `postgres`
    folder = Path(tempfile.mkdtemp(prefix="postgres-mlflow-"))
    folder.chmod(0o711)
    env = {**os.environ, "PYTHON": sys.executable, "MLFLOW_DISABLE_TELEMETRY": "true"}

    def start(*options: str) -> tuple[Path, dict[str, str]]:
        result = subprocess.run([str(SCRIPT), "start", str(folder), "--pg-port", str(free_port()), *options],
                                env=env, capture_output=True, text=True, timeout=240)  # fmt: skip
        logs = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in [*folder.glob("*.log"), *folder.glob("postgres/*.log")] if p.is_file())
        assert result.returncode == 0, f"{result.stderr}\n{logs}"
        values = {}
        for line in (folder / "env").read_text().splitlines():
            if "=" in line and not line.startswith("#"):
                name, _, value = line.removeprefix("export ").partition("=")
                values[name] = value
        return folder, values

    try:
        yield start
    finally:
        pids = []
        if (folder / "postgres/data/postmaster.pid").is_file():
            pids.append(int((folder / "postgres/data/postmaster.pid").read_text().split()[0]))
        if (folder / "mlflow.pid").is_file():
            pids.append(int((folder / "mlflow.pid").read_text()))
        stopped = subprocess.run([str(SCRIPT), "stop", str(folder)], env=env, capture_output=True, text=True, timeout=120)
        alive = [pid for pid in pids if _pid_alive(pid)]
        shutil.rmtree(folder, ignore_errors=True)
        assert stopped.returncode == 0 and not alive, f"stop left {alive} running: {stopped.stderr}"


def _tables(uri: str) -> set[str]:
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri)
    try:
        return set(sqlalchemy.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_concurrent_jobs_write_to_postgresql_directly(services, tiny_data, tmp_path, monkeypatch):  # noqa: F811
    folder, env = services("--no-server")
    uri = env["MLFLOW_BACKEND_STORE_URI"]
    assert uri.startswith("postgresql://mlflow@127.0.0.1:") and ":" not in uri.split("@")[0].removeprefix("postgresql://")  # no password
    monkeypatch.setenv("PGPASSFILE", env["PGPASSFILE"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert _tables(uri) == set()  # a fresh database: init-tracking creates MLflow's schema
    experiment = init_tracking(uri, tmp_path / "tracking.json")
    assert {"experiments", "runs", "metrics", "params", "alembic_version"} <= _tables(uri)
    started = time.monotonic()
    run_dirs = run_concurrently(jobs(N_JOBS), tiny_data, tmp_path / "tracking.json", tmp_path, env={"PGPASSFILE": env["PGPASSFILE"]})
    print(f"{N_JOBS} concurrent jobs on PostgreSQL: {time.monotonic() - started:.1f} s")
    children = check_runs(experiment, run_dirs)
    assert len(children) == N_JOBS
    # with no server, artifacts go to ./mlruns where init-tracking ran (MLflow's default root)
    for run in children:
        stored = tmp_path / "mlruns" / experiment["experiment_id"] / run.info.run_id / "artifacts"
        assert run.info.artifact_uri == str(stored)
        assert (stored / "metrics.json").read_bytes() == (run_dirs[run.info.run_name] / "metrics.json").read_bytes()


def test_concurrent_jobs_log_through_an_mlflow_server_on_postgresql(services, tiny_data, tmp_path, monkeypatch):  # noqa: F811
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    port = free_port()
    folder, env = services("--port", str(port), "--workers", "2")
    uri = env["MLFLOW_TRACKING_URI"]
    assert uri == f"http://127.0.0.1:{port}"
    # the jobs need no database password: they only talk to the server
    monkeypatch.delenv("PGPASSFILE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    experiment = init_tracking(uri, tmp_path / "tracking.json")
    assert MlflowClient(uri).get_experiment(experiment["experiment_id"]).artifact_location.startswith("mlflow-artifacts:")
    started = time.monotonic()
    run_dirs = run_concurrently(jobs(N_JOBS), tiny_data, tmp_path / "tracking.json", tmp_path, env={"PGPASSFILE": "/nonexistent"})
    print(f"{N_JOBS} concurrent jobs through the MLflow server: {time.monotonic() - started:.1f} s")
    children = check_runs(experiment, run_dirs)
    assert len(children) == N_JOBS
    assert not (tmp_path / "mlruns").exists()  # nothing written beside the jobs: all went to the server
    for run in children:
        # downloadable through the server, and kept where the server was told to keep them
        got = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="metrics.json",
                                                  dst_path=str(tmp_path / "download" / run.info.run_id), tracking_uri=uri)  # fmt: skip
        assert Path(got).read_bytes() == (run_dirs[run.info.run_name] / "metrics.json").read_bytes()
        assert (folder / "artifacts" / experiment["experiment_id"] / run.info.run_id / "artifacts/metrics.json").is_file()


@needs_fashion_mnist
def test_a_password_in_the_config_reaches_postgresql_and_nothing_else(services, tmp_path):
    from mlflow.tracking import MlflowClient
    from test_safety import files_holding, snakemake, tiny

    folder, env = services("--no-server")
    password = (folder / "pgpass").read_text().splitlines()[0].rsplit(":", 1)[1]
    uri = env["MLFLOW_BACKEND_STORE_URI"]  # postgresql://mlflow@127.0.0.1:PORT/mlflow
    with_password = uri.replace("mlflow@", f"mlflow:{password}@", 1)
    clean = {k: v for k, v in os.environ.items() if k not in ("PGPASSFILE", "PGPASSWORD")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny(output_dir="results", tracking_uri=with_password, experiment="secret")))
    result = snakemake(tmp_path, "-p", env=clean)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert password not in result.stdout + result.stderr
    assert files_holding(tmp_path, password) == ["c.yaml"]  # results/, logs, .snakemake/ metadata, mlruns/
    assert json.loads((tmp_path / "results/mlflow/experiment.json").read_text())["tracking_uri"] == uri
    client = MlflowClient(with_password)
    runs = client.search_runs([client.get_experiment_by_name("secret").experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    for run in runs:
        assert password not in json.dumps([run.data.params, run.data.tags])
        assert run.data.params["tracking_uri"] == uri

    # PostgreSQL's own ways, with no password in the config: PGPASSWORD (and PGPASSFILE, above)
    def init_with(environment):
        return subprocess.run([sys.executable, "-m", "decoupled", "init-tracking", "--experiment", "secret", "--tracking-uri", uri,
                               "--out", str(tmp_path / "t.json")], capture_output=True, text=True, env=environment, timeout=120)

    assert init_with({**clean, "PGPASSWORD": password}).returncode == 0
    refused = init_with(clean)
    assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1 and "mlflow db upgrade failed" in refused.stderr, refused.stderr
