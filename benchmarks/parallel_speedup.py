"""Do K worker processes train faster than backprop? Images/s of each way to run one network.

On the same network, split the same way, with the same data, batch size and numerics (fp32 and
contiguous unless ``--precision bf16`` / ``--memory-format channels_last``: every variant, backprop
and GPipe included, then runs in them):

* ``backprop_1thread``: end-to-end backprop in one process with one intra-op thread;
* ``backprop_Kthreads``: the same with K threads (the cores the workers get);
* ``independent_Kx1thread``: K copies of ``backprop_1thread`` at once, images/s summed. Nothing
  passes between them, so this is the most any K processes can get out of this machine (cores
  that share caches and memory bandwidth, a virtual machine's neighbours): the ceiling;
* ``gpipe``: a GPipe pipeline of K stages, ``torch.distributed.pipelining`` (benchmarks/gpipe.py);
* ``dgl_sync``, ``dgl_async``, ``dni_async``, ``fdg_sync``, ``fdg_async``: this package's
  distributed engine, K processes with one thread each (DNI runs async: in sync mode its true
  gradients come back within the step, which locks the pipeline).

Training throughput is counted as batches that *every* module has trained on, per second
(``min_k steps_k x batch / seconds``): an async upper module that re-trains on its replay
buffer does not count twice. Each variant trains 2 epochs in a fresh process (torchrun for the
parallel ones) through ``decoupled.train.fit``; the second epoch is measured. The distributed
workers bind themselves to a core each (``distributed.pin_cores``), and so do the independent
copies; the 1-thread baseline is left unbound, where it ran faster (docs/benchmarks.md).

Single runs on a shared machine vary, and the speed of its cores drifts within minutes
(docs/benchmarks.md), so every variant is measured in ``--repeats`` rounds,
interleaved (round r measures every variant once, in the same order), and the 1-thread
baseline is measured again between every two variants: a variant's speedup in a round is
taken against the baseline runs just before and just after it (their geometric mean), then
the median over rounds is kept. Ratios to another variant (K threads, the ceiling) are ratios
of these speedups. Images/s and busy fractions are medians over rounds too; every round's
numbers are kept in the JSON (``samples``; each with the ``baseline_images_per_s`` it was
compared with).

Three networks (``SIZES``): the default config's, 4x wider, and 24 layers deep; each split by
``model.split: balanced``, then (``--split-trial ROUNDS``, default 2) that cut and the cuts
moving its boundary by up to 2 layers are trained with DGL sync on the distributed engine and
the fastest is kept (``split_trial`` in the JSON), fixed for every pipeline variant. The
targets for DGL (at K=2: >= 1.8x backprop with 1 thread, every stage busy >= 90 %, >= 1.1x
backprop with K threads; generally 0.9 K) are
checked for DGL sync and async on each network and printed, and written under ``targets``.

The scaling model: per-layer costs measured on one core and the link's bandwidth and latency
measured with gloo feed ``decoupled.scaling`` (a discrete-event pipeline) for K = 2..16 on the
deep network (K = 2, 3 on the default one), beside the measured K=2 points of the same networks.

    python benchmarks/parallel_speedup.py [--K 2] [--steps 40] [--repeats 3] [--sizes default,wide,deep] [--batch-size 128] [--split-trial 2]
                                          [--precision fp32|bf16] [--memory-format contiguous|channels_last]

Writes results/benchmarks/parallel_speedup.json and parallel_speedup.{png,pdf} (with
``--batch-size`` other than 128: parallel_speedup_batch{N}.*; with other numerics, a suffix
naming them, e.g. parallel_speedup_bf16_channels_last.*); ``--replot``
redraws the figure from the JSON without measuring again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from decoupled import grid, profile, scaling
from decoupled.config import validate
from decoupled.data import Dataset
from decoupled.engines.distributed import worker_cores
from decoupled.files import write_json

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "results" / "benchmarks"
# The networks measured: the default config's, 4x wider, and 24 layers deep, whose finer layers
# can be cut into K near-equal modules (a 3-layer network cannot: its first layer, at full
# resolution, costs about half). The deep one has the default's widths, 16 to 64, and pools
# early (the images would vanish otherwise), so that most of its layers are small ones at 7x7:
# the cut can fall where a layer costs a few percent of the whole. Its activations stay small
# enough that two processes do not slow each other down much, as a 32-wide 14x14 stack did.
SIZES = {
    "default": {"widths": [16, 32, 64]},
    "wide": {"widths": [64, 128, 256]},
    "deep": {"widths": [16] + [32] * 3 + [64] * 20, "pools": ["max2" if i in (0, 1, 4) else "max1" for i in range(24)]},
}
DECOUPLED = [("dgl", "sync"), ("dgl", "async"), ("dni", "async"), ("fdg", "sync"), ("fdg", "async")]
BATCH = 128
IMAGE = (1, 28, 28)
NUMERICS = {"precision": "fp32", "memory_format": "contiguous"}  # every variant's (--precision, --memory-format)


def experiment(network: dict, split: list[int], method: str, mode: str, engine: str, threads: int, epochs: int) -> dict:
    cfg = {
        "experiment": "parallel-speedup",
        "engine": engine,
        "model": {**network, "split": split},
        "train": {"epochs": epochs, "batch_size": BATCH, "threads": threads, "lr": 0.01, "eval_batch_size": 256, **NUMERICS},
        # an epoch is worker 0's pass over the data, as when the measurements in the README were
        # taken: equal-update epochs would add each epoch's wait for the last worker
        "async": {"budget": "time"},
        "grid": {"methods": [method], "modes": [mode], "K": [len(split)], "seeds": [0]},
    }
    variant = next(iter(grid.variants(validate(cfg), method, mode)))
    return grid.job_config(validate(cfg), grid.RunKey(method, mode, len(split), 0, variant))


def synthetic_data(steps: int) -> Dataset:
    """Random images and labels of Fashion-MNIST's shape: speed does not depend on what is in them."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(steps * BATCH + 256, *IMAGE, generator=g), torch.randint(0, 10, (steps * BATCH + 256,), generator=g)
    n = steps * BATCH
    return Dataset(x[:n], y[:n], x[n:], y[n:], [str(c) for c in range(10)], 10, IMAGE[0], IMAGE[1], "synthetic")


