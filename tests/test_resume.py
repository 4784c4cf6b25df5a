"""Checkpoint and resume: a job killed (SIGKILL) or preempted (SIGTERM) and run again computes
what an uninterrupted run computes, in the same MLflow run."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, needs_fashion_mnist

from decoupled import config, grid
from decoupled.data import load_prepared
from decoupled.engines.base import StopRequest
from decoupled.resume import RESUME_FILE, Terminated, load_resume
from decoupled.train import fit


def job(method, mode="sync", epochs=3, widths=(8, 16), budget="updates", K=2, model=None, train=None):
    cfg = config.validate(
        {
            "experiment": "resume-test",
            "model": {"widths": list(widths), "aux_hidden": 32, **(model or {})},
            "train": {"epochs": epochs, "batch_size": 50, "lr": 0.05, **(train or {})},
            "async": {"buffer_size": 4, "budget": budget},
            "grid": {"methods": [method], "K": [K], "modes": [mode], "seeds": [0],
                     "slowdown": [{"factor": 2, "module": 1}] if mode == "async" else [{"factor": 1}]},
        }
    )
    return grid.job_config(cfg, grid.runs(cfg)[0])


def numbers(metrics):
    """Everything in the epoch records but the clock."""
    return [{k: v for k, v in e.items() if "time" not in k and "per_s" not in k} for e in metrics["epochs"]]


BF16 = {"precision": "bf16", "memory_format": "channels_last"}


@pytest.mark.parametrize(
    "method, mode, numerics",
    [("backprop", "sync", None), ("dgl", "sync", None), ("dgl", "async", None), ("dni", "sync", None), ("cdni", "async", None),
     ("ddg", "sync", None), ("ddg", "async", None), ("fdg", "sync", None),
     # bf16 autocast, channels_last: DNI's synthesizers and DDG's stored graphs in bf16 too
     ("dni", "sync", BF16), ("ddg", "async", BF16)],
)
def test_resuming_from_any_epoch_gives_the_uninterrupted_numbers(fashion_subset, method, mode, numerics):
    data = load_prepared(fashion_subset)
    # K = 3 where gradients travel: a middle module's stored inputs must come back needing grad
    the_job = job(method, mode, K=3, widths=(8, 16, 16), train=numerics) if method in ("ddg", "fdg", "dni") else job(method, mode, train=numerics)
    saved = {}

    def checkpoint(state):  # through bytes, as on disk, and with weights_only as train.py loads it
        buffer = io.BytesIO()
        torch.save(state, buffer)
        saved[state["epoch"]] = buffer.getvalue()

    uninterrupted = fit(the_job, data, checkpoint)
    assert sorted(saved) == [0, 1, 2, 3]
    for epoch in (1,) if method == "backprop" else (1, 2):
        state = torch.load(io.BytesIO(saved[epoch]), weights_only=True)
        resumed = fit(the_job, data, resume=state)
        assert numbers(resumed) == numbers(uninterrupted), f"resumed after epoch {epoch}"


class StopAtCheck(StopRequest):
    """A SIGTERM that arrives just before the engine's ``n``-th step (or tick) of the run."""

    def __init__(self, n):
        super().__init__()
        self.checks_left = n

    def is_set(self):
        self.checks_left -= 1
        return self.checks_left < 0


# the last: neuron groups, and a quantized boundary whose codebook, random stream and epoch tally resume too
@pytest.mark.parametrize("method, mode, budget, model", [("dgl", "sync", None, None), ("ddg", "sync", None, None), ("dni", "async", "updates", None),
                                                         ("dgl", "async", "updates", None), ("dgl", "async", "time", None),
                                                         ("gn_dgl", "async", "updates", {"groups": 2, "quantize": {"bits": 4, "dim": 4}})])
def test_a_stop_inside_an_epoch_checkpoints_that_step_and_resumes_from_it(fashion_subset, method, mode, budget, model):
    data = load_prepared(fashion_subset)
    the_job = job(method, mode, budget=budget or "updates", model=model)
    saved = []

    def checkpoint(state):
        buffer = io.BytesIO()
        torch.save(state, buffer)
        saved.append(buffer.getvalue())

    # checks: one per step (or tick) of epoch 1, one after it, then 15 into epoch 2. Epoch 1 has
    # 40 batches, in async mode as many ticks as the schedule takes: counted in the first run
    counter, checks_at_checkpoint = StopAtCheck(10**9), []
    uninterrupted = fit(the_job, data, lambda state: checks_at_checkpoint.append(10**9 - counter.checks_left), stop=counter)
    epoch_1 = checks_at_checkpoint[1]
    assert epoch_1 == 40 if mode == "sync" else epoch_1 > 40  # async: module 1 runs at half speed
    # where it stopped: the step of the epoch's 40, the tick of the epoch's (budget time) or
    # the tick alone (budget updates: an epoch lasts until its slowest module is done)
    where = {"sync": "step 15 of 40", "time": r"tick 15 of \d+", "updates": "tick 15"}[budget if mode == "async" else "sync"]
    with pytest.raises(Terminated, match=f"stopped by SIGTERM at {where} of epoch 2"):
        fit(the_job, data, checkpoint, stop=StopAtCheck(epoch_1 + 1 + 15))
    state = torch.load(io.BytesIO(saved[-1]), weights_only=True)
    assert state["epoch"] == 1 and state["stopped_inside_epoch"] and state["engine"]["partial"] is not None
    resumed = fit(the_job, data, resume=state)
    assert numbers(resumed) == numbers(uninterrupted)


