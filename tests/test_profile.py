"""Layer timing and the balanced cut: exact on given costs, sensible on the real model."""

import itertools
import random

import pytest
import torch

from decoupled import model, profile

DEFAULT = {"widths": [16, 32, 64], "aux_pool": 2, "aux_hidden": 128}  # the schema's defaults
DEEPER = {**DEFAULT, "widths": [16, 32, 64, 64]}  # config/async_sweep.yaml's model
TINY = {"widths": [4, 8, 12], "aux_pool": 2, "aux_hidden": 8}
# Largest stage / mean stage allowed for the measured cut at K=2. The default model measures
# 1.01-1.10 and DEEPER 1.11-1.17 on a loaded 2-core machine; 1.35 still means no module takes
# more than about twice the other's time, while leaving room for timing noise.
MAX_IMBALANCE_K2 = 1.35


def brute_force_best(layer_s, head_s, K):
    """The smallest largest stage over every cut of the layers into K modules."""
    n = len(layer_s)
    return min(
        max(profile.stage_costs([b - a for a, b in zip((0, *cuts), (*cuts, n))], layer_s, head_s))
        for cuts in itertools.combinations(range(1, n), K - 1)
    )


@pytest.mark.parametrize("seed", range(40))
def test_balanced_split_is_the_best_cut(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 8)
    K = rng.randint(1, n)
    layer_s = [rng.uniform(0.1, 10.0) for _ in range(n)]
    head_s = [rng.uniform(0.0, 3.0) for _ in range(n)]
    split = profile.balanced_split(layer_s, head_s, K)
    assert len(split.counts) == K and sum(split.counts) == n and min(split.counts) >= 1
    assert split.stage_s == pytest.approx(profile.stage_costs(split.counts, layer_s, head_s))
    assert max(split.stage_s) == pytest.approx(brute_force_best(layer_s, head_s, K), rel=1e-12)
    assert split.imbalance == pytest.approx(max(split.stage_s) * K / sum(split.stage_s))


def test_ties_keep_the_even_split():
    # [2, 3] and [3, 2] both have a largest stage of 3 layers
    assert profile.balanced_split([1.0] * 5, [0.0] * 5, 2).counts == model.split_layers(5, 2) == [2, 3]
    assert profile.balanced_split([1.0] * 4, [0.5] * 4, 4).counts == [1, 1, 1, 1]


def test_heads_count_in_the_stage_cost():
    # without heads [1, 2] balances 2 | 1+1; the heavy head after layer 0 moves the cut
    assert profile.balanced_split([2.0, 1.0, 1.0], [0.0, 0.0, 0.0], 2).counts == [1, 2]
    assert profile.balanced_split([2.0, 1.0, 1.0], [3.0, 0.0, 0.0], 2).counts == [2, 1]


def test_balanced_split_rejects_impossible_K():
    with pytest.raises(ValueError):
        profile.balanced_split([1.0, 1.0], [0.0, 0.0], 3)


@pytest.fixture(scope="module")
def measured():
    """The default and the deeper model timed once (about a second each) at batch 128, 28x28 grey images."""
    return {name: profile.layer_costs(cfg, 1, 28, 10, 128) for name, cfg in (("default", DEFAULT), ("deeper", DEEPER))}


def test_measured_costs_are_positive_and_activation_sizes_exact(measured):
    costs = measured["default"]
    assert len(costs.layer_s) == len(costs.head_s) == 3
    assert all(s > 0 for s in costs.layer_s + costs.head_s)
    assert costs.out_bytes == [16 * 14 * 14 * 4, 32 * 7 * 7 * 4, 64 * 4 * 4 * 4]  # float32, max-pool 2 rounding up


@pytest.mark.parametrize("name", ["default", "deeper"])
def test_measured_balanced_split_is_even_enough_and_no_worse_than_even(name, measured):
    costs = measured[name]
    n = len(costs.layer_s)
    for K in range(2, n + 1):
        best = profile.balanced_split(costs.layer_s, costs.head_s, K)
        even = profile.stage_costs(model.split_layers(n, K), costs.layer_s, costs.head_s)
        assert max(best.stage_s) <= max(even) * (1 + 1e-9)
    assert profile.balanced_split(costs.layer_s, costs.head_s, 2).imbalance <= MAX_IMBALANCE_K2


def test_timing_leaves_the_seed_stream_and_threads_alone():
    threads, rng_state = torch.get_num_threads(), torch.random.get_rng_state()
    costs = profile.layer_costs(TINY, 3, 32, 10, 4, repeats=1, warmup=0, activation_dtype=torch.float16)
    assert torch.get_num_threads() == threads and torch.equal(torch.random.get_rng_state(), rng_state)
    assert costs.out_bytes == [4 * 16 * 16 * 2, 8 * 8 * 8 * 2, 12 * 4 * 4 * 2]  # float16 activations


def test_explicit_split_is_honoured_by_build():
    net = model.build({**TINY, "split": [2, 1]}, 2, in_channels=1, num_classes=10)
    assert [len(block) for block in net.blocks] == [2, 1]
    assert [head[2].in_features for head in net.heads] == [8 * 2 * 2, 12 * 2 * 2]  # a head on each module's last layer
    assert [len(block) for block in model.build(TINY, 2, 1, 10, counts=[2, 1]).blocks] == [2, 1]
    with pytest.raises(ValueError, match="K=2"):
        model.build(TINY, 2, 1, 10, counts=[1, 1])
    with pytest.raises(ValueError, match="balanced"):
        model.build({**TINY, "split": "balanced"}, 2, 1, 10)


def test_even_split_is_unchanged():
    torch.manual_seed(0)
    before = model.build(TINY, 2, 1, 10).state_dict()  # no split key: as before model.split existed
    torch.manual_seed(0)
    even = model.build({**TINY, "split": "even"}, 2, 1, 10)
    assert [len(block) for block in even.blocks] == model.split_layers(3, 2) == [1, 2]
    assert all(torch.equal(before[name], value) for name, value in even.state_dict().items())
    assert profile.resolve_split({**TINY, "split": "even"}, 2, 1, 28, 10, 16) == ([1, 2], None)
    assert profile.resolve_split({**TINY, "split": [2, 1]}, 2, 1, 28, 10, 16) == ([2, 1], None)


def test_the_cut_moves_heads_not_conv_weights():
    torch.manual_seed(0)
    a = model.build(TINY, 2, 1, 10, counts=[1, 2])
    torch.manual_seed(0)
    b = model.build(TINY, 2, 1, 10, counts=[2, 1])
    convs = lambda net: [p for block in net.blocks for p in block.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(convs(a), convs(b), strict=True))


def test_resolve_balanced_reports_what_it_measured():
    counts, info = profile.resolve_split({**TINY, "split": "balanced"}, 2, 1, 28, 10, 16)
    assert len(counts) == 2 and sum(counts) == 3
    assert info["stage_s"] == pytest.approx(profile.stage_costs(counts, info["layer_s"], info["head_s"]))
    assert info["imbalance"] <= info["even_imbalance"] * (1 + 1e-9)
    assert len(info["even_stage_s"]) == 2
