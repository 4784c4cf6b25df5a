"""One training job: build the net, the method and the engine from a job config and run epochs.

``fit`` is the loop (usable from tests and notebooks, no tracking); ``run_job`` wraps it with
the job's outputs (checkpoint, metrics, resolved config) and its MLflow child run.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from decoupled import methods, model
from decoupled.data import Dataset, load_prepared
from decoupled.engines import ENGINES
from decoupled.errors import UserError
from decoupled.evaluate import evaluate
from decoupled.files import atomic_path, write_json
from decoupled.grid import RunKey

OUTPUTS = ("checkpoint.pt", "metrics.json", "config.json")


class TrainingDiverged(UserError):
    """The loss became NaN or infinite: a setting (usually the learning rate) does not suit the job."""


def run_key(job: dict) -> RunKey:
    return RunKey.of(job["run"])


def run_settings(job: dict) -> dict:
    """The swept settings of a job, null where they do not apply (the report plots against them)."""
    from decoupled.methods import USES_BETA

    asynchronous = job["run"]["mode"] == "async"
    return {
        **{name: job["async"][name] if asynchronous else None for name in ("slowdown_factor", "slowed_module", "buffer_size", "schedule")},
        "beta": job["train"]["beta"] if job["run"]["method"] in USES_BETA else None,
    }


def build(job: dict, data: Dataset):
    """The job's network (drawn from its seed), method and engine."""
    key = run_key(job)
    train_cfg = job["train"]
    torch.manual_seed(key.seed)
    net = model.build(job["model"], key.K, data.in_channels, data.num_classes)
    steps_per_epoch = len(data.train_x) // train_cfg["batch_size"]
    if steps_per_epoch == 0:
        raise UserError(f"config key 'train.batch_size': {train_cfg['batch_size']} exceeds the {len(data.train_x)} training images")
    method = methods.get(key.method)(net, train_cfg, train_cfg["epochs"] * steps_per_epoch)
    # the job was checked by decoupled.grid (e.g. that a slowed module exists)
    engine = ENGINES[(job["engine"], key.mode)](method, data.train_x, data.train_y, train_cfg["batch_size"], key.seed, job["async"], train_cfg["augment"])
    return net, method, engine


def fit(job: dict, data: Dataset, on_epoch: Callable[[dict, dict], None] | None = None) -> dict:
    """Train for ``train.epochs``; after each epoch call ``on_epoch(record, state)``; return the metrics."""
    torch.set_num_threads(job["train"]["threads"])
    key = run_key(job)
    net, method, engine = build(job, data)
    epochs, wall = [], 0.0
    for epoch in range(1, job["train"]["epochs"] + 1):
        stats = engine.run_epoch()
        wall += stats["seconds"]
        losses = stats["train_loss_per_module"]
        train_loss = losses[-1]
        if train_loss is None or not math.isfinite(train_loss):
            raise TrainingDiverged(f"{key.name}: training loss is {train_loss} at epoch {epoch} (try a lower train.lr)")
        ev = evaluate(net, data.test_x, data.test_y, job["train"]["eval_batch_size"])
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_loss_per_module": losses,
            "test_acc": ev["test_acc"],
            "test_acc_per_module": ev["test_acc_per_module"],
            "epoch_time_s": stats["seconds"],
            "wall_time_s": wall,
            "images_per_s": stats["images"] / stats["seconds"],
            # async engines add per-worker steps, idle ticks and staleness
            **{k: v for k, v in stats.items() if k not in ("train_loss_per_module", "images", "seconds")},
        }
        epochs.append(record)
        _print_progress(key, job["train"]["epochs"], record)
        if on_epoch is not None:
            state = {"net": net.state_dict(), "method": method.state_dict(), "engine": engine.state_dict(), "epoch": epoch}
            on_epoch(record, state)
    return {
        **{k: job["run"][k] for k in ("method", "mode", "K", "variant", "seed")},
        "varied": job["run"].get("varied", []),
        "settings": run_settings(job),
        "dataset": data.name,
        "epochs": epochs,
        "train_time_s": wall,
    }


def _print_progress(key: RunKey, total: int, r: dict) -> None:
    heads = "/".join(f"{100 * a:.1f}" for a in r["test_acc_per_module"])
    print(
        f"[{key.name}] epoch {r['epoch']}/{total}  train loss {r['train_loss']:.4f}  "
        f"test acc {100 * r['test_acc']:.2f}% (heads {heads})  {r['epoch_time_s']:.1f} s  {r['images_per_s']:.0f} img/s",
        file=sys.stderr,
        flush=True,
    )


def epoch_metrics(record: dict) -> dict[str, float]:
    """The flat per-epoch metrics logged to MLflow (step = epoch)."""
    flat = {k: record[k] for k in ("train_loss", "test_acc", "epoch_time_s", "wall_time_s", "images_per_s")}
    for k, loss in enumerate(record["train_loss_per_module"]):
        if loss is not None:
            flat[f"train_loss_m{k}"] = loss
    for k, acc in enumerate(record["test_acc_per_module"]):
        flat[f"test_acc_m{k}"] = acc
    for k, steps in enumerate(record.get("steps_per_module", [])):
        flat[f"steps_m{k}"] = steps
        flat[f"idle_m{k}"] = record["idle_per_module"][k]
        for kind in ("input", "grad"):
            mean = record[f"{kind}_staleness"][k]["mean"]
            if mean is not None:
                flat[f"{kind}_staleness_mean_m{k}"] = mean
    return flat


def run_job(job: dict, data_path: str | Path, out_dir: str | Path, experiment: dict | None, tags: dict[str, str]) -> dict:
    """Train one job into ``out_dir`` and its MLflow child run; on failure leave neither output nor a RUNNING run."""
    from decoupled.config import flatten
    from decoupled.tracking import ChildRun

    out_dir = Path(out_dir)
    key = run_key(job)
    data = load_prepared(data_path)  # input problems surface before any run or file exists
    if experiment is None:
        from decoupled.tracking import init_experiment

        experiment = init_experiment(job)
    run_tags = {"method": key.method, "mode": key.mode, "K": str(key.K), "variant": key.variant, "seed": str(key.seed), "dataset": data.name, **tags}
    run = ChildRun.start(experiment, key.name, flatten(job), run_tags)

    def on_epoch(record: dict, state: dict) -> None:
        run.log_metrics(epoch_metrics(record), step=record["epoch"])
        with atomic_path(out_dir / "checkpoint.pt") as tmp:
            torch.save({**state, "job": job, "mlflow_run_id": run.run_id}, tmp)

    try:
        started = time.time()
        metrics = fit(job, data, on_epoch)
        metrics.update(mlflow_run_id=run.run_id, started_at=started)
        write_json(out_dir / "config.json", job)
        write_json(out_dir / "metrics.json", metrics)
        run.log_metrics({"train_time_s": metrics["train_time_s"]}, step=job["train"]["epochs"])
        run.log_artifact(out_dir / "metrics.json")
        run.log_artifact(out_dir / "config.json")
        run.finish()
    except BaseException as e:
        for name in OUTPUTS:
            (out_dir / name).unlink(missing_ok=True)
        run.fail(f"{type(e).__name__}: {e}")
        raise
    return metrics


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}") from None
