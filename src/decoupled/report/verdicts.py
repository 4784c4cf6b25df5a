"""The claims table: each claim of ``report.claims`` checked from the runs.

For a claim a ≥ b − margin (``decoupled.claims``), the estimate is a − b, in points of test
accuracy (eval.json's, the final checkpoint's) or the claim's other metric, with its 95 % interval over seeds
(``intervals.difference``: paired where the sides share seeds), and the verdict says whether
the interval lies above −margin (holds), below it (fails) or across it (undecided). An
undecided claim gets the seeds that a paired test would need, at the observed difference and
spread, to decide it with 80 % probability.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from decoupled.claims import Claim, Side
from decoupled.report import intervals, method_of, tables

COLUMNS = ["claim", "source", "statement", "a", "b", "margin", "seeds_a", "seeds_b", "paired", "n", "estimate", "ci_low", "ci_high",
           "spread", "verdict", "seeds_needed"]


def evaluate(runs_df: pd.DataFrame, claims: list[Claim]) -> pd.DataFrame:
    """One row per claim: claim, source, statement (as tested), a and b (the sides' labels),
    margin, seeds_a and seeds_b (runs found), paired, n (pairs, or runs of both sides), estimate,
    ci_low and ci_high (a − b in points and its 95 % interval; NaN where a side has no run or
    no interval), spread (the standard deviation of one seed's difference; 0: every seed gave
    the same, NaN: one run a side), verdict (holds, fails, undecided) and seeds_needed (an undecided claim's; NaN
    where none would do or no spread is known; empty where decided)."""
    rows = []
    for claim in claims:
        a, b = (_value_by_seed(runs_df, side, claim.metric) for side in (claim.a, claim.b))
        diff = intervals.difference(a, b)
        verdict = intervals.verdict(diff, claim.threshold)
        needed = intervals.seeds_needed(diff.estimate - claim.threshold, diff.spread) if verdict == intervals.UNDECIDED else None
        rows.append({
            "claim": claim.claim, "source": claim.source, "statement": claim.statement, "a": claim.a.label, "b": claim.b.label,
            "margin": claim.margin, "seeds_a": len(a), "seeds_b": len(b), "paired": diff.paired, "n": diff.n,
            "estimate": diff.estimate, "ci_low": diff.low, "ci_high": diff.high, "spread": diff.spread, "verdict": verdict,
            "seeds_needed": pd.NA if needed is None else needed,
        })
    return pd.DataFrame(rows, columns=COLUMNS).astype({"seeds_needed": "Int64"})


def _value_by_seed(runs_df: pd.DataFrame, side: Side, metric: str) -> dict[int, float]:
    """The side's runs' ``metric`` (``tables.METRICS``: test accuracy in %, ...), by seed (a
    method's label, "dni nolastsynth", is its variant's: the side's variant picks it)."""
    if not len(runs_df):
        return {}
    runs = runs_df[(runs_df["method"].map(method_of) == side.method) & (runs_df["mode"] == side.mode)
                   & (runs_df["K"] == side.K) & (runs_df["variant"] == side.variant)]
    return dict(zip(runs["seed"].astype(int), tables.METRICS[metric](runs).astype(float))) if len(runs) else {}


def write(df: pd.DataFrame, tables_dir: Path) -> list[Path]:
    """Write the claims table in every format of ``TABLE_FORMATS``; return their paths."""
    display = pd.DataFrame({
        "claim": df["claim"].astype(str),
        "source": df["source"].astype(str),
        "as tested": df["statement"].astype(str),
        "a − b (95% interval)": [_interval(e, lo, hi) for e, lo, hi in zip(df["estimate"], df["ci_low"], df["ci_high"])],
        "seeds": [_seeds(row) for row in df.itertuples(index=False)],
        "verdict": df["verdict"].astype(str),
        "seeds to decide": [_needed(row) for row in df.itertuples(index=False)],
    })
    notes = [
        "a − b: the difference of test accuracy (the final checkpoint's, in points; or of the metric the claim names) "
        "of the two sides of the claim as tested; "
        "its 95% t-interval is paired (over the per-seed differences) where both sides ran the same seeds, which share "
        "the data order and the initial weights, else Welch's.",
        "holds: the interval lies above the claim's threshold (0 for >, −margin for ≥ … − margin); fails: below it; "
        "undecided: it contains the threshold, or there is none (a side has fewer than two runs, or every seed gave the same "
        "difference: a coarse test set's steps, no spread measured).",
        f"seeds to decide: the fewest seeds with which a paired t-test (the 95% interval excluding the threshold) decides "
        f"with probability {intervals.POWER:.0%}, were the observed difference and its spread the truth.",
    ]
    return tables.write_table("claims", "Claims", df, display, ["claim", "source", "as tested", "verdict"], notes, tables_dir)


def _interval(estimate: float, low: float, high: float) -> str:
    if math.isnan(estimate):
        return tables.NO_RUN
    if math.isnan(low):
        return f"{estimate:+.2f} (no interval)"  # one run a side, or no spread among the seeds
    return f"{estimate:+.2f} [{low:+.2f},\u00a0{high:+.2f}]"  # the interval never wraps inside


def _seeds(row) -> str:
    return f"{row.n} paired" if row.paired else f"{row.seeds_a} vs {row.seeds_b}"


def _needed(row) -> str:
    """An undecided claim's seeds to decide, or why there is no such number."""
    if row.verdict != intervals.UNDECIDED:
        return ""
    if row.seeds_a == 0 or row.seeds_b == 0:
        return tables.NO_RUN
    if not pd.isna(row.seeds_needed):
        return str(row.seeds_needed)
    if row.spread == 0:
        return "every seed gave the same difference: more seeds, to measure its spread"
    if math.isnan(row.estimate) or math.isnan(row.ci_low):
        return "≥ 2 a side, to measure the spread"
    return f"more than {intervals.MAX_SEEDS}" if row.estimate != -row.margin else "none: the difference is at the threshold"
