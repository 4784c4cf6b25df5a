"""Tests of the report: tables, figures and input validation, on synthetic run directories.

The synthetic experiment has base settings K=3, no slowdown, buffer 10, the updates budget
and (FDG) beta 0.5; around its reference runs it sweeps the slowdown (S in {2, 4} on module 1
or 2; S=4 on module 1 under the time budget too), the buffer size, K and FDG's beta, the way
``decoupled.grid`` names and marks such runs. Runs are written as the simulated engine writes
them: their simulated parallel seconds are half their process's seconds.
"""

import json
import math
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from decoupled import config
from decoupled.errors import UserError
from decoupled.layout import TABLE_FORMATS, figures_for, tables_for
from decoupled.report import (DEFAULT_TARGET_ACCURACY, FIGURE_NAMES, add_time_to_accuracy,
                              build_report, figures, load_runs)
from decoupled.report.tables import (NO_RUN, NOT_APPLICABLE, NOT_REACHED, NOT_RECORDED, PER_BOUNDARY, main_table, summary,
                                     write_main, write_summary)

BASE = {"K": 3, "slowdown_factor": 1.0, "slowed_module": None, "buffer_size": 10, "beta": 0.5, "budget": "updates"}
TRAIN_TIME = {0: 130.0, 1: 134.0}


def _sweep_acc(factor: float, module: int, seed: int) -> float:
    """DGL's async accuracy falls with the slowdown, more when the first hidden module is slowed."""
    return round(0.870 - 0.01 * math.log2(factor) * (2 if module == 1 else 1) - 0.002 * seed, 4)


# Final (eval.json) per-module accuracies of each run, by (method, mode, K, variant, seed);
# the last module is the output.
FINAL = {
    # Reference runs (nothing differs from the base settings).
    ("backprop", "sync", 3, "default", 0): [0.40, 0.60, 0.885],
    ("backprop", "sync", 3, "default", 1): [0.42, 0.62, 0.889],
    ("dgl", "sync", 3, "default", 0): [0.83, 0.87, 0.880],
    ("dgl", "sync", 3, "default", 1): [0.81, 0.85, 0.876],
    ("dgl", "async", 3, "S1_B10", 0): [0.82, 0.86, 0.870],
    ("dgl", "async", 3, "S1_B10", 1): [0.82, 0.86, 0.868],
    ("fdg", "sync", 3, "beta0.5", 0): [0.50, 0.70, 0.884],
    ("fdg", "async", 3, "S1_B10_beta0.5", 0): [0.50, 0.70, 0.860],  # the single-seed group
    # FDG's beta sweep.
    ("fdg", "sync", 3, "beta0.25", 0): [0.50, 0.70, 0.874],
    # Slowdown sweep: DGL with two seeds on module 1 and 2, FDG with one on module 1.
    **{("dgl", "async", 3, f"S{s}m{m}_B10", seed): [0.8, 0.85, _sweep_acc(s, m, seed)]
       for s in (2, 4) for m in (1, 2) for seed in (0, 1)},
    ("fdg", "async", 3, "S4m1_B10_beta0.5", 0): [0.50, 0.70, 0.840],
    # ... and DGL's under the time budget, where the slowed module makes fewer updates.
    ("dgl", "async", 3, "S1_B10_time", 0): [0.8, 0.85, 0.868],
    ("dgl", "async", 3, "S4m1_B10_time", 0): [0.8, 0.85, 0.800],
    # Buffer-size sweep, with and without a slowdown.
    ("dgl", "async", 3, "S1_B2", 0): [0.8, 0.85, 0.850],
    ("dgl", "async", 3, "S1_B50", 0): [0.8, 0.85, 0.872],
    ("dgl", "async", 3, "S4m1_B2", 0): [0.8, 0.85, 0.820],
    ("dgl", "async", 3, "S4m1_B50", 0): [0.8, 0.85, 0.845],
    # K sweep.
    ("backprop", "sync", 2, "default", 0): [0.60, 0.881],
    ("backprop", "sync", 4, "default", 0): [0.40, 0.50, 0.60, 0.887],
    ("dgl", "sync", 2, "default", 0): [0.85, 0.872],
    ("dgl", "sync", 4, "default", 0): [0.80, 0.84, 0.86, 0.878],
}
SYNC_REFERENCE = {key: final for key, final in FINAL.items()
                  if key[1] == "sync" and key[2] == 3 and key[3] in ("default", "beta0.5")}


def settings_of(method: str, mode: str, variant: str) -> dict:
    """The ``settings`` training writes for a variant name such as ``S4m1_B10_beta0.5``."""
    asynchronous = mode == "async"
    settings = {
        "slowdown_factor": BASE["slowdown_factor"] if asynchronous else None,
        "slowed_module": None,
        "buffer_size": BASE["buffer_size"] if asynchronous else None,
        "beta": BASE["beta"] if method == "fdg" else None,
        "schedule": "categorical" if asynchronous else None,
        "budget": BASE["budget"] if asynchronous else None,
        "gradient_delay": 2 if method == "fdg" and not asynchronous else None,
        "synth_last_block": True if method in ("dni", "cdni") else None,
    }
    for part in [] if variant == "default" else variant.split("_"):
        if match := re.fullmatch(r"S([\d.]+)(?:m(\d+))?", part):
            settings["slowdown_factor"] = float(match[1])
            settings["slowed_module"] = int(match[2]) if match[2] else None
        elif match := re.fullmatch(r"B(\d+)", part):
            settings["buffer_size"] = int(match[1])
        elif match := re.fullmatch(r"beta([\d.]+)", part):
            settings["beta"] = float(match[1])
        elif part == "time":
            settings["budget"] = part
        elif part == "nolastsynth":
            settings["synth_last_block"] = False
        else:
            raise AssertionError(part)
    return settings


def varied_of(k: int, settings: dict) -> list[str]:
    """The swept axes on which a run differs from BASE (None = does not apply)."""
    varied = ["K"] if k != BASE["K"] else []
    if settings["slowdown_factor"] is not None and (
            (settings["slowdown_factor"], settings["slowed_module"])
            != (BASE["slowdown_factor"], BASE["slowed_module"])):
        varied.append("slowdown")
    varied += [n for n in ("buffer_size", "budget", "beta") if settings[n] not in (None, BASE[n])]
    return sorted(varied)


def write_run(root: Path, method: str, mode: str, k: int, variant: str, seed: int,
              final: list[float], varied: list[str] | None = None) -> Path:
    """Write metrics.json and eval.json in the exact formats training and evaluation produce."""
    run_dir = root / "runs" / method / mode / f"K{k}" / variant / f"seed{seed}"
    run_dir.mkdir(parents=True)
    settings = settings_of(method, mode, variant)
    epochs, wall = [], 0.0
    for epoch in (1, 2, 3):
        scale = 1.0 - 0.05 * (3 - epoch)  # accuracies rise towards the final values
        per_module = [round(a * scale, 4) for a in final]
        wall += 25.0 + seed
        record = {
            "epoch": epoch, "train_loss": round(1.0 / epoch, 3),
            "train_loss_per_module": [round(1.2 / epoch - 0.1 * i, 3) for i in range(k)],
            "test_acc": per_module[-1], "test_acc_per_module": per_module,
            "epoch_time_s": 25.0 + seed, "wall_time_s": wall, "images_per_s": 2400.0 - 10 * epoch,
            "sim_time_s": wall / 2, "finish_time_s_per_module": [wall / 2 - (k - 1 - i) for i in range(k)],
            "steps_per_module": [100] * k,
        }
        if mode == "async":
            # Staleness is cumulative, so only the last epoch's means describe the whole run;
            # module 0 reads no buffer and the output module receives no gradient: null means.
            record["train_loss_per_module"][0] = None if epoch == 1 else record["train_loss_per_module"][0]
            record["steps_per_module"] = [100] * (k - 1) + [90 + epoch]
            record["idle_per_module"] = [5] * k
            stale = [{"mean": None, "max": None, "histogram": {}}] + [
                {"mean": 0.5 * epoch, "max": 2, "histogram": {"0": 10, "1": 3}} for _ in range(k - 1)]
            record["input_staleness"] = stale
            record["grad_staleness"] = stale[::-1]
        epochs.append(record)
    ident = {"method": method, "mode": mode, "K": k, "variant": variant, "seed": seed}
    varied = varied_of(k, settings) if varied is None else varied
    metrics = {**ident, "varied": varied, "settings": settings,
               "dataset": "fashion_mnist", "mlflow_run_id": f"run{seed}",
               "epochs": epochs, "train_time_s": TRAIN_TIME[seed]}
    evaluation = {**ident, "test_acc": final[-1], "test_acc_per_module": final,
                  "test_loss": 0.33, "n_test": 10000}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "eval.json").write_text(json.dumps(evaluation))
    return run_dir


