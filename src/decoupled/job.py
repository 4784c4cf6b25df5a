"""One training job with its outputs and its MLflow child run: ``train.fit`` wrapped.

``run_job`` trains into the run directory (``checkpoint.pt``, ``metrics.json``, ``config.json``)
and one MLflow child run, resuming from ``resume.pt`` (``decoupled.resume``) if a previous
attempt left one; on failure it leaves no output and no RUNNING run. One process at a time
trains a run directory (``decoupled.rundir``). A finished run keeps its final state both as
``resume.pt`` (so that the same job run again, by ``--rerun-incomplete`` or by hand, finishes
at once into the same MLflow run instead of training again) and as its MLflow run's artifact
``checkpoint.pt`` (so that no later attempt, failed, killed or of another configuration, can
lose it).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from decoupled import engines, rundir
from decoupled.compute import as_params
from decoupled.data import load_prepared
from decoupled.files import link_or_copy, save_torch, write_json
from decoupled.grid import RunKey
from decoupled.resume import RESUME_FILE, Terminated, code_of, ignore_sigterm, load_resume, sigterm_stops
from decoupled.train import TrainingDiverged, check_fits, fit

OUTPUTS = ("checkpoint.pt", "metrics.json", "config.json")


def run_job(job: dict, data_path: str | Path, out_dir: str | Path, experiment: dict | None, tags: dict[str, str],
            described: dict | None = None) -> dict:
    """Train one job into ``out_dir`` and its MLflow child run; return its metrics. ``described``,
    the experiment config the job is of (if known): its run goes under that config's parent run."""
    out_dir = Path(out_dir)
    data = load_prepared(data_path)  # input problems surface before any run or file exists
    check_fits(job, data)
    if not engines.of(job).is_main_process():
        # another process of the job (a distributed worker k > 0): it trains its module; the
        # main one holds the run directory, logs, checkpoints and writes the outputs
        return fit(job, data, checkpoint=lambda state: None, resume=load_resume(out_dir, job))
    with rundir.training(out_dir):
        return _run_main(job, data, Path(data_path), out_dir, experiment, tags, described)


def _run_main(job: dict, data, data_path: Path, out_dir: Path, experiment: dict | None, tags: dict[str, str], described: dict | None) -> dict:
    abandoned: list[str] = []
    resume = load_resume(out_dir, job, abandoned)
    run = PendingRun(lambda: _child_run(job, data, data_path, out_dir, experiment, tags, resume, abandoned, described))
    if engines.of(job).process_count(job) > 1:
        # the other workers would wait for this one's epoch-end checkpoint, and a store that
        # takes longer than distributed.timeout_s to open would end the job: wait now, while
        # they wait to join
        run.get()
    resume_path = out_dir / RESUME_FILE
    logged_through = resume["epoch"] if resume is not None else 0

    def checkpoint(state: dict) -> None:
        nonlocal logged_through
        # The first checkpoint, before any step, does not wait for the run: a job stopped before
        # its second checkpoint resumes into a new run (and fail_orphans closes the old one).
        first = state["epoch"] == 0 and not state["stopped_inside_epoch"]
        run_id = run.ready_id() if first else run.get().run_id
        # saved before it is logged: a job killed in between logs the epoch when it resumes
        save_torch({**state, "job": job, "code": code_of(job), "mlflow_run_id": run_id}, resume_path)
        if state["epochs"] and state["epochs"][-1]["epoch"] > logged_through:
            logged_through = state["epochs"][-1]["epoch"]
            run.get().log_epoch(state["epochs"][-1])

    with sigterm_stops() as stop:
        try:
            started = time.time()
            metrics = fit(job, data, checkpoint, resume, stop)
            metrics.update(mlflow_run_id=run.get().run_id, started_at=started, startup_s=_since_process_start(metrics.pop("first_epoch_at")))
            _finish(job, metrics, out_dir, run.get())
        except BaseException as e:
            ignore_sigterm()
            for name in OUTPUTS:
                (out_dir / name).unlink(missing_ok=True)
            if isinstance(e, TrainingDiverged):  # the same job would diverge again from it
                resume_path.unlink(missing_ok=True)
            elif isinstance(e, Terminated) and resume_path.exists():
                e.args = (f"{RunKey.of(job['run']).name}: {e}; a rerun resumes from {resume_path}",)
            made = run.made()
            if made is not None:  # else making the run failed: that is the error raised
                made.fail("interrupted (Ctrl-C)" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}")
            raise
    return metrics


