"""What a training job shows while it runs: a bar within each epoch, a line after it.

The bar (``tqdm``: steps done, rate and time left) is for a person at an interactive terminal
only. Run by hand in a terminal, a job draws it on stderr. Under Snakemake a job's stderr goes
through ``tee`` into its log, which must not fill with redrawn bars: when Snakemake itself runs
in a terminal, the workflow sets ``DECOUPLED_PROGRESS=tty`` and the bar goes straight to that
terminal (``/dev/tty``), not to the log. Under SLURM, or with ``DECOUPLED_PROGRESS=0``, there is
no bar. The per-epoch lines go to stderr always, each with the time of day.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

PROGRESS_ENV = "DECOUPLED_PROGRESS"


def terminal() -> TextIO | None:
    """Where a progress bar may be drawn, or None for no bar."""
    setting = os.environ.get(PROGRESS_ENV, "")
    if setting == "0" or "SLURM_JOB_ID" in os.environ:
        return None
    if sys.stderr.isatty():
        return sys.stderr
    if setting == "tty":
        try:
            return open("/dev/tty", "w")  # noqa: SIM115 (held for the job's life)
        except OSError:  # no controlling terminal after all (e.g. a detached run)
            return None
    return None


class EpochBar:
    """One epoch's bar: ``bar(done, total)`` after each step (``total``: the engine's steps in the epoch)."""

    def __init__(self, name: str, epoch: int, epochs: int, steps: int, stream: TextIO):
        from tqdm import tqdm

        # redrawn at most every 0.5 s; tqdm's own TQDM_MININTERVAL changes that (0: every step)
        interval = float(os.environ.get("TQDM_MININTERVAL", "0.5"))
        self.bar = tqdm(desc=f"[{name}] epoch {epoch}/{epochs}", total=steps, unit="step", file=stream, leave=False, mininterval=interval, dynamic_ncols=True)

    def __call__(self, done: int, total: int) -> None:
        if self.bar.total != total:
            self.bar.total = total
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def stamp() -> str:
    return time.strftime("%H:%M:%S")


def epoch_line(name: str, epochs: int, record: dict) -> str:
    """The line printed after an epoch: losses, accuracies, speed and, in async mode, how stale
    the inputs (and gradients, where they travel) each module consumed were, on average."""
    heads = "/".join(f"{100 * a:.1f}" for a in record["test_acc_per_module"])
    loss = "(done)" if record["train_loss"] is None else format(record["train_loss"], ".4f")
    parallel = f" (simulated parallel {record['sim_time_s']:.1f} s so far)" if "sim_time_s" in record else ""
    line = (
        f"{stamp()} [{name}] epoch {record['epoch']}/{epochs}  train loss {loss}  test acc {100 * record['test_acc']:.2f}% (heads {heads})"
        f"  {record['epoch_time_s']:.1f} s{parallel}  {record['images_per_s']:.0f} img/s"
    )
    for kind in ("input", "grad"):
        means = [s["mean"] for s in record.get(f"{kind}_staleness", [])]
        if any(m is not None for m in means):
            line += f"  {kind} staleness " + "/".join("-" if m is None else f"{m:.1f}" for m in means)
    return line
