"""Summary table of runs: one row per method × mode × K, aggregated over seeds.

The CSV keeps raw fractions for further analysis; the Markdown and LaTeX versions are for
reading, so accuracies become percentages with two decimals and ``mean ± std``.
"""

import math
from pathlib import Path

import pandas as pd

from decoupled.files import write_text

GROUP = ["method", "mode", "K"]
_PM = "\x00PM\x00"  # placeholder so LaTeX escaping cannot mangle the ± sign
_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}


def summary(runs_df: pd.DataFrame) -> pd.DataFrame:
    """Aggregate the per-run frame from ``load_runs`` over seeds.

    Columns: method, mode, K, seeds, test_acc_mean, test_acc_std (ddof=1, NaN for one seed),
    train_time_s, images_per_s, epochs (means), then aux_acc_mean_m1..m{max K}: the mean test
    accuracy of module k's auxiliary head (1-based, as in the layer-wise figure), NaN for
    groups with fewer modules.
    """
    # Pad shorter runs with NaN, which is exactly "this group has no module k", so the mean
    # over seeds leaves those cells NaN instead of inventing a value.
    lists = runs_df["test_acc_per_module"].tolist()
    width = max(map(len, lists), default=0)
    aux = pd.DataFrame([list(a) + [math.nan] * (width - len(a)) for a in lists],
                       index=runs_df.index, dtype=float,
                       columns=[f"aux_acc_mean_m{k + 1}" for k in range(width)])
    grouped = pd.concat([runs_df, aux], axis=1).groupby(GROUP, sort=True)
    table = grouped.agg(
        seeds=("seed", "size"),
        test_acc_mean=("test_acc", "mean"),
        test_acc_std=("test_acc", "std"),
        train_time_s=("train_time_s", "mean"),
        images_per_s=("images_per_s", "mean"),
        epochs=("epochs", "mean"),
    )
    return table.join(grouped[list(aux.columns)].mean()).reset_index()


def write_summary(df: pd.DataFrame, tables_dir: Path) -> list[Path]:
    """Write ``summary.csv``, ``summary.md`` and ``summary.tex``; return their paths.

    The LaTeX tabular uses booktabs rules (``\\toprule``), so the paper needs ``booktabs``.
    """
    tables_dir = Path(tables_dir)
    tables_dir.mkdir(parents=True, exist_ok=True)
    display = _display_frame(df)

    # Cells are preformatted strings: numparse off keeps "83.00" from becoming "83", and
    # numbers are right-aligned by hand since tabulate no longer sees them as numbers.
    markdown = display.map(lambda s: s.replace(_PM, " ± ")).to_markdown(
        index=False, disable_numparse=True, colalign=_alignment(display))
    latex = (display.rename(columns=_latex_escape)
             .map(lambda s: _latex_escape(s).replace(_PM, r" $\pm$ "))
             .style.hide(axis="index")
             .to_latex(hrules=True, column_format="".join(a[0] for a in _alignment(display))))

    outputs = {
        "summary.csv": df.to_csv(index=False),
        "summary.md": markdown + "\n",
        "summary.tex": latex,
    }
    paths = []
    for name, text in outputs.items():
        paths.append(tables_dir / name)
        write_text(paths[-1], text)
    return paths


def _display_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Format the summary as strings for humans, with ``_PM`` where ± goes."""
    aux_cols = [c for c in df.columns if c.startswith("aux_acc_mean_m")]
    out = pd.DataFrame({
        "method": df["method"].astype(str),
        "mode": df["mode"].astype(str),
        "K": df["K"].map(str),
        "seeds": df["seeds"].map(str),
        "test acc (%)": [_pct(m, s) for m, s in zip(df["test_acc_mean"], df["test_acc_std"])],
        "train time (s)": df["train_time_s"].map("{:.1f}".format),
        "images/s": df["images_per_s"].map("{:.0f}".format),
        "epochs": df["epochs"].map("{:g}".format),
    })
    for col in aux_cols:
        out[f"module {col.removeprefix('aux_acc_mean_m')} acc (%)"] = df[col].map(_pct)
    return out


def _alignment(display: pd.DataFrame) -> list[str]:
    """Text columns (method, mode) left, numbers right."""
    return ["left", "left"] + ["right"] * (display.shape[1] - 2)


def _pct(mean: float, std: float = math.nan) -> str:
    """A fraction as a percentage; the spread is left out when there is none (one seed)."""
    if pd.isna(mean):
        return "-"
    text = f"{100 * mean:.2f}"
    return text if pd.isna(std) else f"{text}{_PM}{100 * std:.2f}"


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIALS.get(ch, ch) for ch in text)
