"""``decoupled``: the command line the Snakemake rules call (and users may call by hand).

Every subcommand takes what it needs and no more, so that Snakemake re-runs a step only
when its own settings change. Input problems end with one line, ``decoupled: error: ...``,
and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from decoupled.errors import UserError


def _json_arg(text: str, what: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{what} is not valid JSON: {e}") from None


def _experiment_config(args) -> dict:
    from decoupled import config

    if getattr(args, "config_json", None) is not None:
        return config.validate(_json_arg(args.config_json, "--config-json"))
    return config.load(args.config)


def _tracking(path: str | None) -> dict | None:
    from decoupled.files import read_json

    return read_json(path) if path else None


def cmd_prepare_data(args) -> None:
    from decoupled import data

    if args.dataset_json is not None:
        from decoupled import config

        dataset = config.validate_section("dataset", _json_arg(args.dataset_json, "--dataset-json"))
    else:
        dataset = _experiment_config(args)["dataset"]
    summary = data.prepare(
        dataset["name"],
        args.out,
        dataset["root"],
        download=dataset["download"],
        download_dir=str(Path(args.out).parent / "downloads"),
        subset_per_class=dataset["subset_per_class"],
        test_subset_per_class=dataset["test_subset_per_class"],
        verify_checksums=dataset["verify_checksums"],
        crop_size=dataset["crop_size"],
        resize_size=dataset["resize_size"],
        generate_from=dataset["generate_from"],
        normalize=dataset["normalize"],
    )
    print(f"prepared {summary['name']}: {summary['n_train']} train / {summary['n_test']} test images from {summary['source']} -> {args.out}", file=sys.stderr)


def cmd_init_tracking(args) -> None:
    from decoupled.files import write_json
    from decoupled.tracking import how_to_browse, init_experiment

    if args.config is not None:
        from decoupled import claims

        cfg = _experiment_config(args)
        claims.of(cfg)  # the experiment's start: a claim its grid cannot evaluate is refused before anything runs
        info = init_experiment(cfg, described=cfg)
    elif args.experiment is not None:
        from decoupled import config

        described = config.validate(_json_arg(args.describe_json, "--describe-json")) if args.describe_json else None
        info = init_experiment({"experiment": args.experiment, "tracking_uri": args.tracking_uri}, described)
    else:
        raise UserError("init-tracking needs --config, or --experiment (with --tracking-uri)")
    write_json(args.out, info)
    uri = info["tracking_uri"]
    print(f"MLflow experiment '{info['experiment']}' ({uri}), parent run {info['parent_run_id']}; to follow it: {how_to_browse(uri, info['experiment_id'])}",
          file=sys.stderr)


def cmd_train(args) -> None:
    from decoupled import grid
    from decoupled.job import run_job

    described = None  # the experiment config, when given: the job's run goes under its parent run
    if args.job_json is not None:
        job = grid.check_job(_json_arg(args.job_json, "--job-json"))
    else:
        if None in (args.method, args.K, args.seed):
            raise UserError("train needs --job-json, or --config with --method, --K and --seed")
        cfg = described = _experiment_config(args)
        variant = args.variant
        if variant is None:
            names = list(grid.variants(cfg, args.method, args.mode))
            if len(names) > 1:
                raise UserError(f"the grid has several variants of {args.method}/{args.mode}: pick one with --variant ({', '.join(names)})")
            variant = names[0]
        job = grid.job_config(cfg, grid.RunKey(args.method, args.mode, args.K, args.seed, variant))
    tags = {}
    for item in args.tag:
        name, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--tag '{item}' must look like name=value")
        tags[name] = value
    from decoupled import engines

    if not engines.of(job).is_launched():
        from decoupled import rundir
        from decoupled.data import load_prepared
        from decoupled.train import check_fits

        check_fits(job, load_prepared(args.data))  # before the run directory is made
        with rundir.training(args.out):  # held for the workers: a second launcher stops at once
            _launch_workers(job, args.out)  # this process becomes the launcher's agent; its processes rerun this command
    else:
        run_job(job, args.data, args.out, _tracking(args.tracking), tags, described)


def _launch_workers(job: dict, out: str) -> None:
    """Run this very command as the job's processes under torchrun on this machine."""
    import signal
    import subprocess

    from decoupled import engines, rundir
    from decoupled.grid import RunKey

    command = [sys.executable, "-m", "torch.distributed.run", *engines.of(job).launch_args(job), "-m", "decoupled", *sys.argv[1:]]
    agent = subprocess.Popen(command, env={**os.environ, rundir.HELD_ENV: str(Path(out).resolve())})
    terminated = []

    def forward(signum, frame):
        # to torchrun, which stops the workers: they keep their checkpoint, not train on as orphans
        terminated.append(signum)
        agent.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        code = agent.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code != 0 and terminated:
        from decoupled.resume import Terminated

        raise Terminated(f"distributed job {RunKey.of(job['run']).name} stopped by SIGTERM; a rerun resumes from its last checkpoint")
    if code != 0:
        raise UserError(f"distributed job {RunKey.of(job['run']).name} failed: torchrun exited with {code} (the failing worker's message is above)")


