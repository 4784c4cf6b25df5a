"""One short check of the GPU path: a ``config/paper/`` config trained for a few epochs on one
GPU, on CIFAR-shaped data; images/s per job and the GPU's utilisation while it trains.

Each job of the config's grid (``--methods``, ``--K`` and ``--seeds`` narrow it) is built as the
workflow builds it (``grid.job_config``), with ``train.epochs`` = ``--epochs`` and the simulated
engine (one GPU: the distributed engine wants a GPU per worker), and trained in this process by
``train.fit``: no Snakemake, no MLflow, nothing but torch, PyYAML and jsonschema needed (what a
GPU box without the package's other dependencies can be given). A thread reads the GPU's
utilisation and memory from ``nvidia-smi`` every ``--sample-s`` seconds meanwhile.

Data: ``--dataset`` (cifar10, cifar100 or imagenet32, default cifar10) from ``--data-root``
(``--cifar-root``: the same) where a copy is at hand, read and checked as the pipeline reads it
(ImageNet32 has no published checksums: ``--no-verify-checksums``), else a stand-in of CIFAR's
shape made from Fashion-MNIST (``--fashion-mnist-root``, default Debian's folder, or a copy
carried to the GPU box): each 28x28 image zero-padded to 32x32 and its one channel repeated to
3, with Fashion-MNIST's labels and split. ``--dataset imagenet`` (with an ImageNet config, e.g.
``config/paper/dgl_vgg13_imagenet.yaml``) streams ImageNet from ``--data-root`` (its ``train/``
and ``val/``) through the loader's workers, at the config's crop size; without a root, from a
folder of Fashion-MNIST's images written as JPEG files for it (the ImageNet twins' stand-in).
The JSON says which (``data``); the stand-in's accuracies are Fashion-MNIST's, not the dataset's.

    python benchmarks/gpu_check.py [--config config/paper/fdg_resnet56.yaml] [--epochs 2]
        [--methods backprop,dgl,ddg,fdg] [--K 2] [--seeds 0] [--device cuda]
        [--precision fp32|bf16] [--memory-format contiguous|channels_last]
        [--dataset cifar10|cifar100|imagenet32|imagenet --data-root DIR [--no-verify-checksums] | --fashion-mnist-root DIR]
        [--subset-per-class N] [--out FILE]

Writes results/benchmarks/gpu_check.json (``--out``): per job its images/s in every epoch (the
first pays cuDNN's autotuning and the first kernels' loading), its last test accuracy, and the
GPU's utilisation while it trained (mean and median of the samples, %) and its peak memory.
It runs on the CPU too (``--device cpu``; no utilisation then), which is how it is tested here.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from decoupled import config, grid  # noqa: E402
from decoupled.data import Dataset, balanced_subset, channel_stats, load_prepared, prepare, read_raw, write_image_folder  # noqa: E402
from decoupled.data import fixed_stats  # noqa: E402
from decoupled.data.pixels import normalize as normalized  # noqa: E402
from decoupled.files import write_json  # noqa: E402
from decoupled.train import fit  # noqa: E402


# what the JSON calls each dataset read from --data-root
ABOUT = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100 (fine labels)", "imagenet32": "ImageNet32 (downsampled ImageNet 32x32)",
         "imagenet": "ImageNet (ILSVRC 2012), streamed"}


def streamed(data_root: str | None, fashion_mnist_root: str | None, subset_per_class: int | None, dataset_cfg: dict, workdir: Path):
    """ImageNet's file list from ``data_root`` as the pipeline prepares it; without one, from a
    folder of Fashion-MNIST's images written in ImageNet's layout under ``workdir``."""
    root = data_root
    if root is None:
        raw = read_raw("fashion_mnist", fashion_mnist_root)
        if subset_per_class is not None:  # the test set too: each image is a file to write
            raw.train_x, raw.train_y = balanced_subset(raw.train_x, raw.train_y, subset_per_class)
            raw.test_x, raw.test_y = balanced_subset(raw.test_x, raw.test_y, subset_per_class)
        root = workdir / "imagenet_stand_in"
        write_image_folder(raw, root)
    prepare("imagenet", workdir / "imagenet.pt", root, subset_per_class=subset_per_class if data_root else None,
            crop_size=dataset_cfg["crop_size"], resize_size=dataset_cfg["resize_size"])
    data = load_prepared(workdir / "imagenet.pt")
    about = ABOUT["imagenet"] if data_root else "Fashion-MNIST written as an ImageNet-layout folder of JPEG files, streamed (a stand-in)"
    return data, {"name": about, "source": str(root)}


def dataset(data_root: str | None, fashion_mnist_root: str | None, subset_per_class: int | None, name: str = "cifar10",
            verify_checksums: bool = True, normalize: dict | None = None) -> tuple[Dataset, dict]:
    """Dataset ``name`` (of ``ABOUT``: 32x32 colour images) from ``data_root``; without one,
    Fashion-MNIST in their shape (28x28 zero-padded to 32x32, its one channel repeated to 3).
    Normalized as ``load_prepared`` does: by the config's ``dataset.normalize`` where it fixes
    constants (the real data only), else by the training set's statistics."""
    raw = read_raw(name, data_root, verify_checksums=verify_checksums) if data_root else read_raw("fashion_mnist", fashion_mnist_root)
    shaped = (lambda x: x) if data_root else (lambda x: F.pad(x, (2, 2, 2, 2)).repeat(1, 3, 1, 1))  # noqa: E731
    x_train, y_train = raw.train_x, raw.train_y
    if subset_per_class is not None:
        x_train, y_train = balanced_subset(x_train, y_train, subset_per_class)
    x_train, x_test = shaped(x_train), shaped(raw.test_x)
    mean, std = fixed_stats(normalize, 3) if normalize is not None and data_root else channel_stats(x_train)
    train = normalized(x_train, mean, std)
    name = name if data_root else "fashion_mnist_cifar_shaped"
    data = Dataset(train, y_train.long(), normalized(x_test, mean, std), raw.test_y.long(), list(raw.classes), len(raw.classes), train.shape[1], train.shape[2], name)
    about = ABOUT[name] if data_root else "Fashion-MNIST zero-padded to 32x32, its channel repeated to 3 (a stand-in for CIFAR's shape)"
    return data, {"name": about, "source": raw.source}


