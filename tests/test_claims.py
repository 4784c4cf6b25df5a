"""The claims a config lists (report.claims) and how the report decides them: intervals over
seeds, paired where the seeds are shared, the verdict, and the seeds a paired test would need."""

import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from decoupled import claims, config
from decoupled.errors import UserError
from decoupled.report import intervals, tables, verdicts


def test_the_interval_of_a_mean_is_students_t_over_the_seeds():
    # by hand: t(0.975, 1) = 12.7062, t(0.975, 3) = 3.1824 (a t table); s of [1, 2] is 1/√2, of [1, 2, 3, 4] √(5/3)
    assert intervals.half_width([1.0, 2.0]) == pytest.approx(12.7062 * (1 / math.sqrt(2)) / math.sqrt(2), rel=1e-4)
    assert intervals.half_width([1.0, 2.0, 3.0, 4.0]) == pytest.approx(3.1824 * math.sqrt(5 / 3) / 2, rel=1e-4)
    assert math.isnan(intervals.half_width([1.0])) and math.isnan(intervals.half_width([1.0, math.nan]))


def test_a_difference_over_shared_seeds_is_paired_and_sees_through_what_the_seed_moves_on_both_sides():
    # the seed moves both sides by several points, a is one point above b on every seed
    seed_effect = {0: 80.0, 1: 86.0, 2: 90.0}
    a = {s: v + 1.0 + 0.01 * s for s, v in seed_effect.items()}
    b = dict(seed_effect)
    paired = intervals.difference(a, b)
    assert paired.paired and paired.n == 3 and paired.estimate == pytest.approx(1.01)
    assert intervals.verdict(paired, 0.0) == intervals.HOLDS
    # the same runs under seeds that are not shared: Welch's interval spans the seeds' spread
    unpaired = intervals.difference(a, {s + 10: v for s, v in b.items()})
    assert not unpaired.paired and unpaired.n == 6 and unpaired.estimate == pytest.approx(paired.estimate)
    assert intervals.verdict(unpaired, 0.0) == intervals.UNDECIDED


def test_welchs_interval_against_a_hand_computation():
    a, b = {0: 1.0, 1: 2.0, 2: 3.0}, {5: 2.0, 6: 4.0, 7: 6.0, 8: 8.0}
    # var(a)/3 = 1/3, var(b)/4 = (20/3)/4 = 5/3; df = (2)^2 / ((1/3)^2/2 + (5/3)^2/3) = 4 / (1/18 + 25/27) = 4.075
    diff = intervals.difference(a, b)
    df = 4 / (1 / 18 + 25 / 27)
    from scipy import stats

    assert diff.estimate == pytest.approx(2.0 - 5.0)
    assert diff.high - diff.estimate == pytest.approx(stats.t.ppf(0.975, df) * math.sqrt(2.0), rel=1e-9)
    assert stats.t.ppf(0.975, df) == pytest.approx(2.766, abs=0.01)  # between t(4) 2.776 and t(5) 2.571


@pytest.mark.parametrize("a_minus_b, threshold, expected", [
    ([2.0, 2.1, 1.9], 0.0, intervals.HOLDS),     # clearly above
    ([-2.0, -2.1, -1.9], 0.0, intervals.FAILS),  # clearly below
    ([-2.0, -2.1, -1.9], -3.0, intervals.HOLDS),  # above a threshold of −3: "a ≥ b − 3 points"
    ([-2.0, -2.1, -1.9], -1.0, intervals.FAILS),
    ([3.0, -1.0, 1.0], 0.0, intervals.UNDECIDED),  # the interval contains 0
])
def test_each_verdict(a_minus_b, threshold, expected):
    b = {s: 50.0 + 10 * s for s in range(len(a_minus_b))}
    a = {s: b[s] + d for s, d in enumerate(a_minus_b)}
    assert intervals.verdict(intervals.difference(a, b), threshold) == expected


