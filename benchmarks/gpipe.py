"""The GPipe peer of the speed benchmark: SplitNet's K modules as K pipeline stages.

One process per stage, started by torchrun; stage k is ``net.blocks[k]`` (the last stage also
runs the final head ``net.heads[-1]``), wrapped in ``torch.distributed.pipelining.PipelineStage``
and driven by ``ScheduleGPipe``: all microbatches forward, then all backward, then one SGD step
per stage. Every rank builds the same SplitNet from ``torch.manual_seed(0)`` and the same seeded
Fashion-MNIST-shaped data (1x28x28 images, 10 classes: a fixed random template per class plus
noise, so the loss falls and the network really trains), so nothing but activations and their
gradients crosses between ranks.

    torchrun --standalone --nproc-per-node K benchmarks/gpipe.py \
        --model-widths 16,32,64 --batch-size 128 --microbatches 4 --steps 30 --warmup 5 \
        --threads 1 [--dtype fp32|bf16] [--device cpu|cuda] [--check-grads] --out result.json

K is the number of processes (WORLD_SIZE) and must not exceed the number of widths (layers).
Backend gloo on CPU; with ``--device cuda`` NCCL and cuda:LOCAL_RANK. ``--dtype bf16`` runs the
stages under ``torch.autocast(bfloat16)`` with the model and the images in channels_last.
Rank 0 writes one JSON file (keys: see ``summarize``).

What is measured, per rank (= stage):
- ``wall_s``: time of the ``--steps`` timed steps (after ``--warmup`` steps and a barrier);
  ``images_per_s`` = batch x steps / wall. The pipeline's figure uses the slowest rank's wall.
- ``busy_fraction``: time the stage spends in its own forward and backward compute / wall.
  Measured directly: ``PipelineStage.forward_one_chunk`` and ``backward_one_chunk`` (and, on
  the last stage, the schedule's loss computation) are wrapped with timers. The schedule waits
  for its receives *before* calling them and posts its sends *after* them, so these intervals
  hold compute only, no waiting. On CUDA the intervals are CUDA events read after each step.
  The complement (1 - busy) is pipeline bubble + communication + Python overhead + the
  optimizer step (timed apart: ``optimizer_s``).
- ``isolated_busy_fraction``: a cross-check. After the timed steps each rank in turn (the others
  wait at a barrier) times forward+backward of a copy of its stage on one microbatch with the
  machine to itself; median x microbatches x steps / wall. On a machine with fewer cores than
  ranks x threads, the in-pipeline compute is slowed by the other ranks, so this is lower.
- ``bytes_sent_*_per_image``: bytes of the tensors actually handed to ``isend`` (activations
  forward, their gradients backward) in the timed steps, / (batch x steps).

``--check-grads``: before training, every rank also trains a plain (non-pipelined) copy of the
whole SplitNet, built from the same seed, for one step on the first batch by gradient
accumulation over the same microbatches (loss / microbatches per microbatch): with
``--microbatches 1`` that is plain full-batch backprop. After the pipeline's first step each rank
compares its stage's parameters and BatchNorm buffers with the reference's (``grad_check`` in
the JSON). With more microbatches the reference is still exact, as BatchNorm then normalizes
each microbatch on its own in both.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

REPO = Path(__file__).resolve().parents[1]
try:
    from decoupled import model
except ImportError:  # not installed: use the checkout's sources
    sys.path.insert(0, str(REPO / "src"))
    from decoupled import model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-widths", default="16,32,64", help="conv widths, comma-separated (one layer each)")
    p.add_argument("--pools", default=None, help="pooling after each layer, comma-separated, e.g. max2,max1 (default: max-pool 2 after each)")
    p.add_argument("--split", default=None, help="layers per stage, comma-separated (default: model.split_layers)")
    p.add_argument("--aux-pool", type=int, default=2)
    p.add_argument("--aux-hidden", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads per rank")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast + channels_last")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--shape-inference", choices=["static", "dynamic"], default="static",
                   help="static: input_args/output_args computed locally; dynamic: the library infers them on the first step")
    p.add_argument("--data-batches", type=int, default=8, help="distinct batches, cycled")
    p.add_argument("--seed", type=int, default=0, help="data seed (the model always uses seed 0)")
    p.add_argument("--isolated-reps", type=int, default=10, help="repetitions of the isolated fwd+bwd timing; 0: skip")
    p.add_argument("--check-grads", action="store_true", help="compare the first step with non-pipelined backprop")
    p.add_argument("--out", required=True, help="JSON written by rank 0")
    args = p.parse_args(argv)
    args.widths = [int(w) for w in args.model_widths.split(",")]
    args.counts = [int(c) for c in args.split.split(",")] if args.split else None
    args.model_cfg = {"widths": args.widths, "pools": args.pools.split(",") if args.pools else None, "aux_pool": args.aux_pool, "aux_hidden": args.aux_hidden}
    if args.batch_size % args.microbatches:
        p.error("--batch-size must be a multiple of --microbatches (the static stage shapes assume equal microbatches)")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.check_grads and args.warmup < 1:
        p.error("--check-grads uses the first (untimed) step: give --warmup >= 1")
    return args


def make_data(n_batches: int, batch: int, seed: int, device, channels_last: bool):
    """Fashion-MNIST-shaped batches: a smooth class template + pixel noise, the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.randn(10, 1, 4, 4, generator=g), size=(28, 28), mode="bilinear")
    out = []
    for _ in range(n_batches):
        y = torch.randint(0, 10, (batch,), generator=g)
        x = templates[y] + torch.randn(batch, 1, 28, 28, generator=g)
        x = x.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append((x, y.to(device)))
    return out


