"""The distributed engine: real worker processes (gloo on CPU) launched by torchrun from the CLI."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, free_port, needs_fashion_mnist

from decoupled import grid
from decoupled.errors import UserError

BASE = {
    "experiment": "distributed-test",
    "engine": "distributed",
    "model": {"widths": [8, 16], "aux_hidden": 32},
    "train": {"epochs": 2, "batch_size": 50, "lr": 0.05},
    "distributed": {"timeout_s": 30},
    "async": {"buffer_size": 4},
}


def config(method, mode, K=2, **sections):
    cfg = json.loads(json.dumps(BASE))
    if K == 3:
        cfg["model"]["widths"] = [8, 16, 16]
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    cfg["grid"] = {"methods": [method], "modes": [mode], "K": [K], "seeds": [0]}
    return cfg


def launch(tmp_path, cfg, data, out="run"):
    """`decoupled train` as a user types it; with engine distributed it starts torchrun itself."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    method, mode, K = cfg["grid"]["methods"][0], cfg["grid"]["modes"][0], cfg["grid"]["K"][0]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "PYTHONPATH": str(REPO / "src")}
    command = [sys.executable, "-m", "decoupled", "train", "--config", str(path), "--method", method, "--mode", mode, "--K", str(K), "--seed", "0", "--data", str(data), "--out", str(tmp_path / out)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def train(tmp_path, cfg, data):
    proc = launch(tmp_path, cfg, data)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    return json.loads((tmp_path / "run" / "metrics.json").read_text()), output


def simulated(cfg, data_path):
    from decoupled.data import load_prepared
    from decoupled.train import fit

    cfg = {**cfg, "engine": "simulated"}
    (key,) = grid.runs(cfg)
    return fit(grid.job_config(cfg, key), load_prepared(data_path))


# FDG in bf16 autocast and channels_last (train.precision, train.memory_format): the workers
# send each other bf16 activations and gradients, half the bytes
@pytest.mark.parametrize("method, numerics", [("dgl", {}), ("dni", {"synth_last_block": True}), ("cdni", {"synth_last_block": True}),
                                              ("dni", {"synth_last_block": False}), ("ddg", {}),
                                              ("fdg", {"precision": "bf16", "memory_format": "channels_last"})])
def test_sync_workers_compute_what_the_simulator_computes(tmp_path, fashion_subset, method, numerics):
    """K = 3: the middle worker relays gradients (DDG, FDG) and sends its own (DNI, cDNI); with
    train.synth_last_block the last worker fits the synthesizer below its classifier."""
    cfg = config(method, "sync", K=3, train=numerics)
    metrics, output = train(tmp_path, cfg, fashion_subset)
    reference = simulated(cfg, fashion_subset)
    assert metrics["engine"] == "distributed"
    for ours, theirs in zip(metrics["epochs"], reference["epochs"], strict=True):
        assert ours["train_loss_per_module"] == pytest.approx(theirs["train_loss_per_module"], rel=1e-6)
        assert ours["test_acc_per_module"] == pytest.approx(theirs["test_acc_per_module"], abs=1e-9)
    last = metrics["epochs"][-1]
    steps = 2000 // 50
    assert last["steps_per_module"] == [steps] * 3
    assert all(s > 0 for s in last["idle_s_per_module"][1:])  # each waits for its first input at least
    # each worker bound to a core of its own (distributed.pin_cores, on by default), when all fit
    cores = last["cores_per_module"]
    if len(os.sched_getaffinity(0)) >= 3:
        assert [len(c) for c in cores] == [1, 1, 1] and len({c[0] for c in cores}) == 3
    # module 0 sends activations and labels; the others send gradients back unless DGL
    size = 2 if numerics.get("precision") == "bf16" else 4  # bytes per activation
    activations, labels = 50 * 8 * 14 * 14 * size, 50 * 8  # bytes per batch, headers aside
    assert steps * (activations + labels) <= last["bytes_sent_per_module"][0] <= steps * (activations + labels + 64)
    gradients = 50 * 8 * 14 * 14 * size  # module 1's gradient for module 0's output
    assert (last["bytes_sent_per_module"][1] >= steps * gradients) == (method != "dgl")
    assert "epoch 2/2" in output


def test_quantized_workers_send_codes_and_compute_what_the_simulator_computes(tmp_path, fashion_subset):
    """model.quantize bits 4, dim 4: each boundary sends 4 bits per 4 activations (and the
    codebook, labels and a header per batch), 1/32 of the floats, and the next worker trains on
    what the codes and codebook rebuild: the simulator's numbers, to the last digit."""
    cfg = config("dgl", "sync", K=3, model={"quantize": {"bits": 4, "dim": 4}})
    metrics, _ = train(tmp_path, cfg, fashion_subset)
    reference = simulated(cfg, fashion_subset)
    for ours, theirs in zip(metrics["epochs"], reference["epochs"], strict=True):
        assert ours["train_loss_per_module"] == pytest.approx(theirs["train_loss_per_module"], rel=1e-6)
        assert ours["test_acc_per_module"] == pytest.approx(theirs["test_acc_per_module"], abs=1e-9)
        assert ours["vq_recon_error_per_boundary"] == pytest.approx(theirs["vq_recon_error_per_boundary"], rel=1e-6)
        assert ours["vq_perplexity_per_boundary"] == pytest.approx(theirs["vq_perplexity_per_boundary"], rel=1e-6)
    last = metrics["epochs"][-1]
    fp32 = [8 * 14 * 14 * 4, 16 * 7 * 7 * 4]  # bytes per image of each boundary's activations as floats
    labels = 8  # bytes per image, sent with the activations either way
    for sent, floats in zip(last["bytes_sent_per_module"][:2], fp32):
        assert sent / 2000 - labels == pytest.approx(floats / 32, rel=0.10)  # codebook and header: the rest
    assert last["bytes_per_image"] == pytest.approx(reference["epochs"][-1]["bytes_per_image"], rel=0.01)
    assert 0 < last["vq_recon_error_per_boundary"][0] < 1 and 1 < last["vq_perplexity_per_boundary"][0] <= 16


def test_neuron_groups_run_as_workers_of_their_own_and_compute_what_the_simulator_computes(tmp_path, fashion_subset):
    """GN-DGL, K = 2 modules x G = 2 groups: 4 workers, each training its group's branch and
    head; a module's groups exchange outputs and logits, the next module's gather the groups'
    channels. The same numbers as the simulator's single process."""
    cfg = config("gn_dgl", "sync", K=2, model={"groups": 2, "eval_ensemble": "layerwise"})
    metrics, output = train(tmp_path, cfg, fashion_subset)
    reference = simulated(cfg, fashion_subset)
    for ours, theirs in zip(metrics["epochs"], reference["epochs"], strict=True):
        assert ours["train_loss_per_module"] == pytest.approx(theirs["train_loss_per_module"], rel=1e-5)
        assert ours["test_acc_per_module"] == pytest.approx(theirs["test_acc_per_module"], abs=1e-9)
        # the GN-DGL code's layerwise ensemble, gathered from the workers' shares of the test set
        assert ours["test_acc"] == pytest.approx(theirs["test_acc"], abs=1e-9)
        assert ours["test_acc_classifier"] == ours["test_acc_per_module"][-1] != ours["test_acc"]
    last = metrics["epochs"][-1]
    assert last["steps_per_module"] == [2000 // 50] * 2
    assert metrics["compute"]["workers"] == 4 and len(metrics["compute"]["macs_per_worker"]) == 4
    # each group of module 0 sends its 4 of 8 channels to both groups of module 1, and its
    # outputs and logits to the other group of its module
    own_channels, logits = 50 * 4 * 14 * 14 * 4, 50 * 10 * 4
    assert last["bytes_sent_per_module"][0] >= 40 * (2 * 2 * own_channels + 2 * (own_channels + logits))
    assert "epoch 2/2" in output


def test_async_dgl_workers_make_equal_updates_and_the_slowed_one_finishes_last(tmp_path, fashion_subset):
    """async.budget updates (the default): every worker makes an epoch's steps per epoch, the
    slowed middle one at a third of the pace, so it finishes last; its neighbours go on
    meanwhile (module 0 forwards for it, module 2 replays)."""
    cfg = config("dgl", "async", K=3, **{"async": {"slowdown_factor": 3, "slowed_module": 1}})
    metrics, _ = train(tmp_path, cfg, fashion_subset)
    steps = 2000 // 50
    assert all(e["steps_per_module"] == [steps] * 3 for e in metrics["epochs"])
    finish = metrics["epochs"][-1]["finish_time_s_per_module"]
    assert finish[1] > finish[0] and finish[1] > finish[2]
    staleness = metrics["epochs"][-1]["input_staleness"]  # of the whole run so far
    assert staleness[2]["max"] >= 1  # module 2 trained ahead on replays
    # every input a worker learned from counted once (forwards without learning not at all)
    assert [sum(s["histogram"].values()) for s in staleness[1:]] == [steps * len(metrics["epochs"])] * 2
    first, last = (metrics["epochs"][i]["train_loss_per_module"] for i in (0, -1))
    assert all(b < a for a, b in zip(first, last))  # every module learned in its second epoch


@pytest.mark.parametrize("method", ["dgl", "dni"])
def test_async_workers_under_the_time_budget_learn_at_their_own_pace(tmp_path, fashion_subset, method):
    cfg = config(method, "async", **{"async": {"slowdown_factor": 3, "slowed_module": 0, "budget": "time"}})
    metrics, _ = train(tmp_path, cfg, fashion_subset)
    last = metrics["epochs"][-1]
    steps_below, steps_above = last["steps_per_module"]
    assert steps_below == 2000 // 50  # the epoch is the slowed module 0's pass over the data
    if method == "dgl":  # the upper worker keeps training on its replay buffer while module 0 is slow
        assert steps_above > steps_below
        assert last["input_staleness"][1]["max"] >= 1
        assert sum(last["input_staleness"][1]["histogram"].values()) == sum(e["steps_per_module"][1] for e in metrics["epochs"])
    else:  # each activation once, and a true gradient back for each
        assert steps_above == steps_below
        assert last["grad_staleness"][0]["mean"] is not None


def test_two_launchers_meeting_at_a_rendezvous_train_what_one_launcher_trains(tmp_path, fashion_subset):
    """The multi-node recipe of docs/cluster.md on one machine: two torchrun launchers, one
    worker each, meet at a c10d rendezvous on localhost (as srun starts one per node) and train
    the DGL job that a single launcher trains, to the same numbers."""
    cfg = config("dgl", "sync", distributed={"pin_cores": False})  # the two "nodes" share these cores
    (key,) = grid.runs(cfg)
    job = json.dumps(grid.job_config(cfg, key))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "PYTHONPATH": str(REPO / "src")}
    train_args = ["-m", "decoupled", "train", "--job-json", job, "--data", str(fashion_subset)]

    single = subprocess.run([sys.executable, *train_args, "--out", str(tmp_path / "single")], env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-2000:]

    rendezvous = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{free_port()}", "--rdzv-id=two-launchers"]
    launchers = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *rendezvous, *train_args, "--out", str(tmp_path / "nodes")],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [launcher.communicate(timeout=300)[0] for launcher in launchers]
    assert [launcher.returncode for launcher in launchers] == [0, 0], "\n".join(o[-2000:] for o in outputs)

    ours, theirs = (json.loads((tmp_path / out / "metrics.json").read_text()) for out in ("nodes", "single"))
    assert ours["engine"] == "distributed" and len(ours["epochs"]) == 2
    for a, b in zip(ours["epochs"], theirs["epochs"], strict=True):
        assert a["train_loss_per_module"] == pytest.approx(b["train_loss_per_module"], rel=1e-6)
        assert a["test_acc_per_module"] == b["test_acc_per_module"]
        assert a["steps_per_module"] == b["steps_per_module"] == [2000 // 50] * 2
    assert sum("epoch 2/2" in output for output in outputs) == 1  # the rank-0 worker reports, wherever it ran


def worker_pid(out_dir: Path, rank: int) -> int | None:
    """The pid of the worker process with this rank, among those whose command line names out_dir."""
    for proc in Path("/proc").iterdir():
        try:
            if str(out_dir) in (proc / "cmdline").read_text() and f"RANK={rank}\0" in (proc / "environ").read_text():
                return int(proc.name)
        except (OSError, ValueError):
            continue
    return None


def start_and_wait_for_epoch_1(tmp_path, data, **distributed):
    cfg = config("dgl", "sync", train={"epochs": 200}, distributed=distributed)
    proc = launch(tmp_path, cfg, data)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "epoch 1/200" in line:
            return proc, lines
    pytest.fail("".join(lines)[-3000:])


def finish(proc, lines, limit_s):
    start = time.monotonic()
    output, _ = proc.communicate(timeout=limit_s)
    return proc.returncode, "".join(lines) + output, time.monotonic() - start


def assert_failed_cleanly(tmp_path, code, output):
    from mlflow.tracking import MlflowClient

    assert code != 0
    assert "decoupled: error: distributed job dgl-sync-K2-seed0 failed" in output
    assert not (tmp_path / "run" / "metrics.json").exists() and not (tmp_path / "run" / "checkpoint.pt").exists()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("distributed-test").experiment_id], "tags.`decoupled.role` = 'child'")
    assert [r.info.status for r in runs] == ["FAILED"]


