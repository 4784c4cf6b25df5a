"""Faults a careless or unlucky user meets, each run through the real code: one line, the exit
code, and no MLflow run left RUNNING."""

import os
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
    with pytest.raises(UserError, match=r"^config key 'overrides.dgll': unknown method 'dgll' \(known: backprop, cdni, ddg, dgl, dni, fdg\)$"):
        grid.runs(config.validate(cfg))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    result = subprocess.run([sys.executable, "-m", "decoupled", "train", "--config", "c.yaml", "--method", "dgl", "--K", "2", "--seed", "0",
                             "--data", "x.pt", "--out", "run"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["decoupled: error: config key 'overrides.dgll': unknown method 'dgll' (known: backprop, cdni, ddg, dgl, dni, fdg)"]
    assert not (tmp_path / "run").exists()


def tiny_job(tmp_path, **train):
    cfg = config.validate({"experiment": "faults", "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "model": {"widths": [8, 16]},
                           "train": {"epochs": 1, "batch_size": 50, **train}, "grid": {"methods": ["dgl"], "K": [2]}})
    return cfg, grid.job_config(cfg, grid.runs(cfg)[0])


def test_a_resume_left_by_another_configuration_fails_its_old_run_saying_why(fashion_subset, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from decoupled.train import RESUME_FILE, run_job

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
    job = subprocess.Popen([sys.executable, "-m", "decoupled", "train", "--config", "c.yaml", "--method", "dgl", "--K", "2", "--seed", "0",
                            "--data", str(fashion_subset), "--out", "run"], stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
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


def planned_jobs(cwd, *args) -> list[dict]:
    """The training jobs `snakemake -n` plans, started in ``cwd`` with this repository's Snakefile."""
    import json
    import re

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    result = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-n", "-p", "--cores", "1", *args],
                            capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(j) for j in re.findall(r"decoupled train --job-json '(\{.*?\})' --data", result.stdout + result.stderr)]


def test_one_config_file_means_the_same_to_snakemake_and_the_cli(tmp_path):
    # a partial file: what it leaves out comes from the schema's defaults, not from config/config.yaml
    partial = tmp_path / "partial.yaml"
    partial.write_text("experiment: minimal\ngrid: {methods: [dgl]}\n")
    cli = [grid.job_config(config.load(partial), key) for key in grid.runs(config.load(partial))]
    assert len(cli) == 1 and cli[0]["train"]["epochs"] == 5  # the schema's 5, not config.yaml's 2
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for cwd, path in ((tmp_path, "partial.yaml"), (elsewhere, str(partial))):
        assert planned_jobs(cwd, "--configfile", path) == cli
    # no --configfile: the default experiment, from any folder
    default = config.load(REPO / "config/config.yaml")
    jobs = planned_jobs(elsewhere)
    assert sorted(j["run"]["variant"] + j["run"]["method"] + j["run"]["mode"] + str(j["run"]["seed"]) for j in jobs) == sorted(
        k.variant + k.method + k.mode + str(k.seed) for k in grid.runs(default))
    assert {j["experiment"] for j in jobs} == {default["experiment"]} and {j["train"]["epochs"] for j in jobs} == {2}


def test_a_config_file_that_is_not_yaml_names_its_line(tmp_path):
    (tmp_path / "c.yaml").write_text("experiment: x\ngrid:\n  methods: [dgl\n  K: [2]\n")
    result = subprocess.run([sys.executable, "-m", "decoupled", "train", "--config", "c.yaml", "--method", "dgl", "--K", "2", "--seed", "0",
                             "--data", "x.pt", "--out", "run"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("decoupled: error: config file c.yaml:4:4: not valid YAML: expected ',' or ']', but got ':'"), line
