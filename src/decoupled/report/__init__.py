"""Turn finished training runs into tables and figures.

Each run directory (``results/runs/{method}/{mode}/K{K}/seed{seed}/``) holds ``metrics.json``
from training and ``eval.json`` from the separate evaluation of the final checkpoint. The
report reads both, so a reader can check every number in the tables against the files it came
from. Headline accuracy comes from ``eval.json`` (the final checkpoint); the learning curves come
from the per-epoch records in ``metrics.json``.

Bad input (a missing file, broken JSON, a missing key) is the user's to fix, so it raises
``UserError`` with one line naming the file rather than a pandas traceback.
"""

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from decoupled.errors import UserError
from decoupled.files import read_json

__all__ = ["load_runs", "build_report"]

_RUN_KEYS = ["method", "mode", "K", "seed"]


def build_report(run_dirs: Iterable[Path], tables_dir: Path, figures_dir: Path) -> list[Path]:
    """Load the runs, write the summary tables and both figures; return every path written."""
    # Imported here so that loading runs (e.g. from a notebook) never touches matplotlib or
    # switches its backend.
    from decoupled.report import figures, tables

    runs_df, epochs_df = load_runs(list(run_dirs))
    written = tables.write_summary(tables.summary(runs_df), Path(tables_dir))
    written += figures.plot_accuracy_vs_epoch(epochs_df, Path(figures_dir))
    written += figures.plot_layerwise_accuracy(runs_df, Path(figures_dir))
    return written


def load_runs(run_dirs: list[Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read run directories into a per-run frame and a per-epoch frame.

    Per-run columns: method, mode, K, seed, test_acc, test_acc_per_module (list),
    train_time_s, epochs (count), images_per_s (mean over epochs).
    Per-epoch columns: method, mode, K, seed, epoch, test_acc, train_loss, wall_time_s.
    """
    if not run_dirs:
        raise UserError("no run directories given to the report")
    run_rows, epoch_rows = [], []
    seen: dict[tuple, Path] = {}
    for run_dir in map(Path, run_dirs):
        run, epochs = _load_run(run_dir)
        key = tuple(run[k] for k in _RUN_KEYS)
        # Two directories claiming the same run would be silently averaged as two seeds.
        if key in seen:
            raise UserError(f"{run_dir}: same method/mode/K/seed as {seen[key]}")
        seen[key] = run_dir
        run_rows.append(run)
        epoch_rows.extend(epochs)
    return pd.DataFrame(run_rows), pd.DataFrame(epoch_rows)


def _load_run(run_dir: Path) -> tuple[dict, list[dict]]:
    """Validate one run's two files and flatten them into a run row and epoch rows."""
    metrics_path, eval_path = run_dir / "metrics.json", run_dir / "eval.json"
    metrics, evaluation = read_json(metrics_path), read_json(eval_path)

    ident = {
        "method": _get(metrics, "method", str, metrics_path),
        "mode": _get(metrics, "mode", str, metrics_path),
        "K": _get(metrics, "K", int, metrics_path),
        "seed": _get(metrics, "seed", int, metrics_path),
    }
    # eval.json is written by a separate step; a mismatch means it was copied from another run.
    for key, value in ident.items():
        if _get(evaluation, key, type(value), eval_path) != value:
            raise UserError(f"{eval_path}: {key} does not match {metrics_path}")

    epochs = _get(metrics, "epochs", list, metrics_path)
    if not epochs:
        raise UserError(f"{metrics_path}: 'epochs' is empty")
    epoch_rows, speeds = [], []
    for i, record in enumerate(epochs):
        where = f"{metrics_path}: epochs[{i}]"
        if not isinstance(record, dict):
            raise UserError(f"{where} is not an object")
        epoch_rows.append({
            **ident,
            "epoch": _get(record, "epoch", int, where),
            "test_acc": _get(record, "test_acc", float, where),
            "train_loss": _get(record, "train_loss", float, where),
            "wall_time_s": _get(record, "wall_time_s", float, where),
        })
        speeds.append(_get(record, "images_per_s", float, where))

    per_module = _get(evaluation, "test_acc_per_module", list, eval_path)
    if len(per_module) != ident["K"] or not all(_is_number(a) for a in per_module):
        raise UserError(f"{eval_path}: 'test_acc_per_module' must be {ident['K']} numbers")

    run_row = {
        **ident,
        "test_acc": _get(evaluation, "test_acc", float, eval_path),
        "test_acc_per_module": [float(a) for a in per_module],
        "train_time_s": _get(metrics, "train_time_s", float, metrics_path),
        "epochs": len(epochs),
        "images_per_s": sum(speeds) / len(speeds),
    }
    return run_row, epoch_rows


def _get(data: dict, key: str, kind: type, where: object):
    """Fetch ``data[key]`` checked against ``kind`` (``float`` also accepts JSON integers)."""
    if key not in data:
        raise UserError(f"{where}: missing key '{key}'")
    value = data[key]
    ok = _is_number(value) if kind is float else (
        isinstance(value, kind) and not (kind is int and isinstance(value, bool)))
    if not ok:
        raise UserError(f"{where}: '{key}' must be {kind.__name__}, got {value!r:.40}")
    return float(value) if kind is float else value


def _is_number(value: object) -> bool:
    # bool is an int subclass, but `true` as an accuracy is a bug upstream, not a number.
    # NaN is allowed: a diverged run's loss is a real result worth reporting.
    return isinstance(value, (int, float)) and not isinstance(value, bool)
