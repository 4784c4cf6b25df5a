"""How would the papers' networks scale to K workers? The scaling model on ResNet-56/110 and WRN-28-10.

For each network (CIFAR-shaped input, 3x32x32, 10 classes) the forward+backward seconds of
every layer and of the aux head a module ending there gets are measured on one thread
(``profile.layer_costs``, fp32); ``scaling.estimate_speedup`` then cuts it into K balanced
modules and simulates the pipeline for K = 2..16 (at most one block per module), with the boundaries' activations crossing a
link of ``--bandwidth`` bytes/s and ``--latency`` s, and again over a free link (compute only:
what the cut alone allows). Speedups are over backprop on one worker; the model is DGL's
pipeline (forward activations only), aux heads as ``--aux-head``.

The costs are this CPU's: on a GPU the layers' relative costs differ (small late layers run
far below peak), so these are the model's estimates for CPU workers, and its inputs can be
remeasured on a GPU box with the same script. WRN-28-10 is timed at a smaller batch
(``--wrn-batch-size``) to keep one measurement within minutes on one core.

    python benchmarks/paper_scaling.py [--archs resnet56,resnet110,wrn28_10] [--K 2,4,8,16]
                                       [--bandwidth 12e9] [--latency 2e-5] [--repeats 5]

Writes results/benchmarks/paper_scaling.json. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from decoupled import profile, scaling
from decoupled.files import write_json

IMAGE = (3, 32)  # CIFAR-10: channels, side


def estimate(arch: str, batch_size: int, aux_head: str, Ks: list[int], bandwidth: float, latency: float, repeats: int) -> dict:
    network = {"arch": arch, "aux_head": aux_head, "aux_pool": 2, "aux_hidden": 128}
    started = time.perf_counter()
    costs = profile.layer_costs(network, IMAGE[0], IMAGE[1], 10, batch_size, repeats=repeats, warmup=1)
    measured_s = time.perf_counter() - started
    Ks = [K for K in Ks if K <= len(costs.layer_s)]  # WRN-28-10 has 12 blocks
    links = {"link": (bandwidth, latency), "free_link": (float("inf"), 0.0)}
    result = {
        "batch_size": batch_size,
        "layers": len(costs.layer_s),
        "measure_s": measured_s,
        "layer_s": costs.layer_s,
        "head_s": costs.head_s,
        "out_bytes_per_image": costs.out_bytes,
        "backprop_images_per_s": batch_size / (sum(costs.layer_s) + costs.head_s[-1]),
    }
    for name, (bw, lat) in links.items():
        result[name] = [
            {"K": e.K, "split": e.counts, "images_per_s": e.images_per_s, "speedup": e.speedup, "ideal": e.ideal,
             "imbalance": max(e.stage_s) / (sum(e.stage_s) / len(e.stage_s))}
            for e in scaling.estimate_speedup(costs.layer_s, costs.head_s, costs.out_bytes, Ks, bw, lat, batch_size)
        ]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="resnet56,resnet110,wrn28_10")
    parser.add_argument("--K", default="2,4,8,16", help="comma-separated numbers of modules")
    parser.add_argument("--batch-size", type=int, default=128, help="the ResNets' batch (the papers')")
    parser.add_argument("--wrn-batch-size", type=int, default=8)
    parser.add_argument("--aux-head", default="dgl", help="model.aux_head of the modules but the last")
    parser.add_argument("--bandwidth", type=float, default=12e9, help="link bytes/s (default: a PCIe 3.0 x16 link's order)")
    parser.add_argument("--latency", type=float, default=2e-5, help="link seconds per transfer")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="results/benchmarks/paper_scaling.json")
    args = parser.parse_args()
    Ks = [int(k) for k in args.K.split(",")]
    networks = {}
    for arch in args.archs.split(","):
        batch = args.wrn_batch_size if arch.startswith("wrn") else args.batch_size
        print(f"measuring {arch} at batch {batch} ...", flush=True)
        networks[arch] = estimate(arch, batch, args.aux_head, Ks, args.bandwidth, args.latency, args.repeats)
        for row in networks[arch]["link"]:
            print(f"  K={row['K']:2d} split {row['split']}: {row['speedup']:.2f}x of {row['ideal']} ({row['images_per_s']:.1f} img/s)", flush=True)
    write_json(args.out, {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": 1,
        "link": {"bandwidth_bytes_per_s": args.bandwidth, "latency_s": args.latency},
        "aux_head": args.aux_head,
        "networks": networks,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
