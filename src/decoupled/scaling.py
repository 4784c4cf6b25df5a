"""How fast K workers, one per module, would train: a discrete-event model of the pipeline.

Decoupled methods exist to run modules in parallel. The distributed engine measures that on as
many workers as the machine has; this model predicts, from the measured costs (``profile``),
what K workers would gain beyond that, so a cut and a K can be judged before anything is
deployed (benchmarks/parallel_speedup.py sets it beside the measured points). The events, for
stage k and batch b:

* stage k starts b once it has finished b-1, b has arrived from stage k-1, and its queue to
  stage k+1 has room: at most ``capacity`` of its batches that stage k+1 has not started yet
  (in transit or waiting), so a slow consumer holds its producer back;
* stage k+1 receives b ``transfer_s[k]`` after the link is free and stage k has finished b; a
  link carries one batch at a time, so a transfer slower than the stages also bounds throughput.

Only forward activations cross a boundary, as in DGL; methods sending gradients back as well
(DNI, DDG) would need the reverse links too. The event times follow from these rules batch by
batch (a max-plus recurrence), which is exact for fixed costs.
"""

from __future__ import annotations

from dataclasses import dataclass

from decoupled.profile import balanced_split


@dataclass(frozen=True)
class PipelineRun:
    throughput: float  # batches per second once the pipeline is full (over the last half of the batches)
    busy: list[float]  # fraction of that time each stage computes; 1 = the bottleneck
    makespan: float  # seconds until the last stage finishes the last batch


@dataclass(frozen=True)
class SpeedupEstimate:
    K: int
    counts: list[int]  # the balanced split: layers per module
    stage_s: list[float]  # seconds per batch of each module, head included
    images_per_s: float
    speedup: float  # over one worker training the whole network by backprop
    ideal: int  # K: what perfectly even stages with free transfers and no aux heads would give


def simulate_pipeline(stage_s: list[float], transfer_s: list[float], capacity: int, batches: int) -> PipelineRun:
    """Run ``batches`` batches through stages costing ``stage_s`` seconds each, linked by ``transfer_s``."""
    K = len(stage_s)
    if len(transfer_s) != K - 1:
        raise ValueError(f"{K} stages need {K - 1} transfer times, got {len(transfer_s)}")
    if capacity < 1 or batches < 2:
        raise ValueError(f"need capacity >= 1 and batches >= 2, got capacity {capacity} and {batches} batches")
    start = [[0.0] * batches for _ in range(K)]
    finish = [[0.0] * batches for _ in range(K)]
    arrive = [[0.0] * batches for _ in range(K)]  # stage 0's inputs are always there
    for b in range(batches):
        for k in range(K):
            ready = max(arrive[k][b], finish[k][b - 1] if b else 0.0)
            if k < K - 1 and b >= capacity:
                ready = max(ready, start[k + 1][b - capacity])  # back-pressure from a full queue
            start[k][b] = ready
            finish[k][b] = ready + stage_s[k]
            if k < K - 1:
                link_free = arrive[k + 1][b - 1] if b else 0.0
                arrive[k + 1][b] = max(finish[k][b], link_free) + transfer_s[k]
    first = (batches - 1) // 2  # steady state: from the end of this batch to the end of the last one
    done = batches - 1 - first

    def rate(k: int) -> float:
        return done / (finish[k][-1] - finish[k][first])

    # each stage finishes `done` whole batches in its own window, so its busy fraction is exact
    return PipelineRun(
        throughput=rate(K - 1),
        busy=[stage_s[k] * rate(k) for k in range(K)],
        makespan=finish[K - 1][-1],
    )


def estimate_speedup(
    layer_costs: list[float],
    head_costs: list[float],
    out_bytes: list[int],
    Ks: list[int],
    bandwidth_bytes_per_s: float,
    latency_s: float,
    batch_size: int,
    capacity: int = 4,
    batches: int = 200,
) -> list[SpeedupEstimate]:
    """For each K: the balanced cut's simulated images/s and its speedup over backprop on one worker.

    Arguments are ``profile.LayerCosts``' lists. Backprop's worker runs every layer and the final
    head, nothing else; K workers also pay for K-1 aux heads and the transfers, so the speedup
    stays below the ideal K even for perfectly balanced stages.
    """
    backprop_images_per_s = batch_size / (sum(layer_costs) + head_costs[-1])
    estimates = []
    for K in Ks:
        split = balanced_split(layer_costs, head_costs, K)
        boundaries = [sum(split.counts[: k + 1]) - 1 for k in range(K - 1)]  # last layer of each module but the last
        transfer_s = [out_bytes[layer] * batch_size / bandwidth_bytes_per_s + latency_s for layer in boundaries]
        run = simulate_pipeline(split.stage_s, transfer_s, capacity, batches)
        images_per_s = run.throughput * batch_size
        estimates.append(SpeedupEstimate(K, split.counts, split.stage_s, images_per_s, images_per_s / backprop_images_per_s, K))
    return estimates
