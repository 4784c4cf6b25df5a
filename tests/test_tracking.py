"""MLflow: where runs go, and that bad input leaves no run behind."""

import subprocess
import sys

import pytest

from decoupled import tracking


def test_environment_variable_wins_over_config(monkeypatch):
    cfg = {"tracking_uri": "sqlite:///from-config.db"}
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(cfg) == "sqlite:///from-config.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///from-env.db")
    assert tracking.tracking_uri(cfg) == "sqlite:///from-env.db"


def test_init_experiment_is_idempotent(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = {"experiment": "e", "tracking_uri": f"sqlite:///{tmp_path}/m/mlflow.db"}
    first = tracking.init_experiment(cfg)
    second = tracking.init_experiment(cfg)
    assert first == second  # one experiment, one parent run, however often the rule runs
    from mlflow.tracking import MlflowClient

    runs = MlflowClient(cfg["tracking_uri"]).search_runs([first["experiment_id"]])
    assert [r.info.run_id for r in runs] == [first["parent_run_id"]]


@pytest.mark.parametrize("content", [b"", b"not a torch file"])
def test_train_on_a_corrupt_dataset_creates_no_run(tmp_path, content):
    (tmp_path / "data.pt").write_bytes(content)
    from conftest import REPO

    result = subprocess.run(
        [sys.executable, "-m", "decoupled", "train", "--config", str(REPO / "config/smoke.yaml"),
         "--method", "dgl", "--K", "2", "--seed", "0", "--data", "data.pt", "--out", "run"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.pt" in lines[0], result.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "results").exists()  # no outputs, no MLflow store


def experiment_config(tmp_path, **grid):
    from decoupled import config

    return config.validate({"experiment": "e", "tracking_uri": f"sqlite:///{tmp_path}/m/mlflow.db", "grid": {"methods": ["dgl"], **grid}})


def test_the_parent_run_carries_the_experiment_config_and_a_changed_config_gets_its_own(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from mlflow.tracking import MlflowClient

    cfg = experiment_config(tmp_path, seeds=[0, 1])
    first = tracking.init_experiment(cfg, described=cfg)
    assert tracking.init_experiment(cfg, described=cfg) == first
    client = MlflowClient(cfg["tracking_uri"])
    parent = client.get_run(first["parent_run_id"])
    params = parent.data.params
    assert params["grid.methods"] == "['dgl']" and params["grid.seeds"] == "[0, 1]" and params["train.lr"] == "0.05"
    assert params["experiment"] == "e" and "output_dir" not in params
    assert parent.data.tags["mlflow.user"] and parent.data.tags["mlflow.source.name"] == "decoupled init-tracking"
    assert client.get_experiment(first["experiment_id"]).tags["mlflow.experimentKind"] == "custom_model_development"
    runs = [tracking.ChildRun.start(first, f"dgl K2 s{seed}", {}, {}).run_id for seed in (0, 1, 2)]
    assert tracking.parent_for(first, cfg, runs[:2]) == first["parent_run_id"]  # the config it was made with
    # MLflow never changes a param: another grid gets another parent run, with the report's runs
    # moved under it; the first keeps its params, and the runs the new grid does not have
    more = experiment_config(tmp_path, seeds=[0, 2])
    second = tracking.parent_for(first, more, [runs[0], runs[2]])
    assert second != first["parent_run_id"] and client.get_run(second).data.params["grid.seeds"] == "[0, 2]"
    assert client.get_run(first["parent_run_id"]).data.params["grid.seeds"] == "[0, 1]"
    assert [client.get_run(r).data.tags["mlflow.parentRunId"] for r in runs] == [second, first["parent_run_id"], second]
    assert tracking.parent_for(first, more, [runs[0], runs[2]]) == second  # found again, not made twice
    assert tracking.parent_for(first, cfg, runs[:2]) == first["parent_run_id"]  # and back
    assert client.get_run(runs[0]).data.tags["mlflow.parentRunId"] == first["parent_run_id"]
    # a parent made without a config (a job run by hand first) takes the first config it is given
    bare = tracking.init_experiment({**cfg, "experiment": "bare"})
    assert not client.get_run(bare["parent_run_id"]).data.params
    assert tracking.parent_for(bare, cfg, []) == bare["parent_run_id"]
    assert client.get_run(bare["parent_run_id"]).data.params["grid.seeds"] == "[0, 1]"


def test_a_child_run_has_mlflows_own_fields(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import getpass

    cfg = experiment_config(tmp_path)
    run = tracking.ChildRun.start(tracking.init_experiment(cfg, described=cfg), "dgl", {"train.lr": 0.05}, {"method": "dgl"})
    stored = run.client.get_run(run.run_id)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=tracking.Path(tracking.__file__).parent).stdout.strip()
    assert stored.data.tags["mlflow.source.git.commit"] == commit and len(commit) == 40
    assert stored.data.tags["mlflow.user"] == getpass.getuser() == stored.info.user_id
    assert stored.data.tags["mlflow.source.name"] == "decoupled train" and stored.data.params == {"train.lr": "0.05"}


def test_a_moved_store_reads_and_writes_its_artifacts_beside_itself(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import shutil

    from mlflow.tracking import MlflowClient

    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    cfg = {"experiment": "e", "tracking_uri": "sqlite:///results/mlflow/mlflow.db"}
    info = tracking.init_experiment(cfg)
    note = tmp_path / "note.txt"
    note.write_text("first")
    run = tracking.ChildRun.start(info, "r", {}, {})
    run.log_artifact(note)
    shutil.copytree(tmp_path / "a/results", tmp_path / "b/results")
    shutil.move(tmp_path / "a/results", tmp_path / "a/elsewhere")  # the original moved too: the copy must stand alone
    # by hand (e.g. before `mlflow ui` on the copy)
    copy_db = tmp_path / "b/results/mlflow/mlflow.db"
    result = subprocess.run([sys.executable, "-m", "decoupled", "relocate", str(copy_db)], capture_output=True, text=True)
    assert result.returncode == 0 and "artifacts of 1 experiment(s) now read from" in result.stderr, result.stderr
    client = MlflowClient(f"sqlite:///{copy_db}")
    uri = client.get_run(run.run_id).info.artifact_uri
    assert uri == (tmp_path / "b/results/mlflow/artifacts").as_uri() + f"/{run.run_id}/artifacts"
    assert (tmp_path / "b" / client.download_artifacts(run.run_id, "note.txt", str(tmp_path / "b"))).read_text() == "first"
    # and on its own, when this package opens a moved store (here the original, moved in a/), as
    # the evaluate and report commands do in a process of their own
    note.write_text("second")
    script = (f"from decoupled import tracking; tracking.ChildRun.attach({{**{info!r}, 'tracking_uri': 'sqlite:///elsewhere/mlflow/mlflow.db'}},"
              f" {run.run_id!r}).log_artifact({str(note)!r})")
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path / "a", check=True)
    assert (tmp_path / "a/elsewhere/mlflow/artifacts" / run.run_id / "artifacts/note.txt").read_text() == "second"
    assert (tmp_path / "b/results/mlflow/artifacts" / run.run_id / "artifacts/note.txt").read_text() == "first"  # the copy untouched
    assert tracking.relocate(copy_db) == 0  # nothing moved since


def _record(K: int = 3) -> dict:
    """An async DGL epoch record as train.fit makes it, from a run of two tiny epochs."""
    from decoupled import config, grid
    from decoupled.data.prepared import Dataset
    from decoupled.train import fit
    import torch

    cfg = config.validate({"experiment": "names", "model": {"widths": [4, 8, 8], "aux_hidden": 8},
                           "train": {"epochs": 1, "batch_size": 10}, "async": {"buffer_size": 2},
                           "grid": {"methods": ["dgl"], "modes": ["async"], "K": [K], "seeds": [0]}})
    job = grid.job_config(cfg, grid.runs(cfg)[0])
    g = torch.Generator().manual_seed(0)
    data = Dataset(torch.randn(40, 1, 8, 8, generator=g), torch.arange(40) % 10, torch.randn(20, 1, 8, 8, generator=g), torch.arange(20) % 10,
                   [str(c) for c in range(10)], 10, 1, 8, "tiny")
    return fit(job, data, checkpoint=lambda state: None)["epochs"][-1]


def test_the_charts_open_on_test_accuracy_the_only_metric_of_the_first_section():
    """MLflow's chart view draws a section per prefix before "/", in alphabetical order: the
    first section holds the test accuracy alone, in percent as every table."""
    record = _record()
    metrics = tracking.epoch_metrics(record)
    sections = {name.partition("/")[0] for name in metrics}
    assert all("/" in name for name in metrics) and len(sections) > 3
    first = min(sections)
    assert [name for name in metrics if name.startswith(first + "/")] == ["acc/test"]
    assert metrics["acc/test"] == 100 * record["test_acc"]
    assert metrics["acc_heads/test_m0"] == 100 * record["test_acc_per_module"][0]
    assert {"workers/steps_m2", "staleness/input_mean_m1", "loss/train_m0", "time/simulated_parallel_s"} <= set(metrics)
    final = tracking.final_metrics({"test_acc": 0.5, "test_loss": 1.0, "test_acc_per_module": [0.25, 0.5]})
    assert final == {"final/test_acc": 50.0, "final/test_loss": 1.0, "final/test_acc_m0": 25.0, "final/test_acc_m1": 50.0}


def test_a_runs_name_says_method_mode_what_the_grid_varies_and_seed():
    from decoupled import config, grid

    from conftest import REPO

    for path in sorted(REPO.glob("config/**/*.yaml")):
        if path.name == "schema.yaml":
            continue
        cfg = config.load(path)
        keys = grid.runs(cfg)
        names = [grid.run_name(cfg, key) for key in keys]
        assert len(set(names)) == len(names), f"{path.name}: runs of one name"
        for key, name in zip(keys, names):
            assert name.startswith(f"{key.method} {key.mode} ") and name.endswith(f" s{key.seed}"), name
    cfg = config.load(REPO / "config/smoke.yaml")  # its grid sweeps the slowdown of async runs, and nothing else
    names = {grid.run_name(cfg, key) for key in grid.runs(cfg)}
    assert {"dgl sync s0", "dgl async S1 s0", "dgl async S2m1 s1", "fdg sync s0", "gn_dgl async S2m1 s0"} <= names
    cfg = config.load(REPO / "config/groups_sweep.yaml")  # K and groups
    assert {"gn_dgl sync K2 G4 s1", "dgl sync K3 s0"} <= {grid.run_name(cfg, key) for key in grid.runs(cfg)}


def test_a_runs_params_are_the_settings_its_network_and_schedule_read():
    from decoupled import config, grid

    def params(**sections):
        cfg = config.validate({"experiment": "p", **sections, "grid": {"methods": ["dgl"], "modes": ["sync"], "K": [2], "seeds": [0]}})
        return grid.params_of(grid.job_config(cfg, grid.runs(cfg)[0]))

    cnn = params(train={"lr_schedule": "cosine"})
    assert "model.widths" in cnn and "train.lr" in cnn and "train.momentum" in cnn
    assert not {"model.shortcut", "model.wrn_final_bn_momentum", "model.dropout", "train.lr_milestones", "train.lr_gamma", "train.lr_warmup_start"} & set(cnn)
    resnet = params(model={"arch": "resnet20"}, train={"lr_schedule": "multistep", "lr_warmup_epochs": 2, "optimizer": "adam"})
    assert {"model.shortcut", "model.stem", "train.lr_milestones", "train.lr_gamma", "train.lr_warmup_start"} <= set(resnet)
    assert not {"model.widths", "model.wrn_final_bn_momentum", "train.momentum", "train.nesterov"} & set(resnet)
    assert {"model.dropout", "model.wrn_final_bn_momentum"} <= set(params(model={"arch": "wrn16_2"}))


def test_the_parent_runs_description_names_the_experiment_its_grid_and_its_main_table():
    from decoupled import config

    cfg = config.validate({"experiment": "described", "grid": {"methods": ["dgl", "backprop"], "modes": ["sync"], "K": [3], "seeds": [0, 1, 2],
                                                               "slowdown": [{"factor": 1}, {"factor": 2, "module": 1}]}})
    text = tracking.parent_description(cfg, "| method | sync (%) |\n|---|---|\n| dgl | 80.00 ± 1.00 |\n")
    assert text.startswith("**described**: dgl, backprop on fashion_mnist")
    assert "seeds 0, 1, 2" in text and "slowdown" in text and "| dgl | 80.00 ± 1.00 |" in text


def test_a_main_table_too_long_for_a_description_is_left_to_the_logged_table(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from decoupled import config

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = config.validate({"experiment": "wide", "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "grid": {"methods": ["dgl"], "modes": ["sync"], "K": [2], "seeds": [0]}})
    info = tracking.init_experiment(cfg, described=cfg)
    (tmp_path / "main.md").write_text("| method | sync |\n" + "| dgl | 1.00 |\n" * 1000)
    (tmp_path / "main.csv").write_text("method,sync_mean\ndgl,0.01\n")
    tracking.describe_parent(info, info["parent_run_id"], cfg, tmp_path)
    client = MlflowClient(tracking_uri=info["tracking_uri"])
    note = client.get_run(info["parent_run_id"]).data.tags["mlflow.note.content"]
    assert note.startswith("**wide**") and "too long" in note and "| dgl |" not in note
    assert "main_table.json" in {f.path for f in client.list_artifacts(info["parent_run_id"])}


def test_a_dataset_two_jobs_log_at_once_is_linked_not_lost(tmp_path):
    """Two jobs of one experiment logging the same dataset at once both insert its row (the
    store looks it up first): the second breaks the table's unique key, and is tried again."""
    from mlflow.exceptions import RestException

    run = tracking.ChildRun.__new__(tracking.ChildRun)
    calls = []

    class Store:
        def log_inputs(self, run_id, datasets):
            calls.append(datasets[0].dataset.digest)
            if len(calls) == 1:
                raise RestException({"error_code": "BAD_REQUEST", "message": '(psycopg2.errors.UniqueViolation) duplicate key value violates '
                                                                              'unique constraint "dataset_pk"'})

    run.client, run.run_id = Store(), "r"
    (tmp_path / "data.pt").write_bytes(b"images")
    run.log_dataset("fashion_mnist", tmp_path / "data.pt", {"classes": 10})
    assert len(calls) == 2 and calls[0] == calls[1]

    class Broken:
        def log_inputs(self, run_id, datasets):
            raise RestException({"error_code": "BAD_REQUEST", "message": "something else"})

    run.client = Broken()
    with pytest.raises(RestException, match="something else"):  # any other fault is not retried
        run.log_dataset("fashion_mnist", tmp_path / "data.pt", {"classes": 10})
