"""Faults a careless or unlucky user meets, each run through the real code: one line, the exit
code, and no MLflow run left RUNNING."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import REPO
from decoupled import config, grid, tracking
from decoupled.errors import UserError


def test_a_misspelt_method_under_overrides_is_an_error_not_ignored(tmp_path):
    cfg = yaml.safe_load((REPO / "config/smoke.yaml").read_text())
    cfg["overrides"] = {"dgll": {"train": {"lr": 0.1}}}
    with pytest.raises(UserError, match=r"^config key 'overrides.dgll': unknown method 'dgll' \(known: backprop, cdni, ddg, dgl, dni, fdg, gn_dgl\)$"):
        grid.runs(config.validate(cfg))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    result = subprocess.run([sys.executable, "-m", "decoupled", "train", "--config", "c.yaml", "--method", "dgl", "--K", "2", "--seed", "0",
                             "--data", "x.pt", "--out", "run"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["decoupled: error: config key 'overrides.dgll': unknown method 'dgll' (known: backprop, cdni, ddg, dgl, dni, fdg, gn_dgl)"]
    assert not (tmp_path / "run").exists()


def tiny_job(tmp_path, **train):
    cfg = config.validate({"experiment": "faults", "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "model": {"widths": [8, 16]},
                           "train": {"epochs": 1, "batch_size": 50, **train}, "grid": {"methods": ["dgl"], "K": [2]}})
    return cfg, grid.job_config(cfg, grid.runs(cfg)[0])


def test_a_resume_left_by_another_configuration_fails_its_old_run_saying_why(fashion_subset, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from decoupled.job import run_job
    from decoupled.resume import RESUME_FILE

    cfg, job = tiny_job(tmp_path)
    experiment = tracking.init_experiment(cfg, described=cfg)
    killed = tracking.ChildRun.start(experiment, "dgl K2 s0", {}, {})  # a job killed part-way: RUNNING, its resume.pt left
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"job": {**job, "train": {**job["train"], "lr": 0.5}}, "mlflow_run_id": killed.run_id, "epoch": 0}, out / RESUME_FILE)
    metrics = run_job(job, fashion_subset, out, experiment, {})
    old, new = killed.client.get_run(killed.run_id), killed.client.get_run(metrics["mlflow_run_id"])
    assert old.info.status == "FAILED" and "run again with another configuration" in old.data.tags["error"]
    assert new.info.status == "FINISHED" and new.info.run_id != old.info.run_id


def test_ctrl_c_is_one_line_and_fails_the_run(fashion_subset, tmp_path):
    cfg = {"experiment": "faults", "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "model": {"widths": [16, 32]},
           "train": {"epochs": 50, "batch_size": 8}, "grid": {"methods": ["dgl"], "K": [2]}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # a terminal's Ctrl-C reaches a job that has SIGINT's default handler, even where pytest itself
    # was started ignoring it (a shell's background job does, and its children inherit that)
    job = subprocess.Popen([sys.executable, "-m", "decoupled", "train", "--config", "c.yaml", "--method", "dgl", "--K", "2", "--seed", "0",
                            "--data", str(fashion_subset), "--out", "run"], stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in job.stderr:  # wait for the first epoch, then press Ctrl-C
        lines.append(line)
        if "epoch 1/50" in line:
            job.send_signal(signal.SIGINT)
            break
    rest = job.stderr.read()
    assert job.wait(timeout=120) == 130
    assert rest.strip().splitlines() == ["decoupled: interrupted"] or rest.strip().splitlines()[-1:] == ["decoupled: interrupted"], rest
    assert "Traceback" not in rest
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg["tracking_uri"])
    [run] = client.search_runs([client.get_experiment_by_name("faults").experiment_id], "tags.`decoupled.role` = 'child'")
    assert run.info.status == "FAILED" and run.data.tags["error"] == "interrupted (Ctrl-C)"
    assert (tmp_path / "run" / "resume.pt").is_file() and not (tmp_path / "run" / "metrics.json").exists()  # a rerun resumes


def test_an_unreachable_tracking_server_fails_at_once_in_one_line(tmp_path):
    import time

    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:1"}
    began = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "decoupled", "init-tracking", "--experiment", "e", "--out", "t.json"],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert time.monotonic() - began < 30
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["decoupled: error: tracking_uri http://127.0.0.1:1: cannot reach the MLflow server ([Errno 111] Connection refused)"]
    assert not (tmp_path / "t.json").exists()


def test_a_batch_larger_than_the_data_leaves_no_run(fashion_subset, tmp_path):
    cfg = {"experiment": "faults", "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "train": {"batch_size": 100000}, "grid": {"methods": ["dgl"], "K": [2]}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    result = subprocess.run([sys.executable, "-m", "decoupled", "train", "--config", "c.yaml", "--method", "dgl", "--K", "2", "--seed", "0",
                             "--data", str(fashion_subset), "--out", "run"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["decoupled: error: config key 'train.batch_size': 100000 exceeds the 2000 training images"]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "run").exists()  # no store, no FAILED run, no outputs


def test_a_damaged_prepared_file_says_to_delete_it(tmp_path):
    from decoupled.data import load_prepared

    (tmp_path / "fashion_mnist.pt").write_bytes(b"PK\x03\x04 not what torch wrote")
    with pytest.raises(UserError) as caught:
        load_prepared(tmp_path / "fashion_mnist.pt")
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'fashion_mnist.pt'} is not a prepared dataset file") and message.endswith("delete it to have it prepared again")
    assert "weights_only" not in message and "\n" not in message


def test_a_misspelt_mode_on_the_command_line_names_the_flag(tmp_path):
    result = subprocess.run([sys.executable, "-m", "decoupled", "train", "--config", "c.yaml", "--method", "dgl", "--mode", "asyn",
                             "--K", "2", "--seed", "0", "--data", "x.pt", "--out", "run"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "decoupled train: error: argument --mode: invalid choice: 'asyn' (choose from 'sync', 'async') (see decoupled train --help)"]


def planned(cwd, *args, config_too=True) -> tuple[list[grid.RunKey], dict[str, str] | None]:
    """What Snakemake, started in ``cwd`` with this repository's Snakefile, hands its training
    jobs: their places in the grid (`snakemake -n -p`), and (``config_too``) the experiment
    config they are computed from (in their environment; the parent run carries it as params,
    made by the init_tracking rule)."""
    from mlflow.tracking import MlflowClient

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    snakemake = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--cores", "1"]
    dry = subprocess.run([*snakemake, "-n", "-p", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    places = re.findall(r'decoupled train --config-json "\$DECOUPLED_EXPERIMENT_CONFIG" --method (\S+) --mode (\S+) --K (\d+) --seed (\d+) --variant (\S+)',
                        dry.stdout + dry.stderr)
    keys = [grid.RunKey(method, mode, int(K), int(seed), variant) for method, mode, K, seed, variant in places]
    if not config_too:
        return keys, None
    init = subprocess.run([*snakemake, "--until", "init_tracking", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    assert init.returncode == 0, init.stderr[-3000:]
    experiment = json.loads((cwd / "results/mlflow/experiment.json").read_text())
    parent = MlflowClient(f"sqlite:///{cwd}/results/mlflow/mlflow.db").get_run(experiment["parent_run_id"])
    return keys, parent.data.params


def test_one_config_file_means_the_same_to_snakemake_and_the_cli(tmp_path):
    # a partial file: what it leaves out comes from the schema's defaults, not from config/config.yaml
    partial = tmp_path / "partial.yaml"
    partial.write_text("experiment: minimal\ngrid: {methods: [dgl]}\n")
    cli = config.load(partial)
    assert cli["train"]["epochs"] == 5  # the schema's 5, not config.yaml's 2
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    keys, params = planned(tmp_path, "--configfile", "partial.yaml")
    assert sorted(keys) == sorted(grid.runs(cli)) and params == tracking._described(cli)
    assert planned(elsewhere, "--configfile", str(partial), config_too=False)[0] == keys
    # no --configfile: the default experiment (its grid: K = 3, its variants), from any folder
    default = config.load(REPO / "config/config.yaml")
    keys, _ = planned(elsewhere, config_too=False)
    assert sorted(keys) == sorted(grid.runs(default)) and {key.K for key in keys} == {3}


def test_a_config_file_that_is_not_yaml_names_its_line(tmp_path):
    (tmp_path / "c.yaml").write_text("experiment: x\ngrid:\n  methods: [dgl\n  K: [2]\n")
    result = subprocess.run([sys.executable, "-m", "decoupled", "train", "--config", "c.yaml", "--method", "dgl", "--K", "2", "--seed", "0",
                             "--data", "x.pt", "--out", "run"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("decoupled: error: config file c.yaml:4:4: not valid YAML: expected ',' or ']', but got ':'"), line


def test_a_run_left_running_by_a_dead_attempt_is_failed_by_the_next(fashion_subset, tmp_path, monkeypatch):
    # an attempt that died before it could write resume.pt or close its run (its disk was full, say)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from decoupled.job import run_job

    cfg, job = tiny_job(tmp_path)
    experiment = tracking.init_experiment(cfg, described=cfg)
    out = tmp_path / "run"
    dead = tracking.ChildRun.start(experiment, "dgl K2 s0", {}, {tracking.RUN_DIR_TAG: str(out.resolve())})
    elsewhere = tracking.ChildRun.start(experiment, "dgl K2 s1", {}, {tracking.RUN_DIR_TAG: str(tmp_path / "run-other")})
    metrics = run_job(job, fashion_subset, out, experiment, {})
    client = dead.client
    old = client.get_run(dead.run_id)
    assert old.info.status == "FAILED" and old.data.tags["error"].startswith(f"abandoned: the process training {out} ended without closing")
    assert client.get_run(metrics["mlflow_run_id"]).info.status == "FINISHED"
    assert client.get_run(metrics["mlflow_run_id"]).data.tags[tracking.RUN_DIR_TAG] == str(out.resolve())
    assert client.get_run(elsewhere.run_id).info.status == "RUNNING"  # another directory's run is not this job's to close


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(name, size)``: a tmpfs of ``size`` mounted at tmp_path/name (root only), unmounted after."""
    mounted = []

    def mount(name: str, size: str):
        where = tmp_path / name
        where.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs (needs root): {result.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], check=False)


