"""How much does the framework cost? A method's training steps vs. a bare PyTorch loop.

Both sides train the same network (the default config's model, built from one seed) on the
same in-memory tensors with the same optimizer; the framework side goes through the engine
and the method's ``module_step``, the bare side is the loop one would write by hand. The
ratio (framework images/s ÷ bare images/s) should be >= 0.95. Repeats alternate between the
two sides so that machine noise hits both alike; the median is reported.

    python benchmarks/step_overhead.py [--steps 60] [--repeats 7] [--threads 1]

Writes results/benchmarks/step_overhead.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from decoupled import config, methods, model
from decoupled.data.batches import BatchStream
from decoupled.engines.simulated import SimulatedEngine
from decoupled.files import write_json
from decoupled.optim import make_optimizer

REPO = Path(__file__).resolve().parents[1]


def bare_backprop(net, cfg, total_steps):
    optimizer, scheduler = make_optimizer(net.parameters(), cfg, total_steps)

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
        scheduler.step()

    return step


def bare_dgl(net, cfg, total_steps):
    pairs = [make_optimizer(list(b.parameters()) + list(h.parameters()), cfg, total_steps) for b, h in zip(net.blocks, net.heads)]

    def step(x, y):
        h = x
        for block, head, (optimizer, scheduler) in zip(net.blocks, net.heads, pairs):
            optimizer.zero_grad(set_to_none=True)
            out = block(h.detach())
            F.cross_entropy(head(out), y).backward()
            optimizer.step()
            scheduler.step()
            h = out

    return step


BARE = {"backprop": bare_backprop, "dgl": bare_dgl}


def measure(method_name, job, x, y, steps, repeats):
    cfg = dict(job["train"], probe_heads=False)  # the bare loop trains no probes either
    K, batch = job["run"]["K"], cfg["batch_size"]
    n = steps * batch

    def framework_run():
        torch.manual_seed(0)
        net = model.build(job["model"], K, x.shape[1], 10)
        engine = SimulatedEngine(methods.get(method_name)(net, cfg, steps), BatchStream(x[:n], y[:n], batch, 0))
        start = time.perf_counter()
        engine.run_epoch()
        return n / (time.perf_counter() - start)

    def bare_run():
        torch.manual_seed(0)
        net = model.build(job["model"], K, x.shape[1], 10).train()
        step = BARE[method_name](net, cfg, steps)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        start = time.perf_counter()
        for i in range(steps):
            idx = order[i * batch : (i + 1) * batch]
            step(x[idx], y[idx])
        return n / (time.perf_counter() - start)

    framework_run(), bare_run()  # warm-up: allocator and kernels
    fw, bare = [], []
    for _ in range(repeats):
        fw.append(framework_run())
        bare.append(bare_run())
    return {
        "framework_images_per_s": statistics.median(fw),
        "bare_images_per_s": statistics.median(bare),
        "ratio": statistics.median(fw) / statistics.median(bare),
        "framework_samples": fw,
        "bare_samples": bare,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "config/config.yaml"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/benchmarks/step_overhead.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    exp = config.load(args.config)
    K = exp["grid"]["K"][0]
    from decoupled.grid import RunKey, job_config

    batch = exp["train"]["batch_size"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.steps * batch, 1, 28, 28, generator=g)  # Fashion-MNIST's shape
    y = torch.randint(0, 10, (args.steps * batch,), generator=g)
    results = {}
    for name in ("backprop", "dgl"):
        job = job_config(exp, RunKey(name, "sync", K, 0))
        r = measure(name, job, x, y, args.steps, args.repeats)
        results[name] = r
        print(f"{name:9s} framework {r['framework_images_per_s']:7.0f} img/s  bare {r['bare_images_per_s']:7.0f} img/s  ratio {r['ratio']:.3f}")
    report = {
        "benchmark": "step_overhead",
        "target_ratio": 0.95,
        "config": args.config,
        "K": K,
        "batch_size": batch,
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "methods": results,
    }
    write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