def write_runs(root: Path, finals: dict) -> list[Path]:
    return [write_run(root, *key, final) for key, final in finals.items()]


@pytest.fixture
def run_dirs(tmp_path: Path) -> list[Path]:
    return write_runs(tmp_path, FINAL)


@pytest.fixture
def runs_df(run_dirs: list[Path]) -> pd.DataFrame:
    return load_runs(run_dirs)[0]


@pytest.fixture
def table(run_dirs: list[Path]) -> pd.DataFrame:
    return summary(add_time_to_accuracy(*load_runs(run_dirs), 0.85))


def row(table: pd.DataFrame, method: str, mode: str, k: int = 3, variant: str = "default") -> pd.Series:
    (match,) = table.index[(table["method"] == method) & (table["mode"] == mode)
                           & (table["K"] == k) & (table["variant"] == variant)]
    return table.loc[match]


def test_load_runs_frames(run_dirs):
    runs_df, epochs_df = load_runs(run_dirs)
    assert len(runs_df) == len(FINAL) and len(epochs_df) == 3 * len(FINAL)
    first = runs_df.iloc[0]
    assert first["test_acc"] == 0.885  # from eval.json, not the last epoch of metrics.json
    assert first["test_acc_per_module"] == [0.40, 0.60, 0.885]
    assert first["epochs"] == 3
    assert first["images_per_s"] == pytest.approx(2380.0)
    assert first["variant"] == "default" and first["varied"] == []
    assert first["engine"] == "simulated"  # metrics.json without "engine": written before it existed
    # A sync run: no async settings and no async statistics.
    assert pd.isna(first["slowdown_factor"]) and pd.isna(first["slowed_module"])
    assert pd.isna(first["buffer_size"]) and pd.isna(first["beta"])
    assert first["steps_per_module"] == [300, 300, 300] and first["input_staleness_mean"] is None
    # seconds on the run's clock: the simulated engine's parallel time
    assert (first["clock"], first["time_s"], first["train_time_s"]) == ("simulated parallel", 37.5, 130.0)
    assert first["finish_time_s_per_module"] == [35.5, 36.5, 37.5]

    slowed = runs_df[(runs_df["variant"] == "S4m1_B10") & (runs_df["seed"] == 0)].iloc[0]
    assert slowed["varied"] == ["slowdown"]
    assert (slowed["slowdown_factor"], slowed["slowed_module"], slowed["buffer_size"]) == (4.0, 1, 10)
    assert pd.isna(slowed["beta"])
    assert slowed["steps_per_module"] == [300, 300, 91 + 92 + 93]  # summed over epochs
    assert slowed["input_staleness_mean"] == [None, 1.5, 1.5]  # the last epoch's
    assert slowed["grad_staleness_mean"] == [1.5, 1.5, None]

    fdg = runs_df[runs_df["variant"] == "beta0.25"].iloc[0]
    assert fdg["beta"] == 0.25 and fdg["varied"] == ["beta"]
    assert str(runs_df["slowed_module"].dtype) == "Int64"  # module 1 stays 1, not 1.0

    assert list(epochs_df.columns) == ["method", "mode", "K", "variant", "seed", "engine", "varied",
                                       "epoch", "test_acc", "train_loss", "wall_time_s", "time_s", "clock"]
    assert list(epochs_df["time_s"][:3]) == [12.5, 25.0, 37.5]
    assert runs_df[runs_df["variant"] == "S4m1_B10_time"].iloc[0]["budget"] == "time"
    assert runs_df[runs_df["variant"] == "beta0.25"].iloc[0]["gradient_delay"] == 2
    assert set(epochs_df["engine"]) == {"simulated"}
    assert epochs_df[epochs_df["variant"] == "S4m1_B10"]["varied"].iloc[0] == ["slowdown"]


def test_runs_written_before_the_parallel_clock_keep_their_seconds(tmp_path):
    run_dir = write_run(tmp_path, "dgl", "sync", 3, "default", 0, [0.8, 0.85, 0.88])

    def old(metrics):
        for record in metrics["epochs"]:
            for key in ("sim_time_s", "finish_time_s_per_module", "steps_per_module"):
                del record[key]
        del metrics["settings"]["budget"], metrics["settings"]["gradient_delay"]

    _edit(run_dir / "metrics.json", old)
    runs_df, epochs_df = load_runs([run_dir])
    run = runs_df.iloc[0]
    assert (run["clock"], run["time_s"]) == ("one process", 75.0)
    assert run["steps_per_module"] is None and run["finish_time_s_per_module"] is None
    assert list(epochs_df["time_s"]) == [25.0, 50.0, 75.0]


def test_summary_numbers_and_columns(table):
    assert list(table.columns) == [
        "method", "mode", "K", "variant", "engine", "seeds", "test_acc_mean", "test_acc_std", "test_acc_ci95",
        "train_time_s", "clock", "time_s", "images_per_s", "epochs",
        "time_to_85pct_s_mean", "time_to_85pct_s_std", "time_to_85pct_s_ci95", "time_to_85pct_s_missed",
        "slowdown_factor", "slowed_module", "buffer_size", "budget", "beta", "gradient_delay",
        "bits_per_activation", "bytes_per_image",
        "aux_acc_mean_m1", "aux_acc_mean_m2", "aux_acc_mean_m3", "aux_acc_mean_m4",
        "steps_mean_m1", "steps_mean_m2", "steps_mean_m3", "steps_mean_m4",
        "finish_time_s_mean_m1", "finish_time_s_mean_m2", "finish_time_s_mean_m3", "finish_time_s_mean_m4"]
    groups = {key[:4] for key in FINAL}
    assert len(table) == len(groups)
    assert set(zip(table["method"], table["mode"], table["K"], table["variant"])) == groups

    dgl = row(table, "dgl", "sync")
    # By hand: mean(0.880, 0.876) = 0.878; std (ddof=1) = |0.880 - 0.876| / sqrt(2).
    assert dgl["seeds"] == 2
    assert dgl["test_acc_mean"] == pytest.approx(0.878)
    assert dgl["test_acc_std"] == pytest.approx(0.004 / math.sqrt(2))
    assert dgl["aux_acc_mean_m1"] == pytest.approx(0.82)
    assert dgl["aux_acc_mean_m3"] == pytest.approx(0.878)
    assert dgl["train_time_s"] == pytest.approx(132.0)
    assert dgl["epochs"] == 3
    # Both seeds pass 85% at their last epoch only (79.2, 83.6, 88.0 and 78.8, 83.2, 87.6).
    assert dgl["time_to_85pct_s_mean"] == pytest.approx((75.0 + 78.0) / 2 / 2)  # simulated parallel seconds
    assert dgl["time_s"] == pytest.approx((75.0 + 78.0) / 2 / 2) and dgl["clock"] == "simulated parallel"
    assert dgl["finish_time_s_mean_m3"] == pytest.approx(38.25) and dgl["steps_mean_m1"] == 300
    assert dgl["time_to_85pct_s_missed"] == 0
    assert pd.isna(dgl["slowdown_factor"]) and pd.isna(dgl["beta"])

    slowed = row(table, "dgl", "async", 3, "S4m2_B10")
    assert (slowed["slowdown_factor"], slowed["slowed_module"], slowed["buffer_size"]) == (4.0, 2, 10)
    assert slowed["test_acc_mean"] == pytest.approx((_sweep_acc(4, 2, 0) + _sweep_acc(4, 2, 1)) / 2)
    assert row(table, "fdg", "sync", 3, "beta0.25")["beta"] == 0.25
    assert row(table, "fdg", "sync", 3, "beta0.25")["gradient_delay"] == 2
    assert row(table, "dgl", "async", 3, "S4m1_B10_time")["budget"] == "time"
    assert row(table, "dgl", "async", 3, "S4m1_B10")["steps_mean_m3"] == 91 + 92 + 93


