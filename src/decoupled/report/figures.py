"""Figures of the report: learning curves (vs epoch and vs training time), the DGL paper's
layer-wise accuracy plot, the accuracy of the sweeps (vs slowdown, buffer size and K), of
quantized boundaries (vs bits per activation and bytes per image) and GN-DGL's bubble plot
(accuracy vs the largest per-worker compute).

Each figure is saved as PNG (for quick viewing) and PDF (for the paper). The report draws a
sweep figure only when some run varies its axis (``decoupled.layout``); called without such
runs, a plot function draws empty axes saying so. Points are means over seeds; the legend sits outside
the axes so it never hides a curve, whatever the number of runs. Each method keeps one colour
in every figure; line styles tell apart its modes or its sweep settings.

The learning curves and the layer-wise plot use the reference runs only (``varied == []``);
each sweep figure uses the runs that differ from the base settings along its own axes only.

Bars and bands of ± std are cut at 0 % and 100 %: no accuracy lies outside, and a spread of few
seeds reaching past them would draw one.
"""

from collections.abc import Iterable
from pathlib import Path

import matplotlib

# Reports are built on headless machines and in pipelines; never try to open a window.
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (must follow the backend choice)
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator, NullLocator  # noqa: E402

from decoupled import methods  # noqa: E402
from decoupled.files import atomic_path  # noqa: E402
from decoupled.report import FLOAT_BITS, METHOD_ORDER, SIMULATED_PARALLEL, WALL_CLOCK, method_of, method_rank, mode_rank  # noqa: E402

GROUP = ["method", "mode", "K"]
_COLORS = plt.get_cmap("tab10").colors
_LINESTYLES = ["-", "--", ":", "-."]
_MARKERS = ["o", "s", "^", "D", "v", "P"]
_MODE_STYLE = {"sync": "-", "async": "--"}


