"""Nothing a config file, a crash or a second process can do to your results or your shell.

Each test drives the real code as a user would (Snakemake, the CLI) and reads back the files,
the terminal and the MLflow store: config values never reach a shell unquoted, no password is
printed or written, nothing trained is lost to a failed or interrupted rerun, one process
trains a run directory, MLflow tells the truth after edits, reruns and kills, a deleted store is
said before any job runs, one damaged run file affects that run only, and bad input is one line.
"""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from conftest import REPO, needs_fashion_mnist
from decoupled import config, grid, tracking

SPACED = "my results $(touch pwned)"  # a folder name a shell would split and run


def snakemake(cwd: Path, *args, configfile="c.yaml", timeout=600, env=None):
    env = {k: v for k, v in (env or os.environ).items() if k not in ("MLFLOW_TRACKING_URI", "DECOUPLED_JOB_LOG")}
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--cores", "2", *args, "--configfile", configfile],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def tiny(**changes) -> dict:
    """One sync DGL job on 200 real images, logged beside its results."""
    cfg = {"experiment": "edits", "output_dir": SPACED, "tracking_uri": f"sqlite:///{SPACED}/mlflow/mlflow.db",
           "dataset": {"name": "fashion_mnist", "subset_per_class": 20, "test_subset_per_class": 10},
           "model": {"widths": [8, 16]}, "train": {"epochs": 1, "batch_size": 50},
           "grid": {"methods": ["dgl"], "modes": ["sync"], "K": [2], "seeds": [0]}}
    for section, values in changes.items():
        cfg[section] = {**cfg[section], **values} if isinstance(values, dict) else values
    return cfg


