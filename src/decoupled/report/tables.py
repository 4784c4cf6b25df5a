"""Tables of the report, each written as CSV, Markdown and LaTeX.

``summary``: one row per method × mode × K × variant × engine, aggregated over seeds.
``main``: the paper's main table, test accuracy of the reference runs, one row per method and
one column per mode.

Both give the seconds of training it took to reach the report's target test accuracy (the
per-run ``time_to_{X}pct_s`` column of ``add_time_to_accuracy``), as mean ± std over the seeds
that reached it, with the number of seeds that never did (``..._missed``).

The CSVs keep raw fractions for further analysis; the Markdown and LaTeX versions are for
reading, so accuracies become percentages with two decimals and ``mean ± std``.
"""

import math
import re
from pathlib import Path

import pandas as pd

from decoupled.files import write_text
from decoupled.report import method_rank, mode_rank

GROUP = ["method", "mode", "K", "variant", "engine"]
SETTINGS = ["slowdown_factor", "slowed_module", "buffer_size", "budget", "beta", "gradient_delay"]
# Per-module lists of a run, averaged over seeds into one column per module (1-based).
PER_MODULE = {"test_acc_per_module": "aux_acc_mean_m", "steps_per_module": "steps_mean_m", "finish_time_s_per_module": "finish_time_s_mean_m"}
# A per-run time-to-accuracy column; X (the target in percent) may have decimals.
_TIME_COLUMN = r"time_to_(?P<percent>[\d.]+)pct_s"
_TIME_STATS = ["mean", "std", "missed"]
_PM = "\x00PM\x00"  # placeholders so LaTeX escaping cannot mangle the ± sign or the dash
_NA = "\x00NA\x00"
_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}


def summary(runs_df: pd.DataFrame) -> pd.DataFrame:
    """Aggregate the per-run frame from ``load_runs`` over seeds.

    Columns: method, mode, K, variant, engine, seeds, test_acc_mean, test_acc_std (ddof=1, NaN
    for one seed), train_time_s (the process's seconds), clock and time_s (the run's seconds on
    its clock: simulated parallel, wall clock or one process), images_per_s, epochs (means),
    then for each per-run ``time_to_{X}pct_s`` column (on the same clock):
    ``time_to_{X}pct_s_mean`` and ``_std`` over the seeds that reached X% (NaN where none did)
    and ``time_to_{X}pct_s_missed`` (seeds that never did), then slowdown_factor, slowed_module,
    buffer_size, budget, beta, gradient_delay (the variant's settings, missing where they do not
    apply), then per module k (1-based, as in the layer-wise figure; NaN for groups with fewer
    modules or runs that lack it): aux_acc_mean_m{k}, the mean test accuracy of its head,
    steps_mean_m{k}, its steps over the run, and finish_time_s_mean_m{k}, when it made its last
    one on the run's clock.
    """
    # Pad shorter runs with NaN, which is exactly "this group has no module k", so the mean
    # over seeds leaves those cells NaN instead of inventing a value.
    per_module = [_per_module_columns(runs_df, col, prefix) for col, prefix in PER_MODULE.items()]
    grouped = pd.concat([runs_df, *per_module], axis=1).groupby(GROUP, sort=True)
    table = grouped.agg(
        seeds=("seed", "size"),
        test_acc_mean=("test_acc", "mean"),
        test_acc_std=("test_acc", "std"),
        train_time_s=("train_time_s", "mean"),
        clock=("clock", "first"),  # the engine decides it, and is part of the group
        time_s=("time_s", "mean"),
        images_per_s=("images_per_s", "mean"),
        epochs=("epochs", "mean"),
        **_time_aggregations(runs_df),
        # The variant fixes its settings, so every seed has the same ones.
        **{name: (name, "first") for name in SETTINGS},
    )
    columns = [c for frame in per_module for c in frame.columns]
    return table.join(grouped[columns].mean()).reset_index()


def _per_module_columns(runs_df: pd.DataFrame, col: str, prefix: str) -> pd.DataFrame:
    """One float column per module of the per-run lists in ``col`` (None: a run without it)."""
    lists = [[] if v is None else list(v) for v in runs_df[col]]
    width = max(map(len, lists), default=0)
    return pd.DataFrame([a + [math.nan] * (width - len(a)) for a in lists], index=runs_df.index,
                        dtype=float, columns=[f"{prefix}{k + 1}" for k in range(width)])


