"""A run directory: one process trains it at a time (it holds its lock), and how a damaged file
of it is made again (``make_again``).

A second process that would train the same directory (``decoupled train`` by hand beside the
workflow) stops at once, naming the holder; a second workflow writing the same ``output_dir``
(from another working directory: Snakemake locks only its own) stops before any job. The lock is ``flock`` on ``.train.lock`` in the directory: the kernel drops
it when its holder ends, however it ends (SIGKILL, a crash), so no stale lock is ever left; on
NFS, Linux carries it as a POSIX lock, seen by every node. The file itself stays (removing it
would let two processes lock two files of one name).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from decoupled.errors import UserError

LOCK_FILE = ".train.lock"
WORKFLOW_LOCK_FILE = ".workflow.lock"  # in output_dir: the Snakemake process that writes it (hold_output_dir)
# Set by a launcher that holds the lock for the workers it starts (decoupled.cli), to the
# directory it holds: its main worker, another process, must not try to take it again.
HELD_ENV = "DECOUPLED_RUN_DIR_HELD"


def _acquire(lock_path: Path, busy: str, advice: str):
    """``lock_path`` opened and locked (closing it releases the lock); a UserError saying ``busy``,
    by whom, and ``advice``, if another process holds it."""
    lock = open(lock_path, "a+")  # noqa: SIM115 (the caller holds it open: that is the lock)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"  # (it may not have written itself yet)
        lock.close()
        raise UserError(f"{busy} by {holder}: {advice}") from None
    lock.truncate(0)
    lock.write(f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')} (working directory {os.getcwd()})\n")
    lock.flush()
    return lock


@contextlib.contextmanager
def training(run_dir: str | Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock while the block runs (creating the directory); a UserError naming
    the process that holds it instead, if one does. Taken once per job: a no-op in a process
    whose launcher holds it for it."""
    run_dir = Path(run_dir)
    if os.environ.get(HELD_ENV) == str(run_dir.resolve()):
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with _acquire(run_dir / LOCK_FILE, f"{run_dir} is being trained", "let it finish, or stop it (a rerun then resumes its run)"):
        yield


def hold_output_dir(output_dir: str | Path):
    """The workflow's lock on its ``output_dir``, held until the file returned is closed (at the
    latest when the process ends): two workflows (two working directories with one absolute
    ``output_dir``) never write one folder at once, evaluation and report included. A UserError
    naming the workflow that holds it."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return _acquire(output_dir / WORKFLOW_LOCK_FILE, f"{output_dir} is being written by another workflow", "let it finish, or stop it, then run this one again")


def is_held(run_dir: str | Path) -> bool:
    """Whether a live process trains ``run_dir`` now (holds its lock)."""
    path = Path(run_dir) / LOCK_FILE
    if not path.is_file():  # (never trained here: the file is made once and stays)
        return False
    with open(path) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False


def make_again(path: str | Path) -> str:
    """What to do about a damaged file of a run that the report leaves out, in a few words."""
    return f"the report leaves that run out: delete {path} and run the workflow again (with its --configfile) to make it again"
