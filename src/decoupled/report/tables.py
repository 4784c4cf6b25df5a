"""Tables of the report, each written as CSV, Markdown, LaTeX and HTML.

``summary``: one row per method × mode × K × variant × engine, aggregated over seeds.
``main``: the paper's main table, test accuracy of the reference runs, one row per method and
one column per mode.

Both give the seconds of training it took to reach the report's target test accuracy (the
per-run ``time_to_{X}pct_s`` column of ``add_time_to_accuracy``), as mean ± the 95 % interval
over the seeds that reached it, with the number of seeds that never did (``..._missed``).

The CSVs keep raw fractions for further analysis (the standard deviation and the 95 %
t-interval's half-width, ``_ci95``, both); the other three are for reading: accuracies in
percent with two decimals as ``mean ± half-width`` (``intervals.half_width``), n said, every
time column named by its clock, and notes under the table saying what ± is, over how many seeds, what each time column measures and what
each mark standing for a missing number means (``MARKS``: a number that does not apply is not
one that was never reached). The HTML version is a page of its own, the one ``snakemake
--report`` shows (the others are downloads there).
"""

import html
import math
import re
from pathlib import Path

import pandas as pd

from decoupled import methods
from decoupled.claims import VERDICTS
from decoupled.files import write_text
from decoupled.layout import TABLE_FORMATS
from decoupled.report import ONE_PROCESS, SIMULATED_PARALLEL, WALL_CLOCK, intervals, method_of, method_rank, mode_rank

GROUP = ["method", "mode", "K", "variant", "engine"]
SETTINGS = ["slowdown_factor", "slowed_module", "buffer_size", "budget", "beta", "gradient_delay"]
# Per-module lists of a run, averaged over seeds into one column per module (1-based).
PER_MODULE = {"test_acc_per_module": "aux_acc_mean_m", "steps_per_module": "steps_mean_m", "finish_time_s_per_module": "finish_time_s_mean_m"}
# A per-run time-to-accuracy column; X (the target in percent) may have decimals.
_TIME_COLUMN = r"time_to_(?P<percent>[\d.]+)pct_s"
_TIME_STATS = ["mean", "std", "ci95", "missed"]
PM = " ± "
# What every ± of the tables is (intervals.half_width), said under each.
CI = "95% CI"
PM_IS = ("± is the half-width of the 95% t-interval of the mean over the {over}, t(0.975, n − 1) · s / √n: 9 standard "
         "deviations at n = 2, 1.6 at n = 4; {single} has none.")
# the note under a table whose rows say their seeds in a column of their own
PM_OVER_SEEDS_COLUMN = PM_IS.format(over="row's n seeds (column seeds)", single="a row of one seed")

# What stands in a cell without a number; each mark means one thing only.
NOT_APPLICABLE = "n/a"
NOT_REACHED = "not reached"
NOT_RECORDED = "not recorded"
NO_RUN = "not yet run"
NOT_IN_GRID = "not in the grid"
PER_BOUNDARY = "per boundary"
MARKS = {
    NOT_APPLICABLE: "does not apply (a mode the method has no form of: backprop has no async form; a setting "
                    "the method or mode does not have)",
    NOT_REACHED: "no seed reached the target test accuracy",
    NOT_RECORDED: "not in the runs' metrics.json (written before it was counted)",
    NO_RUN: "the method has this mode, but no run of it is on disk",
    NOT_IN_GRID: "the method has this mode, but the experiment does not run it (grid.modes, or the method's own under overrides: grid.modes)",
    PER_BOUNDARY: "the boundaries send different bits per activation (model.quantize per boundary)",
}
# What each clock's seconds measure (decoupled.report: a run's clock).
CLOCKS = {
    SIMULATED_PARALLEL: "simulated parallel: the simulated engine's clock, each module's measured work as if on a "
                        "worker of its own, waits for its neighbours included",
    WALL_CLOCK: "wall clock: real workers, one process per module (distributed engine)",
    ONE_PROCESS: "one process: a simulated run written before the parallel clock, every module's work in turn",
}
_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}