def test_single_seed_group_has_nan_std_and_missing_modules(table):
    single = row(table, "fdg", "async", 3, "S1_B10_beta0.5")
    assert single["seeds"] == 1
    assert math.isnan(single["test_acc_std"])
    assert math.isnan(row(table, "dgl", "sync", 2)["aux_acc_mean_m3"])  # K=2 has no third module
    assert row(table, "dgl", "sync", 4)["aux_acc_mean_m4"] == pytest.approx(0.878)


def test_written_tables_are_formatted(table, tmp_path):
    paths = write_summary(table, tmp_path / "tables")
    assert [p.name for p in paths] == ["summary.csv", "summary.md", "summary.tex", "summary.html"]

    csv = pd.read_csv(paths[0])
    assert list(csv.columns) == list(table.columns)
    assert len(csv) == len(table)

    md = paths[1].read_text()
    # backprop: mean(0.885, 0.889), std 0.002 * sqrt(2), ± t(0.975, 1) = 12.706 times std / sqrt(2)
    assert "88.70 ± 2.54" in md
    assert "87.80 ± 2.54" in md
    assert "82.00" in md  # aux head m1 of dgl/sync keeps its two decimals
    single_line = next(line for line in md.splitlines() if "S1_B10_beta0.5" in line)
    assert "86.00" in single_line and "±" not in single_line
    slowed_line = next(line for line in md.splitlines() if "S4m1_B10 " in line)
    # steps and finish times per module, slowdown, slowed module, buffer, budget, beta and delay (none for DGL), bits, bytes
    assert re.search(r"\|\s+300/300/276 \|\s+36.2/37.2/38.2 \|\s+4 \|\s+1 \|\s+10 \|\s+updates\s+\|\s+n/a \|\s+n/a \|\s+32 \|\s+not recorded \|", slowed_line)

    tex = paths[2].read_text()
    assert r"\begin{tabular}" in tex
    assert r"88.70 $\pm$ 2.54" in tex
    assert r"test acc (\%, mean $\pm$ 95\% CI)" in tex
    assert r"S4m1\_B10" in tex
    single_tex = next(line for line in tex.splitlines() if r"S1\_B10\_beta0.5" in line)
    assert r"\pm" not in single_tex
    assert "& n/a &" in single_tex  # no slowed module


def test_latex_escapes_method_names(table, tmp_path):
    table.loc[0, "method"] = "end_to_end"
    tex = write_summary(table, tmp_path)[2].read_text()
    assert r"end\_to\_end" in tex


def test_main_table_values(runs_df, tmp_path):
    main = main_table(runs_df)
    # Reference runs only, all at K=3, so no K column.
    assert list(main.columns) == ["method", "sync_mean", "sync_std", "sync_ci95", "sync_seeds", "sync_clock",
                                  "async_mean", "async_std", "async_ci95", "async_seeds", "async_clock"]
    assert list(main["method"]) == ["backprop", "dgl", "fdg"]
    dgl = main.set_index("method").loc["dgl"]
    # By hand: sync mean(0.880, 0.876) = 0.878, std 0.004 / sqrt(2); async mean(0.870, 0.868).
    assert dgl["sync_mean"] == pytest.approx(0.878)
    assert dgl["sync_std"] == pytest.approx(0.004 / math.sqrt(2))
    assert dgl["async_mean"] == pytest.approx(0.869)
    assert dgl["async_std"] == pytest.approx(0.002 / math.sqrt(2))
    backprop = main.set_index("method").loc["backprop"]
    assert math.isnan(backprop["async_mean"]) and math.isnan(backprop["async_std"])
    fdg = main.set_index("method").loc["fdg"]
    assert fdg["sync_mean"] == pytest.approx(0.884)  # beta0.5 only; beta0.25 varies beta
    assert fdg["async_mean"] == pytest.approx(0.860) and math.isnan(fdg["async_std"])

    paths = write_main(main, tmp_path)
    assert [p.name for p in paths] == ["main.csv", "main.md", "main.tex", "main.html"]
    csv = pd.read_csv(paths[0])
    assert list(csv.columns) == list(main.columns)
    assert csv.loc[1, "sync_mean"] == pytest.approx(0.878)

    md_lines = paths[1].read_text().splitlines()
    assert "sync (%, mean ± 95% CI)" in md_lines[0] and md_lines[0].index("sync") < md_lines[0].index("async")
    dgl_md = next(line for line in md_lines if line.startswith("| dgl"))
    assert "87.80 ± 2.54" in dgl_md and "86.90 ± 1.27" in dgl_md
    backprop_md = next(line for line in md_lines if line.startswith("| backprop"))
    assert "88.70 ± 2.54" in backprop_md and re.search(r"\|\s+n/a \|$", backprop_md)  # backprop has no async form
    fdg_md = next(line for line in md_lines if line.startswith("| fdg"))
    assert "88.40" in fdg_md and "86.00" in fdg_md and "±" not in fdg_md  # one seed each

    tex = paths[2].read_text()
    assert r"87.80 $\pm$ 2.54 (n=2) & 86.90 $\pm$ 1.27 (n=2)" in tex
    assert re.search(r"backprop & 88.70 \$\\pm\$ 2.54 \(n=2\) & n/a \\\\", tex)


def test_a_method_in_a_form_other_than_its_authors_goes_by_a_name_of_its_own(tmp_path):
    """DNI without the synthesizer above its last block (train.synth_last_block: false) is not the
    DGL paper's DNI: its runs are "dni nolastsynth" in every table, next to "dni" and never
    averaged into it, even as a config's reference runs; a run from before the setting existed
    had that form."""
    authors = write_runs(tmp_path / "a", {("dni", "sync", 3, "default", 0): [0.5, 0.6, 0.80],
                                          ("dni", "sync", 3, "default", 1): [0.5, 0.6, 0.82],
                                          ("backprop", "sync", 3, "default", 0): [0.4, 0.6, 0.89]})
    own = write_run(tmp_path / "b", "dni", "sync", 3, "nolastsynth", 0, [0.5, 0.6, 0.86], varied=[])
    older = write_run(tmp_path / "c", "dni", "sync", 3, "default", 1, [0.5, 0.6, 0.84])
    metrics = json.loads((older / "metrics.json").read_text())
    del metrics["settings"]["synth_last_block"]
    (older / "metrics.json").write_text(json.dumps(metrics))
    runs, epochs = load_runs(authors + [own, older])
    assert sorted(set(epochs["method"])) == ["backprop", "dni", "dni nolastsynth"]
    main = main_table(runs)
    assert list(main["method"]) == ["backprop", "dni", "dni nolastsynth"]
    assert list(main["sync_mean"]) == pytest.approx([0.89, 0.81, 0.85])
    md = write_main(main, tmp_path / "t")[1].read_text()
    assert re.search(r"\| dni nolastsynth +\| +85\.00 ± 12\.71", md)
    assert list(summary(add_time_to_accuracy(runs, epochs, 0.85))["method"]) == ["backprop", "dni", "dni nolastsynth", "dni nolastsynth"]


