"""Config validation: bad input stops with one line naming the culprit."""

import json
import subprocess
import sys

import pytest
import yaml

from decoupled import config, grid
from decoupled.errors import UserError

from conftest import REPO


def base():
    return yaml.safe_load((REPO / "config/smoke.yaml").read_text())


def test_shipped_configs_are_valid():
    for name in sorted(p.name for p in (REPO / "config").glob("*.yaml") if p.name != "schema.yaml"):
        cfg = config.load(REPO / "config" / name)
        assert grid.runs(cfg)


def test_defaults_are_filled_in():
    cfg = config.validate({"experiment": "x", "grid": {"methods": ["dgl"]}})
    assert cfg["train"]["epochs"] == 5 and cfg["grid"]["modes"] == ["sync"] and cfg["model"]["widths"] == [16, 32, 64]


@pytest.mark.parametrize(
    "change, culprit",
    [
        (lambda c: c["train"].update(lr=-1), "train.lr"),
        (lambda c: c["train"].update(epochs="many"), "train.epochs"),
        (lambda c: c["train"].update(learning_rate=0.1), "learning_rate"),
        (lambda c: c["dataset"].update(name="imagenet21k"), "dataset.name"),
        (lambda c: c["grid"].update(modes=["sideways"]), "grid.modes.0"),
        (lambda c: c.update(overrides={"dgl": {"train": {"lr": 0}}}), "train.lr"),
        (lambda c: c["model"].update(split="lopsided"), "model.split"),
        (lambda c: c["model"].update(split=[1, 0]), "model.split"),
    ],
)
def test_bad_values_name_the_key(change, culprit):
    cfg = base()
    change(cfg)
    with pytest.raises(UserError) as err:
        grid.runs(cfg)
    message = str(err.value)
    assert culprit in message and "\n" not in message


@pytest.mark.parametrize(
    "report, culprit",
    [
        ({"target_accuracy": 1.5}, "report.target_accuracy"),  # a fraction, not a percentage
        ({"target_accuracy": 0}, "report.target_accuracy"),
        ({"target_accuracy": "high"}, "report.target_accuracy"),
        ({"target": 0.9}, "'target' was unexpected"),
    ],
)
def test_bad_report_settings_name_the_key(report, culprit):
    cfg = base()
    cfg["report"] = report
    with pytest.raises(UserError) as err:
        config.validate(cfg)
    message = str(err.value)
    assert culprit in message and "\n" not in message


def test_report_target_accuracy_has_a_default():
    report = config.validate(base())["report"]
    assert {k: report[k] for k in ("target_accuracy", "reduced_run", "published")} == {"target_accuracy": 0.85, "reduced_run": False, "published": []}


def test_unknown_method_and_too_many_modules():
    cfg = base()
    cfg["grid"]["methods"] = ["dgl", "dni2"]
    with pytest.raises(UserError, match="unknown method 'dni2'"):
        grid.runs(cfg)
    cfg = base()
    cfg["grid"]["K"] = [5]
    with pytest.raises(UserError, match="K=5"):
        grid.runs(cfg)


def test_overrides_apply_to_one_method_only():
    cfg = config.validate(base())
    dgl = grid.job_config(cfg, grid.RunKey("dgl", "sync", 2, 0))
    bp = grid.job_config(cfg, grid.RunKey("backprop", "sync", 2, 0))
    assert dgl["train"]["lr"] == 0.08 and bp["train"]["lr"] == 0.05
    assert grid.check_job(json.loads(json.dumps(dgl))) == dgl