def ctrl_c_to_snakemake_alone(cwd: Path, after: str) -> tuple[int, str]:
    """Run the workflow and, once ``after`` is on its terminal, send SIGINT to Snakemake's process
    only (not its jobs: `kill -INT`, or a terminal whose jobs run in their own group)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DECOUPLED_JOB_LOG")}
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--cores", "2", "--configfile", "c.yaml"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # (a background shell job ignores it)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if after in line:
            proc.send_signal(signal.SIGINT)
            break
    seen.append(proc.stdout.read())
    return proc.wait(timeout=300), "".join(seen)


def store(cwd: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{cwd / SPACED}/mlflow/mlflow.db")
    experiment = client.get_experiment_by_name("edits").experiment_id
    return client, client.search_runs([experiment])


@pytest.fixture(scope="module")
def edits(tmp_path_factory):
    """One experiment edited as a user would, in a folder whose output_dir needs quoting:
    A, 40 epochs, with Ctrl-C to Snakemake alone during the first, then A's plain rerun (which
    finishes); then B, a batch larger than the data (its job fails at its first check)."""
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Fashion-MNIST not installed (scripts/setup.sh installs dataset-fashion-mnist)")
    cwd = tmp_path_factory.mktemp("edits")
    seen = {}
    run_dir = cwd / SPACED / "runs/dgl/sync/K2/default/seed0"

    (cwd / "c.yaml").write_text(yaml.safe_dump(tiny(train={"epochs": 40})))
    seen["A code"], seen["A"] = ctrl_c_to_snakemake_alone(cwd, after="epoch 1/40")
    seen["A again"] = snakemake(cwd)
    assert seen["A again"].returncode == 0, seen["A again"].stderr[-3000:]
    seen["A tables"] = (cwd / SPACED / "tables/main.csv").read_text()
    seen["A run"] = json.loads((run_dir / "metrics.json").read_text())["mlflow_run_id"]

    # a job killed before it could close its run (by SIGKILL, say): its run is left RUNNING
    experiment = {**json.loads((cwd / SPACED / "mlflow/experiment.json").read_text()), "tracking_uri": f"sqlite:///{cwd / SPACED}/mlflow/mlflow.db"}
    seen["killed"] = tracking.ChildRun.start(experiment, "killed", {}, {tracking.RUN_DIR_TAG: str(cwd / SPACED / "runs/dgl/sync/K2/default/seed1")}).run_id

    (cwd / "c.yaml").write_text(yaml.safe_dump(tiny(train={"batch_size": 100000})))
    seen["B"] = snakemake(cwd)
    seen["B files"] = sorted(p.name for p in run_dir.iterdir())
    seen["B resume"] = torch.load(run_dir / "resume.pt", weights_only=True)
    seen["B tables"] = (cwd / SPACED / "tables/main.csv").read_text()
    return cwd, seen


@needs_fashion_mnist
def test_no_config_value_reaches_a_shell_and_spaces_in_paths_work(edits):
    cwd, seen = edits
    assert not (cwd / "pwned").exists()  # $(touch pwned) in output_dir was a name, not a command
    assert (cwd / SPACED / "tables/main.csv").is_file() and (cwd / SPACED / "mlflow/mlflow.db").is_file()
    assert {p.name for p in cwd.iterdir()} == {".snakemake", "c.yaml", SPACED}  # nothing written at a split-off word


@needs_fashion_mnist
def test_a_failed_rerun_loses_nothing_trained(edits):
    cwd, seen = edits
    assert seen["B"].returncode != 0 and "exceeds the 200 training images" in seen["B"].stdout  # (a job's lines are on stdout)
    # Snakemake removed the job's outputs before it ran; the final state stays in resume.pt ...
    assert seen["B files"] == [".train.lock", "eval.json", "resume.pt"]
    assert seen["B resume"]["epoch"] == 40 and seen["B resume"]["mlflow_run_id"] == seen["A run"]
    # ... and in the finished run's MLflow artifacts, which no later attempt touches
    client, _ = store(cwd)
    finished = client.get_run(seen["A run"])
    assert finished.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(seen["A run"])} == {"checkpoint.pt", "metrics.json", "config.json", "eval.json"}
    import mlflow.artifacts

    kept = torch.load(mlflow.artifacts.download_artifacts(run_id=seen["A run"], artifact_path="checkpoint.pt", tracking_uri=f"sqlite:///{cwd / SPACED}/mlflow/mlflow.db",
                                                          dst_path=str(cwd.parent / "download")), weights_only=True)
    assert kept["epoch"] == 40 and all(torch.equal(kept["net"][k], seen["B resume"]["net"][k]) for k in kept["net"])
    # the tables still describe that run, which exists
    assert seen["B tables"] == seen["A tables"]
    main = pd.read_csv(io.StringIO(seen["B tables"])).set_index("method")
    assert main.loc["dgl", "sync_mean"] == pytest.approx(finished.data.metrics["final/test_acc"] / 100)


def _config_of(run) -> str:
    """Which of the fixture's configs a run is of, by its params."""
    return "A" if run.data.params["train.batch_size"] == "50" else "B"


@needs_fashion_mnist
def test_each_config_has_its_own_parent_and_no_run_is_left_running(edits):
    cwd, _ = edits
    _, runs = store(cwd)
    runs = [r for r in runs if r.info.run_name != "killed"]  # (the fixture's own)
    parents = {_config_of(r): r for r in runs if r.data.tags["decoupled.role"] == "parent"}
    # B's failure marks B's parent, not A's (the parent of the config that ran before)
    assert {c: r.info.status for c, r in parents.items()} == {"A": "FINISHED", "B": "FAILED"}
    assert len([r for r in runs if r.data.tags["decoupled.role"] == "parent"]) == 2  # one each, none reopened for another
    for run in runs:
        if run.data.tags["decoupled.role"] == "child":
            assert run.data.tags["mlflow.parentRunId"] == parents[_config_of(run)].info.run_id
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]


@needs_fashion_mnist
def test_a_failed_workflow_fails_its_parent_saying_where_its_log_is_and_its_orphans(edits):
    cwd, seen = edits
    said = seen["B"].stdout + seen["B"].stderr
    assert "MLflow parent run" in said and ": FAILED, 1 orphaned run(s) marked FAILED" in said and "Traceback" not in said
    client, runs = store(cwd)
    [parent] = [r for r in runs if r.data.tags["decoupled.role"] == "parent" and _config_of(r) == "B"]
    assert parent.data.tags["error"].startswith("the workflow failed; its log: ") and parent.data.tags["error"].endswith(".snakemake.log")
    killed = client.get_run(seen["killed"])
    assert killed.info.status == "FAILED" and killed.data.tags["error"].startswith("abandoned: its job ended without closing it")


