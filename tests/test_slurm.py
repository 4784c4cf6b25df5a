"""The SLURM profile (workflow/profiles/slurm) against a real single-node SLURM.

scripts/slurm-cluster.sh starts munged, MariaDB, slurmdbd, slurmctld and slurmd on this
machine for the module and stops them by PID at its end. The workflow then runs in a copy of
the repository through a copy of the profile adapted to this node, as a user adapts it to
their cluster (partition, account, memory, max-threads), with test-only settings on the
command line. Every Snakemake run is bounded: past its time it gets SIGINT (on which Snakemake
cancels its SLURM jobs; SIGTERM would not), then SIGKILL.

Needs root, the daemons (scripts/setup.sh --test-services) and Fashion-MNIST; skipped otherwise.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import FASHION_DIR, REPO
from test_workflow import copy_repo

SCRIPT = REPO / "scripts/slurm-cluster.sh"
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")
COMMANDS = ("sbatch", "srun", "squeue", "scancel", "sacct", "sacctmgr", "sinfo", "mariadb-install-db")
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")
TRAIN_OUTPUTS = ("checkpoint.pt", "metrics.json", "config.json")


def _installed(name: str) -> bool:
    return shutil.which(name) is not None or Path("/usr/sbin", name).is_file()


def missing_requirements() -> str | None:
    if os.geteuid() != 0:
        return "the SLURM tests start munged, MariaDB and SLURM's daemons as root; not root"
    missing = [name for name in (*DAEMONS, *COMMANDS) if not _installed(name)]
    if missing:
        return f"not installed: {', '.join(missing)} (scripts/setup.sh --test-services installs slurm-wlm, slurmdbd, munge, mariadb-server)"
    if not FASHION_DIR.is_dir():
        return "Fashion-MNIST not installed (scripts/setup.sh installs dataset-fashion-mnist)"
    conf = Path("/etc/slurm/slurm.conf")
    if conf.is_file() and not conf.is_symlink():
        return "this machine has a SLURM configuration of its own (/etc/slurm/slurm.conf); not replacing it"
    return None


def clean_env() -> dict:
    """This process's environment without what would steer the runs elsewhere."""
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI" and not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}


def slurm(*args: str, timeout: int = 60) -> str:
    result = subprocess.run(args, capture_output=True, text=True, env=clean_env(), timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)}: {result.stderr}"
    return result.stdout


@dataclass
class Cluster:
    state_dir: Path
    cpus: int
    memory_mb: int

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n" + "".join(p.read_text(errors="replace").splitlines(True)[-15:]) for p in sorted((self.state_dir / "log").glob("*.log")))


def daemon_pids(state_dir: Path) -> dict[str, int]:
    pids = {}
    for name in DAEMONS:
        path = state_dir / "run" / f"{name}.pid"
        if path.is_file() and path.read_text().strip().isdigit():
            pids[name] = int(path.read_text())
    return pids


def alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    state_dir = tmp_path_factory.mktemp("slurm")
    started = subprocess.run([str(SCRIPT), "start", str(state_dir)], capture_output=True, text=True, env=clean_env(), timeout=300)
    pids = daemon_pids(state_dir)
    try:
        assert started.returncode == 0, f"the cluster did not start: {started.stderr}\n{Cluster(state_dir, 0, 0).logs()}"
        assert set(pids) == set(DAEMONS), pids
        cpus, memory = slurm("sinfo", "-h", "-n", "localhost", "-o", "%c %m").split()
        yield Cluster(state_dir, int(cpus), int(memory))
    finally:
        stopped = subprocess.run([str(SCRIPT), "stop", str(state_dir)], capture_output=True, text=True, env=clean_env(), timeout=300)
        left = {name: pid for name, pid in pids.items() if alive(pid)}
        for pid in left.values():  # ours: started by the script above
            os.kill(pid, signal.SIGKILL)
        assert stopped.returncode == 0, stopped.stderr
        assert not left, f"still running after stop: {left}"
        assert not Path("/etc/slurm/slurm.conf").is_symlink() or Path("/etc/slurm/slurm.conf").resolve() != state_dir / "etc/slurm.conf"