def test_main_table_with_several_reference_k(tmp_path):
    # Two experiments merged, with base K 2 and 3: K becomes a second index column.
    dirs = write_runs(tmp_path, {("dgl", "sync", 3, "default", 0): [0.8, 0.85, 0.88],
                                 ("backprop", "sync", 3, "default", 0): [0.4, 0.6, 0.89]})
    k2 = write_run(tmp_path, "dgl", "sync", 2, "default", 0, [0.8, 0.86], varied=[])
    main = main_table(load_runs(dirs + [k2])[0])
    assert list(main.columns) == ["method", "K", "sync_mean", "sync_std", "sync_ci95", "sync_seeds", "sync_clock"]
    assert list(zip(main["method"], main["K"])) == [("backprop", 3), ("dgl", 2), ("dgl", 3)]
    header = write_main(main, tmp_path / "t")[1].read_text().splitlines()[0]
    assert [c.strip() for c in header.strip("|").split("|")] == ["method", "K", "sync (%, mean ± 95% CI, n=1)"]


def _magic_ok(path: Path) -> bool:
    magic = {".png": b"\x89PNG\r\n\x1a\n", ".pdf": b"%PDF"}
    return path.read_bytes().startswith(magic[path.suffix])


def test_build_report_writes_everything(run_dirs, tmp_path):
    paths = build_report(run_dirs, tmp_path / "out" / "tables", tmp_path / "out" / "figures")
    # these runs sweep slowdown, buffer size and K, not groups nor quantization
    # no published numbers given, so no reproduction table
    expected = ([f"{t.name}.{ext}" for t in tables_for({}) for ext in ("csv", "md", "tex", "html")]
                + [f"{f.name}.{ext}" for f in figures_for({"slowdown", "buffer_size", "K"}, {"simulated parallel"}) for ext in ("png", "pdf")])
    assert len(paths) == 20 and [p.name for p in paths] == expected
    assert "acc_vs_simulated_time.png" in expected and "acc_vs_wall_time.png" not in expected  # simulated runs only
    for path in paths:
        assert path.is_file() and path.stat().st_size > 0
        if path.suffix in (".png", ".pdf"):
            assert path.parent.name == "figures" and _magic_ok(path)
    # Atomic writes leave no temp files behind.
    leftovers = [p for p in (tmp_path / "out").rglob(".*") if p.is_file()]
    assert leftovers == []


def test_a_sweep_figure_without_its_sweep_is_not_written(tmp_path):
    """Sync-only reference runs: the learning curves, but no empty sweep figures (nor in what
    the report says it wrote); the workflow lists the same (decoupled.layout.figures_for)."""
    dirs = write_runs(tmp_path, SYNC_REFERENCE)
    paths = build_report(dirs, tmp_path / "tables", tmp_path / "figures")
    drawn = {"test_acc_vs_epoch", "acc_vs_simulated_time", "layerwise_acc"}
    assert [f.name for f in figures_for(set(), {"simulated parallel"})] == sorted(drawn, key=FIGURE_NAMES.index)
    for name in FIGURE_NAMES:
        for ext in (".png", ".pdf"):
            path = tmp_path / "figures" / f"{name}{ext}"
            assert (path in paths and _magic_ok(path)) if name in drawn else not (path in paths or path.exists())
    main = pd.read_csv(tmp_path / "tables" / "main.csv")
    assert list(main.columns) == ["method", "sync_mean", "sync_std", "sync_ci95", "sync_seeds", "sync_clock", "sync_time_to_85pct_s_mean",
                                  "sync_time_to_85pct_s_std", "sync_time_to_85pct_s_ci95", "sync_time_to_85pct_s_missed"]


def _capture(monkeypatch) -> dict:
    """Record each figure's error-bar lines (label, x, y) instead of only saving it."""
    seen, finish = {}, figures._finish

    def spy(fig, ax, stem):
        seen[stem.name] = {c.get_label(): (list(c.lines[0].get_xdata()), list(c.lines[0].get_ydata()))
                           for c in ax.containers}
        seen[stem.name]["_texts"] = [t.get_text() for t in ax.texts]
        return finish(fig, ax, stem)

    monkeypatch.setattr(figures, "_finish", spy)
    return seen


def test_sweep_figures_plot_the_right_runs(runs_df, tmp_path, monkeypatch):
    seen = _capture(monkeypatch)
    figures.plot_accuracy_vs_slowdown(runs_df, tmp_path)
    figures.plot_accuracy_vs_buffer_size(runs_df, tmp_path)
    figures.plot_accuracy_vs_K(runs_df, tmp_path)

    slowdown = seen["acc_vs_slowdown"]
    # one line per method, slowed module and budget (updates first)
    assert [k for k in slowdown if k != "_texts"] == [
        "dgl, module 1 slowed, updates budget (2 seeds)", "dgl, module 2 slowed, updates budget (2 seeds)",
        "dgl, module 1 slowed, time budget (1 seed)", "fdg, module 1 slowed, updates budget (1 seed)"]
    x, y = slowdown["dgl, module 1 slowed, updates budget (2 seeds)"]
    # S=1 is the shared start (the reference async runs); buffer-sweep runs are left out.
    assert x == [1, 2, 4]
    assert y == pytest.approx([86.9, 100 * (_sweep_acc(2, 1, 0) + _sweep_acc(2, 1, 1)) / 2,
                               100 * (_sweep_acc(4, 1, 0) + _sweep_acc(4, 1, 1)) / 2])
    assert slowdown["dgl, module 2 slowed, updates budget (2 seeds)"][1][0] == pytest.approx(86.9)
    # the time budget's line starts at its own S=1 run
    assert slowdown["dgl, module 1 slowed, time budget (1 seed)"] == ([1, 4], pytest.approx([86.8, 80.0]))
    assert slowdown["fdg, module 1 slowed, updates budget (1 seed)"] == ([1, 4], pytest.approx([86.0, 84.0]))

    # Settings run at one buffer size only (S=2, FDG) are single points there: left out.
    buffer = seen["acc_vs_buffer_size"]
    assert list(buffer) == ["dgl, no slowdown (1–2 seeds)", "dgl, S=4 on module 1 (1–2 seeds)", "_texts"]
    assert buffer["dgl, no slowdown (1–2 seeds)"] == ([2, 10, 50], pytest.approx([85.0, 86.9, 87.2]))
    assert buffer["dgl, S=4 on module 1 (1–2 seeds)"][0] == [2, 10, 50]

    k = seen["acc_vs_K"]
    assert list(k) == ["backprop / sync (1–2 seeds)", "dgl / sync (1–2 seeds)", "_texts"]
    assert k["dgl / sync (1–2 seeds)"] == ([2, 3, 4], pytest.approx([87.2, 87.8, 87.8]))


def test_empty_sweep_figures_say_why(tmp_path, monkeypatch):
    seen = _capture(monkeypatch)
    runs_df = load_runs(write_runs(tmp_path, SYNC_REFERENCE))[0]
    figures.plot_accuracy_vs_slowdown(runs_df, tmp_path)
    figures.plot_accuracy_vs_buffer_size(runs_df, tmp_path)
    figures.plot_accuracy_vs_K(runs_df, tmp_path)
    assert seen["acc_vs_slowdown"]["_texts"] == ["no runs vary the slowdown"]
    assert seen["acc_vs_buffer_size"]["_texts"] == ["no runs vary the buffer size"]
    assert seen["acc_vs_K"]["_texts"] == ["no runs vary K"]


def test_reference_figures_use_reference_runs_only(run_dirs, tmp_path, monkeypatch):
    seen = _capture(monkeypatch)
    runs_df, epochs_df = load_runs(run_dirs)
    figures.plot_layerwise_accuracy(runs_df, tmp_path)
    assert list(seen["layerwise_acc"]) == [
        "backprop / sync / K=3 (2 seeds)", "dgl / sync / K=3 (2 seeds)", "dgl / async / K=3 (2 seeds)",
        "fdg / sync / K=3 (1 seed)", "fdg / async / K=3 (1 seed)", "_texts"]
    figures.plot_accuracy_vs_epoch(epochs_df, tmp_path)
    assert (tmp_path / "test_acc_vs_epoch.png").is_file()