def test_one_run_a_side_has_no_interval_and_decides_nothing():
    diff = intervals.difference({0: 90.0}, {0: 50.0})
    assert not diff.paired and diff.estimate == 40.0 and math.isnan(diff.low)
    assert intervals.verdict(diff, 0.0) == intervals.UNDECIDED
    assert intervals.seeds_needed(40.0, diff.spread) is None


def test_seeds_that_all_give_the_same_difference_measure_no_spread_and_decide_nothing():
    """A coarse test set (200 images: accuracies in steps of half a point) can give two seeds
    the same difference; a zero-width interval would call that certain."""
    diff = intervals.difference({0: 80.0, 1: 90.0}, {0: 83.5, 1: 93.5})
    assert diff.paired and diff.estimate == -3.5 and diff.spread == 0 and math.isnan(diff.low)
    assert intervals.verdict(diff, -1.0) == intervals.UNDECIDED and intervals.seeds_needed(-2.5, 0.0) is None
    row = verdicts.evaluate(_runs([("dgl", "async", 2, "S1_B4", s, a / 100) for s, a in ((0, 80.0), (1, 90.0))]
                                  + [("dgl", "sync", 2, "default", s, a / 100) for s, a in ((0, 83.5), (1, 93.5))]),
                            [_claim(("dgl", "async", 2, "S1_B4"), ("dgl", "sync", 2, "default"), margin=1.0)]).iloc[0]
    assert row["verdict"] == intervals.UNDECIDED and row["spread"] == 0 and pd.isna(row["seeds_needed"])
    assert verdicts._needed(row).startswith("every seed gave the same difference")


@pytest.mark.parametrize("effect, seeds", [(0.5, 34), (0.8, 15), (1.0, 10), (0.2, 199)])
def test_seeds_needed_are_a_paired_t_tests_at_80_percent_power(effect, seeds):
    # G*Power, "difference between two dependent means (matched pairs)", two tails, α 0.05,
    # power 0.8: total sample size 34 for dz = 0.5, 15 for 0.8, 10 for 1.0, 199 for 0.2
    assert intervals.seeds_needed(effect * 3.0, 3.0) == seeds
    assert intervals.seeds_needed(-effect, 1.0) == seeds  # a claim that would fail: as many to show it
    assert intervals.seeds_needed(0.0, 1.0) is None