def test_a_method_may_run_in_modes_of_its_own():
    cfg = config.validate({"experiment": "x", "grid": {"methods": ["dgl", "dni"], "modes": ["sync", "async"], "seeds": [0]},
                           "overrides": {"dni": {"grid": {"modes": ["sync"]}, "train": {"synth_lr": 0.01}}}})
    assert sorted((k.method, k.mode) for k in grid.runs(cfg)) == [("dgl", "async"), ("dgl", "sync"), ("dni", "sync")]
    job = grid.job_config(cfg, grid.RunKey("dni", "sync", 3, 0))
    assert "grid" not in job and job["train"]["synth_lr"] == 0.01  # the override's other settings still apply
    with pytest.raises(UserError, match=r"config key 'overrides.dni.grid.modes.0': 'both' is not one of \['sync', 'async'\]"):
        config.validate({"experiment": "x", "grid": {"methods": ["dni"]}, "overrides": {"dni": {"grid": {"modes": ["both"]}}}})
    with pytest.raises(UserError, match="config key 'overrides.dni.grid': Additional properties"):
        config.validate({"experiment": "x", "grid": {"methods": ["dni"]}, "overrides": {"dni": {"grid": {"seeds": [1]}}}})


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "decoupled", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_unknown_method_is_one_line_and_leaves_nothing(tmp_path):
    cfg = base()
    cfg["grid"]["methods"] = ["sgd-magic"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    result = cli("train", "--config", "c.yaml", "--method", "sgd-magic", "--K", "2", "--seed", "0", "--data", "x.pt", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "decoupled train: error: argument --method: invalid choice: 'sgd-magic' (choose from 'backprop', 'cdni', 'ddg', 'dgl', 'dni', 'fdg', 'gn_dgl')"
        " (see decoupled train --help)"
    ]
    assert not out.exists() and not (tmp_path / "results").exists()


def test_cli_bad_config_value_is_one_line(tmp_path):
    cfg = base()
    cfg["model"]["widths"] = [8, -3]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    result = cli("train", "--config", "c.yaml", "--method", "dgl", "--K", "2", "--seed", "0", "--data", "x.pt", "--out", "run", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.widths.1" in lines[0]


def test_cli_missing_dataset_is_one_line_and_leaves_nothing(tmp_path):
    cfg = base()
    cfg["dataset"]["root"] = str(tmp_path / "no-such-dir")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    result = cli("prepare-data", "--config", "c.yaml", "--out", "data/f.pt", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-such-dir" in lines[0]
    assert not (tmp_path / "data" / "f.pt").exists()


def sweep(**grid_changes):
    cfg = base()
    cfg["grid"] = {"methods": ["backprop", "dgl", "fdg"], "modes": ["sync", "async"], "K": [2, 1], "seeds": [0]}
    cfg["grid"].update(grid_changes)
    return {(k.method, k.mode, k.K, k.variant) for k in grid.runs(cfg)}


def test_grid_variants_product_and_one_at_a_time():
    slowdown = [{"factor": 1}, {"factor": 2, "module": 0}]
    product = sweep(slowdown=slowdown, buffer_size=[4, 8], beta=[0.5, 1.0])
    assert ("backprop", "sync", 2, "default") in product
    assert not any(m == "backprop" and mode == "async" for m, mode, _, _ in product)  # sync only
    assert ("fdg", "sync", 1, "beta1") in product and ("dgl", "sync", 2, "default") in product
    dgl_async = {(K, v) for m, mode, K, v in product if (m, mode) == ("dgl", "async")}
    assert dgl_async == {(K, f"{s}_{b}") for K in (2, 1) for s in ("S1", "S2m0") for b in ("B4", "B8")}

    one = sweep(slowdown=slowdown, buffer_size=[4, 8], design="one_at_a_time")
    dgl_async = {(K, v) for m, mode, K, v in one if (m, mode) == ("dgl", "async")}
    # the base (K=2, no slowdown, base buffer 4), K swept alone, then each listed value alone
    assert dgl_async == {(2, "S1_B4"), (1, "S1_B4"), (2, "S2m0_B4"), (2, "S1_B8")}


def test_the_budget_axis_names_its_runs_and_crosses_the_slowdown_sweep():
    slowdown = [{"factor": 1}, {"factor": 2, "module": 0}]
    one = sweep(slowdown=slowdown, buffer_size=[4, 8], budget=["updates", "time"], design="one_at_a_time")
    dgl_async = {(K, v) for m, mode, K, v in one if (m, mode) == ("dgl", "async")}
    # the default budget adds nothing to a name; the slowdown sweep runs under each budget
    assert dgl_async == {(2, "S1_B4"), (1, "S1_B4"), (2, "S2m0_B4"), (2, "S1_B8"), (2, "S1_B4_time"), (2, "S2m0_B4_time")}
    cfg = config.validate(base())
    cfg["grid"].update(modes=["async"], methods=["dgl"], slowdown=slowdown, budget=["updates", "time"], design="one_at_a_time")
    job = grid.job_config(cfg, grid.RunKey("dgl", "async", 2, 0, "S2m0_B4_time"))
    assert job["async"]["budget"] == "time" and job["run"]["varied"] == ["budget", "slowdown"]
    assert grid.job_config(cfg, grid.RunKey("dgl", "async", 2, 0, "S2m0_B4"))["async"]["budget"] == "updates"


def test_varied_names_the_axes_a_run_moves_off_the_base():
    cfg = config.validate(base())
    cfg["grid"].update(modes=["async"], methods=["dgl"], K=[2, 1], slowdown=[{"factor": 1}, {"factor": 2, "module": 1}], design="one_at_a_time")
    varied = {(k.K, k.variant): grid.job_config(cfg, k)["run"]["varied"] for k in grid.runs(cfg)}
    assert varied[(2, "S1_B4")] == [] and varied[(2, "S2m1_B4")] == ["slowdown"]
    assert varied[(1, "S1_B4")] == ["K"]
    job = grid.job_config(cfg, grid.RunKey("dgl", "async", 2, 0, "S2m1_B4"))
    assert job["async"]["slowdown_factor"] == 2 and job["async"]["slowed_module"] == 1


def test_a_slowed_module_must_exist():
    cfg = base()
    cfg["grid"].update(modes=["async"], slowdown=[{"factor": 2, "module": 2}])
    with pytest.raises(UserError, match="slowed module 2 does not exist with K=2"):
        grid.runs(cfg)
    cfg["grid"]["slowdown"] = [{"factor": 2}]
    with pytest.raises(UserError, match="needs a slowed module"):
        grid.runs(cfg)


def test_an_explicit_split_must_cut_the_layers_into_K_modules():
    cfg = base()  # two layers, K=2
    cfg["model"]["split"] = [1, 1]
    assert grid.runs(cfg)
    for split, problem in (([2], "lists 1 summing to 2"), ([1, 2], "lists 2 summing to 3")):
        cfg["model"]["split"] = split
        with pytest.raises(UserError) as err:
            grid.runs(cfg)
        message = str(err.value)
        assert message.startswith("config key 'model.split'") and problem in message and "\n" not in message
    # one list cannot serve a sweep over K
    cfg["model"]["split"] = [1, 1]
    cfg["grid"]["K"] = [2, 1]
    with pytest.raises(UserError, match="model.split.*K=1"):
        grid.runs(cfg)


def test_cli_help_names_choices_and_defaults_and_gives_the_version():
    from decoupled import __version__

    assert cli("--version", cwd=REPO).stdout.strip() == f"decoupled {__version__}"
    top = cli("--help", cwd=REPO).stdout
    assert "``" not in top and "train" in top and "relocate" in top  # plain text, not reST
    train = " ".join(cli("train", "--help", cwd=REPO).stdout.split())
    assert "--method {backprop,cdni,ddg,dgl,dni,fdg,gn_dgl}" in train and "--mode {sync,async}" in train and "(default: sync)" in train
    assert "(default: None)" not in train


def test_train_help_describes_the_command_and_its_example_is_a_job_of_the_default_experiment():
    import shlex

    from decoupled.cli import parser

    text = cli("train", "--help", cwd=REPO).stdout
    assert "Train one job of an experiment" in text and "resume.pt" in text
    examples = [line for line in text.replace("\\\n", " ").splitlines() if line.strip().startswith("decoupled train")]
    assert len(examples) == 2
    args = parser().parse_args(shlex.split(examples[0].strip())[1:])  # every option the example gives exists
    key = grid.RunKey(args.method, args.mode, args.K, args.seed)
    assert key in grid.runs(config.load(REPO / args.config))
    assert args.out == f"results/{key.path}"  # where the workflow writes that run