@needs_fashion_mnist
def test_ctrl_c_to_snakemake_alone_then_a_plain_rerun_trains_nothing_again(edits):
    _, seen = edits
    assert seen["A code"] != 0 and "Terminating processes on user request" in seen["A"]
    again = seen["A again"]
    assert "IncompleteFiles" not in again.stdout + again.stderr
    # the job had run to its end while Snakemake waited for it: the rerun finishes it from its resume.pt
    assert "[dgl-sync-K2-seed0] trained already (40/40 epochs in its resume.pt): finishing from there, nothing to train" in again.stdout


@needs_fashion_mnist
def test_one_finished_child_run_per_job_and_configuration(edits):
    cwd, seen = edits
    client, runs = store(cwd)
    [child] = [r for r in runs if r.data.tags["decoupled.role"] == "child" and r.info.run_name != "killed"]  # (B's job failed before it made one)
    assert child.info.run_id == seen["A run"] and child.info.status == "FINISHED"
    assert child.data.tags["resumes"] == "1"  # the plain rerun went on in the run of the interrupted workflow
    assert [m.step for m in client.get_metric_history(child.info.run_id, "acc/test")] == list(range(1, 41))  # each epoch once


# --- passwords ---------------------------------------------------------------------------------


def files_holding(root: Path, secret: str) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_a_password_in_the_tracking_uri_is_never_printed_or_written(tmp_path):
    # a store that cannot be reached: init_tracking fails, and says so, naming the store
    cfg = tiny(tracking_uri="postgresql://user:s3cret@127.0.0.1:1/db")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    result = snakemake(tmp_path, "-p")
    assert result.returncode != 0
    assert "s3cret" not in result.stdout + result.stderr
    assert "decoupled: error: tracking_uri postgresql://user@127.0.0.1:1/db: cannot reach the database server at 127.0.0.1:1" in result.stdout
    assert files_holding(tmp_path, "s3cret") == ["c.yaml"]  # not the logs, nor .snakemake/log or metadata
    assert list((tmp_path / ".snakemake/metadata").iterdir())  # (Snakemake did record the job)


@pytest.fixture
def server_with_login(tmp_path):
    """An MLflow server with its own login (`mlflow server --app-name basic-auth`): its URI and
    the admin's password; stopped at the end."""
    from conftest import free_port

    port, password = free_port(), "an-admin-password-1"
    (tmp_path / "auth.ini").write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{tmp_path}/auth.db\n"
                                       "admin_username = admin\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth.ini"), "MLFLOW_AUTH_ADMIN_PASSWORD": password,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "a-key-of-this-test"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                               "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "artifacts")],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        import urllib.request

        for _ in range(600):  # its start takes seconds
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, "mlflow server ended at its start"
                time.sleep(0.1)
        yield uri, password
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def test_an_mlflow_server_login_is_given_by_mlflows_own_variables_and_a_refusal_is_one_line(server_with_login, tmp_path):
    uri, password = server_with_login
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}

    def init_tracking(tracking_uri, **variables):
        return subprocess.run([sys.executable, "-m", "decoupled", "init-tracking", "--experiment", "login", "--tracking-uri", tracking_uri,
                               "--out", "t.json"], capture_output=True, text=True, cwd=tmp_path, env={**env, **variables}, timeout=120)

    refused = init_tracking(uri)
    assert refused.returncode == 2 and refused.stderr.splitlines() == [
        (f"decoupled: error: tracking store {uri}: the server refuses this login (set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD;"
         " docs/tracking.md, Passwords)")], refused.stderr
    assert init_tracking(uri, MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=password).returncode == 0
    # or written in the URI: used, and not kept
    given = init_tracking(uri.replace("//", f"//admin:{password}@"))
    assert given.returncode == 0, given.stderr
    assert password not in given.stderr and json.loads((tmp_path / "t.json").read_text())["tracking_uri"] == uri.replace("//", "//admin@")