@pytest.fixture(scope="module")
def workdir(cluster, tmp_path_factory):
    """One copy of the repository for every test here: the data and the MLflow store are
    prepared by whichever runs first, and the runs of the tests never share a directory."""
    root = tmp_path_factory.mktemp("slurm-workflow")
    return copy_repo(root / "repo")


@pytest.fixture(scope="module")
def profile(cluster, tmp_path_factory):
    """The repository's profile as a user adapts it to their cluster: partition and account,
    memory that fits the node, no job asking for more CPUs than the node has."""
    settings = yaml.safe_load((REPO / "workflow/profiles/slurm/config.yaml").read_text())
    assert settings["executor"] == "slurm" and "slurm-status-command" not in settings  # sacct, the default
    settings["default-resources"].update(slurm_partition="debug", slurm_account="root")
    cap = cluster.memory_mb // 4  # the test runs at most two jobs at a time, plus a local one
    for resources in (settings["default-resources"], *settings["set-resources"].values()):
        resources["mem_mb"] = min(resources["mem_mb"], cap)
    settings["max-threads"] = cluster.cpus
    directory = tmp_path_factory.mktemp("profile")
    (directory / "config.yaml").write_text(yaml.safe_dump(settings))
    return directory


@pytest.fixture
def empty_queue(cluster):
    """After each test: no job of it is left in the queue (cancelled if one is)."""
    yield
    jobs = slurm("squeue", "-h", "-o", "%A").split()
    if jobs:
        slurm("scancel", *jobs)
        pytest.fail(f"jobs left in the queue: {jobs}")


def write_config(workdir: Path, name: str, **changes) -> Path:
    """config/smoke.yaml with a smaller grid (sync only, seed 0) and `changes` merged in."""
    cfg = yaml.safe_load((REPO / "config/smoke.yaml").read_text())
    cfg["grid"] = {"methods": ["backprop", "dgl"], "modes": ["sync"], "K": [2], "seeds": [0]}
    cfg["report"]["claims"] = []  # the smoke grid's claims: most of their methods are not in this one
    for key, value in changes.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_dir(method: str, seed: int = 0) -> str:
    return f"results/runs/{method}/sync/K2/default/seed{seed}"