def test_a_killed_worker_ends_the_job_with_an_error(tmp_path, fashion_subset):
    proc, lines = start_and_wait_for_epoch_1(tmp_path, fashion_subset)
    os.kill(worker_pid(tmp_path / "run", 1), signal.SIGKILL)
    code, output, seconds = finish(proc, lines, 120)
    assert seconds < 60
    assert_failed_cleanly(tmp_path, code, output)


def test_a_terminated_sync_ddg_job_resumes_with_the_uninterrupted_numbers(tmp_path, fashion_subset):
    # DDG: at the end of an epoch delayed gradients are still on their way down; the
    # checkpoint holds them, and the resumed workers apply them when they fall due
    cfg = config("ddg", "sync", train={"epochs": 3})
    proc = launch(tmp_path, cfg, fashion_subset)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "epoch 1/3" in line:
            proc.send_signal(signal.SIGTERM)  # the launcher hands it to torchrun, torchrun to the workers
            break
    code, output, _ = finish(proc, lines, 120)
    assert code == 75 and "stopped by SIGTERM; a rerun resumes" in output, output[-3000:]
    assert (tmp_path / "run" / "resume.pt").exists() and not (tmp_path / "run" / "metrics.json").exists()
    metrics, output = train(tmp_path, cfg, fashion_subset)
    assert "resuming after epoch" in output
    reference = simulated(cfg, fashion_subset)
    for ours, theirs in zip(metrics["epochs"], reference["epochs"], strict=True):
        assert ours["train_loss_per_module"] == pytest.approx(theirs["train_loss_per_module"], rel=1e-6)
        assert ours["test_acc_per_module"] == pytest.approx(theirs["test_acc_per_module"], abs=1e-9)
    assert metrics["epochs"][-1]["bytes_sent_per_module"][1] > 0  # module 1 sends its gradients back


