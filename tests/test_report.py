"""Tests of the report: tables, figures and input validation, on synthetic run directories."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from decoupled.errors import UserError
from decoupled.report import build_report, load_runs
from decoupled.report.tables import summary, write_summary

# Final (eval.json) per-module accuracies of each synthetic run; the last module is the output.
FINAL = {
    ("backprop", "sync", 3, 0): [0.40, 0.60, 0.885],
    ("backprop", "sync", 3, 1): [0.42, 0.62, 0.889],
    ("dgl", "sync", 3, 0): [0.83, 0.87, 0.880],
    ("dgl", "sync", 3, 1): [0.81, 0.85, 0.876],
    ("dgl", "async", 2, 0): [0.82, 0.871],  # the single-seed group, with fewer modules
}
TRAIN_TIME = {0: 130.0, 1: 134.0}


def write_run(root: Path, method: str, mode: str, k: int, seed: int, final: list[float]) -> Path:
    """Write metrics.json and eval.json in the exact formats training and evaluation produce."""
    run_dir = root / "runs" / method / mode / f"K{k}" / f"seed{seed}"
    run_dir.mkdir(parents=True)
    epochs, wall = [], 0.0
    for epoch in (1, 2, 3):
        scale = 1.0 - 0.05 * (3 - epoch)  # accuracies rise towards the final values
        per_module = [round(a * scale, 4) for a in final]
        wall += 25.0 + seed
        epochs.append({
            "epoch": epoch, "train_loss": round(1.0 / epoch, 3),
            "train_loss_per_module": [round(1.2 / epoch - 0.1 * i, 3) for i in range(k)],
            "test_acc": per_module[-1], "test_acc_per_module": per_module,
            "epoch_time_s": 25.0 + seed, "wall_time_s": wall, "images_per_s": 2400.0 - 10 * epoch,
        })
    ident = {"method": method, "mode": mode, "K": k, "seed": seed}
    metrics = {**ident, "dataset": "fashion_mnist", "mlflow_run_id": f"run{seed}",
               "epochs": epochs, "train_time_s": TRAIN_TIME[seed]}
    evaluation = {**ident, "test_acc": final[-1], "test_acc_per_module": final,
                  "test_loss": 0.33, "n_test": 10000}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "eval.json").write_text(json.dumps(evaluation))
    return run_dir


@pytest.fixture
def run_dirs(tmp_path: Path) -> list[Path]:
    return [write_run(tmp_path, *key, final) for key, final in FINAL.items()]


@pytest.fixture
def table(run_dirs: list[Path]) -> pd.DataFrame:
    runs_df, _ = load_runs(run_dirs)
    return summary(runs_df)


def row(table: pd.DataFrame, method: str, mode: str) -> pd.Series:
    (match,) = table.index[(table["method"] == method) & (table["mode"] == mode)]
    return table.loc[match]


def test_load_runs_frames(run_dirs):
    runs_df, epochs_df = load_runs(run_dirs)
    assert len(runs_df) == 5 and len(epochs_df) == 15
    first = runs_df.iloc[0]
    assert first["test_acc"] == 0.885  # from eval.json, not the last epoch of metrics.json
    assert first["test_acc_per_module"] == [0.40, 0.60, 0.885]
    assert first["epochs"] == 3
    assert first["images_per_s"] == pytest.approx(2380.0)
    assert list(epochs_df.columns) == ["method", "mode", "K", "seed", "epoch", "test_acc",
                                       "train_loss", "wall_time_s"]


def test_summary_numbers_and_columns(table):
    assert list(table.columns) == [
        "method", "mode", "K", "seeds", "test_acc_mean", "test_acc_std", "train_time_s",
        "images_per_s", "epochs", "aux_acc_mean_m1", "aux_acc_mean_m2", "aux_acc_mean_m3"]
    assert list(zip(table["method"], table["mode"])) == [
        ("backprop", "sync"), ("dgl", "async"), ("dgl", "sync")]

    dgl = row(table, "dgl", "sync")
    # By hand: mean(0.880, 0.876) = 0.878; std (ddof=1) = |0.880 - 0.876| / sqrt(2).
    assert dgl["seeds"] == 2
    assert dgl["test_acc_mean"] == pytest.approx(0.878)
    assert dgl["test_acc_std"] == pytest.approx(0.004 / math.sqrt(2))
    assert dgl["aux_acc_mean_m1"] == pytest.approx(0.82)
    assert dgl["aux_acc_mean_m3"] == pytest.approx(0.878)
    assert dgl["train_time_s"] == pytest.approx(132.0)
    assert dgl["epochs"] == 3


def test_single_seed_group_has_nan_std_and_missing_modules(table):
    single = row(table, "dgl", "async")
    assert single["seeds"] == 1
    assert math.isnan(single["test_acc_std"])
    assert math.isnan(single["aux_acc_mean_m3"])  # K=2 has no third module


def test_written_tables_are_formatted(table, tmp_path):
    paths = write_summary(table, tmp_path / "tables")
    assert [p.name for p in paths] == ["summary.csv", "summary.md", "summary.tex"]

    csv = pd.read_csv(paths[0])
    assert list(csv.columns) == list(table.columns)

    md = paths[1].read_text()
    assert "88.70 ± 0.28" in md  # backprop: mean(0.885, 0.889), std 0.002 * sqrt(2)
    assert "87.80 ± 0.28" in md
    assert "82.00" in md  # aux head m1 of dgl/sync keeps its two decimals
    single_line = next(line for line in md.splitlines() if "async" in line)
    assert "87.10" in single_line and "±" not in single_line

    tex = paths[2].read_text()
    assert r"\begin{tabular}" in tex
    assert r"88.70 $\pm$ 0.28" in tex
    assert r"test acc (\%)" in tex
    single_tex = next(line for line in tex.splitlines() if "async" in line)
    assert r"\pm" not in single_tex


def test_latex_escapes_method_names(table, tmp_path):
    table.loc[0, "method"] = "end_to_end"
    tex = write_summary(table, tmp_path)[2].read_text()
    assert r"end\_to\_end" in tex


def test_build_report_writes_everything(run_dirs, tmp_path):
    paths = build_report(run_dirs, tmp_path / "out" / "tables", tmp_path / "out" / "figures")
    names = {p.name for p in paths}
    assert names == {"summary.csv", "summary.md", "summary.tex", "test_acc_vs_epoch.png",
                     "test_acc_vs_epoch.pdf", "layerwise_acc.png", "layerwise_acc.pdf"}
    for path in paths:
        assert path.is_file() and path.stat().st_size > 0
    magic = {".png": b"\x89PNG\r\n\x1a\n", ".pdf": b"%PDF"}
    for path in paths:
        if path.suffix in magic:
            assert path.read_bytes().startswith(magic[path.suffix])
    # Atomic writes leave no temp files behind.
    leftovers = [p for p in (tmp_path / "out").rglob(".*") if p.is_file()]
    assert leftovers == []


def test_malformed_metrics_names_the_file(run_dirs):
    bad = run_dirs[0] / "metrics.json"
    bad.write_text('{"method": "dgl", "epochs": [')
    with pytest.raises(UserError, match="metrics.json") as info:
        load_runs(run_dirs)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_missing_eval_and_missing_key_name_the_file(run_dirs):
    (run_dirs[1] / "eval.json").unlink()
    with pytest.raises(UserError, match=r"eval\.json: file not found"):
        load_runs(run_dirs)

    metrics = run_dirs[2] / "metrics.json"
    data = json.loads(metrics.read_text())
    del data["train_time_s"]
    metrics.write_text(json.dumps(data))
    with pytest.raises(UserError, match="train_time_s"):
        load_runs(run_dirs[2:])
