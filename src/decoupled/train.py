"""The training loop: build the net, the method and the engine from a job config and run epochs.

``fit`` trains (usable from tests and notebooks, no tracking, no files); ``decoupled.job``
wraps it with the job's outputs and its MLflow run, and ``decoupled.resume`` stops and resumes it.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

import torch

from decoupled import compute, engines, methods, model, numerics, progress
from decoupled.data import Dataset
from decoupled.engines.base import EpochInterrupted, StopRequest
from decoupled.errors import UserError
from decoupled.grid import RunKey
from decoupled.resume import Terminated

class TrainingDiverged(UserError):
    """The loss became NaN or infinite: a setting (usually the learning rate) does not suit the job."""


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
        "groups": job["model"]["groups"] if "model.groups" in traits.reads else None,
        "synth_last_block": job["train"]["synth_last_block"] if "train.synth_last_block" in traits.reads else None,
        # bits per activation of a quantizer used at every boundary alike (None: floats, or mixed)
        "quantize_bits_per_activation": _bits_per_activation(job["model"]["quantize"]),
    }


def _bits_per_activation(quantize: dict | list | None) -> float | None:
    return quantize["bits"] / quantize["dim"] if isinstance(quantize, dict) else None


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
    net = numerics.place(model.build(job["model"], key.K, data.in_channels, data.num_classes, counts).to(device), train_cfg)
    method = methods.get(key.method)(net, train_cfg, train_cfg["epochs"] * steps_per_epoch)
    # the job was checked by decoupled.grid (e.g. that a slowed module exists)
    engine = engine_class.for_job(method, data, job, device)
    return net, method, engine, {"counts": counts, **(split_info or {})}


def check_fits(job: dict, data: Dataset) -> int:
    """The job's steps per epoch on ``data``; a UserError if not one batch fits."""
    batch_size = job["train"]["batch_size"]
    if data.n_train < batch_size:
        raise UserError(f"config key 'train.batch_size': {batch_size} exceeds the {data.n_train} training images")
    return data.n_train // batch_size


def _split(job: dict, data: Dataset, K: int, engine_class) -> tuple[list[int], dict | None]:
    """Layers per module (``model.split``). A balanced split is measured; with several
    processes, one measures it and the others take its choice, so that all build the same network."""
    from decoupled.profile import resolve_split

    def resolve():
        return resolve_split(job["model"], K, data.in_channels, data.image_size, data.num_classes, job["train"]["batch_size"])

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
    Everything runs in the job's numerics (``decoupled.numerics``).
    """
    torch.set_num_threads(job["train"]["threads"])
    with numerics.autocast(job["train"], job["train"]["device"]):
        return _fit(job, data, checkpoint, resume, stop)


def _fit(job: dict, data: Dataset, checkpoint, resume: dict | None, stop: StopRequest | None) -> dict:
    key = run_key(job)
    net, method, engine, split = build(job, data, resume["split_info"] if resume else None)
    epochs, wall = [], 0.0
    if resume is not None:
        net.load_state_dict(resume["net"])
        engine.load_checkpoint_state(resume)
        torch.set_rng_state(resume["torch_rng"])
        epochs, wall = list(resume["epochs"]), resume["wall_time_s"]
    engine.stop = stop
    test = data.test_set(next(net.parameters()).device, job["train"]["loader_workers"])
    counts = compute.count(net, data.input_shape, method.traits.sync_only)
    if engine.is_main:
        _announce(key, split, resume, job["train"]["epochs"])

    def save(epoch: int, inside_next: bool = False) -> None:
        """Checkpoint after ``epoch`` epochs (and, ``inside_next``, part of the next one)."""
        if checkpoint is not None:
            state = engine.checkpoint_state()  # collective under the distributed engine
            checkpoint({"net": net.state_dict(), **state, "split": split["counts"], "split_info": split, "epoch": epoch,
                        "stopped_inside_epoch": inside_next, "epochs": list(epochs), "wall_time_s": wall, "torch_rng": torch.get_rng_state()})

    if resume is None:
        save(0)  # so that a job stopped in its first epoch, too, resumes into its MLflow run
    bar_stream = progress.terminal() if engine.is_main else None
    first_epoch_at = time.time()  # the end of this process's start-up (benchmarks/pipeline_wall.py)
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
        _check_finite(key, epoch, stats["train_loss_per_module"], method)
        record = _epoch_record(epoch, stats, engine.evaluate(net, test, job["train"]["eval_batch_size"]), wall)
        epochs.append(record)
        save(epoch)  # before the progress line, which thus means: this epoch is safe
        if engine.is_main:
            print(progress.epoch_line(key.name, job["train"]["epochs"], record), file=sys.stderr, flush=True)
        if stop is not None and stop.is_set():  # asked after the last step had looked
            raise Terminated(f"stopped by SIGTERM after epoch {epoch}")
    engine.close()
    return {**_metrics(job, split, data.name, epochs, wall, counts), "first_epoch_at": first_epoch_at}


def _metrics(job: dict, split: dict, dataset: str, epochs: list[dict], wall: float, counts: dict) -> dict:
    """What a finished job's metrics.json holds: the run, its settings and split, every epoch."""
    return {
        **{k: job["run"][k] for k in ("method", "mode", "K", "variant", "seed")},
        "varied": job["run"].get("varied", []),
        "settings": run_settings(job),
        "engine": job["engine"],
        "split": split,
        "compute": counts,  # parameters and MACs per module and per worker (decoupled.compute)
        "dataset": dataset,
        "epochs": epochs,
        "train_time_s": wall,
    }