class Snakemake:
    """One Snakemake run through the profile, in the background, its output collected."""

    def __init__(self, workdir: Path, profile: Path, configfile: Path, *args: str):
        self.workdir = workdir
        command = [sys.executable, "-m", "snakemake", "--profile", str(profile), "--configfile", str(configfile),
                   # test-only: poll from 1 s on (40 s by default), keep every job's SLURM log
                   "--slurm-init-seconds-before-status-checks", "1", "--slurm-keep-successful-logs", *args]
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            command, cwd=workdir, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
            # SIGINT must reach Snakemake's handler even if this process was started ignoring it
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def jobs(self) -> dict[str, str]:
        """SLURM job id -> rule, from Snakemake's submission lines."""
        return {jobid: re.search(r"/rule_([a-z_]+)/", log).group(1) for jobid, log in SUBMITTED.findall(self.output)}

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"snakemake ran over {timeout:.0f} s:\n{self.output[-6000:]}")
        finally:
            self.reader.join(30)

    def stop(self) -> None:
        """SIGINT (Snakemake cancels its SLURM jobs), then SIGKILL to its process group."""
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            shutil.rmtree(self.workdir / ".snakemake/locks", ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        self.reader.join(30)


def sacct(*jobids: str, steps: bool = False) -> dict[str, dict[str, str]]:
    """Accounting records of these jobs (and of their steps with steps=True), by job id."""
    fields = ["JobID", "State", "AllocCPUS", "NCPUS", "TimelimitRaw", "Comment", "ExitCode"]
    out = slurm("sacct", "-n", "-P", *([] if steps else ["-X"]), "-j", ",".join(jobids), "-o", ",".join(fields))
    return {row.split("|")[0]: dict(zip(fields, row.split("|"))) for row in out.splitlines() if row}


def processes_naming(workdir: Path, text: str) -> list[int]:
    """Processes in workdir whose command line contains text (a run's directory): none may
    outlive the job."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cwd").resolve() == workdir.resolve() and text in (proc / "cmdline").read_text().replace("\0", " "):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.usefixtures("empty_queue")
def test_smoke_pipeline_runs_each_job_as_a_slurm_job(cluster, workdir, profile):
    configfile = write_config(workdir, "slurm-smoke")
    with Snakemake(workdir, profile, configfile) as run:
        rc = run.wait(timeout=360)
    assert rc == 0, run.output[-6000:]
    jobs = run.jobs()
    by_rule = {rule: sorted(j for j, r in jobs.items() if r == rule) for rule in set(jobs.values())}
    # two training runs, their evaluation, one report: each its own SLURM job; the local rules
    # (data, MLflow store) ran where Snakemake runs
    assert {rule: len(ids) for rule, ids in by_rule.items()} == {"train": 2, "evaluate": 1, "report": 1}, run.output[-4000:]
    assert "localrule prepare_data" in run.output and "localrule init_tracking" in run.output
    records = sacct(*jobs)
    assert set(records) == set(jobs)
    assert {r["State"] for r in records.values()} == {"COMPLETED"}, records
    comments = sorted(records[j]["Comment"] for j in by_rule["train"])
    assert comments == ["rule_train_wildcards_backprop_sync_2_default_0", "rule_train_wildcards_dgl_sync_2_default_0"]
    for jobid in by_rule["train"]:  # the profile's runtime for train; one CPU each (train.threads)
        assert records[jobid]["TimelimitRaw"] == "240" and records[jobid]["AllocCPUS"] == "1", records[jobid]
    assert records[by_rule["report"][0]]["TimelimitRaw"] == "30"
    summary = (workdir / "results/tables/summary.csv").read_text()
    assert "backprop" in summary and "dgl" in summary
    for method in ("backprop", "dgl"):
        assert (workdir / run_dir(method) / "eval.json").is_file()


@pytest.mark.usefixtures("empty_queue")
def test_a_failing_job_fails_the_workflow(cluster, workdir, profile):
    # valid config, but the loss becomes NaN in the job (TrainingDiverged)
    configfile = write_config(workdir, "slurm-fail", grid={"methods": ["dni"]}, overrides={"dni": {"train": {"lr": 1e12}}})
    with Snakemake(workdir, profile, configfile, f"{run_dir('dni')}/metrics.json") as run:
        rc = run.wait(timeout=240)
    assert rc != 0, run.output[-4000:]
    assert re.search(r"SLURM-job '\d+' failed, SLURM status is: 'FAILED'", run.output), run.output[-4000:]
    (jobid,) = run.jobs()
    assert sacct(jobid)[jobid]["State"] == "FAILED"
    assert not any((workdir / run_dir("dni") / name).exists() for name in TRAIN_OUTPUTS)
    log = (workdir / "results/logs/train/dni_sync_K2_default_seed0.log").read_text()
    assert "training loss is nan at epoch 1" in log


@pytest.mark.usefixtures("empty_queue")
def test_a_cancelled_job_fails_the_workflow(cluster, workdir, profile):
    configfile = write_config(workdir, "slurm-cancel", grid={"methods": ["ddg"]}, train={"epochs": 1000})
    target = run_dir("ddg")
    train_log = workdir / "results/logs/train/ddg_sync_K2_default_seed0.log"
    with Snakemake(workdir, profile, configfile, f"{run_dir('ddg')}/metrics.json") as run:
        deadline = time.monotonic() + 180
        while not (train_log.is_file() and "epoch 1/1000" in train_log.read_text()):
            assert run.proc.poll() is None and time.monotonic() < deadline, run.output[-4000:]
            time.sleep(0.5)
        (jobid,) = run.jobs()
        assert slurm("squeue", "-h", "-j", jobid, "-o", "%T").strip() == "RUNNING"
        slurm("scancel", jobid)
        rc = run.wait(timeout=180)
    assert rc != 0
    assert re.search(rf"SLURM-job '{jobid}' failed, SLURM status is: 'CANCELLED'", run.output), run.output[-4000:]
    assert sacct(jobid)[jobid]["State"].startswith("CANCELLED")
    assert not any((workdir / target / name).exists() for name in TRAIN_OUTPUTS)
    deadline = time.monotonic() + 30  # SLURM kills what ignored SIGTERM after KillWait (5 s)
    while processes_naming(workdir, target) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not processes_naming(workdir, target), "processes of the cancelled job outlived it"


@pytest.mark.usefixtures("empty_queue")
def test_a_distributed_job_gets_its_workers_cpus_in_one_allocation(cluster, workdir, profile):
    if cluster.cpus < 2:
        pytest.skip(f"the node has {cluster.cpus} CPU; a 2-worker job needs 2")
    configfile = write_config(
        workdir, "slurm-distributed", engine="distributed", grid={"methods": ["dgl"], "seeds": [1]},
        train={"epochs": 2, "threads": 1}, distributed={"timeout_s": 60},
    )
    target = run_dir("dgl", seed=1)
    with Snakemake(workdir, profile, configfile, f"{target}/metrics.json") as run:
        rc = run.wait(timeout=300)
    assert rc == 0, run.output[-6000:]
    (jobid,) = run.jobs()
    records = sacct(jobid, steps=True)
    # the job and the step that runs it (the plugin's srun, in which torchrun starts both workers)
    assert records[jobid]["AllocCPUS"] == records[jobid]["NCPUS"] == "2", records
    assert records[f"{jobid}.0"]["AllocCPUS"] == "2" and records[f"{jobid}.0"]["State"] == "COMPLETED", records
    metrics = yaml.safe_load((workdir / target / "metrics.json").read_text())
    assert metrics["engine"] == "distributed" and len(metrics["epochs"]) == 2
    assert len(metrics["epochs"][-1]["busy_frac_per_module"]) == 2  # one worker process per module


@pytest.mark.usefixtures("empty_queue")
def test_a_cuda_distributed_job_asks_for_its_gpus_and_cpus_in_one_sbatch_call(cluster, workdir, profile):
    if cluster.cpus < 2:
        pytest.skip(f"the node has {cluster.cpus} CPU; max-threads would cut the job's 2 threads")
    # this node has no GPU, so SLURM refuses the job: what it asked for is in the refusal
    configfile = write_config(
        workdir, "slurm-cuda", engine="distributed", grid={"methods": ["dgl"], "seeds": [2]},
        train={"device": "cuda", "threads": 1},
    )
    with Snakemake(workdir, profile, configfile, f"{run_dir('dgl', seed=2)}/metrics.json") as run:
        rc = run.wait(timeout=120)
    assert rc != 0
    call = re.search(r"sbatch call:\s*(sbatch .*)", run.output)
    assert call, run.output[-4000:]
    assert "--gpus=2" in call.group(1) and "--cpus-per-task=2" in call.group(1), call.group(1)
    assert "-p debug" in call.group(1) and "-A root" in call.group(1)


def test_cancelled_states_reach_the_plugin_as_cancelled(monkeypatch):
    """sacct's 'CANCELLED by <uid>' is cut to the state the SLURM plugin knows (no cluster needed)."""
    import asyncio
    import types

    from decoupled import slurm as glue

    async def query_job_status(command, logger):
        return {"1": "CANCELLED by 0", "2": "COMPLETED", "3": "FAILED"}, 0.01

    plugin = types.ModuleType(glue.PLUGIN)
    plugin.query_job_status = query_job_status
    monkeypatch.setitem(sys.modules, glue.PLUGIN, plugin)
    assert glue.patch_status_query() and not glue.patch_status_query()  # once only
    states, seconds = asyncio.run(plugin.query_job_status("sacct ...", None))
    assert states == {"1": "CANCELLED", "2": "COMPLETED", "3": "FAILED"} and seconds == 0.01
    monkeypatch.delitem(sys.modules, glue.PLUGIN)
    assert not glue.patch_status_query()  # no plugin loaded: nothing to do


def test_the_installed_plugin_has_the_query_that_is_patched():
    import inspect

    plugin = pytest.importorskip("snakemake_executor_plugin_slurm")
    assert inspect.iscoroutinefunction(inspect.unwrap(plugin.query_job_status))
    assert list(inspect.signature(plugin.query_job_status).parameters) == ["command", "logger"]