def test_a_checkpoint_of_another_configuration_is_ignored(tmp_path, capsys):
    the_job = job("dgl")
    torch.save({"job": job("dgl", epochs=5), "epoch": 1}, tmp_path / RESUME_FILE)
    assert load_resume(tmp_path, the_job) is None
    assert "written for another configuration" in capsys.readouterr().err
    (tmp_path / RESUME_FILE).write_bytes(b"not a checkpoint")
    assert load_resume(tmp_path, the_job) is None


def test_any_exception_fails_the_run_removes_the_outputs_and_keeps_the_checkpoint(tmp_path, fashion_subset, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from mlflow.tracking import MlflowClient

    from decoupled.engines.simulated import SimulatedEngine
    from decoupled.job import OUTPUTS, run_job

    the_job = {**job("dgl"), "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}
    run_epoch = SimulatedEngine.run_epoch
    epochs_run = []

    def failing_in_epoch_2(self):
        epochs_run.append(1)
        if len(epochs_run) == 2:
            raise RuntimeError("a disk went away")
        return run_epoch(self)

    monkeypatch.setattr(SimulatedEngine, "run_epoch", failing_in_epoch_2)
    with pytest.raises(RuntimeError, match="a disk went away"):
        run_job(the_job, fashion_subset, tmp_path / "run", None, {})
    assert not any((tmp_path / "run" / name).exists() for name in OUTPUTS)
    assert torch.load(tmp_path / "run" / RESUME_FILE, weights_only=True)["epoch"] == 1  # a rerun goes on from there
    client = MlflowClient(the_job["tracking_uri"])
    [run] = client.search_runs([client.get_experiment_by_name("resume-test").experiment_id], "tags.`decoupled.role` = 'child'")
    assert run.info.status == "FAILED" and run.data.tags["error"] == "RuntimeError: a disk went away"


# --- the CLI, killed for real ------------------------------------------------------------------


def start(tmp_path, the_job, data, out):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "decoupled", "train", "--job-json", json.dumps(the_job), "--data", str(data),
               "--out", str(tmp_path / out), "--tracking", str(tmp_path / "tracking.json")]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_to_the_end(tmp_path, the_job, data, out):
    proc = start(tmp_path, the_job, data, out)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    return json.loads((tmp_path / out / "metrics.json").read_text()), output


def stop_during_epoch_2(tmp_path, the_job, data, out, signum):
    """Start the job, send ``signum`` once epoch 1 is done (its checkpoint is written before the
    progress line) and epoch 2 is under way, and return the exit status and output."""
    proc = start(tmp_path, the_job, data, out)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "epoch 1/" in line:
            time.sleep(0.2)  # an epoch takes about a second: this lands among its steps
            proc.send_signal(signum)
            break
    output, _ = proc.communicate(timeout=120)
    return proc.returncode, "".join(lines) + output


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from mlflow.tracking import MlflowClient

    from mlflow_check import init_tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    init_tracking(uri, tmp_path / "tracking.json", "resume-test")
    client = MlflowClient(uri)

    def child_runs():
        experiment = client.get_experiment_by_name("resume-test").experiment_id
        return client.search_runs([experiment], "tags.`decoupled.role` = 'child'")

    return client, child_runs


@needs_fashion_mnist
def test_a_killed_job_run_again_resumes_into_the_same_mlflow_run(tmp_path, fashion_subset, tracking):
    client, child_runs = tracking
    the_job = job("dgl", epochs=4, widths=(16, 32))  # epochs long enough to be killed inside one
    code, output = stop_during_epoch_2(tmp_path, the_job, fashion_subset, "run", signal.SIGKILL)
    assert code == -signal.SIGKILL, output[-3000:]
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert torch.load(tmp_path / "run" / RESUME_FILE, weights_only=True)["epoch"] in (1, 2, 3)
    [killed] = child_runs()
    assert killed.info.status == "RUNNING"  # SIGKILL: nothing could mark it

    metrics, output = run_to_the_end(tmp_path, the_job, fashion_subset, "run")
    assert "resuming after epoch" in output
    assert numbers(metrics) == numbers(fit(the_job, load_prepared(fashion_subset)))  # uninterrupted
    assert (tmp_path / "run" / RESUME_FILE).samefile(tmp_path / "run" / "checkpoint.pt")  # the final state, by two names
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["epoch"] == 4

    resumed = client.get_run(killed.info.run_id)
    assert resumed.info.status == "FINISHED" and resumed.data.tags["resumes"] == "1"
    assert metrics["mlflow_run_id"] == killed.info.run_id
    history = client.get_metric_history(killed.info.run_id, "acc/test")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]  # each epoch logged once
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [100 * e["test_acc"] for e in metrics["epochs"]]
    assert len(child_runs()) == 1  # the killed job resumed: no second run