# Test accuracy at epochs 1-3 of reference sync runs. write_run's simulated parallel times are
# 12.5, 25, 37.5 s for seed 0 and 13, 26, 39 s for seed 1 (half the process's seconds).
CURVES = {
    ("dgl", "sync", 3, "default", 0): [0.80, 0.86, 0.84],  # 85% at epoch 2, then a dip: 25 s
    ("dgl", "sync", 3, "default", 1): [0.80, 0.84, 0.85],  # exactly 85% at epoch 3: 39 s
    ("fdg", "sync", 3, "beta0.5", 0): [0.90, 0.91, 0.92],  # epoch 1: 12.5 s
    ("fdg", "sync", 3, "beta0.5", 1): [0.70, 0.80, 0.84],  # never
    ("backprop", "sync", 3, "default", 0): [0.50, 0.60, 0.70],  # never
    ("backprop", "sync", 3, "default", 1): [0.50, 0.60, 0.70],  # never
}


def write_curves(root: Path, curves: dict = CURVES, engine: str | None = None) -> list[Path]:
    """Runs whose epochs have the given test accuracies (and metrics.json the given engine)."""
    dirs = []
    for key, accs in curves.items():
        dirs.append(write_run(root, *key, [0.5, 0.6, accs[-1]]))

        def change(metrics, accs=accs):
            for record, acc in zip(metrics["epochs"], accs, strict=True):
                record["test_acc"] = acc
            if engine is not None:
                metrics["engine"] = engine
            if engine == "distributed":  # real workers: their seconds are wall-clock seconds
                for record in metrics["epochs"]:
                    del record["sim_time_s"]

        _edit(dirs[-1] / "metrics.json", change)
    return dirs


def _time_by_run(runs: pd.DataFrame, column: str) -> dict:
    return {(m, s): t for m, s, t in zip(runs["method"], runs["seed"], runs[column])}


def test_time_to_accuracy_is_the_time_of_the_first_epoch_reaching_it(tmp_path):
    runs_df, epochs_df = load_runs(write_curves(tmp_path))
    times = _time_by_run(add_time_to_accuracy(runs_df, epochs_df, 0.85), "time_to_85pct_s")
    assert {k: t for k, t in times.items() if not math.isnan(t)} == {
        ("dgl", 0): 25.0, ("dgl", 1): 39.0, ("fdg", 0): 12.5}
    assert math.isnan(times[("fdg", 1)]) and math.isnan(times[("backprop", 0)])

    # The column names its target; a higher one is reached later or not at all.
    higher = _time_by_run(add_time_to_accuracy(runs_df, epochs_df, 0.855), "time_to_85.5pct_s")
    assert higher[("dgl", 0)] == 25.0 and math.isnan(higher[("dgl", 1)])
    assert "time_to_85pct_s" not in runs_df  # the per-run frame itself is left as it was


@pytest.mark.parametrize("target", [0.0, 1.5, math.nan])
def test_target_accuracy_must_be_a_fraction(tmp_path, target):
    runs_df, epochs_df = load_runs(write_curves(tmp_path))
    with pytest.raises(UserError, match="target accuracy must be a fraction in"):
        add_time_to_accuracy(runs_df, epochs_df, target)


def test_default_target_accuracy_is_the_schema_default():
    cfg = config.validate({"experiment": "x", "grid": {"methods": ["dgl"]}})
    assert cfg["report"] == {"target_accuracy": DEFAULT_TARGET_ACCURACY, "reduced_run": False, "published": [], "claims": []}


def test_time_to_accuracy_in_the_tables(tmp_path):
    runs_df = add_time_to_accuracy(*load_runs(write_curves(tmp_path)), 0.85)
    table = summary(runs_df)
    dgl, fdg, backprop = (row(table, m, "sync", 3, v)
                          for m, v in (("dgl", "default"), ("fdg", "beta0.5"), ("backprop", "default")))
    # Mean and std over the seeds that reached 85%; how many did not.
    assert dgl["time_to_85pct_s_mean"] == pytest.approx(32.0)
    assert dgl["time_to_85pct_s_std"] == pytest.approx(14.0 / math.sqrt(2))
    assert dgl["time_to_85pct_s_ci95"] == pytest.approx(12.7062 * 14.0 / math.sqrt(2) / math.sqrt(2), rel=1e-4)
    assert dgl["time_to_85pct_s_missed"] == 0
    assert fdg["time_to_85pct_s_mean"] == 12.5 and math.isnan(fdg["time_to_85pct_s_std"])
    assert fdg["time_to_85pct_s_missed"] == 1
    assert math.isnan(backprop["time_to_85pct_s_mean"]) and backprop["time_to_85pct_s_missed"] == 2

    md = write_summary(table, tmp_path / "tables")[1].read_text().splitlines()
    # one engine, one clock: no column for either, the headers name the clock
    assert "time to 85% (s, simulated parallel)" in md[0] and "engine" not in md[0] and "| clock" not in md[0]
    cells = {line.split("|")[1].strip(): line for line in md[2:] if line.startswith("|")}
    assert re.search(r"\|\s+38.2 \|", cells["dgl"])  # the time on it
    assert re.search(r"\|\s+32.0 ± 88.9 \|", cells["dgl"])
    assert re.search(r"\|\s+12.5 \(not reached by 1 seed\) \|", cells["fdg"])
    assert re.search(r"\|\s+3 \|\s+not reached \|", cells["backprop"])  # epochs, then no time

    main = main_table(runs_df)
    assert list(main.columns) == ["method", "sync_mean", "sync_std", "sync_ci95", "sync_seeds", "sync_clock", "sync_time_to_85pct_s_mean",
                                  "sync_time_to_85pct_s_std", "sync_time_to_85pct_s_ci95", "sync_time_to_85pct_s_missed"]
    assert list(main["sync_time_to_85pct_s_mean"].fillna(-1)) == [-1, 32.0, 12.5]
    assert list(main["sync_time_to_85pct_s_missed"]) == [2, 0, 1]
    md, tex = (p.read_text() for p in write_main(main, tmp_path / "main")[1:3])
    assert [c.strip() for c in md.splitlines()[0].strip("|").split("|")] == [
        "method", "sync (%, mean ± 95% CI, n=2)", "sync: time to 85% (s, simulated parallel)"]
    assert re.search(r"\| backprop .*\|\s+not reached \|$", md, re.M)
    assert r"32.0 $\pm$ 88.9" in tex and "12.5 (not reached by 1 seed)" in tex


def _capture_lines(monkeypatch) -> dict:
    """Record each figure's plotted lines (label -> x, y) instead of only saving it."""
    seen, finish = {}, figures._finish

    def spy(fig, ax, stem):
        seen[stem.name] = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                           for line in ax.lines}
        return finish(fig, ax, stem)

    monkeypatch.setattr(figures, "_finish", spy)
    return seen


def test_time_figure_plots_reference_runs_against_seconds(run_dirs, tmp_path, monkeypatch):
    seen = _capture_lines(monkeypatch)
    epochs_df = load_runs(run_dirs)[1]
    paths = figures.plot_accuracy_vs_simulated_time(epochs_df, tmp_path, 0.85)
    assert [p.name for p in paths] == ["acc_vs_simulated_time.png", "acc_vs_simulated_time.pdf"]
    assert all(_magic_ok(p) for p in paths)
    lines = seen["acc_vs_simulated_time"]
    # Reference runs only, one engine (so not named), and the target.
    assert list(lines) == ["backprop sync (2 seeds)", "dgl sync (2 seeds)", "dgl async (2 seeds)",
                           "fdg sync (1 seed)", "fdg async (1 seed)", "target 85%"]
    # Means over seeds at each epoch: simulated parallel seconds (12.5, 25, 37.5 and 13, 26, 39),
    # accuracy (0.9, 0.95, 1 times the final 0.880 and 0.876).
    x, y = lines["dgl sync (2 seeds)"]
    assert x == pytest.approx([12.75, 25.5, 38.25])
    assert y == pytest.approx([90 * 0.878, 95 * 0.878, 100 * 0.878], abs=1e-6)
    assert lines["target 85%"][1] == [85.0, 85.0]


