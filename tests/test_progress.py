"""What a job shows while it runs: a bar with time left on a terminal only, timestamped epoch lines."""

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios

import yaml

from decoupled import progress

RECORD = {"epoch": 2, "train_loss": 0.5, "test_acc": 0.8, "test_acc_per_module": [0.7, 0.8], "epoch_time_s": 1.5, "images_per_s": 1000.0}


def test_the_epoch_line_has_the_time_of_day_and_an_async_runs_staleness():
    line = progress.epoch_line("dgl-sync-K2-seed0", 3, RECORD)
    assert re.match(r"\d\d:\d\d:\d\d \[dgl-sync-K2-seed0\] epoch 2/3  train loss 0\.5000  test acc 80\.00% \(heads 70\.0/80\.0\)", line), line
    assert "staleness" not in line
    stale = {**RECORD, "input_staleness": [{"mean": None}, {"mean": 2.25}], "grad_staleness": [{"mean": 3.0}, {"mean": None}]}
    assert progress.epoch_line("x", 3, stale).endswith("  input staleness -/2.2  grad staleness 3.0/-")


def test_no_bar_in_logs_under_slurm_or_when_turned_off(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv(progress.PROGRESS_ENV, raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert progress.terminal() is None  # stderr is a pipe or a log file
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert progress.terminal() is sys.stderr
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    assert progress.terminal() is None
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv(progress.PROGRESS_ENV, "0")
    assert progress.terminal() is None


def run_on(fashion_subset, tmp_path, stderr_is_a_terminal: bool) -> str:
    """A short training run by hand, its stderr a terminal (a pty) or a pipe; what it wrote there."""
    cfg = {"experiment": "p", "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "model": {"widths": [16, 32]},
           "train": {"epochs": 2, "batch_size": 8}, "grid": {"methods": ["dgl"], "K": [2]}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_ID", progress.PROGRESS_ENV, "MLFLOW_TRACKING_URI")}
    env["TQDM_MININTERVAL"] = "0"  # a redraw every step: an epoch may take less than the usual 0.5 s between two
    command = [sys.executable, "-m", "decoupled", "train", "--config", "c.yaml", "--method", "dgl", "--K", "2", "--seed", "0",
               "--data", str(fashion_subset), "--out", f"run{int(stderr_is_a_terminal)}"]
    if not stderr_is_a_terminal:
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stderr
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # 24 rows, 160 columns
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 300)
        try:
            chunk = os.read(master, 65536) if ready else b""
        except OSError:  # the child closed the terminal
            chunk = b""
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(timeout=60) == 0, out.decode(errors="replace")[-2000:]
    return out.decode(errors="replace")


def test_a_terminal_shows_a_bar_with_time_left_and_a_pipe_does_not(fashion_subset, tmp_path):
    shown = run_on(fashion_subset, tmp_path, stderr_is_a_terminal=True)
    # tqdm's bar: "[name] epoch 1/2:  40%|####      | 100/250 [00:01<00:01, 90.1step/s]"
    bar = re.compile(r"\[dgl-sync-K2-seed0\] epoch 1/2: +\d+%\|.*\| *\d+/250 \[\d\d:\d\d<\d\d:\d\d")
    assert bar.search(shown), shown[-3000:]
    assert re.search(r"\d\d:\d\d:\d\d \[dgl-sync-K2-seed0\] epoch 2/2  train loss", shown)
    logged = run_on(fashion_subset, tmp_path, stderr_is_a_terminal=False)
    assert "\r" not in logged and "%|" not in logged
    assert len(re.findall(r"^\d\d:\d\d:\d\d \[dgl-sync-K2-seed0\] epoch \d/2  train loss", logged, re.M)) == 2