@needs_fashion_mnist
def test_sigterm_keeps_a_checkpoint_and_asks_to_be_run_again(tmp_path, fashion_subset, tracking):
    client, child_runs = tracking
    the_job = job("ddg", epochs=3, widths=(16, 32))
    code, output = stop_during_epoch_2(tmp_path, the_job, fashion_subset, "run", signal.SIGTERM)
    assert code == 75, output[-3000:]  # EX_TEMPFAIL
    # the engine finished the step at hand and saved it: the rerun goes on from that step
    assert re.search(r"stopped by SIGTERM at step \d+ of 40 of epoch 2; a rerun resumes from .*resume.pt", output), output[-3000:]
    state = torch.load(tmp_path / "run" / RESUME_FILE, weights_only=True)
    assert state["epoch"] == 1 and state["stopped_inside_epoch"] and state["engine"]["partial"]["done"] >= 0
    assert state["mlflow_run_id"] and state["method"]["optimizers"]
    assert not any((tmp_path / "run" / name).exists() for name in ("checkpoint.pt", "metrics.json", "config.json"))
    [stopped] = child_runs()
    assert stopped.info.status == "FAILED" and "SIGTERM" in stopped.data.tags["error"]

    metrics, output = run_to_the_end(tmp_path, the_job, fashion_subset, "run")
    assert "resuming inside epoch 2/3" in output
    assert numbers(metrics) == numbers(fit(the_job, load_prepared(fashion_subset)))  # uninterrupted
    finished = client.get_run(stopped.info.run_id)
    assert finished.info.status == "FINISHED" and "error" not in finished.data.tags
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3]


@needs_fashion_mnist
def test_snakemake_reruns_a_killed_training_job_from_its_checkpoint(tmp_path, fashion_subset):
    workdir = tmp_path / "work"
    (workdir / "config").mkdir(parents=True)
    cfg = yaml.safe_load((REPO / "config/smoke.yaml").read_text())
    # epochs of a few seconds, so that the trainer is still at work when it is killed
    cfg.update(experiment="resume-smk", model={"widths": [16, 32], "aux_pool": 2, "aux_hidden": 32})
    cfg["dataset"]["subset_per_class"] = 500
    cfg["train"]["epochs"] = 4
    cfg["report"]["claims"] = []  # about methods this one-job grid leaves out
    cfg["grid"] = {"methods": ["dgl"], "modes": ["sync"], "K": [2], "seeds": [0]}
    (workdir / "config" / "resume.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # the training job alone (its evaluation and the report add nothing here)
    command = [sys.executable, "-m", "snakemake", "--cores", "2", "--directory", str(workdir), "--snakefile", str(REPO / "Snakefile"),
               "results/runs/dgl/sync/K2/default/seed0/metrics.json", "--configfile", str(workdir / "config/resume.yaml")]
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run_dir = workdir / "results/runs/dgl/sync/K2/default/seed0"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None:  # wait for epoch 1's checkpoint, then kill
        if (run_dir / RESUME_FILE).exists() and torch.load(run_dir / RESUME_FILE, weights_only=True)["epoch"] >= 1:
            break
        time.sleep(0.2)
    trainers = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _is_trainer(p, run_dir)]
    assert trainers, "the training job ended before it could be killed"
    os.kill(int(trainers[0].name), signal.SIGKILL)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode != 0
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "checkpoint.pt").exists()

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    log = (workdir / "results/logs/train/dgl_sync_K2_default_seed0.log").read_text()
    assert "resuming after epoch" in log
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3, 4]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir}/results/mlflow/mlflow.db")
    experiment = client.get_experiment_by_name("resume-smk").experiment_id
    [run] = client.search_runs([experiment], "tags.`decoupled.role` = 'child'")
    assert run.info.status == "FINISHED" and run.info.run_id == metrics["mlflow_run_id"]


def _is_trainer(proc: Path, run_dir: Path) -> bool:
    try:
        cmdline = (proc / "cmdline").read_text().split("\0")
    except OSError:
        return False
    return "decoupled" in cmdline and "train" in cmdline and str(run_dir.relative_to(run_dir.parents[6])) in " ".join(cmdline)
