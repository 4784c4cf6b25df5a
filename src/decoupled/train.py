"""One training job: build the net, the method and the engine from a job config and run epochs.

``fit`` is the loop (usable from tests and notebooks, no tracking); ``run_job`` wraps it with
the job's outputs (checkpoint, metrics, resolved config) and its MLflow child run.

Resuming: at its start and after every epoch a job writes ``resume.pt`` in its run directory:
everything needed to continue exactly (the network with its aux heads, every optimizer,
scheduler and synthesizer, replay buffers and gradients in flight, the data order and RNG
states, step counters, the epochs so far and the MLflow run id). It is not one of the job's
outputs, so Snakemake keeps it when it removes a failed job's outputs; a rerun of the same
job continues from it, into the same MLflow run, and computes what an uninterrupted run
computes. SIGTERM (a SLURM preemption) stops the job with exit status 75 (EX_TEMPFAIL: try
again) so that it can be requeued: the simulated engines finish the step at hand and write a
checkpoint of the epoch's progress too (a rerun goes on from that step); elsewhere (the
distributed engine, evaluation) the job stops at once and the last epoch's checkpoint stays.
On success the last ``resume.pt`` becomes ``checkpoint.pt``.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from decoupled import engines, methods, model, progress
from decoupled.data import Dataset, load_prepared
from decoupled.engines.base import EpochInterrupted, StopRequest
from decoupled.errors import UserError
from decoupled.files import save_torch, write_json
from decoupled.grid import RunKey

OUTPUTS = ("checkpoint.pt", "metrics.json", "config.json")
RESUME_FILE = "resume.pt"


class TrainingDiverged(UserError):
    """The loss became NaN or infinite: a setting (usually the learning rate) does not suit the job."""


class Terminated(UserError):
    """SIGTERM (a scheduler's preemption, torchrun stopping the other workers when one fails, kill)."""

    exit_code = 75  # EX_TEMPFAIL: the job may be run again, and then resumes


def run_key(job: dict) -> RunKey:
    return RunKey.of(job["run"])


def run_settings(job: dict) -> dict:
    """The swept settings of a job, null where they do not apply (the report plots against them)."""
    asynchronous = job["run"]["mode"] == "async"
    traits = methods.traits(job["run"]["method"])
    return {
        **{name: job["async"][name] if asynchronous else None for name in ("slowdown_factor", "slowed_module", "buffer_size", "schedule", "budget")},
        "beta": job["train"]["beta"] if traits.sweeps_beta else None,
        "gradient_delay": job["train"]["gradient_delay"] if traits.gradient_delay is not None and not asynchronous else None,
    }


def build(job: dict, data: Dataset, split: dict | None = None):
    """The job's network (drawn from its seed), method and engine, and its split: ``counts``
    (layers per module) and, for a measured balanced split, what the choice rests on.
    A ``split`` given (a resumed job's) is used as it is rather than measured again.

    With the distributed engine this process first joins the other workers (one per module).
    """
    key = run_key(job)
    train_cfg = job["train"]
    steps_per_epoch = check_fits(job, data)
    engine_class = engines.of(job).engine_class(key.mode)
    device = engine_class.setup(job)  # with several processes, this one first joins the others
    counts, split_info = (split["counts"], split) if split is not None else _split(job, data, key.K, engine_class)
    torch.manual_seed(key.seed)
    net = model.build(job["model"], key.K, data.in_channels, data.num_classes, counts).to(device)
    method = methods.get(key.method)(net, train_cfg, train_cfg["epochs"] * steps_per_epoch)
    # the job was checked by decoupled.grid (e.g. that a slowed module exists)
    engine = engine_class.for_job(method, data, job, device)
    return net, method, engine, {"counts": counts, **(split_info or {})}


def check_fits(job: dict, data: Dataset) -> int:
    """The job's steps per epoch on ``data``; a UserError if not one batch fits."""
    batch_size = job["train"]["batch_size"]
    if len(data.train_x) < batch_size:
        raise UserError(f"config key 'train.batch_size': {batch_size} exceeds the {len(data.train_x)} training images")
    return len(data.train_x) // batch_size


def _split(job: dict, data: Dataset, K: int, engine_class) -> tuple[list[int], dict | None]:
    """Layers per module (``model.split``). A balanced split is measured; with several
    processes, one measures it and the others take its choice, so that all build the same network."""
    from decoupled.profile import resolve_split

    def resolve():
        return resolve_split(job["model"], K, data.in_channels, data.train_x.shape[-1], data.num_classes, job["train"]["batch_size"])

    return resolve() if job["model"]["split"] != "balanced" else engine_class.agreed(resolve)


def fit(job: dict, data: Dataset, checkpoint: Callable[[dict], None] | None = None, resume: dict | None = None,
        stop: StopRequest | None = None) -> dict:
    """Train for ``train.epochs`` and return the metrics.

    ``checkpoint(state)`` is called before the first epoch and after each one, with everything
    a resumed job needs (``state["epochs"]`` holds the epoch records so far); ``resume`` is
    such a state, to continue from. Once ``stop`` is set, training ends with ``Terminated``
    after a last checkpoint: between two steps (simulated engines) or after the epoch.
    With the distributed engine every worker calls this; they return the same metrics, and
    ``checkpoint`` is called on every worker (collecting the state takes all of them).
    """
    torch.set_num_threads(job["train"]["threads"])
    key = run_key(job)
    net, method, engine, split = build(job, data, resume["split_info"] if resume else None)
    epochs, wall = [], 0.0
    if resume is not None:
        net.load_state_dict(resume["net"])
        engine.load_checkpoint_state(resume)
        torch.set_rng_state(resume["torch_rng"])
        epochs, wall = list(resume["epochs"]), resume["wall_time_s"]
    engine.stop = stop
    if engine.is_main:
        _print_split(key, split)
        if resume is not None:
            where = f"inside epoch {resume['epoch'] + 1}" if resume.get("stopped_inside_epoch") else f"after epoch {resume['epoch']}"
            print(f"{progress.stamp()} [{key.name}] resuming {where}/{job['train']['epochs']} from its checkpoint", file=sys.stderr, flush=True)

    def save(epoch: int, inside_next: bool = False) -> None:
        """Checkpoint after ``epoch`` epochs (and, ``inside_next``, part of the next one)."""
        if checkpoint is not None:
            state = engine.checkpoint_state()  # collective under the distributed engine
            checkpoint({"net": net.state_dict(), **state, "split": split["counts"], "split_info": split, "epoch": epoch,
                        "stopped_inside_epoch": inside_next, "epochs": list(epochs), "wall_time_s": wall, "torch_rng": torch.get_rng_state()})

    if resume is None:
        save(0)  # so that a job stopped in its first epoch, too, resumes into its MLflow run
    bar_stream = progress.terminal() if engine.is_main else None
    for epoch in range(len(epochs) + 1, job["train"]["epochs"] + 1):
        engine.progress = progress.EpochBar(key.name, epoch, job["train"]["epochs"], engine.steps_per_epoch, bar_stream) if bar_stream else None
        try:
            stats = engine.run_epoch()
        except EpochInterrupted as where:
            save(epoch - 1, inside_next=True)  # the engine's state holds the epoch's progress
            raise Terminated(f"stopped by SIGTERM at {where} of epoch {epoch}") from None
        finally:
            if engine.progress is not None:
                engine.progress.close()
        wall += stats["seconds"]
        losses = stats["train_loss_per_module"]
        train_loss = losses[-1]  # None: the last module made no step (async: it was done early)
        # any module's: a lower one can diverge while the last still learns (DNI's, from its synthesizer)
        diverged = [k for k, loss in enumerate(losses) if loss is not None and not math.isfinite(loss)]
        if diverged:
            k = diverged[0]
            which = "training loss" if k == len(losses) - 1 else f"module {k}'s training loss"
            raise TrainingDiverged(f"{key.name}: {which} is {losses[k]} at epoch {epoch} ({method.divergence_hint(losses)})")
        ev = engine.evaluate(net, data.test_x, data.test_y, job["train"]["eval_batch_size"])
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_loss_per_module": losses,
            "test_acc": ev["test_acc"],
            "test_acc_per_module": ev["test_acc_per_module"],
            "epoch_time_s": stats["seconds"],
            "wall_time_s": wall,
            "images_per_s": stats["images"] / stats["seconds"],
            # async and distributed engines add per-worker steps, idle time, staleness, ...
            **{k: v for k, v in stats.items() if k not in ("train_loss_per_module", "images", "seconds")},
        }
        epochs.append(record)
        save(epoch)  # before the progress line, which thus means: this epoch is safe
        if engine.is_main:
            print(progress.epoch_line(key.name, job["train"]["epochs"], record), file=sys.stderr, flush=True)
        if stop is not None and stop.is_set():  # asked after the last step had looked
            raise Terminated(f"stopped by SIGTERM after epoch {epoch}")
    engine.close()
    return {
        **{k: job["run"][k] for k in ("method", "mode", "K", "variant", "seed")},
        "varied": job["run"].get("varied", []),
        "settings": run_settings(job),
        "engine": job["engine"],
        "split": split,
        "dataset": data.name,
        "epochs": epochs,
        "train_time_s": wall,
    }


