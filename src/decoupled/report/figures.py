"""Figures of the report: learning curves and the DGL paper's layer-wise accuracy plot.

Each figure is saved as PNG (for quick viewing) and PDF (for the paper). One line per
method × mode × K, averaged over seeds; the legend sits outside the axes so it never hides a
curve, whatever the number of runs.
"""

from pathlib import Path

import matplotlib

# Reports are built on headless machines and in pipelines; never try to open a window.
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (must follow the backend choice)
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from decoupled.files import atomic_path  # noqa: E402

GROUP = ["method", "mode", "K"]


def plot_accuracy_vs_epoch(epochs_df: pd.DataFrame, figures_dir: Path) -> list[Path]:
    """Test accuracy vs epoch; band = min–max over seeds where there are several."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for key, runs in epochs_df.groupby(GROUP, sort=True):
        per_epoch = runs.groupby("epoch")["test_acc"].agg(["mean", "min", "max", "size"])
        x = per_epoch.index.to_numpy()
        (line,) = ax.plot(x, 100 * per_epoch["mean"], marker="o", markersize=3,
                          label=_label(key, runs["seed"].nunique()))
        if (per_epoch["size"] > 1).any():
            ax.fill_between(x, 100 * per_epoch["min"], 100 * per_epoch["max"],
                            color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("Epoch")
    ax.set_ylabel("Test accuracy (%)")
    ax.set_title("Test accuracy vs epoch (mean over seeds, band = min–max)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _finish(fig, ax, Path(figures_dir) / "test_acc_vs_epoch")


def plot_layerwise_accuracy(runs_df: pd.DataFrame, figures_dir: Path) -> list[Path]:
    """Test accuracy of each module's auxiliary head vs its depth (1..K); error bars = std."""
    # One row per (run, module) so the seed statistics are plain group-bys.
    per_module = runs_df[GROUP + ["seed", "test_acc_per_module"]].explode("test_acc_per_module")
    per_module["module"] = per_module.groupby(GROUP + ["seed"]).cumcount() + 1
    per_module["acc"] = per_module["test_acc_per_module"].astype(float)

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for key, rows in per_module.groupby(GROUP, sort=True):
        stats = rows.groupby("module")["acc"].agg(["mean", "std"])
        n_seeds = rows["seed"].nunique()
        # With one seed std is NaN; draw no bars rather than zero-length caps.
        yerr = 100 * stats["std"] if n_seeds > 1 else None
        ax.errorbar(stats.index, 100 * stats["mean"], yerr=yerr, marker="o", capsize=3,
                    label=_label(key, n_seeds))
    ax.set_xlabel("Module index (depth of auxiliary head)")
    ax.set_ylabel("Test accuracy (%)")
    ax.set_title("Layer-wise test accuracy (mean over seeds, bars = std)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _finish(fig, ax, Path(figures_dir) / "layerwise_acc")


def _label(key: tuple, n_seeds: int) -> str:
    method, mode, k = key
    return f"{method} / {mode} / K={k} ({n_seeds} seed{'s' if n_seeds != 1 else ''})"


def _finish(fig, ax, stem: Path) -> list[Path]:
    """Add the legend, save PNG and PDF atomically, and free the figure."""
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)
    stem.parent.mkdir(parents=True, exist_ok=True)
    try:
        return [_save_atomic(fig, stem.with_suffix(ext)) for ext in (".png", ".pdf")]
    finally:
        plt.close(fig)  # pyplot keeps figures alive otherwise; batch reports would leak memory


def _save_atomic(fig, path: Path) -> Path:
    """Save via a temp file so a reader never sees half an image."""
    with atomic_path(path) as tmp:
        # bbox_inches="tight" grows the canvas to include the legend outside the axes.
        fig.savefig(tmp, format=path.suffix[1:], dpi=150, bbox_inches="tight")
    return path