def cmd_evaluate(args) -> None:
    """Every run's final checkpoint on the test set, in one process (one start-up for all of
    them: the workflow evaluates an experiment's runs in one job). Every result is computed
    before any is written or logged. A run whose checkpoint cannot be read gets an eval.json
    saying so (the report leaves it out, naming it), and the others go on."""
    if len(args.out) != len(args.run):
        raise UserError(f"evaluate: {len(args.run)} --run directories but {len(args.out)} --out files")
    from decoupled.data import load_prepared
    from decoupled.rundir import make_again

    data = load_prepared(args.data)
    results = []
    for run, out in zip(args.run, args.out):
        try:
            results.append((Path(run), out, *_evaluate_run(Path(run), data)))
        except UserError as e:
            results.append((Path(run), out, {"error": str(e)}, None))
            print(f"decoupled: warning: {e}; {make_again(Path(run) / 'checkpoint.pt')}", file=sys.stderr)
    if all(checkpoint is None for *_, checkpoint in results):
        raise UserError(f"evaluate: none of the {len(results)} runs has a readable checkpoint")
    from decoupled.files import write_json

    experiment = _tracking(args.tracking)
    for run_dir, out, result, checkpoint in results:
        write_json(out, result)
        if checkpoint is None:
            continue
        if experiment is not None:
            from decoupled.tracking import ChildRun, final_metrics

            run = ChildRun.attach(experiment, checkpoint["mlflow_run_id"])
            run.log_metrics(final_metrics(result), step=checkpoint["epoch"])
            run.log_artifact(out)
        print(f"[{run_dir}] final test accuracy {100 * result['test_acc']:.2f}%", file=sys.stderr)