def test_runs_of_two_engines_are_told_apart(tmp_path, monkeypatch):
    dgl = {k: v for k, v in CURVES.items() if k[0] == "dgl"}
    simulated = write_curves(tmp_path / "simulated", dgl)  # no "engine" key: simulated
    # The same run keys from a second experiment, on the distributed engine.
    distributed = write_curves(tmp_path / "distributed", {k: [0.86, 0.87, 0.88] for k in dgl},
                               engine="distributed")
    runs_df, epochs_df = load_runs(simulated + distributed)
    assert sorted(runs_df["engine"]) == ["distributed"] * 2 + ["simulated"] * 2
    runs_df = add_time_to_accuracy(runs_df, epochs_df, 0.85)

    table = summary(runs_df).set_index("engine")
    assert table.loc["simulated", "time_to_85pct_s_mean"] == pytest.approx(32.0)
    assert table.loc["distributed", "time_to_85pct_s_mean"] == pytest.approx(25.5)  # wall clock
    assert list(table["clock"]) == ["wall clock", "simulated parallel"]
    header = write_summary(summary(runs_df), tmp_path / "tables")[1].read_text().splitlines()[0]
    assert "| engine " in header

    main = main_table(runs_df)
    assert list(main[["method", "engine"]].itertuples(index=False, name=None)) == [
        ("dgl", "distributed"), ("dgl", "simulated")]

    # one figure per clock, each with the runs kept on it
    seen = _capture_lines(monkeypatch)
    figures.plot_accuracy_vs_simulated_time(epochs_df, tmp_path, 0.85)
    figures.plot_accuracy_vs_wall_time(epochs_df, tmp_path, 0.85)
    assert list(seen["acc_vs_simulated_time"]) == ["dgl sync (2 seeds)", "target 85%"]
    assert list(seen["acc_vs_wall_time"]) == ["dgl sync (2 seeds)", "target 85%"]
    assert seen["acc_vs_wall_time"]["dgl sync (2 seeds)"][0] != seen["acc_vs_simulated_time"]["dgl sync (2 seeds)"][0]
    written = build_report(simulated + distributed, tmp_path / "t", tmp_path / "f")
    assert {"acc_vs_simulated_time.png", "acc_vs_wall_time.png"} <= {p.name for p in written}


def test_cli_report_takes_the_target_accuracy(tmp_path):
    dirs = [str(d) for d in write_curves(tmp_path / "runs")]
    out = tmp_path / "out"
    report = [sys.executable, "-m", "decoupled", "report", "--runs", *dirs,
              "--tables", str(out / "tables"), "--figures", str(out / "figures")]
    done = subprocess.run([*report, "--target-accuracy", "0.8"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(out / "tables" / "summary.csv").set_index("method")
    assert table.loc["dgl", "time_to_80pct_s_mean"] == pytest.approx(12.75)  # both at epoch 1
    assert (out / "figures" / "acc_vs_simulated_time.pdf").is_file()

    bad = subprocess.run([*report, "--target-accuracy", "85"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "decoupled: error: target accuracy must be a fraction in (0, 1], got 85.0"]


def test_report_package_does_not_import_matplotlib():
    # The workflow imports the output names; that must stay cheap and headless.
    code = ("import sys, decoupled.report as r; "
            "assert r.FIGURE_NAMES and 'matplotlib' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_duplicate_check_includes_the_variant(run_dirs, tmp_path):
    # Same method/mode/K/seed in two variants: two different runs.
    slowed = [d for d in run_dirs if d.parent.name == "S4m1_B10" and d.name == "seed0"]
    assert len(load_runs(slowed + [d for d in run_dirs if d.parent.name == "S2m1_B10"])[0]) == 3
    copy = tmp_path / "elsewhere" / "seed0"
    shutil.copytree(slowed[0], copy)
    with pytest.raises(UserError, match="same method/mode/K/variant/seed") as info:
        load_runs(slowed + [copy])
    assert str(copy) in str(info.value)


def test_malformed_metrics_names_the_file(run_dirs):
    bad = run_dirs[0] / "metrics.json"
    bad.write_text('{"method": "dgl", "epochs": [')
    with pytest.raises(UserError, match="metrics.json") as info:
        load_runs(run_dirs)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("train_time_s"), "missing key 'train_time_s'"),
    (lambda d: d.pop("variant"), "missing key 'variant'"),
    (lambda d: d.pop("varied"), "missing key 'varied'"),
    (lambda d: d["varied"].append("lr"), "'varied' must list"),
    (lambda d: d["settings"].pop("buffer_size"), r"missing key 'settings\.buffer_size'"),
    (lambda d: d["settings"].update(buffer_size=None), r"'settings\.buffer_size' must be set"),
    (lambda d: d["epochs"][1].pop("steps_per_module"), r"epochs\[1\]: missing key 'steps_per_module'"),
    (lambda d: d["epochs"][2]["grad_staleness"].pop(), r"epochs\[2\]: 'grad_staleness' must be 3"),
    (lambda d: d.update(engine=3), "'engine' must be str"),
])
def test_bad_metrics_name_the_file(run_dirs, change, message):
    run_dir = next(d for d in run_dirs if d.parent.name == "S4m1_B10")
    _edit(run_dir / "metrics.json", change)
    with pytest.raises(UserError, match=message) as info:
        load_runs([run_dir])
    assert str(run_dir / "metrics.json") in str(info.value) and "\n" not in str(info.value)


def test_missing_eval_and_mismatched_variant_name_the_file(run_dirs):
    (run_dirs[1] / "eval.json").unlink()
    with pytest.raises(UserError, match=r"eval\.json: file not found"):
        load_runs(run_dirs)

    _edit(run_dirs[2] / "eval.json", lambda d: d.update(variant="S4m1_B10"))
    with pytest.raises(UserError, match=r"eval\.json: variant does not match"):
        load_runs(run_dirs[2:])


def test_the_quantization_and_groups_figures_plot_their_runs(tmp_path, monkeypatch):
    """acc_vs_bits: floats at 32 bits, each quantized variant at bits/dim and at its bytes per
    image; acc_vs_worker_macs: one bubble per method, K and G at the largest per-worker MACs."""
    from matplotlib.collections import PathCollection

    seen, finish = {}, figures._finish

    def spy(fig, ax, stem, legend_ax=None):
        for a in fig.axes:  # keep what was drawn before the figure is closed
            a._drawn = ([list(line.get_xdata()) for line in a.get_lines()], [c.get_offsets().tolist() for c in a.collections if isinstance(c, PathCollection)])
        seen[stem.name + "_axes"] = [a._drawn for a in fig.axes]
        return finish(fig, ax, stem, legend_ax)

    monkeypatch.setattr(figures, "_finish", spy)
    rows = []
    for seed in (0, 1):
        for bits, nbytes, acc, varied in ((None, 6000.0, 0.88, []), (0.5, 120.0, 0.80, ["quantize"]), (1.0, 220.0, 0.85, ["quantize"])):
            rows.append({"method": "dgl", "mode": "sync", "K": 3, "seed": seed, "varied": varied, "test_acc": acc + 0.01 * seed,
                         "quantize_bits_per_activation": bits, "bytes_per_image": nbytes, "groups": None, "max_worker_macs": 9e5, "workers": 3})
        for G, macs, acc in ((1, 9e5, 0.87), (2, 5e5, 0.86), (4, 3e5, 0.84)):
            rows.append({"method": "gn_dgl", "mode": "sync", "K": 3, "seed": seed, "varied": [] if G == 1 else ["groups"], "test_acc": acc,
                         "quantize_bits_per_activation": None, "bytes_per_image": 6000.0, "groups": G, "max_worker_macs": macs, "workers": 3 * G})
        rows.append({"method": "backprop", "mode": "sync", "K": 3, "seed": seed, "varied": [], "test_acc": 0.9,
                     "quantize_bits_per_activation": None, "bytes_per_image": 0.0, "groups": None, "max_worker_macs": 2e6, "workers": 1})
    runs_df = pd.DataFrame(rows)
    figures.plot_accuracy_vs_bits(runs_df, tmp_path)
    figures.plot_accuracy_vs_worker_macs(runs_df, tmp_path)
    (bits_lines, _), (bytes_lines, _) = seen["acc_vs_bits_axes"]
    assert bits_lines == [[0.5, 1.0, 32.0]] and bytes_lines == [[120.0, 220.0, 6000.0]]  # dgl only: gn_dgl has no quantized runs
    (_, bubbles), = seen["acc_vs_worker_macs_axes"]
    centres = sorted(tuple(p) for c in bubbles for p in c)
    assert [x for x, _ in centres] == [3e5, 5e5, 9e5, 9e5, 2e6]
    assert [y for _, y in centres] == pytest.approx([84.0, 86.0, 87.0, 88.5, 90.0])


class _TablePage(HTMLParser):
    """What a table's HTML page (``tables._html``) shows: header cells, body rows, notes."""

    def __init__(self, page: str):
        super().__init__()
        self.headers, self.rows, self.notes, self._row, self._cell = [], [], [], [], None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self._row = []
        elif tag in ("th", "td", "li"):
            self._cell = []

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("th", "td", "li"):
            text = "".join(self._cell).replace("\xa0", " ")
            {"th": self.headers, "td": self._row, "li": self.notes}[tag].append(text)
            self._cell = None
        elif tag == "tr" and self._row:
            self.rows.append(self._row)


def _markdown_table(md: str) -> tuple[list[str], list[list[str]], list[str]]:
    """The header, rows and notes (the list under the table) of a Markdown table."""
    lines = md.splitlines()
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines if line.startswith("|")]
    notes = [line.removeprefix("- ") for line in lines if line.startswith("- ")]
    return cells[0], cells[2:], notes