def _print_split(key: RunKey, split: dict) -> None:
    line = f"{progress.stamp()} [{key.name}] layers per module {split['counts']}"
    if "stage_s" in split:
        stages = ", ".join(f"{1000 * s:.1f}" for s in split["stage_s"])
        line += f" (balanced: predicted stage costs {stages} ms, imbalance {split['imbalance']:.2f}; even split {split['even_imbalance']:.2f})"
    print(line, file=sys.stderr, flush=True)


def epoch_metrics(record: dict) -> dict[str, float]:
    """The flat per-epoch metrics logged to MLflow (step = epoch)."""
    flat = {k: record[k] for k in ("train_loss", "test_acc", "epoch_time_s", "wall_time_s", "images_per_s", "sim_time_s") if record.get(k) is not None}
    for k, loss in enumerate(record["train_loss_per_module"]):
        if loss is not None:
            flat[f"train_loss_m{k}"] = loss
    for k, acc in enumerate(record["test_acc_per_module"]):
        flat[f"test_acc_m{k}"] = acc
    for name, short in PER_WORKER_METRICS.items():
        for k, value in enumerate(record.get(name, [])):
            flat[f"{short}_m{k}"] = value
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


def run_job(job: dict, data_path: str | Path, out_dir: str | Path, experiment: dict | None, tags: dict[str, str]) -> dict:
    """Train one job into ``out_dir`` and its MLflow child run, resuming from ``resume.pt`` if a
    previous attempt left one; on failure leave no output and no RUNNING run."""
    from decoupled.config import flatten
    from decoupled.tracking import RUN_DIR_TAG, ChildRun, fail_orphans

    out_dir = Path(out_dir)
    key = run_key(job)
    data = load_prepared(data_path)  # input problems surface before any run or file exists
    check_fits(job, data)
    abandoned: list[str] = []
    resume = load_resume(out_dir, job, abandoned)
    if not engines.of(job).is_main_process():
        # another process of the job (a distributed worker k > 0): it trains its module; the
        # main one logs, checkpoints and writes the outputs
        return fit(job, data, checkpoint=lambda state: None, resume=resume)
    if experiment is None:
        from decoupled.tracking import init_experiment

        experiment = init_experiment(job)
    for run_id in abandoned:  # its run would stay RUNNING for ever
        ChildRun.abandon(experiment, run_id, f"abandoned: {key.name} was run again with another configuration, in a new run")
    run = ChildRun.reopen(experiment, resume["mlflow_run_id"], resume["epoch"]) if resume is not None else None
    # an attempt that died before it could close its run or write resume.pt (a full disk, say)
    fail_orphans(experiment, out_dir, f"abandoned: the process training {out_dir} ended without closing this run; a later attempt did not resume it",
                 keep=run.run_id if run is not None else None)
    if run is None:
        run_tags = {"method": key.method, "mode": key.mode, "K": str(key.K), "variant": key.variant, "seed": str(key.seed), "dataset": data.name,
                    RUN_DIR_TAG: str(out_dir.resolve()), **tags}
        run = ChildRun.start(experiment, key.run_name, flatten(job), run_tags)
    else:  # epochs the killed attempt finished but had not logged yet
        logged = run.logged_steps("test_acc")
        for record in resume["epochs"]:
            if record["epoch"] not in logged:
                run.log_metrics(epoch_metrics(record), step=record["epoch"])
    resume_path = out_dir / RESUME_FILE
    logged_through = resume["epoch"] if resume is not None else 0

    def checkpoint(state: dict) -> None:
        nonlocal logged_through
        # saved before it is logged: a job killed in between logs the epoch when it resumes
        save_torch({**state, "job": job, "mlflow_run_id": run.run_id}, resume_path)
        if state["epochs"] and state["epochs"][-1]["epoch"] > logged_through:
            logged_through = state["epochs"][-1]["epoch"]
            run.log_metrics(epoch_metrics(state["epochs"][-1]), step=logged_through)

    # SIGTERM: inside an engine's step loop, a request to stop after the step at hand (with a
    # checkpoint); anywhere else, at once. Either way the clean-up below runs.
    stop = StopRequest()

    def on_sigterm(signum, frame):
        if stop.between_steps:
            stop.set()
        else:
            raise Terminated("stopped by SIGTERM")

    previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        started = time.time()
        metrics = fit(job, data, checkpoint, resume, stop)
        metrics.update(mlflow_run_id=run.run_id, started_at=started)
        write_json(out_dir / "config.json", job)
        write_json(out_dir / "metrics.json", metrics)
        final = {"train_time_s": metrics["train_time_s"]}
        if "imbalance" in metrics["split"]:  # a measured (balanced) split: how even it promised to be
            final["split_predicted_imbalance"] = metrics["split"]["imbalance"]
        run.log_metrics(final, step=job["train"]["epochs"])
        run.set_tag("split", "-".join(map(str, metrics["split"]["counts"])))
        run.log_artifact(out_dir / "metrics.json")
        run.log_artifact(out_dir / "config.json")
        run.finish()
        os.replace(resume_path, out_dir / "checkpoint.pt")
    except BaseException as e:
        # A second SIGTERM (torchrun stopping the workers after a peer died) must not cut the
        # clean-up short and leave the run RUNNING.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for name in OUTPUTS:
            (out_dir / name).unlink(missing_ok=True)
        if isinstance(e, TrainingDiverged):  # the same job would diverge again from it
            resume_path.unlink(missing_ok=True)
        elif isinstance(e, Terminated) and resume_path.exists():
            e.args = (f"{key.name}: {e}; a rerun resumes from {resume_path}",)
        run.fail("interrupted (Ctrl-C)" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    return metrics


def load_resume(out_dir: Path, job: dict, abandoned: list[str] | None = None) -> dict | None:
    """The state a previous attempt of this very job left in ``out_dir``, or None to start afresh.
    The MLflow run of an attempt that was another configuration of the job goes in ``abandoned``."""
    path = out_dir / RESUME_FILE
    if not path.is_file():
        return None
    name = run_key(job).name
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:  # written atomically, so only a foreign or damaged file gets here
        print(f"[{name}] ignoring {path} ({type(e).__name__}): starting afresh", file=sys.stderr, flush=True)
        return None
    if state.get("job") != job:
        if abandoned is not None and state.get("mlflow_run_id"):
            abandoned.append(state["mlflow_run_id"])
        print(f"[{name}] ignoring {path}: it was written for another configuration of this job; starting afresh", file=sys.stderr, flush=True)
        return None
    return state


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}") from None