def test_the_html_report_refuses_a_config_file_holding_a_password(tmp_path):
    # Snakemake's report embeds the config files as they are
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny(tracking_uri="postgresql://user:s3cret@127.0.0.1:1/db")))
    result = snakemake(tmp_path, "--report", "report.html")
    assert result.returncode != 0 and not (tmp_path / "report.html").exists()
    assert "--report: the config file's tracking_uri holds a password, which the report would show with the config file" in result.stdout + result.stderr
    assert "s3cret" not in result.stdout + result.stderr


def test_a_password_is_given_back_only_to_its_own_uri_and_only_to_the_store_client(monkeypatch):
    from decoupled.credentials import PASSWORDS_ENV, redact, with_password

    monkeypatch.setenv(PASSWORDS_ENV, "{}")  # (and put back as it was after the test)
    cfg = config.validate({"experiment": "e", "tracking_uri": "postgresql://me:p%40ss@db.example:5432/mlflow", "grid": {"methods": ["dgl"]}})
    assert cfg["tracking_uri"] == "postgresql://me@db.example:5432/mlflow"
    # for this process's children (the jobs, torchrun's workers), by the URI it belongs to
    assert json.loads(os.environ[PASSWORDS_ENV]) == {"postgresql://me@db.example:5432/mlflow": "p%40ss"}
    assert with_password(cfg["tracking_uri"]) == "postgresql://me:p%40ss@db.example:5432/mlflow"
    assert with_password("postgresql://me@elsewhere:5432/mlflow") == "postgresql://me@elsewhere:5432/mlflow"  # (its own ~/.pgpass line)
    job = grid.job_config(cfg, grid.runs(cfg)[0])
    assert "p%40ss" not in json.dumps(job) and "p%40ss" not in json.dumps(tracking._described(cfg))
    assert redact("connect to http://u:p%40ss@h failed: another reason") == "connect to http://u:***@h failed: another reason"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://u:other@server:5000")
    assert tracking.tracking_uri(cfg) == "http://u@server:5000" and with_password("http://u@server:5000") == "http://u:other@server:5000"


# --- one writer per run directory ----------------------------------------------------------------


def by_hand(tmp_path, data, out, epochs=1, **kwargs):
    """`decoupled train` of one small DGL job, as a user types it (``kwargs``: Popen's)."""
    cfg = {"experiment": "safety", "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "model": {"widths": [16, 32]},
           "train": {"epochs": epochs, "batch_size": 8}, "grid": {"methods": ["dgl"], "K": [2]}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DECOUPLED_JOB_LOG")}
    command = [sys.executable, "-m", "decoupled", "train", "--config", "c.yaml", "--method", "dgl", "--K", "2", "--seed", "0",
               "--data", str(data), "--out", str(out)]
    return subprocess.Popen(command, text=True, cwd=tmp_path, env=env, **kwargs)


def child_runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id], "tags.`decoupled.role` = 'child'")