def _tables(writer, df: pd.DataFrame, tmp_path: Path) -> dict:
    """The written files of one table, by format."""
    return {p.suffix[1:]: p.read_text() for p in writer(df, tmp_path)}


def test_every_table_is_an_html_page_with_every_column_row_and_note(table, runs_df, tmp_path):
    """What `snakemake --report` shows of a table: a real <table>, nothing left out of the
    Markdown version, and the notes under it."""
    assert "html" in TABLE_FORMATS
    for writer, df in ((write_summary, table), (write_main, main_table(runs_df))):
        files = _tables(writer, df, tmp_path / writer.__name__)
        assert list(files) == TABLE_FORMATS
        header, rows, notes = _markdown_table(files["md"])
        page = _TablePage(files["html"])
        assert files["html"].startswith("<!DOCTYPE html>") and "<table>" in files["html"]
        assert page.headers == header and len(header) > 2
        assert page.rows == rows and len(rows) == len(df)
        assert page.notes == notes and notes
        assert all(f"% {note}" in files["tex"] for note in notes)  # under the tabular, as comments


def test_a_missing_number_says_whether_it_does_not_apply_or_was_never_reached(tmp_path):
    """Backprop has no async form (n/a) and never reaches 85 % (not reached); FDG has an async
    form but no run of it (not yet run); a sync run has no slowdown (n/a). Each mark means one
    thing, and the notes under the table say what."""
    assert len({NOT_APPLICABLE, NOT_REACHED, NOT_RECORDED, NO_RUN, PER_BOUNDARY}) == 5
    dirs = write_curves(tmp_path / "runs") + [write_run(tmp_path / "runs", "dgl", "async", 3, "S1_B10", 0, [0.8, 0.85, 0.87])]
    runs_df = add_time_to_accuracy(*load_runs(dirs), 0.85)

    main = _TablePage(_tables(write_main, main_table(runs_df), tmp_path / "main")["html"])
    cells = {row[0]: dict(zip(main.headers, row)) for row in main.rows}
    assert cells["backprop"]["async (%, mean ± 95% CI, n=1)"] == NOT_APPLICABLE
    assert cells["backprop"]["sync: time to 85% (s, simulated parallel)"] == NOT_REACHED
    assert cells["fdg"]["async (%, mean ± 95% CI, n=1)"] == NO_RUN
    assert cells["fdg"]["async: time to 85% (s, simulated parallel)"] == NO_RUN
    assert cells["dgl"]["async: time to 85% (s, simulated parallel)"] == "37.5"
    for mark in (NOT_APPLICABLE, NOT_REACHED, NO_RUN):
        assert sum(note.startswith(f'"{mark}": ') for note in main.notes) == 1, mark
    # an experiment that runs FDG in sync mode only (overrides.fdg.grid.modes): not a run to wait for
    from decoupled.report.tables import NOT_IN_GRID

    planned = {("backprop", "sync"), ("dgl", "sync"), ("dgl", "async"), ("fdg", "sync")}
    html = (write_main(main_table(runs_df), tmp_path / "planned", planned)[3]).read_text()
    only_sync = _TablePage(html)
    cells = {row[0]: dict(zip(only_sync.headers, row)) for row in only_sync.rows}
    assert cells["fdg"]["async (%, mean ± 95% CI, n=1)"] == NOT_IN_GRID and cells["backprop"]["async (%, mean ± 95% CI, n=1)"] == NOT_APPLICABLE
    assert any(note.startswith(f'"{NOT_IN_GRID}": ') for note in only_sync.notes) and NO_RUN not in html

    page = _TablePage(_tables(write_summary, summary(runs_df), tmp_path / "summary")["html"])
    backprop = dict(zip(page.headers, next(row for row in page.rows if row[0] == "backprop")))
    assert backprop["slowdown"] == NOT_APPLICABLE and backprop["time to 85% (s, simulated parallel)"] == NOT_REACHED
    assert any(note.startswith(f'"{NOT_REACHED}": no seed reached') for note in page.notes)


def test_tables_say_what_plus_minus_is_and_over_how_many_seeds(table, runs_df, tmp_path):
    files = _tables(write_summary, table, tmp_path / "summary")
    plus_minus = "± is the half-width of the 95% t-interval of the mean over the row's n seeds (column seeds), t(0.975, n − 1) · s / √n"
    assert all(plus_minus in text for ext, text in files.items() if ext != "csv")
    assert "test acc (%, mean ± 95% CI)" in _markdown_table(files["md"])[0] and "seeds" in _markdown_table(files["md"])[0]

    # the main table has no seeds column: the header says n where every row has the same
    curves = write_curves(tmp_path / "same")
    header = _markdown_table(_tables(write_main, main_table(load_runs(curves)[0]), tmp_path / "same")["md"])[0]
    assert header[1] == "sync (%, mean ± 95% CI, n=2)"
    # ... else each cell (FDG has one seed per mode, the others two)
    files = _tables(write_main, main_table(runs_df), tmp_path / "differ")
    header, rows, notes = _markdown_table(files["md"])
    assert header[1:3] == ["sync (%, mean ± 95% CI)", "async (%, mean ± 95% CI)"]
    assert {row[0]: row[1] for row in rows} == {"backprop": "88.70 ± 2.54 (n=2)", "dgl": "87.80 ± 2.54 (n=2)", "fdg": "88.40 (n=1)"}
    assert notes[0].startswith("± is the half-width of the 95% t-interval of the mean over the n seeds")


def test_every_time_column_names_its_clock(tmp_path):
    """Process seconds (the training process's wall clock) beside the run's clock: simulated
    parallel for the simulated engine, wall clock for real workers; a column of runs on several
    clocks says so, and the clock column beside it names each."""
    dgl = {k: v for k, v in CURVES.items() if k[0] == "dgl"}
    simulated = write_curves(tmp_path / "simulated", dgl)
    distributed = write_curves(tmp_path / "distributed", {k: [0.86, 0.87, 0.88] for k in dgl}, engine="distributed")

    one = add_time_to_accuracy(*load_runs(simulated), 0.85)
    header, _, notes = _markdown_table(_tables(write_summary, summary(one), tmp_path / "one")["md"])
    timed = [h for h in header if "time" in h]
    assert timed == ["process time (s, wall clock)", "time (s, simulated parallel)", "time to 85% (s, simulated parallel)",
                     "finish time per module (s, simulated parallel)"]
    assert "clock" not in header
    assert any("simulated parallel: the simulated engine's clock, each module's measured work as if on a worker of its own" in n for n in notes)
    assert any(n.startswith("process time (s, wall clock): the seconds the training process measured") for n in notes)

    both = add_time_to_accuracy(*load_runs(simulated + distributed), 0.85)
    header, rows, notes = _markdown_table(_tables(write_summary, summary(both), tmp_path / "both")["md"])
    assert [h for h in header if "time" in h] == ["process time (s, wall clock)", "time (s, on the row's clock)",
                                                  "time to 85% (s, on the row's clock)", "finish time per module (s, on the row's clock)"]
    assert sorted(dict(zip(header, row))["clock"] for row in rows) == ["simulated parallel", "wall clock"]
    assert any("wall clock: real workers" in n for n in notes)
    main_header = _markdown_table(_tables(write_main, main_table(both), tmp_path / "main")["md"])[0]
    assert main_header[-1] == "sync: time to 85% (s, on the row's clock)"


