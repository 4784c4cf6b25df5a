"""Many training jobs logging into the default MLflow store (SQLite) at one moment lose nothing."""

import time
from pathlib import Path
from urllib.parse import urlparse

from mlflow_check import attached, check_runs, init_tracking, jobs, run_concurrently, tiny_data  # noqa: F401 (a fixture)

N_JOBS = 8
N_JOBS_UNINITIALIZED = 4  # fewer than above, to keep CI short: with no lock, 6 of 6 such jobs failed


def test_concurrent_jobs_on_the_default_sqlite_store(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    # as the workflow does: init-tracking once (it creates the store), then the jobs only attach
    experiment = init_tracking(f"sqlite:///{tmp_path}/results/mlflow/mlflow.db", tmp_path / "tracking.json")
    started = time.monotonic()
    run_dirs = run_concurrently(jobs(N_JOBS), tiny_data, tmp_path / "tracking.json", tmp_path)
    print(f"{N_JOBS} concurrent jobs on SQLite: {time.monotonic() - started:.1f} s")
    children = check_runs(experiment, run_dirs)
    assert len(children) == N_JOBS
    # the artifacts lie next to the store, where init-tracking put the experiment's
    for run in children:
        stored = Path(urlparse(run.info.artifact_uri).path)
        assert stored.parent.parent == tmp_path / "results/mlflow/artifacts"
        assert (stored / "metrics.json").read_bytes() == (run_dirs[run.info.run_name] / "metrics.json").read_bytes()


def test_concurrent_jobs_without_init_tracking_share_one_fresh_sqlite_store(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    # `decoupled train` without --tracking, started by hand at once: each creates (or finds)
    # the store, experiment and parent run itself. Unlocked, 7 of 8 such jobs failed.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/fresh/mlflow.db"
    job_list = [dict(job, tracking_uri=uri) for job in jobs(N_JOBS_UNINITIALIZED)]
    run_dirs = run_concurrently(job_list, tiny_data, None, tmp_path)
    assert len(check_runs(attached(uri), run_dirs)) == N_JOBS_UNINITIALIZED