def train_by_hand(tmp_path, data, out, *args):
    cfg = {"experiment": "faults", "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "model": {"widths": [8, 16]},
           "train": {"epochs": 1, "batch_size": 50}, "grid": {"methods": ["dgl"], "K": [2]}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DECOUPLED_JOB_LOG")}
    return subprocess.run([sys.executable, "-m", "decoupled", "train", "--config", "c.yaml", "--method", "dgl", "--K", "2", "--seed", "0",
                           "--data", str(data), "--out", str(out), *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)


def child_runs(uri: str, experiment: str = "faults"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id], "tags.`decoupled.role` = 'child'")


def test_a_full_disk_is_one_line_saying_so_and_fails_the_run(fashion_subset, tmp_path, small_disk):
    out = small_disk("full", "4k") / "run"  # room for no checkpoint
    log = tmp_path / "job.log"
    result = train_by_hand(tmp_path, fashion_subset, out)
    assert result.returncode == 74
    assert result.stderr.splitlines()[-1] == f"decoupled: error: no space left on device: {out / 'resume.pt'}", result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    [run] = child_runs(f"sqlite:///{tmp_path}/mlflow.db")
    assert run.info.status == "FAILED" and "No space left on device" in run.data.tags["error"]
    # under the workflow the traceback goes to the job's log
    env_log = subprocess.run([sys.executable, "-c", "import os, sys; from decoupled.cli import main; sys.exit(main(sys.argv[1:]))",
                              "prepare-data", "--dataset-json", "{}", "--out", str(out.parent / "data.pt")],
                             capture_output=True, text=True, env={**os.environ, "DECOUPLED_JOB_LOG": str(log)}, timeout=300)
    assert env_log.returncode == 74 and env_log.stderr.splitlines()[-1] == f"decoupled: error: no space left on device: {out.parent / 'data.pt'}"
    assert "Traceback" not in env_log.stderr and "Traceback" in log.read_text() and "No space left on device" in log.read_text()


def test_a_read_only_store_is_one_line_naming_it(fashion_subset, tmp_path, small_disk):
    store = small_disk("store", "64m")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    subprocess.run([sys.executable, "-m", "decoupled", "init-tracking", "--experiment", "faults", "--tracking-uri", f"sqlite:///{store}/mlflow.db",
                    "--out", "experiment.json"], cwd=tmp_path, env=env, check=True, capture_output=True)
    subprocess.run(["mount", "-o", "remount,ro", str(store)], check=True)  # as a store that a user may only read
    result = train_by_hand(tmp_path, fashion_subset, tmp_path / "run", "--tracking", "experiment.json")
    assert result.returncode == 74
    # the run is made while the first epoch trains (decoupled.job.PendingRun): the job's first
    # line, then its one error line, when the epoch's end waits for the run
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and "layers per module" in lines[0], result.stderr
    assert lines[1] == f"decoupled: error: tracking store sqlite:///{store}/mlflow.db: read-only (attempt to write a readonly database)"
    assert not any((tmp_path / "run" / name).exists() for name in ("checkpoint.pt", "metrics.json", "config.json"))


@pytest.mark.parametrize("method, train, says", [
    # the order in which losses broke, and both settings of a synthetic-gradient method
    ("dni", {"synth_lr": 10.0, "synth_last_block": False}, r"module 0's training loss is nan at epoch 1 \(non-finite first: module 0 at step 6, the synthesizers at step 6, module 1 at step 7; try a lower train.synth_lr or train.lr\)"),
    ("dni", {"synth_lr": 10.0}, r"module 0's training loss is nan at epoch 1 \(non-finite first: module 0 at step 7; try a lower train.synth_lr or train.lr\)"),
    ("cdni", {"lr": 1e6}, r"module 0's training loss is nan at epoch 1 \(non-finite first: the synthesizers at step 2, (module 0|module 1) at step 4.*; try a lower train.synth_lr or train.lr\)"),
    ("dgl", {"lr": 1e6}, r"module 0's training loss is nan at epoch 1 \(try a lower train.lr\)"),
])
def test_a_divergence_names_the_setting_that_diverged(fashion_subset, tmp_path, method, train, says):
    # DNI at synth_lr 10: module 0 diverges on its synthetic gradients (without the synthesizer
    # above the last block, a step before the last module)
    from decoupled.data import load_prepared
    from decoupled.train import TrainingDiverged, fit

    cfg = config.validate({"experiment": "faults", "model": {"widths": [8, 16]}, "train": {"epochs": 1, "batch_size": 25, **train},
                           "grid": {"methods": [method], "K": [2]}})
    (key,) = grid.runs(cfg)
    with pytest.raises(TrainingDiverged) as caught:
        fit(grid.job_config(cfg, key), load_prepared(fashion_subset))
    assert re.fullmatch(f"{key.name}: {says}", str(caught.value)), str(caught.value)


def test_a_report_under_a_config_whose_runs_are_not_there_is_refused(tmp_path):
    # e.g. `snakemake --report` without the --configfile of the experiment whose outputs are on disk
    (tmp_path / "other.yaml").write_text("experiment: other\ngrid: {methods: [dgl]}\n")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    result = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--report", "report.html", "--configfile", "other.yaml"],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode != 0
    assert "--report: experiment 'other' has none of its 1 runs under results/runs/; give the --configfile it was run with" in result.stderr
    assert not (tmp_path / "report.html").exists()


def test_the_store_snakemake_shows_is_the_one_the_jobs_use(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/elsewhere.db"}
    result = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-n", "-p", "results/mlflow/experiment.json"],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"--tracking-uri sqlite:///{tmp_path}/elsewhere.db" in result.stdout + result.stderr
    assert "sqlite:///results/mlflow/mlflow.db" not in result.stdout + result.stderr


def test_a_synthetic_gradient_method_with_nothing_recorded_names_both_settings():
    # a loss that overflowed only in the epoch's mean: no step of it was seen non-finite
    from test_methods import make

    _, dni = make("dni", K=2)
    assert dni.divergence_hint([float("nan"), 1.0]) == "try a lower train.synth_lr or train.lr"
    dni.first_nonfinite["modules"][1] = 3
    assert dni.divergence_hint([1.0, float("nan")]) == "non-finite first: module 1 at step 3; try a lower train.synth_lr or train.lr"