def test_a_hung_worker_ends_the_job_after_the_timeout(tmp_path, fashion_subset):
    proc, lines = start_and_wait_for_epoch_1(tmp_path, fashion_subset, timeout_s=5)
    hung = worker_pid(tmp_path / "run", 1)
    os.kill(hung, signal.SIGSTOP)
    try:
        code, output, seconds = finish(proc, lines, 120)
    finally:
        if worker_pid(tmp_path / "run", 1):
            os.kill(hung, signal.SIGKILL)
    assert seconds < 90  # the timeout, then torchrun's 30 s grace before it kills the stopped worker
    # worker 0 names the peer that stopped answering, or the collective it hung in
    assert re.search(r"decoupled: error: .*(module 0 -> 1: worker 1 (sent nothing for 5 s|stopped receiving)|a worker did not answer within 5 s)", output)
    assert_failed_cleanly(tmp_path, code, output)


def test_workers_keep_cores_of_their_own_only_when_all_fit():
    from decoupled.engines.distributed import worker_cores

    # a SLURM allocation of CPUs 4-7: worker 1 of 2, 2 threads each, takes the second pair
    assert worker_cores([4, 5, 6, 7], local_rank=1, local_world=2, threads=2) == [6, 7]
    assert worker_cores([0, 1], local_rank=0, local_world=2, threads=1) == [0]
    assert worker_cores([0, 1], local_rank=1, local_world=3, threads=1) is None  # 3 workers on 2 cores share
    assert worker_cores([0, 1, 2, 3], local_rank=0, local_world=2, threads=3) is None