def main_table(runs_df: pd.DataFrame) -> pd.DataFrame:
    """Test accuracy of the reference runs (``varied == []``), one row per method.

    Columns: method, then K and engine, each only if the reference runs have several, then
    {mode}_mean, {mode}_std (fractions; std ddof=1, NaN for one seed) and {mode}_clock (what its
    seconds measure) for each mode present, sync and async first, then for each per-run ``time_to_{X}pct_s`` column and each mode
    {mode}_time_to_{X}pct_s_mean, _std and _missed, as in ``summary``. A method without a mode
    (backprop has no async) gets NaN there. Rows follow ``METHOD_ORDER``, then any other method
    alphabetically.
    """
    ref = runs_df[runs_df["varied"].map(len) == 0]
    if ref.empty:
        return pd.DataFrame({"method": pd.Series([], dtype=str)})
    index = ["method"] + [col for col in ("K", "engine") if ref[col].nunique() > 1]
    stats = (ref.groupby(index + ["mode"])
             .agg(mean=("test_acc", "mean"), std=("test_acc", "std"), **_time_aggregations(ref))
             .unstack("mode"))
    modes = sorted(stats.columns.get_level_values("mode").unique(), key=mode_rank)
    table = pd.DataFrame(index=stats.index)
    clocks = ref.groupby(index + ["mode"])["clock"].first().unstack("mode")
    for mode in modes:
        table[f"{mode}_mean"] = stats[("mean", mode)]
        table[f"{mode}_std"] = stats[("std", mode)]
        table[f"{mode}_clock"] = clocks[mode]
    for time_col in _time_columns(ref):
        for mode in modes:
            for stat in _TIME_STATS:
                table[f"{mode}_{time_col}_{stat}"] = stats[(f"{time_col}_{stat}", mode)]
            # A mode the method lacks made the count float; keep it a count.
            table[f"{mode}_{time_col}_missed"] = table[f"{mode}_{time_col}_missed"].astype("Int64")
    table = table.reset_index()
    rank = table["method"].map(lambda m: method_rank(m)[0])
    return (table.assign(_rank=rank).sort_values(["_rank"] + index)
            .drop(columns="_rank").reset_index(drop=True))


def write_summary(df: pd.DataFrame, tables_dir: Path) -> list[Path]:
    """Write ``summary.csv``, ``summary.md`` and ``summary.tex``; return their paths.

    The LaTeX tabular uses booktabs rules (``\\toprule``), so the paper needs ``booktabs``. The
    engine column is shown only when the runs use several engines (the CSV always has it).
    """
    aux_cols = [c for c in df.columns if c.startswith("aux_acc_mean_m")]
    display = pd.DataFrame({
        "method": df["method"].astype(str),
        "mode": df["mode"].astype(str),
        "K": df["K"].map(str),
        "variant": df["variant"].astype(str),
        "seeds": df["seeds"].map(str),
        "test acc (%)": [_pct(m, s) for m, s in zip(df["test_acc_mean"], df["test_acc_std"])],
        "process time (s)": df["train_time_s"].map("{:.1f}".format),
        "clock": df["clock"].astype(str),
        "time (s)": df["time_s"].map("{:.1f}".format),
        "images/s": df["images_per_s"].map("{:.0f}".format),
        "epochs": df["epochs"].map("{:g}".format),
    })
    if df["engine"].nunique() > 1:  # with one engine it would be the same word on every row
        display.insert(display.columns.get_loc("seeds"), "engine", df["engine"].astype(str))
    for time_col in _time_columns(df, suffix="_mean"):
        display[_time_header(time_col)] = _seconds_cells(df, time_col)
    display = display.assign(**{
        "steps per module": _module_cells(df, "steps_mean_m", "{:.0f}"),
        "finish time per module (s)": _module_cells(df, "finish_time_s_mean_m", "{:.1f}"),
        "slowdown": df["slowdown_factor"].map(_setting),
        "slowed module": df["slowed_module"].map(_setting),
        "buffer": df["buffer_size"].map(_setting),
        "budget": df["budget"].map(lambda b: _NA if pd.isna(b) else str(b)),
        "beta": df["beta"].map(_setting),
        "gradient delay": df["gradient_delay"].map(_setting),
    })
    for col in aux_cols:
        display[f"module {col.removeprefix('aux_acc_mean_m')} acc (%)"] = df[col].map(_pct)
    return _write("summary", df, display, ["method", "mode", "variant", "engine", "clock", "budget"], tables_dir)