def plot_accuracy_vs_epoch(epochs_df: pd.DataFrame, figures_dir: Path) -> list[Path]:
    """Test accuracy vs epoch of the reference runs; band = min–max over seeds where there are several."""
    ref = _select(epochs_df, set())
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for key, runs in _groups(ref, GROUP):
        per_epoch = runs.groupby("epoch")["test_acc"].agg(["mean", "min", "max", "size"])
        x = per_epoch.index.to_numpy()
        (line,) = ax.plot(x, 100 * per_epoch["mean"], marker="o", markersize=3, **_style(*key[:2]),
                          label=_label(key, runs["seed"].nunique()))
        if (per_epoch["size"] > 1).any():
            ax.fill_between(x, 100 * per_epoch["min"], 100 * per_epoch["max"],
                            color=line.get_color(), alpha=0.2, linewidth=0)
    if ref.empty:
        _note(ax, "no reference runs (every run varies a swept setting)")
    ax.set_xlabel("Epoch")
    ax.set_ylabel("Test accuracy (%)")
    ax.set_title("Test accuracy vs epoch (reference runs, mean over seeds, band = min–max)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _finish(fig, ax, Path(figures_dir) / "test_acc_vs_epoch")


def plot_accuracy_vs_simulated_time(epochs_df: pd.DataFrame, figures_dir: Path, target_accuracy: float) -> list[Path]:
    """Test accuracy vs the simulated parallel seconds of the simulated engines' reference runs:
    each module's measured work as if on a worker of its own, not wall-clock time."""
    return _accuracy_vs_time(epochs_df, figures_dir, target_accuracy, SIMULATED_PARALLEL, "acc_vs_simulated_time")


def plot_accuracy_vs_wall_time(epochs_df: pd.DataFrame, figures_dir: Path, target_accuracy: float) -> list[Path]:
    """Test accuracy vs the wall-clock seconds of real workers' reference runs (distributed engine)."""
    return _accuracy_vs_time(epochs_df, figures_dir, target_accuracy, WALL_CLOCK, "acc_vs_wall_time")


def _accuracy_vs_time(epochs_df: pd.DataFrame, figures_dir: Path, target_accuracy: float, clock: str, stem: str) -> list[Path]:
    """Test accuracy vs training seconds on ``clock`` of the reference runs kept on it, one line
    per method × mode × engine.

    A point is one epoch: the means over seeds of its test accuracy and of its cumulative
    ``time_s``, so the first line to cross the dotted target line is the method that reached
    that accuracy first (the tables give the seconds). One clock per figure, named in its
    title, axis and file name: seconds of two clocks on one axis would compare what is not
    alike. Runs of the engine whose seconds are another clock (a simulated run from before the
    parallel clock: one process) are left out, and the figure says how many.
    """
    named = clock if clock.endswith("clock") else f"{clock} clock"  # "the simulated parallel clock", "the wall clock"
    ref = _select(epochs_df, set())
    other = ref[ref["clock"] != clock] if len(ref) else ref
    ref = ref[ref["clock"] == clock] if len(ref) else ref
    engines = sorted(ref["engine"].unique()) if len(ref) else []
    several_k = ref["K"].nunique() > 1 if len(ref) else False
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for (method, mode, k, engine), runs in _groups(ref, GROUP + ["engine"]):
        per_epoch = runs.groupby("epoch")[["time_s", "test_acc"]].mean()
        details = [f"K={k}"] if several_k else []
        if len(engines) > 1:
            details.append(engine)
        seeds = runs["seed"].nunique()
        details.append(f"{seeds} seed{'s' if seeds != 1 else ''}")
        label = f"{method} {mode} ({', '.join(details)})"
        ax.plot(per_epoch["time_s"], 100 * per_epoch["test_acc"], label=label, markersize=4,
                marker=_MARKERS[engines.index(engine) % len(_MARKERS)], **_style(method, mode))
    if ref.empty:
        _note(ax, f"no reference runs on the {named}")
    else:
        ax.axhline(100 * target_accuracy, color="0.4", linestyle=":", linewidth=1,
                   label=f"target {100 * target_accuracy:g}%")
        ax.set_xlim(left=0)  # time to accuracy is read from the start of training
    ax.set_xlabel(f"Training time (s, {named}; cumulative at the end of each epoch)")
    ax.set_ylabel("Test accuracy (%)")
    left_out = other.drop_duplicates(["method", "mode", "K", "variant", "seed", "engine"]) if len(other) else other
    elsewhere = f"; {len(left_out)} on another clock ({', '.join(sorted(set(left_out['clock'])))}) left out" if len(left_out) else ""
    ax.set_title(f"Test accuracy vs training time on the {named}\n(reference runs, mean over seeds{elsewhere})", fontsize=11)
    return _finish(fig, ax, Path(figures_dir) / stem)


def plot_layerwise_accuracy(runs_df: pd.DataFrame, figures_dir: Path) -> list[Path]:
    """Test accuracy of each module's auxiliary head vs its depth (1..K), reference runs; bars = std."""
    ref = _select(runs_df, set())
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    if ref.empty:
        _note(ax, "no reference runs (every run varies a swept setting)")
    else:
        # One row per (run, module) so the seed statistics are plain group-bys.
        per_module = ref[GROUP + ["seed", "test_acc_per_module"]].explode("test_acc_per_module")
        per_module["module"] = per_module.groupby(GROUP + ["seed"]).cumcount() + 1
        per_module["acc"] = per_module["test_acc_per_module"].astype(float)
        for key, rows in _groups(per_module, GROUP):
            stats = rows.groupby("module")["acc"].agg(["mean", "std"])
            n_seeds = rows["seed"].nunique()
            # With one seed std is NaN; draw no bars rather than zero-length caps.
            yerr = _clipped_yerr(100 * stats["mean"], 100 * stats["std"]) if n_seeds > 1 else None
            ax.errorbar(stats.index, 100 * stats["mean"], yerr=yerr, marker="o", capsize=3,
                        **_style(*key[:2]), label=_label(key, n_seeds))
    ax.set_xlabel("Module index (depth of auxiliary head)")
    ax.set_ylabel("Test accuracy (%)")
    ax.set_title("Layer-wise test accuracy (reference runs, mean over seeds, bars = std)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _finish(fig, ax, Path(figures_dir) / "layerwise_acc")


def plot_accuracy_vs_slowdown(runs_df: pd.DataFrame, figures_dir: Path) -> list[Path]:
    """Final test accuracy of async runs vs the slowdown factor S, one line per method × slowed
    module × budget (``async.budget``, named when the runs have several).

    The runs with S = 1 (nothing slowed) under the same budget start every line of their
    method. Bars = std over seeds.
    """
    runs = _select(runs_df[runs_df["mode"] == "async"], {"slowdown", "budget"})
    if len(runs):  # async runs from before budgets existed had the time budget's epochs
        runs = runs.assign(budget=runs["budget"].fillna("time"))
    several_k = runs["K"].nunique() > 1 if len(runs) else False
    several_budgets = runs["budget"].nunique() > 1 if len(runs) else False
    series = []
    budgets = sorted(set(runs["budget"]), key=lambda b: (b != "updates", b)) if len(runs) else []
    modules = sorted(set(runs["slowed_module"].dropna())) if len(runs) else []
    for (method, k, budget), rows in _groups(runs, ["method", "K", "budget"]):
        base = rows[rows["slowdown_factor"] == 1]
        slowed = rows[rows["slowdown_factor"] != 1]
        for module, more in slowed.groupby("slowed_module", sort=True):
            label = (f"{method}, module {module} slowed" + (f", {budget} budget" if several_budgets else "")
                     + (f", K={k}" if several_k else ""))
            # the method's colour; a marker per slowed module, a line style per budget
            style = {"color": _color(method), "marker": _MARKERS[modules.index(module) % len(_MARKERS)],
                     "linestyle": _LINESTYLES[(budgets.index(budget) if several_budgets else modules.index(module)) % len(_LINESTYLES)]}
            series.append((label, pd.concat([base, more]), style))
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    if _varies(runs, "slowdown") and series:
        _draw(ax, series, "slowdown_factor")
    else:
        _note(ax, "no runs vary the slowdown")
    ax.set_xlabel("Slowdown factor S of the slowed module (log scale; modules numbered from 0)")
    ax.set_ylabel("Test accuracy (%)")
    ax.set_title("Async test accuracy vs slowdown (mean over seeds, bars = std)"
                 + ("\nupdates: every module makes the steps of sync mode; time: the same schedule time" if several_budgets else ""),
                 fontsize=10 if several_budgets else None)
    return _finish(fig, ax, Path(figures_dir) / "acc_vs_slowdown")


def plot_accuracy_vs_buffer_size(runs_df: pd.DataFrame, figures_dir: Path) -> list[Path]:
    """Final test accuracy of async runs vs the buffer size, one line per method × slowdown."""
    runs = _select(runs_df[runs_df["mode"] == "async"], {"buffer_size", "slowdown"})
    several_k = runs["K"].nunique() > 1 if len(runs) else False
    series = []
    if len(runs):
        # Slowdown factor 1 is "no slowdown" whichever module it names.
        runs = runs.assign(_slowdown=[(None, None) if f == 1 else (f, m)
                                      for f, m in zip(runs["slowdown_factor"], runs["slowed_module"])])
    for (method, k), rows in _groups(runs, ["method", "K"]):
        keys = sorted(set(rows["_slowdown"]), key=lambda s: (s[0] is not None, s))
        for i, key in enumerate(keys):
            factor, module = key
            what = "no slowdown" if factor is None else f"S={factor:g} on module {module}"
            label = f"{method}, {what}" + (f", K={k}" if several_k else "")
            series.append((label, rows[rows["_slowdown"].map(key.__eq__)], _sweep_style(method, i)))
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    if _varies(runs, "buffer_size"):
        _draw(ax, series, "buffer_size")
    else:
        _note(ax, "no runs vary the buffer size")
    ax.set_xlabel("Buffer size (entries between two modules, log scale)")
    ax.set_ylabel("Test accuracy (%)")
    ax.set_title("Async test accuracy vs buffer size (mean over seeds, bars = std)")
    return _finish(fig, ax, Path(figures_dir) / "acc_vs_buffer_size")


def plot_accuracy_vs_K(runs_df: pd.DataFrame, figures_dir: Path) -> list[Path]:
    """Final test accuracy vs the number of modules K, one line per method × mode."""
    runs = _select(runs_df, {"K"})
    series = [(f"{method} / {mode}", rows, {"marker": "o", **_style(method, mode)})
              for (method, mode), rows in _groups(runs, ["method", "mode"])]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    if _varies(runs, "K"):
        _draw(ax, series, "K", log2=False)
    else:
        _note(ax, "no runs vary K")
    ax.set_xlabel("Number of modules K")
    ax.set_ylabel("Test accuracy (%)")
    ax.set_title("Test accuracy vs K (mean over seeds, bars = std)")
    return _finish(fig, ax, Path(figures_dir) / "acc_vs_K")




def plot_accuracy_vs_bits(runs_df: pd.DataFrame, figures_dir: Path) -> list[Path]:
    """Test accuracy vs bits per activation sent between modules (left) and vs bytes per image
    (right), one line per method × mode, floats at 32 bits; bands = std over seeds."""
    runs = _select(runs_df, {"quantize"})
    if len(runs):
        runs = runs[runs["quantize_bits_per_activation"].notna() | ~runs["varied"].map(bool)]
        runs = runs.assign(bits=runs["quantize_bits_per_activation"].astype(float).fillna(FLOAT_BITS).to_numpy())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    if _varies(runs, "quantize"):
        for (method, mode), rows in _groups(runs, ["method", "mode"]):
            if rows["bits"].nunique() < 2:
                continue
            for ax, x in zip(axes, ("bits", "bytes_per_image")):
                _band(ax, rows, x, f"{method} / {mode}", **_style(method, mode), marker="o")
        for ax in axes:
            ax.set_xscale("log", base=2)
        ticks = sorted(set(runs["bits"]))
        axes[0].set_xticks(ticks, labels=[f"{t:g}" + (" (floats)" if t == FLOAT_BITS else "") for t in ticks])
        axes[0].xaxis.set_minor_locator(NullLocator())
    else:
        _note(axes[0], "no runs vary model.quantize")
    axes[0].set_xlabel("Bits per activation sent to the next module (log scale)")
    axes[1].set_xlabel("Bytes sent per image, all boundaries (log scale)")
    axes[0].set_ylabel("Test accuracy (%)")
    fig.suptitle("Test accuracy vs quantization of the activations between modules (mean over seeds, bands = std)", fontsize=10)
    axes[1].grid(True, alpha=0.3)
    return _finish(fig, axes[0], Path(figures_dir) / "acc_vs_bits", legend_ax=axes[1])


def plot_accuracy_vs_worker_macs(runs_df: pd.DataFrame, figures_dir: Path) -> list[Path]:
    """GN-DGL's plot: test accuracy vs the largest forward MACs per image of one worker, one
    bubble per (method, K, groups), its area the number of workers; bars = std over seeds."""
    runs = _select(runs_df, {"groups", "K"})
    if len(runs):
        runs = runs[runs["max_worker_macs"].notna() & (runs["mode"] == "sync")]
        runs = runs.assign(G=runs["groups"].fillna(1).astype(int).to_numpy())
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    if _varies(runs, "groups"):
        for (method, K, G), rows in _groups(runs, ["method", "K", "G"]):
            acc, macs = 100 * rows["test_acc"], rows["max_worker_macs"].astype(float)
            workers = int(rows["workers"].iloc[0])
            name = f"K{K}" + (f"G{G}" if "model.groups" in methods.traits(method_of(method)).reads else "")
            yerr = _clipped_yerr(pd.Series([acc.mean()]), pd.Series([acc.std()])) if len(rows) > 1 else None
            ax.errorbar(macs.mean(), acc.mean(), yerr=yerr, color=_color(method), capsize=3, zorder=1)
            ax.scatter(macs.mean(), acc.mean(), s=40 * workers, color=_color(method), alpha=0.5, edgecolors="black", zorder=2,
                       label=f"{method} {name} ({workers} worker{'s' if workers > 1 else ''}, {len(rows)} seeds)")
            ax.annotate(name, (macs.mean(), acc.mean()), fontsize=7, ha="center", va="center")
        ax.set_xscale("log")
    else:
        _note(ax, "no runs vary model.groups")
    ax.set_xlabel("Largest forward MACs per image of one worker (log scale)")
    ax.set_ylabel("Test accuracy (%)")
    ax.set_title("Test accuracy vs per-worker compute (bubble area = workers)")
    return _finish(fig, ax, Path(figures_dir) / "acc_vs_worker_macs")


def _band(ax, rows: pd.DataFrame, x: str, label: str, **style) -> None:
    """Mean test accuracy over seeds at each value of ``x``, a band of ± std."""
    stats = rows.groupby(x)["test_acc"].agg(["mean", "std", "size"]).sort_index()
    xs, mean, std = stats.index.to_numpy(dtype=float), 100 * stats["mean"], 100 * stats["std"].fillna(0)
    ax.plot(xs, mean, label=f"{label} ({stats['size'].max()} seeds)", **style)
    ax.fill_between(xs, (mean - std).clip(lower=0), (mean + std).clip(upper=100), color=style.get("color"), alpha=0.2)


def _draw(ax, series: list[tuple[str, pd.DataFrame, dict]], x: str, log2: bool = True) -> None:
    """Draw the (label, runs, style) series of a sweep figure, with a tick at each x value.

    A series with a single x value (e.g. a method run at one K only, or a slowdown run at the
    base buffer size only) says nothing about the sweep, so it is left out, unless no series
    has more than one point.
    """
    lines = [s for s in series if s[1][x].nunique() > 1] or series
    for label, rows, style in lines:
        _errorbar(ax, rows, x, label=label, **style)
    ticks = sorted({float(v) for _, rows, _ in lines for v in rows[x].dropna()})
    if log2:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_minor_locator(NullLocator())
        if len(ticks) == 1:  # a lone point would sit on a degenerate axis
            ax.set_xlim(ticks[0] / 2, ticks[0] * 2)
    ax.set_xticks(ticks, labels=[f"{t:g}" for t in ticks])


def _sweep_style(method: str, i: int) -> dict:
    """The method's colour; the i-th line of that method gets its own line style and marker."""
    return {"color": _color(method), "linestyle": _LINESTYLES[i % len(_LINESTYLES)],
            "marker": _MARKERS[i % len(_MARKERS)]}


def _select(df: pd.DataFrame, axes: set[str]) -> pd.DataFrame:
    """The runs (or epochs) that differ from the base settings along ``axes`` at most."""
    return df[df["varied"].map(lambda varied: set(varied) <= axes)] if len(df) else df


def _varies(runs: pd.DataFrame, axis: str) -> bool:
    return bool(runs["varied"].map(lambda varied: axis in varied).any()) if len(runs) else False


def _groups(df: pd.DataFrame, by: list[str]) -> Iterable[tuple[tuple, pd.DataFrame]]:
    """``df.groupby(by)`` with methods in the paper's order, sync before async, updates before time."""
    if df.empty:
        return []
    rank = {"method": method_rank, "mode": mode_rank, "budget": lambda budget: (budget != "updates", budget)}
    return sorted(df.groupby(by, sort=True),
                  key=lambda item: [rank.get(col, lambda v: v)(v) for col, v in zip(by, item[0])])


def _errorbar(ax, rows: pd.DataFrame, x: str, label: str, **style) -> None:
    """Mean test accuracy over seeds at each value of ``x``; bars = std where there are several seeds.

    The label gets the number of seeds per point, as a range where the points differ.
    """
    stats = rows.groupby(x)["test_acc"].agg(["mean", "std", "size"]).sort_index()
    low, high = stats["size"].min(), stats["size"].max()
    seeds = f"{low} seed{'s' if low != 1 else ''}" if low == high else f"{low}–{high} seeds"
    # One seed has no std (NaN): matplotlib draws no bar there rather than a zero-length cap.
    ax.errorbar(stats.index.to_numpy(dtype=float), 100 * stats["mean"], yerr=_clipped_yerr(100 * stats["mean"], 100 * stats["std"]),
                capsize=3, label=f"{label} ({seeds})", **style)


def _clipped_yerr(mean: pd.Series, std: pd.Series):
    """Error bars of ± ``std`` (percent) about ``mean``, cut at 0 % and 100 %: the lengths below
    and above, as matplotlib's ``yerr`` takes them (NaN: no bar)."""
    return [(mean - (mean - std).clip(lower=0)).to_numpy(dtype=float),
            ((mean + std).clip(upper=100) - mean).to_numpy(dtype=float)]


def _color(method: str):
    """The method's colour, the same in every figure."""
    rank, _ = method_rank(method)
    if rank == len(METHOD_ORDER):  # unknown methods: stable by name, after the known ones
        rank += sum(map(ord, method))
    return _COLORS[rank % len(_COLORS)]


def _style(method: str, mode: str) -> dict:
    return {"color": _color(method), "linestyle": _MODE_STYLE.get(mode, "-.")}


def _label(key: tuple, n_seeds: int) -> str:
    method, mode, k = key
    return f"{method} / {mode} / K={k} ({n_seeds} seed{'s' if n_seeds != 1 else ''})"


def _note(ax, text: str) -> None:
    """Say in the middle of an empty axes why it is empty."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=11, color="0.35")
    ax.set_xticks([])
    ax.set_yticks([])


def _finish(fig, ax, stem: Path, legend_ax=None) -> list[Path]:
    """Add the legend (of ``ax``, beside ``legend_ax`` if given), save PNG and PDF atomically, and free the figure."""
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # an empty figure has nothing to list
        (legend_ax or ax).legend(*ax.get_legend_handles_labels(), loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)
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