# --- inside the measured processes ---------------------------------------------------------------


def worker(job_path: str, steps: int, out: str) -> None:
    """Train the job (under torchrun when distributed); the main process writes the last epoch."""
    from decoupled.train import fit

    job = json.loads(Path(job_path).read_text())
    metrics = fit(job, synthetic_data(steps))
    if int(os.environ.get("RANK", "0")) == 0:
        write_json(out, metrics["epochs"][-1])


def probe_link(out: str, size_bytes: int = 8 << 20, repeats: int = 10) -> None:
    """Bandwidth (large messages) and latency (one-number messages) between two gloo processes."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()

    def ping(tensor, n):
        for _ in range(n):
            if rank == 0:
                dist.send(tensor, 1)
                dist.recv(tensor, 1)
            elif rank == 1:
                dist.recv(tensor, 0)
                dist.send(tensor, 0)

    big, small = torch.zeros(size_bytes // 4), torch.zeros(1)
    ping(big, 2)
    start = time.perf_counter()
    ping(big, repeats)
    big_s = (time.perf_counter() - start) / (2 * repeats)
    ping(small, 10)
    start = time.perf_counter()
    ping(small, 200)
    latency = (time.perf_counter() - start) / 400
    if rank == 0:
        write_json(out, {"bandwidth_bytes_per_s": size_bytes / max(big_s - latency, 1e-9), "latency_s": latency})
    dist.destroy_process_group()


# --- the driver ------------------------------------------------------------------------------------


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "MLFLOW_DISABLE_TELEMETRY": "true"}


def run(command: list[str], what: str) -> None:
    result = subprocess.run(command, env=_env(), capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"parallel_speedup: {what} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")


def torchrun(K: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc-per-node={K}"]


def worker_args(job_path: Path, steps: int, out: Path) -> list[str]:
    """This script's arguments to train ``job_path`` in a measured process."""
    return [__file__, "--worker", str(job_path), "--steps", str(steps), "--batch-size", str(BATCH), "--out", str(out),
            "--precision", NUMERICS["precision"], "--memory-format", NUMERICS["memory_format"]]


