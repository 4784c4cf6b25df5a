"""A paper's claims about its methods, as an experiment config lists them (``report.claims``).

A claim compares a metric (test accuracy in points by default) of two sets of runs of the
grid, ``a`` and ``b``, each a method in a mode at one K and variant, over the grid's seeds: it
says that a ≥ b − margin (margin 0: a beats b; margin 1: a is at most a point below b). The
report (``decoupled.report.verdicts``) tells from the runs whether it holds, fails or is
undecided at their seeds.

Reading a config resolves each side's defaults (the mode sync, the grid's first K, the method's
base variant: the runs that vary no swept setting) and refuses a claim whose runs the grid does
not have, with one line naming it, before any job runs. Torch-free and pandas-free: Snakemake
reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from decoupled import config as config_lib
from decoupled import grid
from decoupled.errors import UserError


# What the report can say of a claim at the runs' seeds (decoupled.report.intervals.verdict).
HOLDS, FAILS, UNDECIDED = "holds", "fails", "undecided"
VERDICTS = (HOLDS, FAILS, UNDECIDED)


@dataclass(frozen=True)
class Side:
    """The runs of one method in one mode at one K and variant, one per seed of the grid."""

    method: str
    mode: str
    K: int
    variant: str
    label: str  # how the tables name it: method and mode, then K and variant where they are not the grid's base

    def holds(self, key: grid.RunKey) -> bool:
        return (key.method, key.mode, key.K, key.variant) == (self.method, self.mode, self.K, self.variant)


@dataclass(frozen=True)
class Claim:
    claim: str  # as the paper states it
    source: str  # paper, table or figure, page
    a: Side
    b: Side
    margin: float  # in the metric's unit: the claim is a ≥ b − margin
    metric: str = "test_acc_pct"  # report.published's metrics: test_acc_pct, test_error_pct, s_per_epoch

    @property
    def threshold(self) -> float:
        """The least a − b (in the metric's unit) for which the claim is true."""
        return -self.margin

    @property
    def statement(self) -> str:
        """The claim as tested: ``dgl sync ≥ backprop sync − 1 point``, ``cdni sync > dni sync``;
        ``backprop sync > fdg sync (s per epoch)`` for another metric than test accuracy."""
        what = "" if self.metric == "test_acc_pct" else f" ({UNITS[self.metric][1]})"
        if self.margin == 0:
            return f"{self.a.label} > {self.b.label}{what}"
        sign, size = ("−", self.margin) if self.margin > 0 else ("+", -self.margin)
        unit = UNITS[self.metric][0]
        return f"{self.a.label} ≥ {self.b.label} {sign} {size:g} {unit if size == 1 else unit + 's'}{what}"


# each metric's unit (a margin of 1 is "1 point") and its name in a statement
UNITS = {"test_acc_pct": ("point", "test accuracy, %"), "test_error_pct": ("point", "test error, %"), "s_per_epoch": ("second", "s per epoch")}


def of(config: dict[str, Any], keys: list[grid.RunKey] | None = None) -> list[Claim]:
    """The claims of an experiment config, every side resolved; UserError naming the
    first claim the grid cannot evaluate (a method, mode, K or variant it does not run).
    ``keys``: the grid's jobs, where the caller has them (``grid.runs``)."""
    config = config_lib.validate(config)  # the sides' defaults filled in
    keys = grid.runs(config) if keys is None else keys
    claims = []
    for i, entry in enumerate(config["report"]["claims"]):
        text = entry["claim"] if len(entry["claim"]) <= 60 else entry["claim"][:59] + "…"
        where = f'config key \'report.claims[{i}]\' ("{text}")'
        a, b = (_side(config, keys, entry[name], f"{where}: {name}") for name in ("a", "b"))
        if a == b:
            raise UserError(f"{where}: a and b are the same runs ({a.label})")
        claims.append(Claim(entry["claim"], entry["source"], a, b, float(entry["margin"]), entry["metric"]))
    return claims


def _side(config: dict[str, Any], keys: list[grid.RunKey], given: dict[str, Any], where: str) -> Side:
    """One side of a claim, its defaults filled in, checked against the grid's jobs."""
    method, mode = given["method"], given["mode"]
    Ks = config["grid"]["K"]
    K = Ks[0] if given["K"] is None else given["K"]
    of_method = [k for k in keys if k.method == method]
    if not of_method:
        raise UserError(f"{where}: method '{method}' is not in the grid (grid.methods: {', '.join(config['grid']['methods'])})")
    of_mode = [k for k in of_method if k.mode == mode]
    if not of_mode:
        raise UserError(f"{where}: the grid has no {mode} run of {method} (its modes: {', '.join(sorted({k.mode for k in of_method}))})")
    if not any(k.K == K for k in of_mode):
        raise UserError(f"{where}: the grid has no run of {method} {mode} at K={K} (its K: {', '.join(map(str, sorted({k.K for k in of_mode})))})")
    base = grid.base_variant(config, method, mode)
    variant = base if given["variant"] is None else given["variant"]
    found = sorted({k.variant for k in of_mode if k.K == K})
    if variant not in found:
        raise UserError(f"{where}: the grid has no variant '{variant}' of {method} {mode} at K={K} (it has: {', '.join(found)})")
    label = " ".join([method, mode] + ([f"K={K}"] if len(Ks) > 1 else []) + ([variant] if variant != base else []))
    return Side(method, mode, K, variant, label)
