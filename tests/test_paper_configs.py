"""config/paper/: one config per published table, each with a reduced twin, and the reproduction table."""

import math
import re

import pandas as pd
import pytest

from conftest import REPO
from test_workflow import snakemake

from decoupled import config, grid
from decoupled.report import tables

PAPER = sorted((REPO / "config/paper").glob("*.yaml"))
FULL = [p for p in PAPER if not p.stem.endswith("_cpu")]


def test_every_paper_config_has_a_reduced_twin_labelled_so():
    assert len(FULL) >= 3
    for path in FULL:
        twin = path.with_name(f"{path.stem}_cpu.yaml")
        assert twin.exists(), twin
        assert config.load(twin)["report"]["reduced_run"] and not config.load(path)["report"]["reduced_run"]
        assert twin.read_text().startswith("# REDUCED RUN of config/paper/")
        assert config.load(twin)["report"]["published"] == config.load(path)["report"]["published"]


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_a_paper_config_names_what_it_reproduces_and_runs_it(path):
    cfg = config.load(path)
    header = path.read_text().split("\nexperiment:")[0]
    runs = grid.runs(cfg)
    for entry in cfg["report"]["published"]:
        assert path.stem.endswith("_cpu") or f"{entry['value']:g}" in header  # the number it reproduces is in its header
        assert any(r.method == entry["method"] and r.K == entry["K"] for r in runs), entry  # and a run of it is planned
    for key in runs:
        grid.job_config(cfg, key)  # every job passes the checks a run makes


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_a_dry_run_plans_every_training_job_and_the_reproduction_table(tmp_path, path):
    result = snakemake(tmp_path, "--dry-run", configfile=path, snakefile=REPO / "Snakefile")
    assert result.returncode == 0, result.stderr[-3000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", result.stdout, re.M))
    assert int(counts["train"]) == len(grid.runs(config.load(path)))
    assert int(counts["report"]) == 1 and "paper_vs_ours.md" in result.stdout


def runs(rows):
    return pd.DataFrame([{"varied": [], "variant": "default", "epochs": 2, "time_s": 10.0, **row} for row in rows])


def test_the_reproduction_table_sets_ours_beside_theirs_and_never_invents_a_number(tmp_path):
    published = [
        {"paper": "P", "table": "T", "method": "fdg", "K": 2, "metric": "test_error_pct", "value": 5.9},
        {"paper": "P", "table": "T", "method": "fdg", "K": 4, "metric": "test_error_pct", "value": 6.14},
        {"paper": "P", "table": "T", "method": "dgl", "K": 2, "metric": "s_per_epoch", "value": 4.0},
        {"paper": "P", "table": "T", "method": "fdg", "K": 3, "metric": "test_error_pct", "value": 6.08},
        {"paper": "P", "table": "T", "method": "fdg", "K": 2, "variant": "beta0.7", "metric": "test_error_pct", "value": 5.0},
    ]
    df = runs([{"method": "fdg", "K": 2, "test_acc": 0.93}, {"method": "fdg", "K": 2, "test_acc": 0.95},
               {"method": "fdg", "K": 2, "test_acc": 0.5, "varied": ["beta"], "variant": "beta0.7"},  # not a reference run
               {"method": "dgl", "K": 2, "test_acc": 0.9},
               {"method": "fdg", "K": 3, "test_acc": 0.92, "varied": ["K"]}])  # K swept: counts at its K
    table = tables.paper_vs_ours(df, published, reduced_run=True)
    assert table["ours_mean"][0] == pytest.approx(6.0) and table["gap"][0] == pytest.approx(0.1) and table["seeds"][0] == 2
    assert math.isnan(table["ours_mean"][1]) and table["seeds"][1] == 0  # no run of K=4
    assert table["ours_mean"][2] == pytest.approx(5.0)  # 10 s over 2 epochs
    assert table["ours_mean"][3] == pytest.approx(8.0) and table["seeds"][3] == 1
    assert table["ours_mean"][4] == pytest.approx(50.0) and table["seeds"][4] == 1  # its variant's run, only
    assert set(table["run"]) == {"reduced run"}
    md = (tables.write_paper_vs_ours(table, tmp_path)[1]).read_text()
    assert "not yet run" in md and "6.00 ± 12.71" in md and "+0.10" in md
    assert pd.read_csv(tmp_path / "paper_vs_ours.csv")["published"].tolist() == [5.9, 6.14, 4.0, 6.08, 5.0]