def test_that_many_seeds_decide_four_times_in_five_and_one_fewer_less_often():
    gap, spread = 0.5, 1.0
    n = intervals.seeds_needed(gap, spread)
    rng = np.random.default_rng(0)

    def decided(seeds: int, trials: int = 4000) -> float:
        count = 0
        for _ in range(trials):
            d = rng.normal(gap, spread, seeds)
            verdict = intervals.verdict(intervals.difference(dict(enumerate(d)), dict.fromkeys(range(seeds), 0.0)), 0.0)
            count += verdict != intervals.UNDECIDED
        return count / trials

    assert decided(n) == pytest.approx(0.8, abs=0.025)
    assert decided(n // 2) < 0.6


def _runs(rows):
    """A runs frame as load_runs gives it, of (method, mode, K, variant, seed, test_acc) rows."""
    df = pd.DataFrame(rows, columns=["method", "mode", "K", "variant", "seed", "test_acc"])
    return df.assign(time_s=100.0, epochs=2)


def _claim(a, b, margin=0.0, metric="test_acc_pct"):
    def side(spec):
        method, mode, K, variant = spec
        return claims.Side(method, mode, K, variant, f"{method} {mode}")

    return claims.Claim("a claim", "a paper", side(a), side(b), margin, metric)


def test_a_claim_is_decided_from_the_runs_test_accuracy_in_points_paired_by_seed():
    # dgl is 0.5 point below backprop with differences −1.5, −0.5, +0.5 (s = 1): undecided against
    # "dgl ≥ backprop" (threshold 0) and against "≥ backprop − 1", decided against "≥ − 3"
    rows = [("backprop", "sync", 3, "default", s, 0.80 + 0.05 * s) for s in range(3)]
    rows += [("dgl", "sync", 3, "default", s, 0.80 + 0.05 * s + d / 100) for s, d in enumerate([-1.5, -0.5, 0.5])]
    rows += [("dgl", "sync", 4, "default", s, 0.10) for s in range(3)]  # another K: not either side
    runs = _runs(rows)
    dgl, bp = ("dgl", "sync", 3, "default"), ("backprop", "sync", 3, "default")
    table = verdicts.evaluate(runs, [_claim(dgl, bp), _claim(dgl, bp, margin=1.0), _claim(dgl, bp, margin=3.0)])
    first = table.iloc[0]
    assert first["estimate"] == pytest.approx(-0.5) and first["paired"] and first["n"] == 3
    assert first["ci_high"] - first["estimate"] == pytest.approx(intervals.half_width([-1.5, -0.5, 0.5]))
    assert list(table["verdict"]) == [intervals.UNDECIDED, intervals.UNDECIDED, intervals.HOLDS]
    # by hand (G*Power, dz = 0.5): 34 seeds; the second's gap to −1 is also 0.5
    assert list(table["seeds_needed"][:2]) == [34, 34] and pd.isna(table["seeds_needed"][2])


def test_a_speed_claim_compares_seconds_per_epoch():
    rows = [("backprop", "sync", 2, "default", s, 0.9) for s in range(3)] + [("fdg", "sync", 2, "beta0.5", s, 0.9) for s in range(3)]
    runs = _runs(rows)
    runs.loc[runs["method"] == "fdg", "time_s"] = [50.0, 52.0, 51.0]  # 2 epochs: about 25.5 s each, backprop 50
    table = verdicts.evaluate(runs, [_claim(("backprop", "sync", 2, "default"), ("fdg", "sync", 2, "beta0.5"), metric="s_per_epoch")])
    assert table.iloc[0]["estimate"] == pytest.approx(50 - 25.5) and table.iloc[0]["verdict"] == intervals.HOLDS


def test_the_claims_table_is_written_with_its_verdicts_and_marks(tmp_path):
    rows = [("dgl", "sync", 3, "default", s, 0.9 + 0.001 * s) for s in range(2)] + [("dni", "sync", 3, "default", s, 0.7) for s in range(2)]
    dgl, dni, cdni = ("dgl", "sync", 3, "default"), ("dni", "sync", 3, "default"), ("cdni", "sync", 3, "default")
    table = verdicts.evaluate(_runs(rows), [_claim(dgl, dni), _claim(cdni, dni)])
    paths = verdicts.write(table, tmp_path)
    assert sorted(p.name for p in paths) == ["claims.csv", "claims.html", "claims.md", "claims.tex"]
    md = (tmp_path / "claims.md").read_text()
    assert "holds" in md and tables.NO_RUN in md and "2 paired" in md and "+20.05 [" in md
    assert '<td class="holds">holds</td>' in (tmp_path / "claims.html").read_text()
    assert list(pd.read_csv(tmp_path / "claims.csv")["verdict"]) == ["holds", "undecided"]


def _config(**report):
    return config.validate({"experiment": "x", "grid": {"methods": ["backprop", "dgl", "fdg"], "modes": ["sync", "async"], "K": [2, 3],
                                                        "seeds": [0, 1], "beta": [0.5, 0.7]},
                            "report": report})


def _one(a, b=None, **more):
    return {"claims": [{"claim": "the paper's words", "source": "a paper", "a": a, "b": b or {"method": "backprop"}, **more}]}


def test_a_claims_sides_default_to_sync_the_first_K_and_the_base_variant():
    (claim,) = claims.of(_config(**_one({"method": "fdg"}, margin=1)))
    assert (claim.a.method, claim.a.mode, claim.a.K, claim.a.variant) == ("fdg", "sync", 2, "beta0.5")
    assert claim.statement == "fdg sync K=2 ≥ backprop sync K=2 − 1 point"
    (claim,) = claims.of(_config(**_one({"method": "fdg", "K": 3, "variant": "beta0.7"})))
    assert claim.statement == "fdg sync K=3 beta0.7 > backprop sync K=2"


@pytest.mark.parametrize("side, named", [
    ({"method": "dni"}, "method 'dni' is not in the grid"),
    ({"method": "dgl", "K": 4}, "no run of dgl sync at K=4"),
    ({"method": "backprop", "mode": "async"}, "no async run of backprop"),
    ({"method": "fdg", "variant": "beta0.9"}, "no variant 'beta0.9' of fdg sync at K=2 (it has: beta0.5, beta0.7)"),
])
def test_a_claim_the_grid_cannot_evaluate_is_refused_naming_it(side, named):
    with pytest.raises(UserError) as e:
        claims.of(_config(**_one(side)))
    message = str(e.value)
    assert "\n" not in message and message.startswith("config key 'report.claims[0]' (\"the paper's words\"): a: ") and named in message


def test_a_claim_of_a_side_against_itself_is_refused():
    with pytest.raises(UserError, match="a and b are the same runs"):
        claims.of(_config(**_one({"method": "dgl"}, {"method": "dgl", "K": 2})))


def test_the_cli_refuses_such_a_claim_when_it_reads_the_config(tmp_path):
    cfg = tmp_path / "claims.yaml"
    cfg.write_text("experiment: x\ngrid: {methods: [dgl], K: [2]}\nreport:\n  claims:\n"
                   "    - {claim: DGL beats DNI, source: a paper, a: {method: dgl}, b: {method: dni}}\n")
    done = subprocess.run([sys.executable, "-m", "decoupled", "init-tracking", "--config", str(cfg), "--out", str(tmp_path / "e.json")],
                          capture_output=True, text=True)
    assert done.returncode != 0 and not (tmp_path / "e.json").exists()
    assert done.stderr.strip().splitlines()[-1] == (
        "decoupled: error: config key 'report.claims[0]' (\"DGL beats DNI\"): b: method 'dni' is not in the grid (grid.methods: dgl)")


@pytest.mark.parametrize("path", sorted(str(p) for p in __import__("pathlib").Path("config").rglob("*.yaml") if p.name != "schema.yaml"))
def test_every_shipped_experiment_lists_claims_its_grid_can_evaluate(path):
    found = claims.of(config.load(path))
    assert found and all(c.source and c.claim for c in found)


def test_runs_of_one_seed_share_the_initial_weights_and_the_data_order_whatever_the_method():
    """What makes a paired interval paired: the default experiment's methods, seed by seed."""
    import torch

    from decoupled import grid
    from decoupled.data.prepared import Dataset
    from decoupled.train import build

    g = torch.Generator().manual_seed(0)
    data = Dataset(torch.randn(256, 1, 28, 28, generator=g), torch.randint(0, 10, (256,), generator=g), torch.randn(8, 1, 28, 28),
                   torch.zeros(8, dtype=torch.long), [str(c) for c in range(10)], 10, 1, 28, "toy")
    cfg = config.load("config/config.yaml")

    def start(method: str, mode: str, seed: int):
        key = next(k for k in grid.runs(cfg) if (k.method, k.mode, k.seed) == (method, mode, seed))
        net, _, engine, _ = build(grid.job_config(cfg, key), data)
        blocks = {name: value.clone() for name, value in net.blocks.state_dict().items()}
        return blocks, engine.batches.next()[1].clone()  # the first batch's labels: the data order

    reference, order = start("backprop", "sync", 1)
    for method, mode in (("dgl", "sync"), ("dni", "sync"), ("fdg", "sync"), ("dgl", "async")):
        blocks, first = start(method, mode, 1)
        assert all(torch.equal(blocks[name], reference[name]) for name in reference), method
        assert torch.equal(first, order), method
    other, other_order = start("backprop", "sync", 2)
    assert not torch.equal(other[next(iter(other))], reference[next(iter(reference))]) and not torch.equal(other_order, order)