class Timer:
    """Sums the durations of intervals; CUDA events on GPU (read at ``collect``), else perf_counter."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.total = 0.0
        self.pending: list = []

    def wrap(self, fn):
        def timed(*a, **kw):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                result = fn(*a, **kw)
                end.record()
                self.pending.append((start, end))
            else:
                t = time.perf_counter()
                result = fn(*a, **kw)
                self.total += time.perf_counter() - t
            return result

        return timed

    def collect(self) -> float:
        if self.pending:
            torch.cuda.synchronize()
            self.total += sum(s.elapsed_time(e) for s, e in self.pending) / 1000
            self.pending.clear()
        return self.total

    def reset(self):
        self.collect()
        self.total = 0.0


class ByteCounter:
    """Counts the bytes of the tensors in the P2P ops a ``get_*_send_ops`` method returns."""

    def __init__(self):
        self.total = 0

    def wrap(self, fn):
        def counted(*a, **kw):
            ops = fn(*a, **kw)
            self.total += sum(op.tensor.numel() * op.tensor.element_size() for op in ops)
            return ops

        return counted


class ToChannelsLast(torch.autograd.Function):
    """``x.contiguous(memory_format=channels_last)`` whose gradient comes back NCHW-contiguous.

    Plain ``.contiguous(channels_last)`` hands back a channels_last gradient. At run time the
    library takes the input gradient from ``input.grad``, which autograd lays out like the input
    (NCHW), but its dynamic metadata inference takes it from ``torch.autograd.grad``, which keeps
    the channels_last layout: the previous stage then allocates a channels_last receive buffer
    and gloo fails with "input tensor has to be contiguous". Forcing NCHW here fixes both.
    """

    @staticmethod
    def forward(ctx, x):
        return x.contiguous(memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class Stage(nn.Module):
    """Stage k's modules, with NCHW-contiguous tensors at its borders.

    Gloo and NCCL send and receive only contiguous tensors ("RuntimeError: input tensor has to
    be contiguous" from ``isend``/``irecv`` otherwise), and a channels_last activation is not
    contiguous: with ``--dtype bf16`` the stage converts its input to channels_last and its
    output back (the gradients are converted the other way). In fp32 both are no-ops.
    """

    def __init__(self, *parts: nn.Module, channels_last: bool, sends: bool):
        super().__init__()
        self.body = nn.Sequential(*parts)
        self.channels_last, self.sends = channels_last, sends

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = ToChannelsLast.apply(x)
        y = self.body(x)
        return y.contiguous() if self.sends else y


def stage_input_output(net, k: int, submodule: nn.Module, x_mb: torch.Tensor, autocast):
    """Example input and output of stage k for one microbatch, for PipelineStage's static shapes.

    Runs blocks 0..k-1 and then the stage in eval mode (the BatchNorm running statistics stay
    untouched; the shapes, dtypes and strides are those of training). The input of a non-first
    stage must *require grad* and the output must too: the library derives the gradient buffers
    from these flags, and with ``requires_grad=False`` it silently sends no gradient back.
    """
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad(), autocast():
            h = x_mb
            for j in range(k):
                h = net.blocks[j](h)
            inp = h if k == 0 else h.contiguous().requires_grad_(True)  # NCHW: what the stage receives
        with torch.enable_grad(), autocast():
            out = submodule(inp)  # requires grad through the parameters
    finally:
        net.train(was_training)
    return inp, out.detach().requires_grad_(True)


def param_names(net: nn.Module) -> dict[int, str]:
    names = {id(p): n for n, p in net.named_parameters()}
    names.update({id(b): n for n, b in net.named_buffers()})
    return names


def reference_step(args, K, device, channels_last, autocast, batch):
    """One non-pipelined step of the whole SplitNet, by gradient accumulation over the microbatches."""
    torch.manual_seed(0)
    ref = model.build(args.model_cfg, K, 1, 10, args.counts).to(device)
    if channels_last:
        ref = ref.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(ref.parameters(), lr=args.lr, momentum=args.momentum)
    x, y = batch
    opt.zero_grad(set_to_none=True)
    for xc, yc in zip(torch.tensor_split(x, args.microbatches), torch.tensor_split(y, args.microbatches)):
        with autocast():
            loss = F.cross_entropy(ref(xc), yc) / args.microbatches
        loss.backward()
    opt.step()
    return dict(ref.named_parameters()), dict(ref.named_buffers())


def isolated_cost(submodule, inp, target, is_last, autocast, reps: int, device) -> float:
    """Median seconds of forward+backward of a copy of the stage on one microbatch."""
    sub = copy.deepcopy(submodule).train()
    inp = inp.detach().requires_grad_(inp.requires_grad)
    times = []
    for _ in range(reps + 1):  # the first repetition warms up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with autocast():
            out = sub(inp)
            if is_last:
                loss = F.cross_entropy(out, target)
        if is_last:
            loss.backward()
        else:
            out.backward(torch.ones_like(out))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        sub.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


def main(argv=None):
    args = parse_args(argv)
    rank, K = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    torch.set_num_threads(args.threads)  # torchrun sets OMP_NUM_THREADS=1; say it explicitly
    if args.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    try:
        return run(args, rank, K, device)
    finally:
        dist.destroy_process_group()


def run(args, rank, K, device):
    k = rank  # one stage per rank
    first, last = k == 0, k == K - 1
    channels_last = args.dtype == "bf16"
    if args.dtype == "bf16":
        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext

    torch.manual_seed(0)
    net = model.build(args.model_cfg, K, 1, 10, args.counts).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    parts = (net.blocks[k], net.heads[-1]) if last else (net.blocks[k],)
    submodule = Stage(*parts, channels_last=channels_last, sends=not last)
    names = param_names(net)
    data = make_data(args.data_batches, args.batch_size, args.seed, device, channels_last)
    mb = args.batch_size // args.microbatches
    x_mb, y_mb = data[0][0][:mb], data[0][1][:mb]
    inp, out = stage_input_output(net, k, submodule, x_mb, autocast)

    if args.shape_inference == "static":
        stage = PipelineStage(submodule, k, K, device, input_args=inp, output_args=out)
    else:
        stage = PipelineStage(submodule, k, K, device)
    # Instrumentation: instance attributes shadow the methods the schedule calls through self;
    # the loss (the last stage's forward work) is timed through the public loss_fn.
    compute = {"forward": Timer(device), "backward": Timer(device), "optimizer": Timer(device)}
    schedule = ScheduleGPipe(stage, n_microbatches=args.microbatches, loss_fn=compute["forward"].wrap(F.cross_entropy))
    optimizer = torch.optim.SGD(submodule.parameters(), lr=args.lr, momentum=args.momentum)
    stage.forward_one_chunk = compute["forward"].wrap(stage.forward_one_chunk)
    stage.backward_one_chunk = compute["backward"].wrap(stage.backward_one_chunk)
    optimizer_step = compute["optimizer"].wrap(optimizer.step)  # reported apart, not part of busy
    sent = {"forward": ByteCounter(), "backward": ByteCounter()}
    stage.get_fwd_send_ops = sent["forward"].wrap(stage.get_fwd_send_ops)
    stage.get_bwd_send_ops = sent["backward"].wrap(stage.get_bwd_send_ops)

    reference = reference_step(args, K, device, channels_last, autocast, data[0]) if args.check_grads else None
    initial = {id(p): p.detach().clone() for p in submodule.parameters()}

    losses_all: list[float] = []

    def train_step(i: int):
        x, y = data[i % len(data)]
        optimizer.zero_grad(set_to_none=True)
        losses: list = []
        with autocast():
            if first and last:
                schedule.step(x, target=y, losses=losses, return_outputs=False)
            elif first:
                schedule.step(x)
            elif last:
                schedule.step(target=y, losses=losses, return_outputs=False)
            else:
                schedule.step()
        optimizer_step()
        if losses:
            losses_all.append(float(torch.stack([l.detach().float() for l in losses]).mean()))

    grad_check = None
    for i in range(args.warmup):
        train_step(i)
        if i == 0 and reference is not None:
            grad_check = compare(submodule, names, initial, reference)
    if device.type == "cuda":
        torch.cuda.synchronize()
    for t in compute.values():
        t.reset()
    for c in sent.values():
        c.total = 0

    dist.barrier()
    start = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        train_step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    fwd_s, bwd_s, opt_s = (compute[key].collect() for key in ("forward", "backward", "optimizer"))

    isolated = None
    if args.isolated_reps > 0:
        for r in range(K):  # one rank at a time, the others wait
            dist.barrier()
            if r == rank:
                isolated = isolated_cost(submodule, inp, y_mb, last, autocast, args.isolated_reps, device)
        dist.barrier()

    images = args.batch_size * args.steps
    mine = {
        "stage": k,
        "rank": rank,
        "layers": len(net.blocks[k]),
        "params": sum(p.numel() for p in submodule.parameters()),
        "input_shape_per_microbatch": list(inp.shape),
        "output_shape_per_microbatch": list(out.shape),
        "output_dtype": str(out.dtype).removeprefix("torch."),
        "wall_s": wall,
        "images_per_s": images / wall,
        "forward_s": fwd_s,
        "backward_s": bwd_s,
        "busy_s": fwd_s + bwd_s,
        "busy_fraction": (fwd_s + bwd_s) / wall,
        "optimizer_s": opt_s,
        "isolated_fwd_bwd_s_per_microbatch": isolated,
        "isolated_busy_fraction": None if isolated is None else isolated * args.microbatches * args.steps / wall,
        "bytes_sent_forward_per_image": sent["forward"].total / images,
        "bytes_sent_backward_per_image": sent["backward"].total / images,
        "bytes_sent_per_image": (sent["forward"].total + sent["backward"].total) / images,
        "losses": losses_all if last else None,
        "grad_check": grad_check,
    }
    gathered = [None] * K
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        result = summarize(args, K, device, gathered)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        o = result["overall"]
        print(f"gpipe K={K} widths={args.widths} batch={args.batch_size} microbatches={args.microbatches} {args.dtype}: "
              f"{o['images_per_s']:.0f} images/s, busy {[round(s['busy_fraction'], 2) for s in result['stages']]}, "
              f"loss {o['loss_first']:.3f} -> {o['loss_last']:.3f}", flush=True)
    return 0


def compare(submodule, names, initial, reference) -> dict:
    """Largest differences between the pipeline's stage after step 1 and the reference's."""
    ref_params, ref_buffers = reference
    diff = update = 0.0
    for p in submodule.parameters():
        name = names[id(p)]
        diff = max(diff, (p.detach().float() - ref_params[name].detach().float()).abs().max().item())
        update = max(update, (p.detach().float() - initial[id(p)].float()).abs().max().item())
    buf_diff = 0.0
    for b in submodule.buffers():
        if b.is_floating_point():
            buf_diff = max(buf_diff, (b.float() - ref_buffers[names[id(b)]].float()).abs().max().item())
    return {"max_param_diff": diff, "max_param_update": update, "max_buffer_diff": buf_diff}


def summarize(args, K, device, stages) -> dict:
    last = stages[-1]
    wall = max(s["wall_s"] for s in stages)
    checks = [s["grad_check"] for s in stages]
    losses = last["losses"] or []
    return {
        "benchmark": "gpipe",
        "config": {
            "K": K,
            "widths": args.widths,
            "aux_pool": args.aux_pool,
            "aux_hidden": args.aux_hidden,
            "batch_size": args.batch_size,
            "microbatches": args.microbatches,
            "steps": args.steps,
            "warmup": args.warmup,
            "threads": args.threads,
            "dtype": args.dtype,
            "device": device.type,
            "backend": "nccl" if device.type == "cuda" else "gloo",
            "shape_inference": args.shape_inference,
            "lr": args.lr,
            "momentum": args.momentum,
            "schedule": "ScheduleGPipe",
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
        },
        "overall": {
            "wall_s": wall,
            "images_per_s": args.batch_size * args.steps / wall,
            "busy_fraction_mean": statistics.fmean(s["busy_fraction"] for s in stages),
            "busy_fraction_min": min(s["busy_fraction"] for s in stages),
            # GPipe's idealized bubble with equal stages and free communication
            "ideal_bubble_fraction": (K - 1) / (args.microbatches + K - 1),
            "bytes_sent_per_image": sum(s["bytes_sent_per_image"] for s in stages),
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
        },
        "grad_check": None if checks[0] is None else {
            "microbatches": args.microbatches,
            "max_param_diff": max(c["max_param_diff"] for c in checks),
            "min_stage_param_update": min(c["max_param_update"] for c in checks),  # each stage's largest update, smallest over stages
            "max_buffer_diff": max(c["max_buffer_diff"] for c in checks),
            "per_stage": checks,
        },
        "losses": losses,
        "stages": [{key: v for key, v in s.items() if key not in ("losses", "grad_check")} for s in stages],
    }


if __name__ == "__main__":
    sys.exit(main())
