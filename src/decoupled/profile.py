"""Time the CNN layer by layer, and cut it into the K modules whose slowest one is fastest.

With one worker per module (a pipeline), throughput is set by the slowest module, and equal
layer counts do not make equal work: early layers see large images, late ones many channels,
and every module also pays for its head (an aux head, or the final classifier for the last).
``layer_costs`` measures what a cut has to balance, ``balanced_split`` finds the best cut, and
``resolve_split`` turns the config key ``model.split`` into layer counts for ``model.build``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from decoupled import model


@dataclass(frozen=True)
class LayerCosts:
    layer_s: list[float]  # forward+backward seconds per batch of each conv layer
    head_s: list[float]  # the same for a head on each layer's output (loss included)
    out_bytes: list[int]  # bytes per image of each layer's output: what crosses a boundary there


@dataclass(frozen=True)
class Split:
    counts: list[int]  # layers per module
    stage_s: list[float]  # predicted seconds per batch of each module: its layers plus its head
    imbalance: float  # max / mean of stage_s; 1 = perfectly even


def layer_costs(
    model_cfg: dict,
    in_channels: int,
    image_size: int,
    num_classes: int,
    batch_size: int,
    repeats: int = 9,
    warmup: int = 2,
    activation_dtype: torch.dtype = torch.float32,
) -> LayerCosts:
    """Median forward+backward seconds per batch of each layer and each candidate head, on one thread.

    Layers and heads are timed round-robin, so a burst of load on a shared machine slows all of
    them alike instead of one. Every layer but the first also computes the gradient for its input,
    as in backprop; a module's first layer in DGL does not need it, so DGL stages cost a little
    less than predicted. Compute runs in float32; ``activation_dtype`` only sets ``out_bytes``.
    Neither torch's global RNG nor its thread count is changed on return.
    """
    n_layers = model.n_layers(model_cfg)
    with torch.random.fork_rng(devices=[]):
        # one module per layer: block i is layer i and head i the head a module ending there gets
        net = model.build(model_cfg, n_layers, in_channels, num_classes, counts=[1] * n_layers)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, in_channels, image_size, image_size, generator=generator)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
    with torch.no_grad():
        inputs = [images]
        for layer in net.blocks:
            inputs.append(layer(inputs[-1]))
    outputs = inputs[1:]
    tasks = [_layer_step(layer, x, first=i == 0, generator=generator) for i, (layer, x) in enumerate(zip(net.blocks, inputs))]
    tasks += [_head_step(head, features, labels) for head, features in zip(net.heads, outputs)]
    seconds = _median_seconds(tasks, repeats, warmup)
    element_bytes = torch.empty((), dtype=activation_dtype).element_size()
    return LayerCosts(
        layer_s=seconds[:n_layers],
        head_s=seconds[n_layers:],
        out_bytes=[out[0].numel() * element_bytes for out in outputs],
    )


def _layer_step(layer: torch.nn.Module, x: torch.Tensor, first: bool, generator: torch.Generator) -> Callable[[], None]:
    x = x.detach().requires_grad_(not first)
    with torch.no_grad():
        grad_out = torch.randn(layer(x).shape, generator=generator)

    def step():
        layer(x).backward(grad_out)

    return step


def _head_step(head: torch.nn.Module, features: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    # the head passes its gradient on to the module's layers, so it computes d loss / d features
    features = features.detach().requires_grad_(True)

    def step():
        F.cross_entropy(head(features), labels).backward()

    return step


def _median_seconds(steps: list[Callable[[], None]], repeats: int, warmup: int) -> list[float]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a pipeline worker owns one core; more threads would hide the cost
    try:
        samples = [[] for _ in steps]
        for round_ in range(warmup + repeats):
            for step, times in zip(steps, samples):
                start = time.perf_counter()
                step()
                if round_ >= warmup:
                    times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return [statistics.median(times) for times in samples]


def stage_costs(counts: list[int], layer_s: list[float], head_s: list[float]) -> list[float]:
    """Seconds per batch of each module of the cut ``counts``: its layers plus the head on its last layer."""
    stages, start = [], 0
    for count in counts:
        end = start + count
        stages.append(sum(layer_s[start:end]) + head_s[end - 1])
        start = end
    return stages


def _split(counts: list[int], layer_s: list[float], head_s: list[float]) -> Split:
    stages = stage_costs(counts, layer_s, head_s)
    return Split(list(counts), stages, max(stages) / statistics.fmean(stages))


def balanced_split(layer_s: list[float], head_s: list[float], K: int) -> Split:
    """The cut of the layers into K contiguous non-empty modules with the smallest largest stage cost.

    Exact, by dynamic programming over (modules used, layers covered): O(K n^2). Where the even
    cut (``model.split_layers``) is as good, it is returned, so balancing changes nothing it need not.
    """
    n = len(layer_s)
    even = _split(model.split_layers(n, K), layer_s, head_s)  # also rejects K outside 1..n
    prefix = [0.0]
    for cost in layer_s:
        prefix.append(prefix[-1] + cost)
    # least[k][j]: smallest largest stage when the first j layers form k modules; cut_at[k][j]: where the k-th module starts
    least = [[math.inf] * (n + 1) for _ in range(K + 1)]
    cut_at = [[0] * (n + 1) for _ in range(K + 1)]
    least[0][0] = 0.0
    for k in range(1, K + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                worst = max(least[k - 1][i], prefix[j] - prefix[i] + head_s[j - 1])
                if worst < least[k][j]:
                    least[k][j], cut_at[k][j] = worst, i
    if max(even.stage_s) <= least[K][n] * (1 + 1e-9):  # tolerance: the sums add in another order
        return even
    ends = [n]
    for k in range(K, 1, -1):
        ends.append(cut_at[k][ends[-1]])
    ends.reverse()
    counts = [end - start for start, end in zip([0] + ends[:-1], ends)]
    return _split(counts, layer_s, head_s)


def resolve_split(model_cfg: dict, K: int, in_channels: int, image_size: int, num_classes: int, batch_size: int) -> tuple[list[int], dict | None]:
    """Layers per module as ``model.split`` asks, and for "balanced" what the choice rests on.

    "even" and explicit lists are taken as they are, without timing anything (info None), so
    those runs cost and build exactly what they did before. For "balanced" the info holds the
    measured ``layer_s``/``head_s``, the chosen cut's ``stage_s`` and ``imbalance``, and the even
    cut's ``even_stage_s`` and ``even_imbalance`` for comparison. The counts are measured, so
    they can differ between machines and runs: record them with the run to rebuild its network.
    """
    if model_cfg.get("split", "even") != "balanced":
        return model.configured_counts(model_cfg, K), None
    costs = layer_costs(model_cfg, in_channels, image_size, num_classes, batch_size)
    best = balanced_split(costs.layer_s, costs.head_s, K)
    even = _split(model.split_layers(len(costs.layer_s), K), costs.layer_s, costs.head_s)
    info = {
        "layer_s": costs.layer_s,
        "head_s": costs.head_s,
        "stage_s": best.stage_s,
        "imbalance": best.imbalance,
        "even_stage_s": even.stage_s,
        "even_imbalance": even.imbalance,
    }
    return best.counts, info