def measure_ours(tmp: Path, name: str, job: dict, steps: int) -> dict:
    job_path, out = tmp / f"{name}.job.json", tmp / f"{name}.json"
    job_path.write_text(json.dumps(job))
    launcher = torchrun(job["run"]["K"]) if job["engine"] == "distributed" else [sys.executable]
    run([*launcher, *worker_args(job_path, steps, out)], name)
    record = json.loads(out.read_text())
    steps_done = record.get("steps_per_module") or [steps]
    images = min(steps_done) * BATCH
    result = {"images_per_s": images / record["epoch_time_s"], "threads": job["train"]["threads"]}
    if "busy_frac_per_module" in record:
        result["busy_frac_per_stage"] = record["busy_frac_per_module"]
        result["bytes_per_image"] = sum(record["bytes_sent_per_module"]) / (steps_done[0] * BATCH)
        result["steps_per_stage"] = steps_done
    return result


def measure_independent(tmp: Path, name: str, job: dict, steps: int, K: int) -> dict:
    """K copies of a 1-process job at once; their images/s summed. Each copy is bound to a
    core of its own as the distributed workers are (``distributed.pin_cores``), where they fit."""
    job_path = tmp / f"{name}.job.json"
    job_path.write_text(json.dumps(job))
    outs = [tmp / f"{name}.{i}.json" for i in range(K)]
    allowed = sorted(os.sched_getaffinity(0))

    def bind(i: int):
        cores = worker_cores(allowed, i, K, job["train"]["threads"])
        return (lambda: os.sched_setaffinity(0, cores)) if cores is not None else None

    procs = [
        subprocess.Popen([sys.executable, *worker_args(job_path, steps, out)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=bind(i))
        for i, out in enumerate(outs)
    ]
    for proc in procs:
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            sys.exit(f"parallel_speedup: {name} failed:\n{stdout[-2000:]}\n{stderr[-4000:]}")
    per_copy = [steps * BATCH / json.loads(out.read_text())["epoch_time_s"] for out in outs]
    return {"images_per_s": sum(per_copy), "images_per_s_per_copy": per_copy, "threads": 1, "copies": K}


def measure_gpipe(tmp: Path, name: str, network: dict, split: list[int], steps: int) -> dict:
    out = tmp / f"{name}.json"
    shape = ["--model-widths", ",".join(map(str, network["widths"])), "--split", ",".join(map(str, split))]
    if network.get("pools"):
        shape += ["--pools", ",".join(network["pools"])]
    run([*torchrun(len(split)), str(REPO / "benchmarks" / "gpipe.py"), *shape, "--batch-size", str(BATCH), "--microbatches", "4",
         "--steps", str(steps), "--warmup", "5", "--threads", "1", "--isolated-reps", "0", "--out", str(out), "--dtype", _gpipe_dtype()], name)
    report = json.loads(out.read_text())
    return {
        "images_per_s": report["overall"]["images_per_s"],
        "threads": 1,
        "busy_frac_per_stage": [s["busy_fraction"] for s in report["stages"]],
        "bytes_per_image": report["overall"]["bytes_sent_per_image"],
        "microbatches": 4,
    }


def _gpipe_dtype() -> str:
    """benchmarks/gpipe.py's --dtype for NUMERICS: it has fp32 (contiguous) and bf16 (autocast with channels_last)."""
    return {("fp32", "contiguous"): "fp32", ("bf16", "channels_last"): "bf16"}[NUMERICS["precision"], NUMERICS["memory_format"]]


def measure_size(tmp: Path, network: dict, K: int, steps: int, repeats: int, trial_rounds: int) -> dict:
    model_cfg = {**network, "aux_pool": 2, "aux_hidden": 128, "split": "balanced"}
    split, info = profile.resolve_split(model_cfg, K, IMAGE[0], IMAGE[1], 10, BATCH)
    profiled_split = split
    print(f"{network}: split {split}, predicted stage costs {[round(1000 * s, 1) for s in info['stage_s']]} ms", file=sys.stderr)
    trial = None
    if trial_rounds:
        measure = lambda candidate: measure_ours(tmp, "split_trial", experiment(network, candidate, "dgl", "sync", "distributed", 1, 2), steps)  # noqa: E731
        split, trial = choose_split_by_trial(split, measure, trial_rounds)
    backprop_1thread = experiment(network, split, "backprop", "sync", "simulated", 1, 2)
    plan = {
        "backprop_1thread": lambda name: measure_ours(tmp, name, backprop_1thread, steps),
        f"backprop_{K}threads": lambda name: measure_ours(tmp, name, experiment(network, split, "backprop", "sync", "simulated", K, 2), steps),
        f"independent_{K}x1thread": lambda name: measure_independent(tmp, name, backprop_1thread, steps, K),
        "gpipe": lambda name: measure_gpipe(tmp, name, network, split, steps),
    }
    for method, mode in DECOUPLED:
        job = experiment(network, split, method, mode, "distributed", 1, 2)
        plan[f"{method}_{mode}"] = lambda name, job=job: measure_ours(tmp, name, job, steps)
    rounds = []
    for round_ in range(repeats):
        rounds.append(measure_round(plan))
        line = "  ".join(f"{name} {v['images_per_s']:.0f}" for name, v in rounds[-1].items())
        print(f"  round {round_ + 1}/{repeats} (img/s): {line}", file=sys.stderr)
    variants = {name: summarize(name, rounds, K) for name in plan}
    for name, v in variants.items():
        busy = "/".join(f"{b:.2f}" for b in v.get("busy_frac_per_stage", []))
        print(f"  {name:24s} {v['images_per_s']:8.0f} img/s  x{v['speedup']:.2f}  {v['vs_Kthreads']:.2f}x of {K} threads  "
              f"{v['of_ceiling']:.2f} of ceiling  busy {busy or '-'}", file=sys.stderr)
    size = {**network, "split": split, "profiled_split": profiled_split, "predicted_stage_s": info["stage_s"], "predicted_imbalance": info["imbalance"], "split_trial": trial, "variants": variants}
    size["targets"] = check_targets(variants, K)
    for name, t in size["targets"].items():
        print(f"  targets, {name}: {'MET' if t['met'] else 'not met'} ({t['summary']})", file=sys.stderr)
    return size


def neighbouring_splits(split: list[int], window: int = 2) -> list[list[int]]:
    """``split`` first, then every cut that moves one of its boundaries by up to ``window`` layers."""
    candidates = [list(split)]
    for boundary in range(len(split) - 1):
        for shift in [s for w in range(1, window + 1) for s in (-w, w)]:
            moved = list(split)
            moved[boundary] += shift
            moved[boundary + 1] -= shift
            if min(moved) >= 1:
                candidates.append(moved)
    return candidates


def choose_split_by_trial(split: list[int], measure, rounds: int, window: int = 2) -> tuple[list[int], dict]:
    """The cut, among ``split`` and its neighbours, whose pipeline trains fastest.

    The profile adds up layers timed one by one, alone; a worker runs its module whole, beside
    another one, and the sum misjudged that by 10-15 % on the 24-layer network here (the stage
    with 18 small layers ran slower than its sum). So the profiled cut and its neighbours are
    each trained for real (``measure(cut)`` -> a measurement with ``images_per_s``), in
    interleaved rounds, and the median decides. Every variant then uses the chosen cut.
    """
    candidates = neighbouring_splits(split, window)
    speeds = {str(c): [] for c in candidates}
    for round_ in range(rounds):
        for candidate in candidates:
            speeds[str(candidate)].append(measure(candidate)["images_per_s"])
        line = "  ".join(f"{c} {v[-1]:.0f}" for c, v in speeds.items())
        print(f"  split trial {round_ + 1}/{rounds} (DGL sync, img/s): {line}", file=sys.stderr)
    medians = {c: statistics.median(v) for c, v in speeds.items()}
    chosen = max(candidates, key=lambda c: medians[str(c)])
    print(f"  split {chosen} (profiled {split})", file=sys.stderr)
    return chosen, {"profiled": list(split), "chosen": chosen, "method": "dgl_sync", "images_per_s": speeds}


def measure_round(plan: dict) -> dict:
    """Every variant once, in order, with the 1-thread baseline measured before the first and
    after each: a variant's ``baseline_images_per_s`` is the geometric mean of the baseline
    runs on either side of it, the machine's speed as close in time as can be had."""
    baseline, *others = plan
    baselines = [plan[baseline](baseline)]
    results = {}
    for name in others:
        results[name] = plan[name](name)
        baselines.append(plan[baseline](baseline))
        results[name]["baseline_images_per_s"] = math.sqrt(baselines[-2]["images_per_s"] * baselines[-1]["images_per_s"])
    median = statistics.median(b["images_per_s"] for b in baselines)
    runs = [b["images_per_s"] for b in baselines]
    return {baseline: {**baselines[0], "images_per_s": median, "baseline_images_per_s": median, "runs_images_per_s": runs}, **results}


def summarize(name: str, rounds: list[dict], K: int) -> dict:
    """One variant over the rounds: medians, and ratios taken within each round first.

    A round's speedup divides by the baseline measured next to the variant (its
    ``baseline_images_per_s``; the round's ``backprop_1thread`` where there is none)."""
    samples = [r[name] for r in rounds]

    def speedup(r: dict, variant: str) -> float:
        baseline = r[variant].get("baseline_images_per_s", r["backprop_1thread"]["images_per_s"])
        return r[variant]["images_per_s"] / baseline

    def ratios_to(other: str) -> list[float]:
        return [speedup(r, name) / speedup(r, other) for r in rounds]

    speedups = [speedup(r, name) for r in rounds]
    summary = {
        **samples[0],
        "images_per_s": statistics.median(s["images_per_s"] for s in samples),
        "speedup": statistics.median(speedups),
        "speedup_range": [min(speedups), max(speedups)],
        "vs_Kthreads": statistics.median(ratios_to(f"backprop_{K}threads")),
        "of_ceiling": statistics.median(ratios_to(f"independent_{K}x1thread")),
        "samples": samples,
    }
    if "busy_frac_per_stage" in samples[0]:
        summary["busy_frac_per_stage"] = [statistics.median(stage) for stage in zip(*(s["busy_frac_per_stage"] for s in samples))]
    return summary


def check_targets(variants: dict, K: int) -> dict:
    """The targets for DGL: >= 0.9 K x backprop on 1 thread (1.8x at K=2), every stage
    busy >= 90 %, >= 1.1x backprop on K threads."""
    targets = {}
    for name in ("dgl_sync", "dgl_async"):
        v = variants[name]
        checks = {
            f"speedup >= {0.9 * K:g}": v["speedup"] >= 0.9 * K,
            "every stage busy >= 0.90": min(v["busy_frac_per_stage"]) >= 0.9,
            f">= 1.1x backprop on {K} threads": v["vs_Kthreads"] >= 1.1,
        }
        summary = f"{v['speedup']:.2f}x, busy {'/'.join(f'{b:.2f}' for b in v['busy_frac_per_stage'])}, {v['vs_Kthreads']:.2f}x of {K} threads"
        targets[name] = {"met": all(checks.values()), "checks": checks, "summary": summary}
    return targets


def scaling_estimates(network: dict, link: dict, Ks: list[int]) -> list[dict]:
    costs = profile.layer_costs({**network, "aux_pool": 2, "aux_hidden": 128}, IMAGE[0], IMAGE[1], 10, BATCH)
    estimates = scaling.estimate_speedup(costs.layer_s, costs.head_s, costs.out_bytes, Ks, link["bandwidth_bytes_per_s"], link["latency_s"], BATCH)
    return [{"K": e.K, "split": e.counts, "images_per_s": e.images_per_s, "speedup": e.speedup, "ideal": e.ideal} for e in estimates]


def plot(results: dict, path_stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, curve) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(next(iter(results["sizes"].values()))["variants"])
    width = 0.8 / len(results["sizes"])
    # one colour per network, the same in both panels whichever networks a run measured
    colors = {size: f"C{i}" for i, size in enumerate([*SIZES, *(s for s in results["sizes"] if s not in SIZES)])}
    for i, (size, r) in enumerate(results["sizes"].items()):
        speedups = [r["variants"][n]["speedup"] for n in names]
        spread = [[s - r["variants"][n]["speedup_range"][0] for n, s in zip(names, speedups)], [r["variants"][n]["speedup_range"][1] - s for n, s in zip(names, speedups)]]
        bars.bar([j + i * width for j in range(len(names))], speedups, width, yerr=spread, capsize=2, color=colors[size], label=f"{size} ({len(r['widths'])} layers, split {r['split']})")
    bars.axhline(1, color="grey", lw=0.8)
    bars.set_xticks([j + width * (len(results["sizes"]) - 1) / 2 for j in range(len(names))], names, rotation=35, ha="right")
    bars.set_ylabel("speedup over backprop, 1 process, 1 thread\n(median over rounds; bars: min-max)")
    bars.set_title(f"K={results['K']} on {results['machine']['cpu_count']} cores")
    bars.legend()
    for label, points in results["scaling"].items():
        curve.plot([p["K"] for p in points], [p["speedup"] for p in points], "o-", color=colors.get(label), label=f"estimate, {label}")
    Ks = sorted({p["K"] for points in results["scaling"].values() for p in points})
    curve.plot(Ks, Ks, "k--", lw=0.8, label="ideal K x")
    for size, r in results["sizes"].items():
        color = colors[size]
        if size in results["scaling"]:  # the measured points beside their own network's estimate
            for mode, marker in (("sync", "s"), ("async", "^")):
                curve.plot([results["K"]], [r["variants"][f"dgl_{mode}"]["speedup"]], marker, color=color, label=f"measured DGL {mode}, {size}")
    curve.set_xscale("log", base=2)
    curve.set_yscale("log", base=2)
    curve.set_xlabel("K (workers)")
    curve.set_ylabel("DGL speedup over backprop")
    curve.set_title("scaling model (discrete-event)")
    curve.legend(fontsize=8)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(path_stem.with_suffix(f".{ext}"))


def main() -> None:
    global BATCH  # the workers' and the driver's batch size, from --batch-size
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--K", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40, help="batches per epoch (2 epochs; the second is timed)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; ratios are medians over rounds")
    parser.add_argument("--sizes", default="default,wide,deep")
    parser.add_argument("--batch-size", type=int, default=BATCH, help="the smaller, the worse intra-op threads scale")
    parser.add_argument("--split-trial", type=int, default=2, metavar="ROUNDS",
                        help="rounds of training the profiled cut and its neighbours to pick the fastest (0: keep the profiled cut)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="every variant's train.precision")
    parser.add_argument("--memory-format", choices=["contiguous", "channels_last"], default="contiguous", help="every variant's train.memory_format")
    parser.add_argument("--replot", action="store_true", help="redraw the figure from the JSON of the last run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--probe-link", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    BATCH = args.batch_size
    NUMERICS.update(precision=args.precision, memory_format=args.memory_format)
    if not args.worker and not args.probe_link and (args.precision, args.memory_format) in (("bf16", "contiguous"), ("fp32", "channels_last")):
        parser.error("the GPipe variant (benchmarks/gpipe.py) runs fp32 contiguous or bf16 channels_last: give both or neither")
    if args.worker:
        return worker(args.worker, args.steps, args.out)
    if args.probe_link:
        return probe_link(args.out)
    stem = OUT_DIR / ("parallel_speedup" if BATCH == 128 else f"parallel_speedup_batch{BATCH}")
    if NUMERICS != {"precision": "fp32", "memory_format": "contiguous"}:
        stem = stem.with_name(f"{stem.name}_{args.precision}_{args.memory_format}")
    if args.replot:
        return plot(json.loads(stem.with_suffix(".json").read_text()), stem)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        run([*torchrun(2), __file__, "--probe-link", "--out", str(tmp / "link.json")], "link probe")
        link = json.loads((tmp / "link.json").read_text())
        sizes = {size: measure_size(tmp, SIZES[size], args.K, args.steps, args.repeats, args.split_trial) for size in args.sizes.split(",")}
    results = {
        "benchmark": "parallel_speedup",
        "K": args.K,
        "batch_size": BATCH,
        "numerics": dict(NUMERICS),
        "steps_timed": args.steps,
        "repeats": args.repeats,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
        "link": link,
        "sizes": sizes,
        "scaling": {
            "deep": scaling_estimates(SIZES["deep"], link, [2, 4, 8, 16]),
            "default": scaling_estimates(SIZES["default"], link, [2, 3]),
        },
    }
    write_json(stem.with_suffix(".json"), results)
    plot(results, stem)
    print(f"wrote {stem.with_suffix('.json')}", file=sys.stderr)


if __name__ == "__main__":
    main()