def write_main(df: pd.DataFrame, tables_dir: Path) -> list[Path]:
    """Write ``main.csv``, ``main.md`` and ``main.tex``; return their paths.

    Cells read "91.31 ± 0.11" (percent, mean ± std over seeds) and "–" where a method has no
    run in that mode; the time-to-accuracy columns follow the accuracy ones, one per mode.
    """
    display = pd.DataFrame({"method": df["method"].astype(str)})
    for col in ("K", "engine"):
        if col in df.columns:
            display[col] = df[col].map(str)
    # Mode names are single words (the workflow's wildcard), so "sync_mean" is an accuracy
    # column and "sync_time_to_85pct_s_mean" is not.
    for mean_col in [c for c in df.columns if re.fullmatch(r"[a-z]+_mean", c)]:
        mode = mean_col.removesuffix("_mean")
        display[f"{mode} (%)"] = [_pct(m, s) for m, s in zip(df[mean_col], df[f"{mode}_std"])]
    for time_col in _time_columns(df, suffix="_mean", mode_prefix=True):
        mode, _, bare = time_col.partition("_")
        clocks = ", ".join(sorted(set(df[f"{mode}_clock"].dropna())))  # what the seconds measure
        display[f"{mode}: {_time_header(bare)[:-1]}, {clocks})"] = _seconds_cells(df, time_col)
    return _write("main", df, display, ["method", "engine"], tables_dir)


def _write(name: str, df: pd.DataFrame, display: pd.DataFrame, text_cols: list[str],
           tables_dir: Path) -> list[Path]:
    """Write ``df`` as ``{name}.csv`` and the preformatted ``display`` as .md and .tex."""
    tables_dir = Path(tables_dir)
    tables_dir.mkdir(parents=True, exist_ok=True)
    # Text columns left, numbers right.
    align = ["left" if c in text_cols else "right" for c in display.columns]

    # Cells are preformatted strings: numparse off keeps "83.00" from becoming "83", and
    # numbers are right-aligned by hand since tabulate no longer sees them as numbers.
    markdown = display.map(lambda s: s.replace(_PM, " ± ").replace(_NA, "–")).to_markdown(
        index=False, disable_numparse=True, colalign=align or None)
    # "--" is LaTeX's en dash, safe whatever the input encoding.
    latex = (display.rename(columns=_latex_escape)
             .map(lambda s: _latex_escape(s).replace(_PM, r" $\pm$ ").replace(_NA, "--"))
             .style.hide(axis="index")
             .to_latex(hrules=True, column_format="".join(a[0] for a in align)))

    outputs = {
        f"{name}.csv": df.to_csv(index=False),
        f"{name}.md": markdown + "\n",
        f"{name}.tex": latex,
    }
    paths = []
    for file_name, text in outputs.items():
        paths.append(tables_dir / file_name)
        write_text(paths[-1], text)
    return paths


def _time_aggregations(runs_df: pd.DataFrame) -> dict[str, tuple]:
    """Named aggregations of each per-run time-to-accuracy column over seeds.

    pandas' mean and std skip NaN, so they are over the seeds that reached the target; the
    ``_missed`` count says how many did not, so a lucky seed cannot pass for a reliable method.
    """
    aggregations = {}
    for col in _time_columns(runs_df):
        aggregations |= {f"{col}_mean": (col, "mean"), f"{col}_std": (col, "std"),
                         f"{col}_missed": (col, _count_missing)}
    return aggregations


def _count_missing(values: pd.Series) -> int:
    return int(values.isna().sum())


def _time_columns(df: pd.DataFrame, suffix: str = "", mode_prefix: bool = False) -> list[str]:
    """The names ``[{mode}_]time_to_{X}pct_s`` of ``df``'s columns ``...{suffix}``, in order."""
    pattern = ("[a-z]+_" if mode_prefix else "") + _TIME_COLUMN + re.escape(suffix)
    return [c.removesuffix(suffix) for c in df.columns if re.fullmatch(pattern, c)]


def _time_header(time_col: str) -> str:
    """``time_to_85pct_s`` -> ``time to 85% (s)``."""
    return f"time to {re.fullmatch(_TIME_COLUMN, time_col)['percent']}% (s)"


