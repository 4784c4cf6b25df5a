"""Stopping and resuming a training job: its ``resume.pt``, SIGTERM, and the final checkpoint.

At its start and after every epoch a job writes ``resume.pt`` in its run directory: everything
needed to continue exactly (the network with its aux heads, every optimizer, scheduler and
synthesizer, replay buffers and gradients in flight, the data order and RNG states, step
counters, the epochs so far, the MLflow run id and a hash of the training code). It is not one
of the job's outputs, so Snakemake keeps it when it removes a failed job's outputs; a rerun of
the same job (the same config and code) continues from it, into the same MLflow run, and
computes what an uninterrupted run computes. SIGTERM (a SLURM preemption) stops the job with
exit status 75 (EX_TEMPFAIL: try again) so that it can be requeued: the simulated engines
finish the step at hand and write a checkpoint of the epoch's progress too (a rerun goes on from
that step); elsewhere (the distributed engine, evaluation) the job stops at once and the last
epoch's checkpoint stays. On success the last ``resume.pt`` stays, and ``checkpoint.pt`` is a
second name of it: the job run again finishes at once, from its end.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from decoupled.code_version import training_code_hash
from decoupled.engines.base import StopRequest
from decoupled.errors import UserError
from decoupled.grid import RunKey

RESUME_FILE = "resume.pt"


class Terminated(UserError):
    """SIGTERM (a scheduler's preemption, torchrun stopping the other workers when one fails, kill)."""

    exit_code = 75  # EX_TEMPFAIL: the job may be run again, and then resumes


@contextlib.contextmanager
def sigterm_stops() -> Iterator[StopRequest]:
    """While the block runs, SIGTERM inside an engine's step loop is a request to stop after the
    step at hand (with a checkpoint: the ``StopRequest`` yielded); anywhere else it raises
    ``Terminated`` at once. Either way the block's clean-up runs."""
    stop = StopRequest()

    def on_sigterm(signum, frame):
        if stop.between_steps:
            stop.set()
        else:
            raise Terminated("stopped by SIGTERM")

    previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def ignore_sigterm() -> None:
    """For a clean-up that a second SIGTERM (torchrun stopping the workers after a peer died)
    must not cut short, leaving the run RUNNING."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def load_resume(out_dir: Path, job: dict, abandoned: list[str] | None = None) -> dict | None:
    """The state a previous attempt of this very job left in ``out_dir``, or None to start afresh.
    The MLflow run of an attempt that was another configuration of the job (or ran other code)
    goes in ``abandoned``."""
    path = out_dir / RESUME_FILE
    if not path.is_file():
        return None
    name = RunKey.of(job["run"]).name
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:  # written atomically, so only a foreign or damaged file gets here
        print(f"[{name}] ignoring {path} ({type(e).__name__}): starting afresh", file=sys.stderr, flush=True)
        return None
    other = "another configuration of this job" if state.get("job") != job else None
    if other is None and state.get("code") != code_of(job):
        other = "this job under other code (its method's or the shared training code has changed since)"
    if other is not None:
        if abandoned is not None and state.get("mlflow_run_id"):  # (a FINISHED run stays as it is)
            abandoned.append(state["mlflow_run_id"])
        print(f"[{name}] ignoring {path}: it was written for {other}; starting afresh", file=sys.stderr, flush=True)
        return None
    return state


def code_of(job: dict) -> str:
    """What a resume.pt records of the code that wrote it: the hash of the job's training code."""
    return training_code_hash(job["run"]["method"])


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}") from None