def test_the_summary_gives_bits_per_activation_and_bytes_per_image(tmp_path):
    """Floats: 32 bits; a quantizer at every boundary: its bits/dim; boundaries that differ:
    "per boundary"; bytes sent per image from the last epoch, "not recorded" in a run without."""
    runs = {2: (None, None, 6000.0), 3: (1.0, [0.1, 0.2], 220.0), 4: (None, [0.1, None, None], None)}
    dirs = []
    for k, (bits, errors, nbytes) in runs.items():
        dirs.append(write_run(tmp_path / "runs", "dgl", "sync", k, "default", 0, [0.8] * (k - 1) + [0.88]))

        def change(metrics, bits=bits, errors=errors, nbytes=nbytes):
            metrics["settings"]["quantize_bits_per_activation"] = bits
            for record in metrics["epochs"]:
                if errors is not None:
                    record["vq_recon_error_per_boundary"] = errors
                if nbytes is not None:
                    record["bytes_per_image"] = nbytes

        _edit(dirs[-1] / "metrics.json", change)
    table = summary(add_time_to_accuracy(*load_runs(dirs), 0.85))
    assert list(table["bits_per_activation"].fillna(-1)) == [32.0, 1.0, -1]
    assert list(table["bytes_per_image"].fillna(-1)) == [6000.0, 220.0, -1]
    header, rows, notes = _markdown_table(_tables(write_summary, table, tmp_path / "t")["md"])
    cells = [dict(zip(header, row)) for row in rows]
    assert [c["bits per activation"] for c in cells] == ["32", "1", PER_BOUNDARY]
    assert [c["bytes sent per image"] for c in cells] == ["6000", "220", NOT_RECORDED]
    assert any(n.startswith("bits per activation: what one activation sent to the next module costs (32: floats") for n in notes)


def _capture_spread(monkeypatch) -> dict:
    """Per figure, the lowest and highest y of its error bars and bands, instead of only saving it."""
    from matplotlib.collections import LineCollection, PolyCollection

    seen, finish = {}, figures._finish

    def spy(fig, ax, stem, legend_ax=None):
        ys = []
        for collection in (c for a in fig.axes for c in a.collections):
            if isinstance(collection, LineCollection):
                ys += [y for segment in collection.get_segments() for _, y in segment]
            elif isinstance(collection, PolyCollection):
                ys += [y for path in collection.get_paths() for _, y in path.vertices]
        seen[stem.name] = (min(ys), max(ys)) if ys else None
        return finish(fig, ax, stem, legend_ax)

    monkeypatch.setattr(figures, "_finish", spy)
    return seen


def test_error_bars_and_bands_stay_between_0_and_100_percent(tmp_path, monkeypatch):
    """Two seeds at 0 % and 6 % (or 97 % and 100 %) have a std of 4.2 (2.1) points: bars and
    bands of ± std would reach below 0 % (above 100 %), which no accuracy can."""
    seen = _capture_spread(monkeypatch)
    finals = {("dgl", "sync", k, "default", seed): [[0.0, 0.06][seed]] * (k - 1) + [[0.97, 1.0][seed]]
              for k in (2, 3) for seed in (0, 1)}
    runs_df = load_runs(write_runs(tmp_path / "runs", finals))[0]
    figures.plot_layerwise_accuracy(runs_df, tmp_path)
    figures.plot_accuracy_vs_K(runs_df, tmp_path)
    assert seen["layerwise_acc"] == pytest.approx((0.0, 100.0))  # drawn, and cut
    assert seen["acc_vs_K"] == pytest.approx((98.5 - 3 / math.sqrt(2), 100.0))  # the mean 98.5 ± 2.1, cut above

    rows = [{"method": "dgl", "mode": "sync", "K": 3, "seed": seed, "varied": varied, "test_acc": acc[seed],
             "quantize_bits_per_activation": bits, "bytes_per_image": nbytes, "groups": groups, "max_worker_macs": macs,
             "workers": 3 * (groups or 1)}
            for seed in (0, 1)
            for bits, nbytes, groups, macs, acc, varied in ((None, 6000.0, None, 9e5, [0.97, 1.0], []),
                                                             (0.5, 120.0, None, 9e5, [0.0, 0.06], ["quantize"]),
                                                             (None, 6000.0, 2, 5e5, [0.0, 0.06], ["groups"]))]
    sweeps = pd.DataFrame(rows).assign(method=lambda df: ["gn_dgl" if g else "dgl" for g in df["groups"]])
    figures.plot_accuracy_vs_bits(sweeps, tmp_path)
    figures.plot_accuracy_vs_worker_macs(sweeps, tmp_path)
    assert seen["acc_vs_bits"] == pytest.approx((0.0, 100.0))
    assert seen["acc_vs_worker_macs"] == pytest.approx((0.0, 100.0))


def test_the_time_figure_names_its_clock_in_its_title_axis_and_file_name(tmp_path, monkeypatch):
    """Simulated parallel seconds are not wall-clock seconds: each figure says which it plots, in
    its title, its axis and its file name, and plots no run of the other clock."""
    seen, notes, finish = {}, {}, figures._finish

    def spy(fig, ax, stem, legend_ax=None):
        seen[stem.name] = (ax.get_title(), ax.get_xlabel())
        notes[stem.name] = " ".join(text.get_text() for text in ax.texts)
        return finish(fig, ax, stem, legend_ax)

    monkeypatch.setattr(figures, "_finish", spy)
    dgl = {k: v for k, v in CURVES.items() if k[0] == "dgl"}
    simulated = load_runs(write_curves(tmp_path / "simulated", dgl))[1]
    paths = figures.plot_accuracy_vs_simulated_time(simulated, tmp_path, 0.85)
    assert [p.stem for p in paths] == ["acc_vs_simulated_time"] * 2 and "acc_vs_simulated_time" in FIGURE_NAMES
    title, xlabel = seen["acc_vs_simulated_time"]
    assert "simulated parallel clock" in title and "simulated parallel clock" in xlabel and "wall" not in title + xlabel

    real = load_runs(write_curves(tmp_path / "distributed", dgl, engine="distributed"))[1]
    paths = figures.plot_accuracy_vs_wall_time(real, tmp_path, 0.85)
    assert [p.stem for p in paths] == ["acc_vs_wall_time"] * 2 and "acc_vs_wall_time" in FIGURE_NAMES
    title, xlabel = seen["acc_vs_wall_time"]
    assert "wall clock" in title and "wall clock" in xlabel and "simulated" not in title + xlabel
    figures.plot_accuracy_vs_wall_time(simulated, tmp_path, 0.85)  # no run on the wall clock: it says so
    assert notes["acc_vs_wall_time"] == "no reference runs on the wall clock"


def test_summary_rows_follow_the_main_tables_order(table):
    """The paper's method order, sync before async, as the main table and the figures; not the
    alphabet (which put cdni before backprop)."""
    keys = list(table[["method", "mode"]].drop_duplicates().itertuples(index=False, name=None))
    assert keys == [("backprop", "sync"), ("dgl", "sync"), ("dgl", "async"), ("fdg", "sync"), ("fdg", "async")]