@needs_fashion_mnist
def test_a_second_process_training_a_run_directory_stops_at_once_naming_the_first(fashion_subset, tmp_path):
    import re
    import socket

    from decoupled import rundir

    first = by_hand(tmp_path, fashion_subset, tmp_path / "run", epochs=50, stderr=subprocess.PIPE)
    for line in first.stderr:  # wait until it trains
        if "epoch 1/50" in line:
            break
    second = by_hand(tmp_path, fashion_subset, tmp_path / "run", epochs=50, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 2 and first.poll() is None
    [line] = err.splitlines()
    assert re.fullmatch(rf"decoupled: error: {re.escape(str(tmp_path / 'run'))} is being trained by process {first.pid} on {re.escape(socket.gethostname())} since "
                        rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d \(working directory {re.escape(str(tmp_path))}\): let it finish, or stop it \(a rerun then resumes its run\)",
                        line), line
    # it touched neither the first's run nor its files
    [run] = child_runs(f"sqlite:///{tmp_path}/mlflow.db", "safety")
    assert run.info.status == "RUNNING" and "error" not in run.data.tags
    first.kill()  # SIGKILL: nothing of the first can clean up ...
    first.wait(timeout=60)
    assert not rundir.is_held(tmp_path / "run")  # ... and the lock went with it
    with rundir.training(tmp_path / "run"):
        assert rundir.is_held(tmp_path / "run")


def test_a_second_workflow_writing_the_same_output_dir_stops_before_any_job(tmp_path):
    # e.g. two working directories with one absolute output_dir: Snakemake locks only its own directory
    from decoupled import rundir

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny(output_dir=str(tmp_path / "shared results"), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")))
    assert snakemake(tmp_path, str(tmp_path / "shared results/mlflow/experiment.json")).returncode == 0
    (tmp_path / "elsewhere").mkdir()
    with rundir.hold_output_dir(tmp_path / "shared results"):  # the first workflow, at work
        second = snakemake(tmp_path / "elsewhere", configfile=str(tmp_path / "c.yaml"))
    said = second.stdout + second.stderr
    assert second.returncode != 0
    assert (f"{tmp_path / 'shared results'} is being written by another workflow by process {os.getpid()}" in said
            and "let it finish, or stop it, then run this one again" in said), said[-2000:]
    assert "Execute" not in said and "MLflow parent run" not in said  # no job started, no parent marked
    assert not (tmp_path / "shared results/runs").exists()


def test_a_run_whose_directory_a_live_process_trains_is_no_orphan(tmp_path, monkeypatch):
    from decoupled import rundir

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = config.validate({"experiment": "safety", "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "grid": {"methods": ["dgl"]}})
    experiment = tracking.init_experiment(cfg, cfg)
    live = tracking.ChildRun.start(experiment, "live", {}, {tracking.RUN_DIR_TAG: str(tmp_path / "runs/live")})
    dead = tracking.ChildRun.start(experiment, "dead", {}, {tracking.RUN_DIR_TAG: str(tmp_path / "runs/dead")})
    with rundir.training(tmp_path / "runs/live"):  # e.g. `decoupled train` by hand while the workflow ends
        assert tracking.fail_orphans(experiment, tmp_path / "runs", "abandoned") == [dead.run_id]
    assert live.client.get_run(live.run_id).info.status == "RUNNING"


# --- reruns of a finished job --------------------------------------------------------------------


@needs_fashion_mnist
def test_a_finished_job_run_again_finishes_into_its_run_and_a_retrain_supersedes_it(fashion_subset, tmp_path, monkeypatch):
    from mlflow.entities import ViewType

    from decoupled.job import run_job

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = config.validate({"experiment": "safety", "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "model": {"widths": [8, 16]},
                           "train": {"epochs": 2, "batch_size": 50}, "grid": {"methods": ["dgl"], "K": [2]}})
    job = grid.job_config(cfg, grid.runs(cfg)[0])
    experiment = tracking.init_experiment(cfg, cfg)
    first = run_job(job, fashion_subset, tmp_path / "run", experiment, {})
    again = run_job(job, fashion_subset, tmp_path / "run", experiment, {})  # --rerun-incomplete, or by hand
    assert again["mlflow_run_id"] == first["mlflow_run_id"] and again["epochs"] == first["epochs"]
    [run] = child_runs(cfg["tracking_uri"], "safety")
    assert run.info.status == "FINISHED" and run.data.tags["resumes"] == "1"

    # the training code changed: the job trains again, and its new run supersedes the old one
    monkeypatch.setattr("decoupled.resume.training_code_hash", lambda method: "changed code")
    retrained = run_job(job, fashion_subset, tmp_path / "run", experiment, {})
    assert retrained["mlflow_run_id"] != first["mlflow_run_id"]
    [current] = child_runs(cfg["tracking_uri"], "safety")
    assert current.info.run_id == retrained["mlflow_run_id"] and current.info.status == "FINISHED"
    old = run.info and tracking._client(cfg["tracking_uri"]).get_run(first["mlflow_run_id"])
    assert old.info.lifecycle_stage == "deleted" and old.data.tags[tracking.SUPERSEDED_TAG] == retrained["mlflow_run_id"]
    assert f"Superseded by run {retrained['mlflow_run_id']}" in old.data.tags["mlflow.note.content"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg["tracking_uri"])
    everything = client.search_runs([experiment["experiment_id"]], "tags.`decoupled.role` = 'child'", run_view_type=ViewType.ALL)
    assert len(everything) == 2  # the old one is kept, with its checkpoint artifact: restorable


# --- a deleted or replaced store -------------------------------------------------------------------


def test_a_deleted_or_replaced_store_is_said_before_any_job_runs(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny(output_dir="results", tracking_uri="sqlite:///results/mlflow/mlflow.db")))
    assert snakemake(tmp_path, "results/mlflow/experiment.json").returncode == 0
    (tmp_path / "results/mlflow/mlflow.db").unlink()
    gone = snakemake(tmp_path, "-n")
    says = ("the MLflow store sqlite:///results/mlflow/mlflow.db of results/mlflow/experiment.json {}"
            " (deleted or replaced, or made from another working directory?): put it back, or delete results/mlflow/experiment.json"
            " to log to a new store (finished runs are then logged to it again from their resume.pt, not retrained)")
    assert gone.returncode != 0 and says.format(f"is missing from {tmp_path}, where its relative path points") in gone.stdout + gone.stderr, gone.stdout[-2000:]
    assert not (tmp_path / "results/mlflow/mlflow.db").exists()  # no new empty store made behind the user's back
    # another store in its place
    other = subprocess.run([sys.executable, "-m", "decoupled", "init-tracking", "--experiment", "other", "--tracking-uri",
                            "sqlite:///results/mlflow/mlflow.db", "--out", "other.json"], cwd=tmp_path, capture_output=True, text=True)
    assert other.returncode == 0, other.stderr
    replaced = snakemake(tmp_path, "-n")
    assert replaced.returncode != 0 and says.format("has no experiment 'edits' of id 1") in replaced.stdout + replaced.stderr, replaced.stdout[-2000:]
    # doing as it says
    (tmp_path / "results/mlflow/experiment.json").unlink()
    assert snakemake(tmp_path, "-n").returncode == 0


def test_the_store_check_through_mlflow_finds_what_is_missing(tmp_path, monkeypatch):
    # (the check for a server's store, asked at the workflow's start; a SQLite store here)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = config.validate({"experiment": "safety", "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "grid": {"methods": ["dgl"]}})
    experiment = tracking.init_experiment(cfg, cfg)
    assert tracking._store_problem(experiment) is None
    assert tracking._store_problem({**experiment, "parent_run_id": "0" * 32}) == f"has no parent run {'0' * 32}"
    assert tracking._store_problem({**experiment, "experiment": "another"}) == f"has no experiment 'another' of id {experiment['experiment_id']}"
    assert tracking._store_problem({**experiment, "experiment_id": "999"}) == "has no experiment 'safety' of id 999"


# --- one damaged run file ----------------------------------------------------------------------------


@needs_fashion_mnist
def test_one_damaged_run_file_leaves_the_other_runs_evaluated_and_reported(fashion_subset, tmp_path, monkeypatch):
    from decoupled.job import run_job

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = config.validate({"experiment": "safety", "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "model": {"widths": [8, 16]},
                           "train": {"epochs": 1, "batch_size": 50}, "grid": {"methods": ["dgl"], "K": [2], "seeds": [0, 1, 2]}})
    experiment = tracking.init_experiment(cfg, cfg)
    (tmp_path / "t.json").write_text(json.dumps(experiment))
    runs = [tmp_path / f"seed{key.seed}" for key in grid.runs(cfg)]
    for key, run in zip(grid.runs(cfg), runs):
        run_job(grid.job_config(cfg, key), fashion_subset, run, experiment, {})
    checkpoint = runs[0] / "checkpoint.pt"
    with open(checkpoint, "r+b") as f:  # truncated in place (a full disk, a copy cut short)
        f.truncate(checkpoint.stat().st_size // 2)
    (runs[1] / "metrics.json").write_text('{"method": "dgl", ')  # cut short

    def decoupled(*args):
        env = {k: v for k, v in os.environ.items() if k != "DECOUPLED_JOB_LOG"}
        return subprocess.run([sys.executable, "-m", "decoupled", *map(str, args)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)

    evaluated = decoupled("evaluate", "--run", *runs, "--data", fashion_subset, "--tracking", "t.json", "--out", *[r / "eval.json" for r in runs])
    assert evaluated.returncode == 0, evaluated.stderr
    again = f"the report leaves that run out: delete {checkpoint} and run the workflow again (with its --configfile) to make it again"
    unreadable = f"cannot read checkpoint {checkpoint}: RuntimeError"  # (what torch.load raises for a zip archive cut short)
    assert f"decoupled: warning: {unreadable}; {again}" in evaluated.stderr.splitlines(), evaluated.stderr
    assert "error" in json.loads((runs[0] / "eval.json").read_text())
    assert all("test_acc" in json.loads((r / "eval.json").read_text()) for r in runs[1:])

    reported = decoupled("report", "--runs", *runs, "--tables", "tables", "--figures", "figures", "--tracking", "t.json",
                         "--config-json", json.dumps(cfg))
    assert reported.returncode == 0, reported.stderr
    warnings = [line for line in reported.stderr.splitlines() if line.startswith("decoupled: warning: ")]
    assert warnings == [
        f"decoupled: warning: {runs[0] / 'eval.json'}: {unreadable}; {again}",
        (f"decoupled: warning: {runs[1] / 'metrics.json'}: malformed JSON (Expecting property name enclosed in double quotes at line 1)"
         f"; the report leaves that run out: delete {runs[1] / 'metrics.json'} and run the workflow again (with its --configfile) to make it again")]
    summary = pd.read_csv(tmp_path / "tables/summary.csv")
    assert list(summary["seeds"]) == [1]  # the sound run alone
    assert summary.loc[0, "test_acc_mean"] == pytest.approx(json.loads((runs[2] / "eval.json").read_text())["test_acc"])


# --- bad input: one line -------------------------------------------------------------------------------


@pytest.mark.parametrize("args, says", [
    (["train", "--config", "cdir", "--method", "dgl", "--K", "2", "--seed", "0", "--data", "x.pt", "--out", "run"],
     "decoupled: error: config file cdir is a directory: give a YAML file, e.g. config/config.yaml"),
    (["relocate", "notdb.txt"], "decoupled: error: notdb.txt is not an SQLite database (file is not a database)"),
    (["train", "--config", "braces.yaml", "--method", "dgl", "--K", "2", "--seed", "0", "--data", "x.pt", "--out", "run"],
     "decoupled: error: config key 'experiment': 'a{b}' cannot be a path or a name: it holds a brace, a newline or another control character"),
    (["train", "--config", "newline.yaml", "--method", "dgl", "--K", "2", "--seed", "0", "--data", "x.pt", "--out", "run"],
     "decoupled: error: config key 'output_dir': 'one\\ntwo' cannot be a path or a name: it holds a brace, a newline or another control character"),
])
def test_bad_input_is_one_line(tmp_path, args, says):
    (tmp_path / "cdir").mkdir()
    (tmp_path / "notdb.txt").write_text("not a database, but long enough to be read as one ...\n" * 3)
    (tmp_path / "braces.yaml").write_text(yaml.safe_dump({"experiment": "a{b}", "grid": {"methods": ["dgl"]}}))
    (tmp_path / "newline.yaml").write_text(yaml.safe_dump({"experiment": "e", "output_dir": "one\ntwo", "grid": {"methods": ["dgl"]}}))
    result = subprocess.run([sys.executable, "-m", "decoupled", *args], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.splitlines() == [says]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key, value", [("experiment", "res{x}"), ("output_dir", "res{x}"), ("output_dir", "two\nlines")])
def test_snakemake_refuses_what_cannot_be_a_path_or_a_name_naming_the_key(tmp_path, key, value):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"experiment": "e", "grid": {"methods": ["dgl"]}, key: value}))
    result = snakemake(tmp_path, "-n")
    assert result.returncode != 0
    said = result.stdout + result.stderr  # (a dry run's messages are on stdout)
    assert f"config key '{key}': {value!r} cannot be a path or a name: it holds a brace, a newline or another control character" in said
    assert "WildcardError" not in said
