"""The whole workflow on config/smoke.yaml, in a temporary copy of the repository, read back as a user would."""

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO, needs_fashion_mnist
from test_mlflow_ui import serve_ui

def snakemake(workdir: Path, *args, configfile="config/smoke.yaml", snakefile=None):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    snakefile = snakefile or workdir / "Snakefile"
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile), "--cores", "2",
         "--directory", str(workdir), "--configfile", str(configfile), *args],
        capture_output=True, text=True, env=env, timeout=900,
    )


METHODS = yaml.safe_load((REPO / "config/smoke.yaml").read_text())["grid"]["methods"]


def copy_repo(dest: Path) -> Path:
    """A committed copy of the repository, so tests may edit its code and its runs get a real commit."""
    ignore = shutil.ignore_patterns(".git", ".venv", "results", ".snakemake", "__pycache__", ".pytest_cache", "*.egg-info")
    shutil.copytree(REPO, dest, symlinks=True, ignore=ignore)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost", "-C", str(dest)]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "copy"]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    return dest


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    workdir = copy_repo(tmp_path_factory.mktemp("smoke") / "repo")
    result = snakemake(workdir)
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir, result


@needs_fashion_mnist
def test_summary_table(smoke):
    workdir, _ = smoke
    summary = pd.read_csv(workdir / "results/tables/summary.csv")
    assert list(summary.columns[:10]) == ["method", "mode", "K", "variant", "engine", "seeds", "test_acc_mean", "test_acc_std", "test_acc_ci95",
                                          "train_time_s"]
    assert "time_to_85pct_s_mean" in summary.columns  # the schema's default target
    # every method in sync mode; every method but backprop in async mode, with and without slowdown
    rows = set(zip(summary["method"], summary["mode"], summary["variant"]))
    # (FDG's beta and GN-DGL's groups and quantizer, from its overrides, name their variants)
    own = {"fdg": "beta0.5", "gn_dgl": "G2_q4d4"}
    expected = {(m, "sync", own.get(m, "default")) for m in METHODS}
    for m in set(METHODS) - {"backprop"}:
        suffix = f"_{own[m]}" if m in own else ""
        expected |= {(m, "async", f"S1_B4{suffix}"), (m, "async", f"S2m1_B4{suffix}")}
    assert rows == expected
    assert (summary["seeds"] == 2).all() and (summary["K"] == 2).all()
    assert summary["test_acc_mean"].between(0, 1).all() and summary["test_acc_std"].notna().all()
    for ext in ("md", "tex"):
        text = (workdir / f"results/tables/summary.{ext}").read_text()
        assert all((method.replace("_", "\\_") if ext == "tex" else method) in text for method in METHODS)


@needs_fashion_mnist
def test_main_table(smoke):
    workdir, _ = smoke
    main = pd.read_csv(workdir / "results/tables/main.csv")
    assert list(main["method"]) == ["backprop", "dgl", "dni", "cdni", "ddg", "fdg", "gn_dgl"]
    assert main.set_index("method").loc["dgl", ["sync_mean", "async_mean"]].between(0, 1).all()
    assert pd.isna(main.set_index("method").loc["backprop", "async_mean"])  # no async backprop
    # the async cell is the no-slowdown run, read back from its eval.json files
    import json

    accs = [json.loads((workdir / f"results/runs/dgl/async/K2/S1_B4/seed{s}/eval.json").read_text())["test_acc"] for s in (0, 1)]
    assert main.set_index("method").loc["dgl", "async_mean"] == pytest.approx(sum(accs) / 2)
    assert "±" in (workdir / "results/tables/main.md").read_text()


