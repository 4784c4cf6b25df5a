"""benchmarks/parallel_speedup.py: how rounds of measurements become ratios and target verdicts.

The measuring itself takes minutes (it is a benchmark, run by hand); what is tested here is
the arithmetic a reader of its table relies on, on made-up rounds.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("parallel_speedup", REPO / "benchmarks" / "parallel_speedup.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO / "src"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "src"))
    return module


def one_round(base: float, threads: float, ceiling: float, dgl: float, busy: list[float]) -> dict:
    return {
        "backprop_1thread": {"images_per_s": base},
        "backprop_2threads": {"images_per_s": threads},
        "independent_2x1thread": {"images_per_s": ceiling},
        "dgl_sync": {"images_per_s": dgl, "busy_frac_per_stage": busy},
        "dgl_async": {"images_per_s": dgl * 0.9, "busy_frac_per_stage": [0.99, 0.99]},
    }


def test_ratios_are_taken_within_each_round_then_the_median(bench):
    # the machine is twice as fast in round 2: within each round DGL is 1.9x backprop,
    # though the ratio of the medians over all rounds would say 0.95x or 3.8x
    rounds = [
        one_round(base=100, threads=160, ceiling=195, dgl=190, busy=[0.95, 0.97]),
        one_round(base=200, threads=320, ceiling=390, dgl=380, busy=[0.93, 0.99]),
        one_round(base=100, threads=160, ceiling=195, dgl=190, busy=[0.91, 0.98]),
    ]
    summary = bench.summarize("dgl_sync", rounds, K=2)
    assert summary["speedup"] == pytest.approx(1.9)
    assert summary["speedup_range"] == pytest.approx([1.9, 1.9])
    assert summary["vs_Kthreads"] == pytest.approx(190 / 160)
    assert summary["of_ceiling"] == pytest.approx(190 / 195)
    assert summary["images_per_s"] == 190  # the median round's
    assert summary["busy_frac_per_stage"] == [0.93, 0.98]  # stage by stage
    assert len(summary["samples"]) == 3


def test_one_bad_round_does_not_move_the_median(bench):
    rounds = [
        one_round(base=100, threads=160, ceiling=195, dgl=185, busy=[0.95, 0.97]),
        one_round(base=60, threads=160, ceiling=195, dgl=185, busy=[0.95, 0.97]),  # the baseline ran in a slow spell
        one_round(base=100, threads=160, ceiling=195, dgl=182, busy=[0.95, 0.97]),
    ]
    summary = bench.summarize("dgl_sync", rounds, K=2)
    assert summary["speedup"] == pytest.approx(1.85)
    assert summary["speedup_range"] == pytest.approx([1.82, 185 / 60])


def test_each_variant_is_compared_with_the_baseline_measured_beside_it(bench):
    # the machine halves its speed halfway through the round: the baseline runs before and
    # after each variant say how fast it was then
    speeds = iter([100, 100, 50, 50])
    measured = []

    def measure(value):
        def run(name):
            measured.append(name)
            return {"images_per_s": next(speeds) if value is None else value}
        return run

    # (the variants' names are those ``summarize`` compares with; their numbers are made up)
    plan = {"backprop_1thread": measure(None), "backprop_2threads": measure(190), "independent_2x1thread": measure(95), "dgl_sync": measure(95)}
    round_ = bench.measure_round(plan)
    assert measured == ["backprop_1thread", "backprop_2threads", "backprop_1thread", "independent_2x1thread", "backprop_1thread", "dgl_sync", "backprop_1thread"]
    assert list(round_) == list(plan)
    assert round_["backprop_1thread"]["images_per_s"] == 75  # the median of its 4 runs
    assert round_["backprop_1thread"]["runs_images_per_s"] == [100, 100, 50, 50]
    speedups = {name: bench.summarize(name, [round_], K=2)["speedup"] for name in list(plan)[1:]}
    # before the slow spell, across it (geometric mean of 100 and 50), in it
    assert speedups == pytest.approx({"backprop_2threads": 1.9, "independent_2x1thread": 95 / (100 * 50) ** 0.5, "dgl_sync": 1.9})


def test_ratios_between_variants_use_each_ones_own_baseline(bench):
    round_ = one_round(base=100, threads=160, ceiling=195, dgl=95, busy=[0.95, 0.97])
    round_["dgl_sync"]["baseline_images_per_s"] = 50  # DGL ran while the machine ran at half speed
    summary = bench.summarize("dgl_sync", [round_], K=2)
    assert summary["speedup"] == pytest.approx(1.9)
    assert summary["vs_Kthreads"] == pytest.approx(1.9 / 1.6)
    assert summary["of_ceiling"] == pytest.approx(1.9 / 1.95)


@pytest.mark.parametrize(
    "dgl, busy, threads, met",
    [
        (185, [0.92, 0.97], 160, True),
        (175, [0.92, 0.97], 150, False),  # under 1.8x
        (185, [0.85, 0.97], 160, False),  # one stage idles
        (185, [0.92, 0.97], 175, False),  # only 1.06x of 2 threads
    ],
)
def test_the_targets_need_all_three(bench, dgl, busy, threads, met):
    rounds = [one_round(base=100, threads=threads, ceiling=195, dgl=dgl, busy=busy)]
    variants = {name: bench.summarize(name, rounds, K=2) for name in rounds[0] if name.startswith("dgl")}
    targets = bench.check_targets(variants, K=2)
    assert targets["dgl_sync"]["met"] is met
    assert sum(targets["dgl_sync"]["checks"].values()) == (3 if met else 2)


def test_neighbouring_splits_move_one_boundary_and_keep_every_module(bench):
    assert bench.neighbouring_splits([6, 18]) == [[6, 18], [5, 19], [7, 17], [4, 20], [8, 16]]
    assert bench.neighbouring_splits([1, 2], window=2) == [[1, 2], [2, 1]]
    assert bench.neighbouring_splits([3, 3, 3], window=1) == [[3, 3, 3], [2, 4, 3], [4, 2, 3], [3, 2, 4], [3, 4, 2]]


def test_split_trial_keeps_the_cut_that_trains_fastest_in_the_median(bench):
    # [8, 16] is fastest in 2 of 3 rounds; [7, 17] once, by a spike that the median ignores
    speeds = {"[6, 18]": [100, 100, 100], "[5, 19]": [90, 90, 90], "[7, 17]": [105, 200, 105], "[4, 20]": [80, 80, 80], "[8, 16]": [120, 110, 120]}
    calls = []

    def measure(cut):
        calls.append(cut)
        return {"images_per_s": speeds[str(cut)][sum(c == cut for c in calls) - 1]}

    chosen, trial = bench.choose_split_by_trial([6, 18], measure, rounds=3)
    assert chosen == [8, 16]
    assert calls == bench.neighbouring_splits([6, 18]) * 3  # interleaved: every cut once per round
    assert trial["profiled"] == [6, 18] and trial["chosen"] == [8, 16]
    assert trial["images_per_s"] == speeds