def summary(runs_df: pd.DataFrame) -> pd.DataFrame:
    """Aggregate the per-run frame from ``load_runs`` over seeds.

    Columns: method, mode, K, variant, engine, seeds, test_acc_mean, test_acc_std (ddof=1, NaN
    for one seed), test_acc_ci95 (the 95 % t-interval's half-width, NaN for one seed),
    train_time_s (the process's seconds), clock and time_s (the run's seconds on its clock:
    simulated parallel, wall clock or one process), images_per_s, epochs (means), then for each
    per-run ``time_to_{X}pct_s`` column (on the same clock): ``time_to_{X}pct_s_mean``,
    ``_std`` and ``_ci95`` over the seeds that reached X% (NaN where none did) and
    ``time_to_{X}pct_s_missed`` (seeds that never did), then slowdown_factor, slowed_module,
    buffer_size, budget, beta, gradient_delay (the variant's settings, missing where they do not
    apply), bits_per_activation (32: floats; NaN: boundaries that differ) and bytes_per_image
    (what every module sent per image read, forward and back; NaN: not counted), then per module k (1-based, as in the layer-wise figure; NaN for groups with fewer
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
        test_acc_ci95=("test_acc", intervals.half_width),
        train_time_s=("train_time_s", "mean"),
        clock=("clock", "first"),  # the engine decides it, and is part of the group
        time_s=("time_s", "mean"),
        images_per_s=("images_per_s", "mean"),
        epochs=("epochs", "mean"),
        **_time_aggregations(runs_df),
        # The variant fixes its settings, so every seed has the same ones.
        **{name: (name, "first") for name in SETTINGS},
        bits_per_activation=("bits_per_activation", "first"),
        bytes_per_image=("bytes_per_image", "mean"),
    )
    columns = [c for frame in per_module for c in frame.columns]
    table = table.join(grouped[columns].mean()).reset_index()
    # rows in the main table's order: the paper's methods, sync before async
    order = sorted(table.index, key=lambda i: (method_rank(table.at[i, "method"]), mode_rank(table.at[i, "mode"]), *table.loc[i, GROUP[2:]]))
    return table.loc[order].reset_index(drop=True)


def _per_module_columns(runs_df: pd.DataFrame, col: str, prefix: str) -> pd.DataFrame:
    """One float column per module of the per-run lists in ``col`` (None: a run without it)."""
    lists = [[] if v is None else list(v) for v in runs_df[col]]
    width = max(map(len, lists), default=0)
    return pd.DataFrame([a + [math.nan] * (width - len(a)) for a in lists], index=runs_df.index,
                        dtype=float, columns=[f"{prefix}{k + 1}" for k in range(width)])


def main_table(runs_df: pd.DataFrame) -> pd.DataFrame:
    """Test accuracy of the reference runs (``varied == []``), one row per method.

    Columns: method, then K and engine, each only if the reference runs have several, then
    {mode}_mean, {mode}_std, {mode}_ci95 (fractions; std ddof=1 and the 95 % t-interval's
    half-width, NaN for one seed), {mode}_seeds and {mode}_clock (what its seconds measure) for
    each mode present, sync and async first, then for each per-run ``time_to_{X}pct_s`` column
    and each mode {mode}_time_to_{X}pct_s_mean, _std, _ci95 and _missed, as in ``summary``. A method without a mode
    (backprop has no async) gets NaN there. Rows follow ``METHOD_ORDER``, then any other method
    alphabetically.
    """
    ref = runs_df[runs_df["varied"].map(len) == 0]
    if ref.empty:
        return pd.DataFrame({"method": pd.Series([], dtype=str)})
    index = ["method"] + [col for col in ("K", "engine") if ref[col].nunique() > 1]
    stats = (ref.groupby(index + ["mode"])
             .agg(mean=("test_acc", "mean"), std=("test_acc", "std"), ci95=("test_acc", intervals.half_width), seeds=("seed", "size"),
                  **_time_aggregations(ref))
             .unstack("mode"))
    modes = sorted(stats.columns.get_level_values("mode").unique(), key=mode_rank)
    table = pd.DataFrame(index=stats.index)
    clocks = ref.groupby(index + ["mode"])["clock"].first().unstack("mode")
    for mode in modes:
        table[f"{mode}_mean"] = stats[("mean", mode)]
        table[f"{mode}_std"] = stats[("std", mode)]
        table[f"{mode}_ci95"] = stats[("ci95", mode)]
        table[f"{mode}_seeds"] = stats[("seeds", mode)].astype("Int64")  # NA: no run in that mode
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
    """Write ``summary`` in every format of ``TABLE_FORMATS``; return their paths.

    The LaTeX tabular uses booktabs rules (``\\toprule``), so the paper needs ``booktabs``. The
    engine column is shown only when the runs use several engines, the clock column only when
    they use several clocks (else the time headers name it); the CSV always has both.
    """
    clock = _clock_name(df["clock"])
    display = pd.DataFrame({
        "method": df["method"].astype(str),
        "mode": df["mode"].astype(str),
        "K": df["K"].map(str),
        "variant": df["variant"].astype(str),
        "seeds": df["seeds"].map(str),
        f"test acc (%, mean ± {CI})": [_pct(m, h) for m, h in zip(df["test_acc_mean"], df["test_acc_ci95"])],
        "process time (s, wall clock)": df["train_time_s"].map("{:.1f}".format),
        f"time (s, {clock})": df["time_s"].map("{:.1f}".format),
        "images/s": df["images_per_s"].map("{:.0f}".format),
        "epochs": df["epochs"].map("{:g}".format),
    })
    if df["engine"].nunique() > 1:  # with one engine it would be the same word on every row
        display.insert(display.columns.get_loc("seeds"), "engine", df["engine"].astype(str))
    if df["clock"].nunique() > 1:
        display.insert(display.columns.get_loc(f"time (s, {clock})"), "clock", df["clock"].astype(str))
    for time_col in _time_columns(df, suffix="_mean"):
        display[_time_header(time_col, clock)] = _seconds_cells(df, time_col)
    display = display.assign(**{
        "steps per module": _module_cells(df, "steps_mean_m", "{:.0f}"),
        f"finish time per module (s, {clock})": _module_cells(df, "finish_time_s_mean_m", "{:.1f}"),
        "slowdown": df["slowdown_factor"].map(_setting),
        "slowed module": df["slowed_module"].map(_setting),
        "buffer": df["buffer_size"].map(_setting),
        "budget": [_budget(b, mode) for b, mode in zip(df["budget"], df["mode"])],
        "beta": df["beta"].map(_setting),
        "gradient delay": df["gradient_delay"].map(_setting),
        "bits per activation": df["bits_per_activation"].map(lambda b: PER_BOUNDARY if pd.isna(b) else f"{b:g}"),
        "bytes sent per image": df["bytes_per_image"].map(lambda b: NOT_RECORDED if pd.isna(b) else f"{b:.0f}"),
    })
    # one cell, as the steps: the CSV has a column per module
    display["head test acc per module (%)"] = _module_cells(df, "aux_acc_mean_m", "{:.2%}", percent=True)
    notes = [
        PM_OVER_SEEDS_COLUMN,
        "process time (s, wall clock): the seconds the training process measured over its epochs, test evaluations "
        "excluded; the simulated engine's one process runs every module in turn, so this is their work added up.",
        f"time (s, {clock}): the same training on the run's clock; " + "; ".join(CLOCKS[c] for c in sorted(set(df["clock"]))) + ".",
        *_time_notes(df, clock),
        "bits per activation: what one activation sent to the next module costs (32: floats; model.quantize: its bits/dim); "
        "bytes sent per image: every module's messages forward and back per image read, in the last epoch.",
    ]
    return write_table("summary", "Summary table", df, display, ["method", "mode", "variant", "engine", "clock", "budget"], notes, tables_dir)


def write_main(df: pd.DataFrame, tables_dir: Path, planned: set[tuple[str, str]] | None = None) -> list[Path]:
    """Write ``main`` in every format of ``TABLE_FORMATS``; return their paths.

    Cells read "91.31 ± 0.45" (percent, mean ± the 95 % t-interval's half-width over seeds; the
    header says over how many, or each cell where the rows differ); where a method has no run in
    a mode, "n/a" if the method has no form in that mode (backprop: no async), "not in the grid"
    if ``planned`` (the experiment's (method, mode) pairs) lacks it, else "not yet run". The
    time-to-accuracy columns follow the accuracy ones, one per mode, "not reached" where no seed reached it.
    """
    display = pd.DataFrame({"method": df["method"].astype(str)})
    for col in ("K", "engine"):
        if col in df.columns:
            display[col] = df[col].map(str)
    modes = [c.removesuffix("_seeds") for c in df.columns if re.fullmatch(r"[a-z]+_seeds", c)]
    for mode in modes:
        absent = _absent_marks(df, mode, planned)
        seeds = df[f"{mode}_seeds"].dropna()
        n = f", n={seeds.iloc[0]}" if seeds.nunique() == 1 else ""  # else each cell says its n
        display[f"{mode} (%, mean ± {CI}{n})"] = [
            mark or _pct(m, h) + ("" if n else f" (n={count})")
            for mark, m, h, count in zip(absent, df[f"{mode}_mean"], df[f"{mode}_ci95"], df[f"{mode}_seeds"])]
    clocks = set()
    for time_col in _time_columns(df, suffix="_mean", mode_prefix=True):
        mode, _, bare = time_col.partition("_")
        clocks |= set(df[f"{mode}_clock"].dropna())
        clock = _clock_name(df[f"{mode}_clock"].dropna())
        display[f"{mode}: {_time_header(bare, clock)}"] = _seconds_cells(df, time_col, _absent_marks(df, mode, planned))
    notes = [PM_IS.format(over="n seeds (n in the header, or after the cell where rows differ)", single="a cell of one seed")
             + " A difference between two methods, paired over the seeds they share, is in the claims table."]
    if clocks:
        notes.append("Seconds are on the runs' clock; " + "; ".join(CLOCKS[c] for c in sorted(clocks)) + ".")
        notes += _time_notes(df, _clock_name(pd.Series(sorted(clocks))), mode_prefix=True)
    return write_table("main", "Main table", df, display, ["method", "engine"], notes, tables_dir)


def _absent_marks(df: pd.DataFrame, mode: str, planned: set[tuple[str, str]] | None) -> list[str | None]:
    """Per row of the main table, the mark of a mode the method has no run in (None: it has)."""
    return [None if not pd.isna(seeds) else _absent_mode(method, mode, planned)
            for method, seeds in zip(df["method"], df[f"{mode}_seeds"])]


def _absent_mode(method: str, mode: str, planned: set[tuple[str, str]] | None) -> str:
    """Backprop has no async form: "n/a"; a method that has the mode, and that the experiment
    does not run in it: "not in the grid"; that it runs but has no run of: "not yet run"."""
    name = method_of(method)
    if name in methods.names() and methods.traits(name).sync_only and mode != "sync":
        return NOT_APPLICABLE
    return NOT_IN_GRID if planned is not None and (name, mode) not in planned else NO_RUN


def write_table(name: str, title: str, df: pd.DataFrame, display: pd.DataFrame, text_cols: list[str],
           notes: list[str], tables_dir: Path) -> list[Path]:
    """Write ``df`` as ``{name}.csv`` and the preformatted ``display`` as .md, .tex and .html,
    each followed by ``notes`` and the meaning of each mark its cells hold."""
    tables_dir = Path(tables_dir)
    tables_dir.mkdir(parents=True, exist_ok=True)
    # Text columns left, numbers right.
    align = ["left" if c in text_cols else "right" for c in display.columns]
    notes = notes + [f'"{mark}": {meaning}.' for mark, meaning in MARKS.items() if (display == mark).any().any()]
    texts = {
        "csv": df.to_csv(index=False),
        "md": _markdown(display, align, notes),
        "tex": _latex(display, align, notes),
        "html": _html(title, display, align, notes),
    }
    paths = []
    for ext in TABLE_FORMATS:
        paths.append(tables_dir / f"{name}.{ext}")
        write_text(paths[-1], texts[ext])
    return paths


def _markdown(display: pd.DataFrame, align: list[str], notes: list[str]) -> str:
    # Cells are preformatted strings: numparse off keeps "83.00" from becoming "83", and
    # numbers are right-aligned by hand since tabulate no longer sees them as numbers.
    table = display.to_markdown(index=False, disable_numparse=True, colalign=align or None)
    return table + "\n\n" + "".join(f"- {note}\n" for note in notes)


def _latex(display: pd.DataFrame, align: list[str], notes: list[str]) -> str:
    """A booktabs tabular, the notes under it as comments: for whoever writes the paper's caption."""
    tabular = (display.rename(columns=_latex_text).map(_latex_text)
               .style.hide(axis="index")
               .to_latex(hrules=True, column_format="".join(a[0] for a in align)))
    return tabular + "".join(f"% {note}\n" for note in notes)


def _latex_text(text: str) -> str:
    return _latex_escape(text).replace("±", r"$\pm$")


def _html(title: str, display: pd.DataFrame, align: list[str], notes: list[str]) -> str:
    """A page of its own: the table with every column and the notes under it. Headers and cells
    wrap at their spaces, so that a wide table fits the window where it can (and scrolls where
    not), but never inside a number and its spread or a mark."""
    def cell(text: str, side: str) -> str:
        kind = "mark" if text in MARKS else text if text in VERDICTS else side
        return f'<td class="{kind}">{_escape(text).replace(PM, "&nbsp;±&nbsp;")}</td>'

    head = "".join(f"<th>{_escape(c)}</th>" for c in display.columns)
    body = "\n".join("<tr>" + "".join(cell(text, side) for text, side in zip(row, align)) + "</tr>"
                     for row in display.itertuples(index=False))
    items = "\n".join(f"<li>{_escape(note)}</li>" for note in notes)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{_escape(title)}</title>
<style>
body {{ font: 12px/1.35 system-ui, sans-serif; margin: 12px; color: #111; background: #fff; }}
table {{ border-collapse: separate; border-spacing: 0; border-top: 1px solid #ccc; border-left: 1px solid #ccc; }}
caption {{ text-align: left; font-weight: 600; font-size: 15px; margin-bottom: 6px; }}
th, td {{ border-right: 1px solid #ccc; border-bottom: 1px solid #ccc; padding: 3px 5px; }}
th {{ background: #eef0f3; text-align: left; vertical-align: bottom; min-width: 3em; max-width: 10em; position: sticky; top: 0; }}
td.right {{ text-align: right; font-variant-numeric: tabular-nums; }}
td.mark {{ text-align: center; color: #777; font-style: italic; white-space: nowrap; }}
/* a claim's verdict (the claims table) */
td.holds {{ color: #146c2e; font-weight: 600; }}
td.fails {{ color: #b3261e; font-weight: 600; }}
td.undecided {{ color: #8a5a00; font-weight: 600; }}
tbody tr {{ background: #fff; }}
tbody tr:nth-child(even) {{ background: #f8f8f8; }}
/* the row's name stays in view when a wide table scrolls sideways */
th:first-child, td:first-child {{ position: sticky; left: 0; z-index: 1; background: inherit; }}
th:first-child {{ z-index: 2; background: #eef0f3; }}
ul.notes {{ max-width: 60em; padding-left: 1.2em; color: #333; }}
</style>
</head>
<body>
<table>
<caption>{_escape(title)}</caption>
<thead><tr>{head}</tr></thead>
<tbody>
{body}
</tbody>
</table>
<ul class="notes">
{items}
</ul>
</body>
</html>
"""


def _escape(text: str) -> str:
    """Text as HTML element content (quotes are plain characters there)."""
    return html.escape(text, quote=False)


def _time_aggregations(runs_df: pd.DataFrame) -> dict[str, tuple]:
    """Named aggregations of each per-run time-to-accuracy column over seeds.

    pandas' mean and std skip NaN, so they are over the seeds that reached the target; the
    ``_missed`` count says how many did not, so a lucky seed cannot pass for a reliable method.
    """
    aggregations = {}
    for col in _time_columns(runs_df):
        aggregations |= {f"{col}_mean": (col, "mean"), f"{col}_std": (col, "std"), f"{col}_ci95": (col, intervals.half_width),
                         f"{col}_missed": (col, _count_missing)}
    return aggregations


def _count_missing(values: pd.Series) -> int:
    return int(values.isna().sum())


def _time_columns(df: pd.DataFrame, suffix: str = "", mode_prefix: bool = False) -> list[str]:
    """The names ``[{mode}_]time_to_{X}pct_s`` of ``df``'s columns ``...{suffix}``, in order."""
    pattern = ("[a-z]+_" if mode_prefix else "") + _TIME_COLUMN + re.escape(suffix)
    return [c.removesuffix(suffix) for c in df.columns if re.fullmatch(pattern, c)]


def _clock_name(clocks: pd.Series) -> str:
    """The clock the header of a time column names: the rows' one clock, else the column beside."""
    found = sorted(set(clocks))
    return found[0] if len(found) == 1 else "on the row's clock"


def _time_header(time_col: str, clock: str) -> str:
    """``time_to_85pct_s`` -> ``time to 85% (s, simulated parallel)``."""
    return f"time to {_percent(time_col)}% (s, {clock})"


def _percent(time_col: str) -> str:
    return re.fullmatch(_TIME_COLUMN, re.sub(r"^[a-z]+_(?=time_to)", "", time_col))["percent"]


def _time_notes(df: pd.DataFrame, clock: str, mode_prefix: bool = False) -> list[str]:
    """What a time-to-accuracy column holds, once per target (``mode_prefix``: the main table's columns)."""
    targets = sorted({_percent(c) for c in _time_columns(df, suffix="_mean", mode_prefix=mode_prefix)}, key=float)
    return [f"time to {x}% (s, {clock}): the seconds at the end of the first epoch whose test accuracy reached "
            f"{x}% (accuracy is measured once an epoch), mean ± {CI} over the seeds that reached it; "
            f'"(not reached by k seeds)" counts the others.' for x in targets]


def _seconds_cells(df: pd.DataFrame, time_col: str, absent: list[str | None] | None = None) -> list[str]:
    """Cells like "31.0 ± 0.5": seconds over the seeds that reached the target; "not reached"
    where none did, "(not reached by 1 seed)" appended where some did not, and the ``absent``
    mark of a row without runs."""
    cells = []
    absent = absent or [None] * len(df)
    for mark, mean, half, missed in zip(absent, *(df[f"{time_col}_{stat}"] for stat in ("mean", "ci95", "missed"))):
        if mark is not None or pd.isna(mean):
            cells.append(mark or NOT_REACHED)
            continue
        text = f"{mean:.1f}" if pd.isna(half) else f"{mean:.1f}{PM}{half:.1f}"
        if missed:
            text += f" (not reached by {missed} seed{'s' if missed != 1 else ''})"
        cells.append(text)
    return cells


def _pct(mean: float, half: float = math.nan) -> str:
    """A fraction as a percentage ± its interval's half-width, left out when there is none (one seed)."""
    if pd.isna(mean):
        return NOT_APPLICABLE
    text = f"{100 * mean:.2f}"
    return text if pd.isna(half) else f"{text}{PM}{100 * half:.2f}"


def _setting(value) -> str:
    """A setting of the variant; NaN: the method or mode does not have it."""
    return NOT_APPLICABLE if pd.isna(value) else f"{value:g}"


def _budget(budget, mode: str) -> str:
    """Sync runs have no budget; async runs from before budgets existed did not record theirs."""
    if not pd.isna(budget):
        return str(budget)
    return NOT_APPLICABLE if mode == "sync" else NOT_RECORDED


def _module_cells(df: pd.DataFrame, prefix: str, number: str, percent: bool = False) -> list[str]:
    """Cells like "470/470/470": one number per module of the row's K (NaN beyond it), "not
    recorded" where the runs lack them; ``percent``: fractions shown in percent, without the sign."""
    cols = [c for c in df.columns if c.startswith(prefix)]
    text = (lambda v: number.format(v).removesuffix("%")) if percent else number.format
    return ["/".join(text(v) for v in row if not pd.isna(v)) or NOT_RECORDED for row in df[cols].itertuples(index=False)]


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIALS.get(ch, ch) for ch in text)


# what each published metric reads of a run (eval.json's test accuracy, a fraction; seconds on its clock)
METRICS = {
    "test_error_pct": lambda runs: 100 * (1 - runs["test_acc"]),
    "test_acc_pct": lambda runs: 100 * runs["test_acc"],
    "s_per_epoch": lambda runs: runs["time_s"] / runs["epochs"],
}


def paper_vs_ours(runs_df: pd.DataFrame, published: list[dict], reduced_run: bool) -> pd.DataFrame:
    """One row per published number (``report.published``): paper, table, setting, method, K,
    metric, published, then ours over the runs of that method and K that vary no other axis, or
    are of the entry's ``variant`` (ours_mean, ours_std, ours_ci95: the 95 % t-interval's
    half-width, seeds; NaN and 0 seeds where none ran),
    gap (ours_mean - published) and run ("reduced run" for a ``*_cpu.yaml`` config, else "full")."""
    # A published number names its K, so runs swept over K count; any other swept axis does not.
    ref = runs_df[runs_df["varied"].map(lambda varied: set(varied) <= {"K"})] if len(runs_df) else runs_df
    rows = []
    for entry in published:
        pool = ref if entry.get("variant") is None or not len(runs_df) else runs_df[runs_df["variant"] == entry["variant"]]
        runs = pool[(pool["method"] == entry["method"]) & (pool["K"] == entry["K"])] if len(pool) else pool
        values = METRICS[entry["metric"]](runs) if len(runs) else pd.Series([], dtype=float)
        mean = float(values.mean()) if len(values) else math.nan
        rows.append({
            "paper": entry["paper"], "table": entry["table"], "setting": entry.get("setting", ""),
            "method": entry["method"], "K": entry["K"], "metric": entry["metric"], "published": entry["value"],
            "ours_mean": mean, "ours_std": float(values.std()) if len(values) > 1 else math.nan,
            "ours_ci95": intervals.half_width(values), "seeds": len(values),
            "gap": mean - entry["value"], "run": "reduced run" if reduced_run else "full",
        })
    return pd.DataFrame(rows, columns=["paper", "table", "setting", "method", "K", "metric", "published", "ours_mean", "ours_std", "ours_ci95", "seeds", "gap", "run"])


def write_paper_vs_ours(df: pd.DataFrame, tables_dir: Path) -> list[Path]:
    """Write ``paper_vs_ours`` in every format of ``TABLE_FORMATS``: "not yet run" where no run exists."""
    def ours(mean: float, half: float) -> str:
        if math.isnan(mean):
            return NO_RUN
        return f"{mean:.2f}" if math.isnan(half) else f"{mean:.2f}{PM}{half:.2f}"

    display = pd.DataFrame({
        "paper": df["paper"].astype(str), "table": df["table"].astype(str), "setting": df["setting"].astype(str),
        "method": df["method"].astype(str), "K": df["K"].map(str), "metric": df["metric"].astype(str),
        "published": df["published"].map("{:g}".format),
        f"ours (mean ± {CI})": [ours(m, h) for m, h in zip(df["ours_mean"], df["ours_ci95"])],
        "seeds": df["seeds"].map(str),
        "gap": df["gap"].map(lambda g: NO_RUN if math.isnan(g) else f"{g:+.2f}"),
        "run": df["run"].astype(str),
    })
    notes = [PM_OVER_SEEDS_COLUMN,
             "gap: ours minus published, in the metric's unit; s_per_epoch is on the runs' clock.",
             '"reduced run": from a config/paper/*_cpu.yaml config (other data, smaller network, fewer epochs): its gap says nothing about the paper.']
    return write_table("paper_vs_ours", "Paper vs ours", df, display, ["paper", "table", "setting", "method", "metric", "run"], notes, tables_dir)