class PendingRun:
    """The job's MLflow run, made by a thread of its own while training starts: importing
    MLflow and opening its store take seconds (see benchmarks/pipeline_wall.py) that the first
    steps need not wait for. ``get()`` waits for it (and raises what making it raised)."""

    def __init__(self, make):
        self._run, self._error = None, None
        self._thread = threading.Thread(target=self._make, args=(make,), name="mlflow-run", daemon=True)
        self._thread.start()

    def _make(self, make) -> None:
        try:
            self._run = make()
        except BaseException as e:  # raised again in the main thread, by get()
            self._error = e

    def get(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._run

    def ready_id(self) -> str | None:
        """The run's id if it is made by now, else None (without waiting)."""
        return self._run.run_id if self._run is not None else None

    def made(self):
        """The run once its thread has ended, or None if making it failed."""
        self._thread.join()
        return self._run


def _since_process_start(moment: float) -> float | None:
    """Seconds from this process's start to ``moment`` (a ``time.time()``); None where /proc is missing."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except OSError:
        return None
    started = time.time() - (uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))  # field 22: start time, in ticks after boot
    return moment - started


def _child_run(job: dict, data, data_path: Path, out_dir: Path, experiment: dict | None, tags: dict[str, str], resume: dict | None,
               abandoned: list[str], described: dict | None):
    """The job's MLflow run: the resumed attempt's, RUNNING again with the epochs it had not
    logged, or a new one (under the parent run of ``described``, if given); the runs of attempts
    nobody goes on with are marked FAILED."""
    from decoupled.grid import params_of, run_name
    from decoupled.tracking import EPOCHS_METRIC, JOB_TAG, RUN_DIR_TAG, ChildRun, fail_orphans, init_experiment, job_digest, parent_run

    key = RunKey.of(job["run"])
    if experiment is None:
        experiment = init_experiment(job, described)
    for run_id in abandoned:  # its run would stay RUNNING for ever
        ChildRun.abandon(experiment, run_id, f"abandoned: {key.name} was run again with another configuration or code, in a new run")
    # (no id: the attempt stopped before its run was made)
    run = ChildRun.reopen(experiment, resume["mlflow_run_id"], resume["epoch"]) if resume is not None and resume["mlflow_run_id"] else None
    # an attempt that died before it could close its run or write resume.pt (a full disk, say);
    # this process holds the directory, so no live process trains it
    fail_orphans(experiment, out_dir, f"abandoned: the process training {out_dir} ended without closing this run; a later attempt did not resume it",
                 keep=run.run_id if run is not None else None, live_ones=False)
    if run is None:
        run_tags = {"method": key.method, "mode": key.mode, "K": str(key.K), "variant": key.variant, "seed": str(key.seed), "dataset": data.name,
                    RUN_DIR_TAG: str(out_dir.resolve()), JOB_TAG: job_digest(job), **tags}
        parent_id = parent_run(experiment, described, "decoupled train") if described is not None else None
        name = run_name(described, key) if described is not None else key.run_name
        # "group": the run's name less its seed, for the UI's "Group by": one line per method,
        # mode and setting, its band over the seeds
        run_tags["group"] = name.rsplit(" ", 1)[0]
        run = ChildRun.start(experiment, name, params_of(job), run_tags, parent_id)
        run.log_dataset(data.name, data_path, {"train_images": data.n_train, "test_images": data.n_test, "classes": data.num_classes,
                                               "image": [data.in_channels, data.image_size, data.image_size]})
    logged = run.logged_steps(EPOCHS_METRIC)
    for record in resume["epochs"] if resume is not None else []:  # epochs an earlier attempt finished but had not logged here
        if record["epoch"] not in logged:
            run.log_epoch(record)
    return run


def _finish(job: dict, metrics: dict, out_dir: Path, run) -> None:
    """The outputs, the run's last metrics, tags and artifacts (the final checkpoint among them),
    FINISHED, superseding an earlier FINISHED run of the same job. ``checkpoint.pt`` is a second
    name of the final ``resume.pt``, which stays."""
    write_json(out_dir / "config.json", job)
    write_json(out_dir / "metrics.json", metrics)
    link_or_copy(out_dir / RESUME_FILE, out_dir / "checkpoint.pt")
    final = {"time/train_s": metrics["train_time_s"]}
    if "imbalance" in metrics["split"]:  # a measured (balanced) split: how even it promised to be
        final["split/predicted_imbalance"] = metrics["split"]["imbalance"]
    run.log_metrics(final, step=job["train"]["epochs"])
    run.log_params(as_params(metrics["compute"]))  # (the same values again when a finished run is finished again)
    run.set_tag("split", "-".join(map(str, metrics["split"]["counts"])))
    for name in ("metrics.json", "config.json", "checkpoint.pt"):
        run.log_artifact(out_dir / name)
    run.supersede_earlier()
    run.finish()