class GpuSampler(threading.Thread):
    """``nvidia-smi``'s utilisation (%) and memory used (MiB) of GPU ``index`` every ``every`` seconds."""

    def __init__(self, index: int, every: float):
        super().__init__(daemon=True)
        self.index, self.every, self.samples, self.done = index, every, [], threading.Event()

    def run(self) -> None:
        query = ["nvidia-smi", f"--id={self.index}", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
        while not self.done.wait(self.every):
            line = subprocess.run(query, capture_output=True, text=True).stdout.strip()
            if line:
                utilisation, memory = (float(v) for v in line.split(","))
                self.samples.append((time.perf_counter(), utilisation, memory))

    def between(self, start: float, end: float) -> list[tuple[float, float]]:
        return [(u, m) for t, u, m in self.samples if start <= t <= end]


def jobs(cfg: dict, methods: list[str] | None, Ks: list[int] | None, seeds: list[int] | None) -> list[tuple[grid.RunKey, dict]]:
    keys = [key for key in grid.runs(cfg) if (methods is None or key.method in methods) and (Ks is None or key.K in Ks)
            and (seeds is None or key.seed in seeds)]
    return [(key, grid.job_config(cfg, key)) for key in keys]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="config/paper/fdg_resnet56.yaml")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--methods", help="comma-separated (default: the grid's)")
    parser.add_argument("--K", help="comma-separated (default: the grid's)")
    parser.add_argument("--seeds", default="0", help="comma-separated (default: 0)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", choices=["fp32", "bf16"], help="train.precision (default: the config's)")
    parser.add_argument("--memory-format", choices=["contiguous", "channels_last"], help="train.memory_format (default: the config's)")
    parser.add_argument("--dataset", choices=sorted(ABOUT), default="cifar10", help="what --data-root holds")
    parser.add_argument("--data-root", "--cifar-root", dest="data_root",
                        help="the dataset's folder (cifar-10-batches-py, cifar-100-python, ImageNet32's batches) or its parent")
    parser.add_argument("--no-verify-checksums", action="store_true", help="read files without a known checksum (ImageNet32: none is published)")
    parser.add_argument("--fashion-mnist-root", help="Fashion-MNIST's IDX files (default: Debian's folder), for the stand-in")
    parser.add_argument("--subset-per-class", type=int, help="fewer training images per class (a quick look)")
    parser.add_argument("--sample-s", type=float, default=0.2)
    parser.add_argument("--out", default="results/benchmarks/gpu_check.json")
    args = parser.parse_args()

    split = lambda text: None if text is None else [v.strip() for v in text.split(",")]  # noqa: E731
    train = {"epochs": args.epochs, "device": args.device, "threads": torch.get_num_threads() if args.device == "cpu" else 1}
    train.update({k: v for k, v in (("precision", args.precision), ("memory_format", args.memory_format)) if v is not None})
    cfg = config.validate(config.deep_merge(config.load(REPO / args.config), {"engine": "simulated", "train": train}))
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    if args.dataset == "imagenet":
        data, about = streamed(args.data_root, args.fashion_mnist_root, args.subset_per_class, cfg["dataset"], workdir)
    else:
        data, about = dataset(args.data_root, args.fashion_mnist_root, args.subset_per_class, args.dataset, not args.no_verify_checksums,
                              cfg["dataset"]["normalize"] if cfg["dataset"]["name"] == args.dataset else None)
    Ks, seeds = split(args.K), split(args.seeds)
    todo = jobs(cfg, split(args.methods), None if Ks is None else [int(k) for k in Ks], None if seeds is None else [int(s) for s in seeds])
    if not todo:
        sys.exit("gpu_check: no job of the grid matches --methods/--K/--seeds")
    if args.device == "cuda" and isinstance(data, Dataset):  # in memory: on the GPU once (a streamed one is read by its workers)
        data = Dataset(data.train_x.cuda(), data.train_y.cuda(), data.test_x.cuda(), data.test_y.cuda(), *(getattr(data, f) for f in ("classes", "num_classes", "in_channels", "image_size", "name")))
    index = torch.device(args.device).index or 0
    sampler = GpuSampler(index, args.sample_s) if args.device == "cuda" and shutil.which("nvidia-smi") else None
    if sampler is not None:
        sampler.start()
    results = []
    for key, job in todo:
        print(f"{key.name}: {args.epochs} epochs on {args.device} ...", flush=True)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats(index)
        start = time.perf_counter()
        metrics = fit(job, data)
        end = time.perf_counter()
        row = {"run": key.name, "method": key.method, "mode": key.mode, "K": key.K, "seconds": end - start,
               "images_per_s_per_epoch": [e["images_per_s"] for e in metrics["epochs"]], "test_acc": metrics["epochs"][-1]["test_acc"]}
        if args.device == "cuda":
            row["peak_memory_mib"] = torch.cuda.max_memory_allocated(index) / 2**20
        samples = sampler.between(start, end) if sampler is not None else []
        if samples:
            row["gpu_utilisation_pct"] = {"mean": statistics.fmean(u for u, _ in samples), "median": statistics.median(u for u, _ in samples), "samples": len(samples)}
        print(f"  images/s per epoch {[round(v) for v in row['images_per_s_per_epoch']]}, test accuracy {100 * row['test_acc']:.2f}%"
              + (f", GPU busy {row['gpu_utilisation_pct']['median']:.0f}% (median)" if samples else ""), flush=True)
        results.append(row)
    if sampler is not None:
        sampler.done.set()
    device_name = torch.cuda.get_device_name(index) if args.device == "cuda" else platform.processor() or platform.machine()
    write_json(REPO / args.out if not Path(args.out).is_absolute() else Path(args.out), {
        "benchmark": "gpu_check", "config": args.config, "epochs": args.epochs, "device": device_name, "torch": torch.__version__,
        "numerics": {k: cfg["train"][k] for k in ("precision", "memory_format")}, "batch_size": cfg["train"]["batch_size"],
        "data": {**about, "n_train": data.n_train, "n_test": data.n_test}, "jobs": results})
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
