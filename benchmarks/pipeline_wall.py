"""How long does the default experiment take, and where does the time go?

Runs ``snakemake --cores all`` on an experiment config (the default one unless told) into a
clean output folder, then splits its wall time:

* per rule: each job's seconds from Snakemake's start and end stamps (whole seconds);
* per training job: start-up (the process's start to its first step, ``startup_s`` in
  metrics.json), training (the epochs), and the rest (evaluation per epoch, checkpoints,
  MLflow, exit), beside ``python -c 'import torch'`` on the same machine;
* Snakemake's own time: before its first job starts, between jobs, and after the last ends;
* idle cores: the core-seconds no job held (cores x wall - the jobs' threads x seconds).

    python benchmarks/pipeline_wall.py [--configfile config/config.yaml] [--set train.precision=bf16 ...]

Writes results/benchmarks/pipeline_wall.json (and keeps the experiment's output folder, whose
tables it names, under results/benchmarks/pipeline_wall/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from decoupled.files import write_json  # noqa: E402

STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
STARTED = re.compile(r"^(?:local)?rule (\w+):$")
JOBID = re.compile(r"^\s+jobid: (\d+)$")
FINISHED = re.compile(r"^Finished jobid: (\d+) \(Rule: (\w+)\)$")


def job_spans(log: str) -> dict[int, dict]:
    """Each job's rule, start and end (seconds since the epoch) from Snakemake's output."""
    jobs, stamp, pending = {}, None, None
    for line in log.splitlines():
        if m := STAMP.match(line):
            stamp = datetime.strptime(m.group(1), "%a %b %d %H:%M:%S %Y").timestamp()
        elif m := STARTED.match(line):
            pending = (m.group(1), stamp)
        elif (m := JOBID.match(line)) and pending is not None:
            jobs[int(m.group(1))] = {"rule": pending[0], "start": pending[1]}
            pending = None
        elif (m := FINISHED.match(line)) and int(m.group(1)) in jobs:
            jobs[int(m.group(1))]["end"] = stamp
    return {j: span for j, span in jobs.items() if "end" in span and span["rule"] != "all"}


def import_torch_s(repeats: int = 3) -> float:
    """Median seconds of ``python -c 'import torch'``: the floor of a job's start-up."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def busy_union(spans: list[tuple[float, float]]) -> float:
    """Seconds in which at least one job ran."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def breakdown(log: str, out_dir: Path, started: float, ended: float, cores: int, train_threads: int) -> dict:
    spans = job_spans(log)
    wall = ended - started
    per_rule: dict[str, dict] = {}
    for span in spans.values():
        entry = per_rule.setdefault(span["rule"], {"jobs": 0, "seconds": 0.0})
        entry["jobs"] += 1
        entry["seconds"] += span["end"] - span["start"]
    training = []
    for metrics_path in sorted(out_dir.glob("runs/**/metrics.json")):
        metrics = json.loads(metrics_path.read_text())
        training.append({"run": str(metrics_path.parent.relative_to(out_dir / "runs")), "startup_s": metrics.get("startup_s"),
                         "train_s": sum(e["epoch_time_s"] for e in metrics["epochs"])})
    train_jobs = sorted((s for s in spans.values() if s["rule"] == "train"), key=lambda s: s["start"])
    threads = {"train": train_threads}  # the other rules' jobs hold one core
    busy = busy_union([(s["start"], s["end"]) for s in spans.values()])
    held = sum((s["end"] - s["start"]) * threads.get(s["rule"], 1) for s in spans.values())
    first = min(s["start"] for s in spans.values())
    last = max(s["end"] for s in spans.values())
    startups = [t["startup_s"] for t in training if t["startup_s"] is not None]
    return {
        "wall_s": wall,
        "per_rule": per_rule,
        "training_jobs": {
            "count": len(training),
            "job_seconds_total": sum(s["end"] - s["start"] for s in train_jobs),
            "startup_s_total": sum(startups),
            "startup_s_median": statistics.median(startups) if startups else None,
            "startup_s_max": max(startups) if startups else None,
            "train_s_total": sum(t["train_s"] for t in training),
            "per_job": training,
        },
        "snakemake_s": {"before_first_job": first - started, "with_no_job_running": (last - first) - busy, "after_last_job": ended - last},
        "idle_core_s": cores * wall - held,
        "cores": cores,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configfile", default="config/config.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config value for this run, e.g. train.precision=bf16 (YAML value; repeatable)")
    p.add_argument("--out", default="results/benchmarks/pipeline_wall.json")
    p.add_argument("--cores", default="all")
    args = p.parse_args()

    import yaml

    cfg = yaml.safe_load((REPO / args.configfile).read_text())
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, name = key.rpartition(".")
        (cfg.setdefault(section, {}) if section else cfg)[name] = yaml.safe_load(value)
    out_dir = REPO / "results/benchmarks/pipeline_wall"
    shutil.rmtree(out_dir, ignore_errors=True)  # a clean output folder: every rule runs
    out_dir.mkdir(parents=True)
    cfg.update(output_dir=str(out_dir), tracking_uri=f"sqlite:///{out_dir}/mlflow/mlflow.db")
    configfile = out_dir / "config.yaml"
    configfile.write_text(yaml.safe_dump(cfg))
    floor = import_torch_s()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    started = time.time()
    result = subprocess.run(["snakemake", "--cores", args.cores, "--configfile", str(configfile)], cwd=REPO, env=env,
                            capture_output=True, text=True)
    ended = time.time()
    (out_dir / "snakemake.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        sys.exit(f"pipeline_wall: snakemake failed ({result.returncode}); its output: {out_dir / 'snakemake.log'}")
    cores = os.cpu_count() if args.cores == "all" else int(args.cores)
    report = {
        "benchmark": "pipeline_wall",
        "configfile": args.configfile,
        "set": args.set,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "import_torch_s": floor,
        **breakdown(result.stdout + result.stderr, out_dir, started, ended, cores, cfg.get("train", {}).get("threads", 1)),
        "main_table": (out_dir / "tables/main.md").read_text(),
    }
    jobs = report["training_jobs"]
    report["startup_minus_import_torch_s_median"] = jobs["startup_s_median"] - floor if jobs["startup_s_median"] is not None else None
    write_json(REPO / args.out, report)
    print(f"wall {report['wall_s']:.0f} s; training jobs: start-up median {jobs['startup_s_median']:.2f} s"
          f" (import torch {floor:.2f} s), {jobs['train_s_total']:.0f} s of epochs; idle core-seconds {report['idle_core_s']:.0f}")
    print(report["main_table"])


if __name__ == "__main__":
    main()