def _seconds_cells(df: pd.DataFrame, time_col: str) -> list[str]:
    """Cells like "31.0 ± 0.5": seconds over the seeds that reached the target; "–" where none
    did, and "(not reached by 1 seed)" appended where some did not."""
    cells = []
    for mean, std, missed in zip(*(df[f"{time_col}_{stat}"] for stat in _TIME_STATS)):
        if pd.isna(mean):
            cells.append(_NA)
            continue
        text = f"{mean:.1f}" if pd.isna(std) else f"{mean:.1f}{_PM}{std:.1f}"
        if missed:
            text += f" (not reached by {missed} seed{'s' if missed != 1 else ''})"
        cells.append(text)
    return cells


def _pct(mean: float, std: float = math.nan) -> str:
    """A fraction as a percentage; the spread is left out when there is none (one seed)."""
    if pd.isna(mean):
        return _NA
    text = f"{100 * mean:.2f}"
    return text if pd.isna(std) else f"{text}{_PM}{100 * std:.2f}"


def _setting(value) -> str:
    return _NA if pd.isna(value) else f"{value:g}"


def _module_cells(df: pd.DataFrame, prefix: str, number: str) -> list[str]:
    """Cells like "470/470/470": one number per module, "–" where the runs lack them."""
    cols = [c for c in df.columns if c.startswith(prefix)]
    return ["/".join(number.format(v) for v in row if not pd.isna(v)) or _NA for row in df[cols].itertuples(index=False)]


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIALS.get(ch, ch) for ch in text)


# what each published metric reads of a run (eval.json's test accuracy, a fraction; seconds on its clock)
_METRICS = {
    "test_error_pct": lambda runs: 100 * (1 - runs["test_acc"]),
    "test_acc_pct": lambda runs: 100 * runs["test_acc"],
    "s_per_epoch": lambda runs: runs["time_s"] / runs["epochs"],
}


def paper_vs_ours(runs_df: pd.DataFrame, published: list[dict], reduced_run: bool) -> pd.DataFrame:
    """One row per published number (``report.published``): paper, table, setting, method, K,
    metric, published, then ours over the runs of that method and K that vary no other axis, or
    are of the entry's ``variant`` (ours_mean, ours_std, seeds; NaN and 0 seeds where none ran),
    gap (ours_mean - published) and run ("reduced run" for a ``*_cpu.yaml`` config, else "full")."""
    # A published number names its K, so runs swept over K count; any other swept axis does not.
    ref = runs_df[runs_df["varied"].map(lambda varied: set(varied) <= {"K"})] if len(runs_df) else runs_df
    rows = []
    for entry in published:
        pool = ref if entry.get("variant") is None or not len(runs_df) else runs_df[runs_df["variant"] == entry["variant"]]
        runs = pool[(pool["method"] == entry["method"]) & (pool["K"] == entry["K"])] if len(pool) else pool
        values = _METRICS[entry["metric"]](runs) if len(runs) else pd.Series([], dtype=float)
        mean = float(values.mean()) if len(values) else math.nan
        rows.append({
            "paper": entry["paper"], "table": entry["table"], "setting": entry.get("setting", ""),
            "method": entry["method"], "K": entry["K"], "metric": entry["metric"], "published": entry["value"],
            "ours_mean": mean, "ours_std": float(values.std()) if len(values) > 1 else math.nan, "seeds": len(values),
            "gap": mean - entry["value"], "run": "reduced run" if reduced_run else "full",
        })
    return pd.DataFrame(rows, columns=["paper", "table", "setting", "method", "K", "metric", "published", "ours_mean", "ours_std", "seeds", "gap", "run"])


def write_paper_vs_ours(df: pd.DataFrame, tables_dir: Path) -> list[Path]:
    """Write ``paper_vs_ours.csv``, ``.md`` and ``.tex``: "not yet run" where no run exists."""
    def ours(mean: float, std: float) -> str:
        if math.isnan(mean):
            return "not yet run"
        return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f}{_PM}{std:.2f}"

    display = pd.DataFrame({
        "paper": df["paper"].astype(str), "table": df["table"].astype(str), "setting": df["setting"].astype(str),
        "method": df["method"].astype(str), "K": df["K"].map(str), "metric": df["metric"].astype(str),
        "published": df["published"].map("{:g}".format),
        "ours": [ours(m, s) for m, s in zip(df["ours_mean"], df["ours_std"])],
        "seeds": df["seeds"].map(str),
        "gap": df["gap"].map(lambda g: _NA if math.isnan(g) else f"{g:+.2f}"),
        "run": df["run"].astype(str),
    })
    return _write("paper_vs_ours", df, display, ["paper", "table", "setting", "method", "metric", "run"], tables_dir)