@needs_fashion_mnist
def test_figures(smoke):
    workdir, _ = smoke
    for name in ("test_acc_vs_epoch", "acc_vs_simulated_time", "layerwise_acc", "acc_vs_slowdown"):  # smoke sweeps the slowdown only
        assert (workdir / f"results/figures/{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (workdir / f"results/figures/{name}.pdf").read_bytes()[:4] == b"%PDF"
    for name in ("acc_vs_buffer_size", "acc_vs_K", "acc_vs_wall_time"):  # no empty figure where nothing was swept, no clock no run keeps
        assert not list((workdir / "results/figures").glob(f"{name}.*"))


@needs_fashion_mnist
def test_progress_lines_on_the_terminal(smoke):
    _, result = smoke
    out = result.stdout + result.stderr
    for method in METHODS:
        name = {"fdg": "fdg-sync-K2-beta0.5-seed0", "gn_dgl": "gn_dgl-sync-K2-G2_q4d4-seed0"}.get(method, f"{method}-sync-K2-seed0")
        for epoch in (1, 2, 3):
            assert f"[{name}] epoch {epoch}/3" in out


@needs_fashion_mnist
def test_mlflow_runs(smoke):
    workdir, result = smoke
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/results/mlflow/mlflow.db")
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("decoupled.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("decoupled.role") == "child"]
    n_jobs = 2 * (len(METHODS) + 2 * (len(METHODS) - 1))  # seeds x (sync + async x 2 slowdowns)
    assert len(parents) == 1 and len(children) == n_jobs and len(runs) == n_jobs + 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["grid.methods"] == str(METHODS) and parent.data.params["train.epochs"] == "3"  # the experiment's config
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs table
    parent_files = {f.path for d in ("tables", "figures") for f in client.list_artifacts(parent.info.run_id, d)}
    from decoupled.layout import FIGURE_FORMATS, TABLE_FORMATS, figures_for, tables_for

    smoke_config = yaml.safe_load((workdir / "config/smoke.yaml").read_text())
    expected = ({f"tables/{t.name}.{e}" for t in tables_for(smoke_config["report"]) for e in TABLE_FORMATS}
                | {f"figures/{f.name}.{e}" for f in figures_for({"slowdown"}, {"simulated parallel"}) for e in FIGURE_FORMATS})
    assert expected == parent_files and {"figures/acc_vs_slowdown.png", "tables/claims.csv", "tables/claims.html"} <= expected
    # its description: the experiment, its grid, the main table and the claims checked; each table as an MLflow table too
    description = parent.data.tags["mlflow.note.content"]
    assert "**smoke**" in description and "seeds 0, 1" in description
    for name in ("main", "claims"):
        assert (workdir / f"results/tables/{name}.md").read_text().strip() in description
    assert {"main_table.json", "claims_table.json"} <= {f.path for f in client.list_artifacts(parent.info.run_id)}
    verdicts = {name: parent.data.metrics[f"claims/{name}"] for name in ("holds", "fails", "undecided")}
    # a verdict for every claim of the config, from both seeds, paired; the main table's cells with their intervals
    claims = pd.read_csv(workdir / "results/tables/claims.csv")
    assert list(claims["claim"]) == [c["claim"] for c in smoke_config["report"]["claims"]]
    assert set(claims["verdict"]) <= {"holds", "fails", "undecided"} and claims["paired"].all() and (claims["n"] == 2).all()
    assert verdicts == {name: float((claims["verdict"] == name).sum()) for name in verdicts}
    # an interval where the seeds' differences spread (the smoke test set's 200 images can give both seeds the same one)
    spread = claims["spread"] > 0
    assert (claims["ci_low"] < claims["estimate"])[spread].all() and (claims["estimate"] < claims["ci_high"])[spread].all()
    assert claims["ci_low"][~spread].isna().all() and (claims["verdict"][~spread] == "undecided").all()
    main = pd.read_csv(workdir / "results/tables/main.csv")
    assert main["sync_ci95"].notna().all() and "mean ± 95% CI, n=2" in (workdir / "results/tables/main.md").read_text()
    # the UI's command and links, again when the workflow ends
    end = result.stderr[result.stderr.rindex("MLflow parent run"):]
    assert f"mlflow ui --backend-store-uri sqlite:///results/mlflow/mlflow.db" in end
    assert f"/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning&compareRunsMode=CHART" in end

    seen = set()
    for run in children:
        tags, params = run.data.tags, run.data.params
        assert run.info.status == "FINISHED"
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        key = (tags["method"], tags["mode"], tags["K"], tags["variant"], tags["seed"])
        seen.add(key)
        assert tags["rule"] == "train"
        # method, mode, what the grid varies (async: the slowdown), seed; the tag "group" without the seed
        swept = [key[3].split("_")[0]] if key[1] == "async" else []
        assert run.info.run_name == " ".join([key[0], key[1], *swept, f"s{key[4]}"]) and tags["group"] == run.info.run_name.rsplit(" ", 1)[0]
        assert tags["wildcards"] == f"method={key[0]},mode={key[1]},K={key[2]},variant={key[3]},seed={key[4]}"
        commit = subprocess.run(["git", "-C", str(workdir), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        assert tags["mlflow.source.git.commit"] == commit and len(commit) == 40
        assert tags["mlflow.user"] == run.info.user_id != "unknown" and tags["mlflow.source.name"] == "decoupled train"
        # params: the resolved job config, overrides applied, without what does not apply to the run
        assert params["run.method"] == key[0] and params["model.widths"] == "[8, 16]"
        assert params["train.lr"] == ("0.08" if key[0] == "dgl" else "0.05")
        assert params["dataset.subset_per_class"] == "100"
        assert ("async.buffer_size" in params) == (key[1] == "async") and ("train.beta" in params) == (key[0] == "fdg")
        assert ("train.synth_lr" in params) == (key[0] in ("dni", "cdni"))
        history = client.get_metric_history(run.info.run_id, "acc/test")
        assert [m.step for m in history] == [1, 2, 3]
        for name in ("loss/train", "acc_heads/test_m0", "acc_heads/test_m1", "time/wall_s", "speed/images_per_s", "final/test_acc"):
            assert name in run.data.metrics, name
        if key[1] == "async":  # per-worker progress of the simulator
            assert {"workers/steps_m0", "workers/steps_m1", "workers/idle_ticks_m1", "staleness/input_mean_m1"} <= set(run.data.metrics)
            assert params["async.slowdown_factor"] == ("2" if key[3].startswith("S2") else "1")
        artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
        assert {"metrics.json", "config.json", "eval.json"} <= artifacts
    assert len(seen) == n_jobs


@needs_fashion_mnist
def test_rerun_does_nothing_and_plot_code_reruns_only_the_report(smoke):
    workdir, _ = smoke
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/results/mlflow/mlflow.db")
    runs_before = len(client.search_runs([client.get_experiment_by_name("smoke").experiment_id]))
    again = snakemake(workdir)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
    assert len(client.search_runs([client.get_experiment_by_name("smoke").experiment_id])) == runs_before  # no duplicates
    plot_code = workdir / "src/decoupled/report/figures.py"
    plot_code.write_text(plot_code.read_text() + "\n# an edit to the plot code\n")
    dry = snakemake(workdir, "--dry-run", "--quiet", "rules")
    assert dry.returncode == 0, dry.stderr
    planned = dry.stdout + dry.stderr
    assert "report" in planned
    for rule in ("train", "evaluate", "prepare_data", "init_tracking"):
        assert rule not in planned, planned


def planned_jobs(workdir: Path, edited: str) -> tuple[set[tuple[str, str]], str]:
    """The jobs (rule, wildcards) and reasons `snakemake -n` plans after an edit to ``edited``; the edit is undone."""
    path = workdir / edited
    original = path.read_text()
    path.write_text(original + "\n# an edit\n")
    try:
        dry = snakemake(workdir, "--dry-run")
    finally:
        path.write_text(original)
    assert dry.returncode == 0, dry.stderr
    out = dry.stdout + dry.stderr
    jobs = set()
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out):
        rule = re.match(r"(?:local)?rule (\w+):", block)
        if rule:
            wildcards = re.search(r"^\s*wildcards: (.*)$", block, re.M)
            jobs.add((rule.group(1), wildcards.group(1) if wildcards else ""))
    return jobs, out


@needs_fashion_mnist
def test_a_code_change_reruns_exactly_the_jobs_that_run_that_code(smoke):
    workdir, _ = smoke
    # a method's file: that method's training jobs (both modes, every variant and seed), the
    # evaluation and the report; FDG's file imports DDG's, so DDG's edit re-runs FDG too (and DGL's GN-DGL)
    from decoupled import config, grid

    keys = grid.runs(config.load(REPO / "config/smoke.yaml"))
    wildcards = {key: f"method={key.method}, mode={key.mode}, K={key.K}, variant={key.variant}, seed={key.seed}" for key in keys}
    train = set(wildcards.values())
    for edited, methods in (("src/decoupled/methods/dgl.py", {"dgl", "gn_dgl"}), ("src/decoupled/methods/ddg.py", {"ddg", "fdg"})):
        jobs, out = planned_jobs(workdir, edited)
        expected = {wc for key, wc in wildcards.items() if key.method in methods}
        assert len(expected) == 2 * 3 * len(methods)  # seeds x (sync + 2 async variants) per method
        assert {wc for rule, wc in jobs if rule == "train"} == expected, out[-3000:]
        assert ("evaluate", "") in jobs  # one job evaluates every run of the experiment
        assert {rule for rule, _ in jobs} == {"train", "evaluate", "report", "all"}
        assert "Params have changed since last execution" in out
    # shared training code: every training job; the report's code: the report alone
    jobs, _ = planned_jobs(workdir, "src/decoupled/engines/simulated.py")
    assert {wc for rule, wc in jobs if rule == "train"} == train
    jobs, _ = planned_jobs(workdir, "src/decoupled/report/tables.py")
    assert {rule for rule, _ in jobs} == {"report", "all"}


@needs_fashion_mnist
def test_a_copied_results_folder_works_on_its_own(smoke, tmp_path):
    """Copied (with its repository) and the original moved away, a finished experiment's store
    serves its artifacts from the copy, and a report regenerated there writes to the copy only."""
    workdir, _ = smoke
    from mlflow.tracking import MlflowClient

    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy, symlinks=True)
    original_artifacts = workdir / "results/mlflow/artifacts"
    before = {p: p.stat().st_mtime_ns for p in original_artifacts.rglob("*") if p.is_file()}
    hidden = workdir.with_name(workdir.name + "-away")
    workdir.rename(hidden)
    try:
        assert subprocess.run([sys.executable, "-m", "decoupled", "relocate", "results/mlflow/mlflow.db"], cwd=copy).returncode == 0
        client = MlflowClient(f"sqlite:///{copy}/results/mlflow/mlflow.db")
        experiment = client.get_experiment_by_name("smoke")
        [child] = client.search_runs([experiment.experiment_id], "tags.method = 'dgl' and tags.mode = 'sync' and tags.seed = '0'")
        assert child.info.artifact_uri.startswith((copy / "results/mlflow/artifacts").as_uri())
        assert json.loads((Path(client.download_artifacts(child.info.run_id, "eval.json", str(tmp_path)))).read_text())["method"] == "dgl"
        with serve_ui(f"sqlite:///{copy}/results/mlflow/mlflow.db", tmp_path) as ui:  # what the UI's artifact view fetches
            with urllib.request.urlopen(f"{ui}/get-artifact?path=eval.json&run_uuid={child.info.run_id}", timeout=30) as answer:
                assert json.loads(answer.read())["method"] == "dgl"
        plot_code = copy / "src/decoupled/report/tables.py"
        plot_code.write_text(plot_code.read_text() + "\n# edited in the copy\n")
        again = snakemake(copy)
        assert again.returncode == 0, again.stderr[-3000:]
        parent = client.search_runs([experiment.experiment_id], "tags.`decoupled.role` = 'parent'")[0]
        assert (copy / "results/mlflow/artifacts" / parent.info.run_id / "artifacts/tables/main.csv").stat().st_mtime_ns > max(before.values())
    finally:
        hidden.rename(workdir)
    assert not (workdir.parent / "results").exists() and not Path(str(hidden)).exists()
    assert {p: p.stat().st_mtime_ns for p in original_artifacts.rglob("*") if p.is_file()} == before  # the original untouched


def test_bad_config_stops_before_any_job(tmp_path):
    cfg = yaml.safe_load((REPO / "config/smoke.yaml").read_text())
    cfg["train"]["lr"] = "fast"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    result = snakemake(tmp_path, configfile=tmp_path / "bad.yaml", snakefile=REPO / "Snakefile")
    assert result.returncode != 0
    assert "config key 'train.lr': 'fast' is not of type 'number'" in result.stderr
    assert not (tmp_path / "results").exists()


def test_unknown_method_stops_before_any_job(tmp_path):
    cfg = yaml.safe_load((REPO / "config/smoke.yaml").read_text())
    cfg["grid"]["methods"] = ["backprop", "dgll"]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    result = snakemake(tmp_path, configfile=tmp_path / "bad.yaml", snakefile=REPO / "Snakefile")
    assert result.returncode != 0
    assert "unknown method 'dgll' (known: backprop, cdni, ddg, dgl, dni, fdg, gn_dgl)" in result.stderr
    assert not (tmp_path / "results").exists()


def test_a_claim_the_grid_cannot_evaluate_stops_before_any_job(tmp_path):
    cfg = yaml.safe_load((REPO / "config/smoke.yaml").read_text())
    cfg["report"]["claims"].append({"claim": "FDG beats DDG at K=4", "source": "a paper", "a": {"method": "fdg", "K": 4}, "b": {"method": "ddg", "K": 4}})
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    result = snakemake(tmp_path, configfile=tmp_path / "bad.yaml", snakefile=REPO / "Snakefile")
    assert result.returncode != 0
    where = len(cfg["report"]["claims"]) - 1
    assert f"config key 'report.claims[{where}]' (\"FDG beats DDG at K=4\"): a: the grid has no run of fdg sync at K=4 (its K: 2)" in result.stderr
    assert not (tmp_path / "results").exists()


def test_lint_is_clean():
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint", "--snakefile", str(REPO / "Snakefile")],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Congratulations" in result.stdout + result.stderr


def test_the_workflow_is_snakefmt_clean():
    """Formatted as snakefmt formats it, with the settings in pyproject.toml ([tool.snakefmt])."""
    result = subprocess.run([str(Path(sys.executable).parent / "snakefmt"), "--check", "."], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