def _evaluate_run(run_dir: Path, data) -> tuple[dict, dict]:
    """A run's eval.json contents, from its checkpoint, and the checkpoint."""
    import torch

    from decoupled import model, numerics
    from decoupled.evaluate import evaluate
    from decoupled.resume import load_checkpoint

    path = run_dir / "checkpoint.pt"
    checkpoint = load_checkpoint(path)
    try:
        job = checkpoint["job"]
        torch.set_num_threads(job["train"]["threads"])
        net = numerics.place(model.build(job["model"], job["run"]["K"], data.in_channels, data.num_classes, checkpoint["split"]), job["train"])
        net.load_state_dict(checkpoint["net"])
    except (KeyError, TypeError, RuntimeError) as e:  # a checkpoint of something else
        raise UserError(f"checkpoint {path} is not one of this pipeline's runs on this data ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    with numerics.autocast(job["train"], "cpu"):  # the numerics it was trained (and evaluated per epoch) in
        test = data.test_set(torch.device("cpu"), job["train"]["loader_workers"])
        result = {**job["run"], **evaluate(net, test.batches(job["train"]["eval_batch_size"]))}
    return result, {"mlflow_run_id": checkpoint["mlflow_run_id"], "epoch": checkpoint["epoch"]}


def cmd_report(args) -> None:
    from decoupled import claims, grid
    from decoupled.report import DEFAULT_TARGET_ACCURACY, build_report
    from decoupled.rundir import make_again

    target = DEFAULT_TARGET_ACCURACY if args.target_accuracy is None else args.target_accuracy
    args.runs = args.runs if args.runs is not None else [str(Path(m).parent) for m in args.metrics]
    described = _experiment_config(args) if args.config_json is not None else None
    left_out: list[tuple[Path, str]] = []
    keys = grid.runs(described) if described is not None else None
    written = build_report([Path(r) for r in args.runs], Path(args.tables), Path(args.figures), target,
                           described["report"] if described is not None else None, left_out,
                           claims.of(described, keys) if described is not None else None,
                           {(key.method, key.mode) for key in keys} if keys is not None else None)
    for damaged, why in left_out:  # one damaged run: the others are reported
        print(f"decoupled: warning: {why}; {make_again(damaged)}", file=sys.stderr)
    experiment = _tracking(args.tracking)
    if experiment is not None:
        from decoupled.files import read_json
        from decoupled.tracking import describe_parent, log_to_parent, parent_for

        parent_id = None
        if described is not None:  # the parent run of this config, with these runs under it
            skipped = {damaged.parent for damaged, _ in left_out}
            children = [read_json(Path(r) / "metrics.json")["mlflow_run_id"] for r in args.runs if Path(r) not in skipped]
            parent_id = parent_for(experiment, described, children)
        describe_parent(experiment, parent_id or experiment["parent_run_id"], described, Path(args.tables))
        log_to_parent(experiment, written, parent_id=parent_id)
    for path in written:
        print(f"wrote {path}", file=sys.stderr)


def cmd_workflow_state(args) -> None:
    from decoupled.tracking import check_store, fail_abandoned_parents, fail_orphans, how_to_browse, mark_parent

    experiment = _tracking(args.tracking)
    described = _experiment_config(args)
    if args.state == "started":  # before any job: the store must still be the one its jobs attach to
        check_store(experiment, args.tracking)
        mark_parent(experiment, described, "RUNNING", runs_dir=args.runs_dir)
        return
    # Snakemake has ended, and with it every job it ran: a run still RUNNING lost its process
    orphans = fail_orphans(experiment, args.runs_dir, f"abandoned: its job ended without closing it (killed?); see {args.log}")
    if args.state == "succeeded":
        parent = mark_parent(experiment, described, "FINISHED")
    else:
        parent = mark_parent(experiment, described, "FAILED", f"the workflow failed; its log: {args.log}")
    abandoned = fail_abandoned_parents(experiment, args.runs_dir, keep=parent)
    closed = f", {len(orphans)} orphaned run(s) marked FAILED" if orphans else ""
    closed += f", {len(abandoned)} parent run(s) a killed workflow left RUNNING marked FAILED" if abandoned else ""
    state = "FINISHED" if args.state == "succeeded" else "FAILED"
    print(f"MLflow parent run {parent}: {state}{closed}" if parent else f"MLflow: no parent run of this config to mark {state}{closed}", file=sys.stderr)
    print(f"MLflow: to see the runs of '{experiment['experiment']}', {how_to_browse(experiment['tracking_uri'], experiment['experiment_id'])}", file=sys.stderr)


def cmd_relocate(args) -> None:
    from decoupled.tracking import relocate

    db = Path(args.store.removeprefix("sqlite:///"))
    if not db.is_file():
        raise UserError(f"no SQLite store at {db}" + (" (a directory)" if db.is_dir() else ""))
    moved = relocate(db)
    where = (db.parent / "artifacts").resolve()
    print(f"{db}: artifacts of {moved} experiment(s) now read from {where}" if moved else f"{db}: artifacts already beside the store ({where})", file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, as every other input problem here (no usage dump),
    and no abbreviated flags (``--config`` must not pass for ``--config-json``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help that states an option's default where it has one (and the help does not say it), its
    description and examples as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, [], False, argparse.SUPPRESS) and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


DESCRIPTION = """The command line of the decoupled-training pipeline: the steps its Snakemake rules
call (prepare-data, init-tracking, train, evaluate, report), which can be run by hand too."""


def parser() -> argparse.ArgumentParser:
    from decoupled import __version__

    p = _Parser(prog="decoupled", description=DESCRIPTION, formatter_class=_HelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _prepare_data_command(sub)
    _init_tracking_command(sub)
    _train_command(sub)
    _evaluate_command(sub)
    _report_command(sub)
    _workflow_state_command(sub)
    _relocate_command(sub)
    for action in sub.choices.values():
        action.formatter_class = _HelpFormatter
    return p


def _prepare_data_command(sub) -> None:
    sp = sub.add_parser("prepare-data", help="read, check and store a dataset as tensors")
    group = sp.add_mutually_exclusive_group(required=True)
    group.add_argument("--config", help="experiment config YAML file (its dataset section is used)")
    group.add_argument("--config-json", help="experiment config as a JSON string")
    group.add_argument("--dataset-json", help="the dataset section alone, as JSON")
    sp.add_argument("--out", required=True, help="prepared file to write (.pt)")
    sp.set_defaults(func=cmd_prepare_data)


def _init_tracking_command(sub) -> None:
    sp = sub.add_parser("init-tracking", help="create the MLflow experiment and parent run once, before any job")
    sp.add_argument("--config", help="experiment config YAML file (a new parent run carries it as params)")
    sp.add_argument("--experiment", help="experiment name (instead of --config)")
    sp.add_argument("--tracking-uri", default="sqlite:///results/mlflow/mlflow.db", help="with --experiment")
    sp.add_argument("--describe-json", help="with --experiment: the experiment config, as JSON, that a new parent run carries as params")
    sp.add_argument("--out", required=True, help="JSON file that jobs read to attach to the experiment")
    sp.set_defaults(func=cmd_init_tracking)


def _train_command(sub) -> None:
    from decoupled.grid import method_names

    sp = sub.add_parser("train", help="train one job of the grid", description=TRAIN_DESCRIPTION, epilog=TRAIN_EXAMPLES)
    group = sp.add_mutually_exclusive_group(required=True)
    group.add_argument("--job-json", help="resolved job config as JSON (a job's config.json, say)")
    group.add_argument("--config", help="experiment config YAML file; pick the job with --method/--mode/--K/--seed")
    group.add_argument("--config-json", help="the same as JSON (what the workflow passes, from $DECOUPLED_EXPERIMENT_CONFIG)")
    sp.add_argument("--method", choices=method_names(), help="with --config")
    sp.add_argument("--mode", choices=["sync", "async"], default="sync", help="with --config")
    sp.add_argument("--K", type=int, help="modules, with --config")
    sp.add_argument("--seed", type=int, help="with --config")
    sp.add_argument("--variant", help="swept settings, e.g. S4m1_B10 (default: the grid's only one)")
    sp.add_argument("--data", required=True, help="prepared dataset file")
    sp.add_argument("--out", required=True, help="run directory")
    sp.add_argument("--tracking", help="JSON written by init-tracking (default: create/attach here)")
    sp.add_argument("--tag", action="append", default=[], help="extra MLflow tag name=value (repeatable)")
    sp.set_defaults(func=cmd_train)


TRAIN_DESCRIPTION = """Train one job of an experiment: one method, mode, K, variant and seed of its grid.

It writes checkpoint.pt, metrics.json and config.json into the run directory (--out), logs
each epoch to an MLflow child run, and resumes from the run directory's resume.pt if an
earlier attempt left one. The workflow runs every job this way; `snakemake --cores all`
runs them all, with evaluation, tables and figures."""

TRAIN_EXAMPLES = """example, the default experiment's DGL in sync mode, K = 3, seed 0:
  decoupled prepare-data --config config/config.yaml --out results/data/fashion_mnist.pt
  decoupled train --config config/config.yaml --method dgl --mode sync --K 3 --seed 0 \\
      --data results/data/fashion_mnist.pt --out results/runs/dgl/sync/K3/default/seed0

again, from the job config a run wrote:
  decoupled train --job-json "$(cat results/runs/dgl/sync/K3/default/seed0/config.json)" \\
      --data results/data/fashion_mnist.pt --out /tmp/dgl-again"""


def _evaluate_command(sub) -> None:
    sp = sub.add_parser("evaluate", help="test accuracy of every head of trained runs")
    sp.add_argument("--run", required=True, nargs="+", help="run directories holding checkpoint.pt")
    sp.add_argument("--data", required=True, help="prepared dataset file")
    sp.add_argument("--out", required=True, nargs="+", help="JSON file to write per run, in the order of --run")
    sp.add_argument("--tracking", help="JSON written by init-tracking; logs the results to each run")
    sp.set_defaults(func=cmd_evaluate)


def _report_command(sub) -> None:
    sp = sub.add_parser("report", help="tables and figures from finished runs")
    runs = sp.add_mutually_exclusive_group(required=True)
    runs.add_argument("--runs", nargs="+", help="run directories")
    runs.add_argument("--metrics", nargs="+", help="the runs' metrics.json files (what the workflow's report rule has as inputs)")
    sp.add_argument("--tables", required=True, help="directory for the tables (.csv, .md, .tex, .html)")
    sp.add_argument("--figures", required=True, help="directory for PNG/PDF figures")
    # No default here: the package's default is imported with the report, not on every command.
    sp.add_argument("--target-accuracy", type=float,
                    help="test accuracy (a fraction) whose time to reach the tables give (default: the config schema's)")
    sp.add_argument("--tracking", help="JSON written by init-tracking; attaches the outputs to the parent run")
    sp.add_argument("--config-json", help="with --tracking: the experiment config (JSON), whose parent run gets the outputs and the runs")
    sp.set_defaults(func=cmd_report)


def _workflow_state_command(sub) -> None:
    sp = sub.add_parser("workflow-state", help="the workflow's start and end, on its MLflow parent run (Snakemake's onstart/onsuccess/onerror)")
    sp.add_argument("--tracking", required=True, help="JSON written by init-tracking")
    group = sp.add_mutually_exclusive_group(required=True)
    group.add_argument("--config", help="experiment config YAML file, whose parent run it is")
    group.add_argument("--config-json", help="the same as JSON (what the workflow passes)")
    sp.add_argument("--state", required=True, choices=["started", "succeeded", "failed"], help="started: RUNNING; succeeded: FINISHED; failed: FAILED")
    sp.add_argument("--runs-dir", required=True, help="the experiment's run directories' folder: RUNNING runs under it are orphans once it has ended")
    sp.add_argument("--log", default="Snakemake's log", help="where the workflow's log is (named in the parent's error tag)")
    sp.set_defaults(func=cmd_workflow_state)


def _relocate_command(sub) -> None:
    sp = sub.add_parser("relocate", help="after moving or copying results/: point a SQLite store at the artifacts beside it")
    sp.add_argument("store", help="the store's file (results/mlflow/mlflow.db) or its sqlite:/// URI")
    sp.set_defaults(func=cmd_relocate)


JOB_LOG_ENV = "DECOUPLED_JOB_LOG"  # set by the workflow's rules: the job's log, for tracebacks


def _keep_traceback() -> None:
    """The traceback of the exception at hand, appended to the job's log (not the terminal)."""
    import traceback

    from decoupled.credentials import redact

    log = os.environ.get(JOB_LOG_ENV)
    if log:
        with contextlib.suppress(OSError):  # a full disk: the one line will do
            with open(log, "a") as f:
                f.write(redact(traceback.format_exc()))


def main(argv: list[str] | None = None) -> int:
    from decoupled.credentials import redact
    from decoupled.errors import EnvironmentFault, environment_cause

    args = parser().parse_args(argv)
    try:
        try:
            args.func(args)
        except UserError:
            raise
        except Exception as e:  # a fault of the machine deep inside torch, MLflow or a write
            cause = environment_cause(e)
            if cause is None:
                raise
            raise EnvironmentFault(cause) from e
    except UserError as e:
        if isinstance(e, EnvironmentFault):
            _keep_traceback()
        try:
            print(f"decoupled: error: {redact(str(e))}", file=sys.stderr)
        except BrokenPipeError:  # e.g. a SIGTERM to the whole job stopped the `tee` we write to
            pass
        return getattr(e, "exit_code", 2)  # 75 for a terminated job that may be run again
    except KeyboardInterrupt:  # Ctrl-C: the job has cleaned up (a training job: its run FAILED, "interrupted")
        with contextlib.suppress(BrokenPipeError):
            print("decoupled: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it
    except Exception:  # a bug: its traceback, as Python prints it, but with no password in it
        import traceback

        with contextlib.suppress(BrokenPipeError):
            sys.stderr.write(redact(traceback.format_exc()))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