def _check_finite(key: RunKey, epoch: int, losses: list[float | None], method) -> None:
    """``TrainingDiverged`` when any module's loss is NaN or infinite: a lower one can diverge
    while the last still learns (DNI's, from its synthesizer); the method says what to lower."""
    diverged = [k for k, loss in enumerate(losses) if loss is not None and not math.isfinite(loss)]
    if diverged:
        k = diverged[0]
        which = "training loss" if k == len(losses) - 1 else f"module {k}'s training loss"
        raise TrainingDiverged(f"{key.name}: {which} is {losses[k]} at epoch {epoch} ({method.divergence_hint(losses)})")


def _epoch_record(epoch: int, stats: dict, ev: dict, wall: float) -> dict:
    losses = stats["train_loss_per_module"]
    return {
        "epoch": epoch,
        "train_loss": losses[-1],  # None: the last module made no step (async: it was done early)
        "train_loss_per_module": losses,
        "test_acc": ev["test_acc"],
        "test_acc_per_module": ev["test_acc_per_module"],
        **({"test_acc_classifier": ev["test_acc_classifier"]} if "test_acc_classifier" in ev else {}),
        "epoch_time_s": stats["seconds"],
        "wall_time_s": wall,
        "images_per_s": stats["images"] / stats["seconds"],
        # async and distributed engines add per-worker steps, idle time, staleness, ...
        **{k: v for k, v in stats.items() if k not in ("train_loss_per_module", "images", "seconds")},
    }


def _announce(key: RunKey, split: dict, resume: dict | None, epochs: int) -> None:
    """The job's first lines: its split of layers into modules, and where it resumes."""
    line = f"{progress.stamp()} [{key.name}] layers per module {split['counts']}"
    if "stage_s" in split:
        stages = ", ".join(f"{1000 * s:.1f}" for s in split["stage_s"])
        line += f" (balanced: predicted stage costs {stages} ms, imbalance {split['imbalance']:.2f}; even split {split['even_imbalance']:.2f})"
    print(line, file=sys.stderr, flush=True)
    if resume is not None and resume["epoch"] == epochs and not resume.get("stopped_inside_epoch"):
        print(f"{progress.stamp()} [{key.name}] trained already ({epochs}/{epochs} epochs in its resume.pt): finishing from there, nothing to train",
              file=sys.stderr, flush=True)
    elif resume is not None:
        where = f"inside epoch {resume['epoch'] + 1}" if resume.get("stopped_inside_epoch") else f"after epoch {resume['epoch']}"
        print(f"{progress.stamp()} [{key.name}] resuming {where}/{epochs} from its checkpoint", file=sys.stderr, flush=True)