def test_pinning_can_be_turned_off(tmp_path, fashion_subset):
    cfg = config("dgl", "sync", distributed={"pin_cores": False}, train={"epochs": 1})
    metrics, _ = train(tmp_path, cfg, fashion_subset)
    allowed = sorted(os.sched_getaffinity(0))
    assert metrics["epochs"][-1]["cores_per_module"] == [allowed, allowed]


def test_backprop_has_no_distributed_form_unless_overridden():
    cfg = config("backprop", "sync")
    with pytest.raises(UserError, match="config key 'engine': method 'backprop' has no distributed form"):
        grid.runs(cfg)
    cfg["overrides"] = {"backprop": {"engine": "simulated"}}
    (key,) = grid.runs(cfg)
    assert grid.job_config(cfg, key)["engine"] == "simulated"


def test_a_job_outside_torchrun_is_refused(fashion_subset):
    from decoupled.data import load_prepared
    from decoupled.train import fit

    key = grid.RunKey("dgl", "sync", 2, 0)
    job = grid.job_config(config("dgl", "sync"), key)
    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}
    try:
        with pytest.raises(UserError, match="launch with torchrun"):
            fit(job, load_prepared(fashion_subset))
    finally:
        os.environ.update(env)


@needs_fashion_mnist
def test_the_workflow_launches_distributed_jobs_with_torchrun(tmp_path):
    from test_workflow import copy_repo, snakemake

    workdir = copy_repo(tmp_path / "repo")
    cfg = yaml.safe_load((REPO / "config/smoke.yaml").read_text())
    cfg.update(experiment="distributed-workflow", engine="distributed")
    cfg["train"]["epochs"] = 2
    cfg["grid"] = {"methods": ["backprop", "dgl"], "modes": ["sync"], "K": [2], "seeds": [0]}
    cfg["overrides"] = {"backprop": {"engine": "simulated"}}
    cfg["report"]["claims"] = []  # about methods this grid leaves out
    config_path = workdir / "config" / "distributed.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    dry = snakemake(workdir, "--dry-run", "--printshellcmds", configfile=config_path)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "torchrun --standalone --nnodes=1 --nproc-per-node=2 -m decoupled train" in dry.stdout
    assert "python -m decoupled train" in dry.stdout  # backprop stays in one process
    result = snakemake(workdir, configfile=config_path)
    assert result.returncode == 0, result.stderr[-4000:]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir}/results/mlflow/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("distributed-workflow").experiment_id], "tags.`decoupled.role` = 'child'")
    by_method = {r.data.tags["method"]: r for r in runs}
    assert sorted(by_method) == ["backprop", "dgl"] and all(r.info.status == "FINISHED" for r in runs)
    dgl = by_method["dgl"]
    assert dgl.data.params["engine"] == "distributed" and dgl.data.tags["split"] == "1-1"
    assert {"workers/busy_frac_m0", "workers/busy_frac_m1", "workers/queue_depth_m1", "comm/bytes_sent_m0", "final/test_acc"} <= set(dgl.data.metrics)
    metrics = json.loads((workdir / "results/runs/dgl/sync/K2/default/seed0/metrics.json").read_text())
    assert metrics["engine"] == "distributed" and metrics["epochs"][-1]["test_acc"] > 0.2  # chance: 0.1
    assert "Nothing to be done" in (lambda r: r.stdout + r.stderr)(snakemake(workdir, configfile=config_path))
