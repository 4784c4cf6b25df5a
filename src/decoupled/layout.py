"""The report's tables and figures, named once for the workflow, the package and the tests.

One row per output: its file name (``results/tables/{name}.csv|md|tex|html``,
``results/figures/{name}.png|pdf``; its caption in ``workflow/report/{name}.rst``), how
``snakemake --report`` files and titles it, the function of ``decoupled.report.figures`` that
draws a figure, and, for a sweep figure, the swept axis (a
``varied`` entry of the runs) without which it has nothing to show: such a figure is written
(and listed as an output) only when some run varies that axis. Adding a figure = its plot
function + one row here (+ a caption file).

Imports nothing heavy: Snakemake reads it to list its outputs, in an environment that may
have neither torch nor pandas.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple


class Output(NamedTuple):
    name: str
    title: str  # its name in the report's list
    subcategory: str  # its group under "Tables" or "Figures" in the report
    writer: str | None = None  # a figure's plot function (decoupled.report.figures)
    sweeps: str | None = None  # a figure's swept axis: written only when some run varies it
    needs: str | None = None  # a table written only when the config's report lists these (report.published, report.claims)
    clock: str | None = None  # a time figure's clock (an engine's ``clock``): written only when some run's engine keeps it


TABLES = [
    Output("summary", "summary", "Summary table"),
    Output("main", "main", "Main table"),
    Output("claims", "claims checked", "Claims", needs="claims"),
    Output("paper_vs_ours", "paper vs ours", "Reproduction", needs="published"),
]
FIGURES = [
    Output("test_acc_vs_epoch", "test accuracy vs epoch", "Learning curves", "plot_accuracy_vs_epoch"),
    Output("acc_vs_simulated_time", "test accuracy vs simulated parallel time", "Learning curves", "plot_accuracy_vs_simulated_time",
           clock="simulated parallel"),
    Output("acc_vs_wall_time", "test accuracy vs wall-clock time", "Learning curves", "plot_accuracy_vs_wall_time", clock="wall clock"),
    Output("layerwise_acc", "layer-wise accuracy", "Learning curves", "plot_layerwise_accuracy"),
    Output("acc_vs_slowdown", "accuracy vs slowdown", "Sweeps", "plot_accuracy_vs_slowdown", sweeps="slowdown"),
    Output("acc_vs_buffer_size", "accuracy vs buffer size", "Sweeps", "plot_accuracy_vs_buffer_size", sweeps="buffer_size"),
    Output("acc_vs_K", "accuracy vs K", "Sweeps", "plot_accuracy_vs_K", sweeps="K"),
    Output("acc_vs_bits", "accuracy vs bits per activation", "Sweeps", "plot_accuracy_vs_bits", sweeps="quantize"),
    Output("acc_vs_worker_macs", "accuracy vs per-worker compute", "Sweeps", "plot_accuracy_vs_worker_macs", sweeps="groups"),
]
TABLE_NAMES = [t.name for t in TABLES]
FIGURE_NAMES = [f.name for f in FIGURES]
# Every table is written as .csv (raw numbers), .md, .tex and .html (the page `snakemake --report`
# shows, every column visible); every figure as .png and .pdf.
TABLE_FORMATS = ["csv", "md", "tex", "html"]
FIGURE_FORMATS = ["png", "pdf"]


def tables_for(report: dict) -> list[Output]:
    """The tables of an experiment whose config's ``report`` section is ``report``: the claims
    table only with claims to check, the reproduction table only with published numbers."""
    return [t for t in TABLES if t.needs is None or report.get(t.needs)]


def figures_for(swept: Iterable[str], clocks: Iterable[str]) -> list[Output]:
    """The figures of runs that vary the axes ``swept`` and whose engines keep the ``clocks``:
    every figure but the sweeps of other axes and the time figures of other clocks."""
    swept, clocks = set(swept), set(clocks)
    return [f for f in FIGURES if (f.sweeps is None or f.sweeps in swept) and (f.clock is None or f.clock in clocks)]
