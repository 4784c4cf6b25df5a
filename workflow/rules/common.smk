# Shared set-up and input functions. The grid logic lives in the package (decoupled.grid),
# imported from src/ so that the workflow and the CLI agree on every job; it needs only
# pyyaml and jsonschema, which Snakemake itself depends on.
import functools
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.settings.types import DeploymentMethod
from snakemake.utils import validate

REPO = Path(workflow.basedir)
sys.path.insert(0, str(REPO / "src"))

from decoupled import claims as decoupled_claims  # noqa: E402
from decoupled import engines as decoupled_engines  # noqa: E402
from decoupled import grid as decoupled_grid  # noqa: E402
from decoupled import rundir as decoupled_rundir  # noqa: E402
from decoupled.code_version import training_code_hash  # noqa: E402
from decoupled.config import describe  # noqa: E402
from decoupled.credentials import without_password  # noqa: E402
from decoupled.errors import UserError  # noqa: E402
from decoupled.layout import FIGURE_FORMATS, FIGURES, TABLE_FORMATS, TABLES, figures_for, tables_for  # noqa: E402
from decoupled.slurm import patch_status_query  # noqa: E402
from decoupled.tracking import digest as config_digest_of  # noqa: E402

# Under the SLURM executor (workflow/profiles/slurm): a scancel-ed job fails the workflow
# instead of being waited for for ever (see decoupled/slurm.py).
patch_status_query()


def _braced(text):
    """``text`` as Snakemake's formatting of a shell line gives it back (braces doubled)."""
    return text.replace("{", "{{").replace("}", "}}")


# Jobs run `python -m decoupled` with the package taken from this checkout (PYTHONPATH) and the
# interpreter from --use-conda's env if any, else the one running Snakemake (its bin/ first
# on PATH, so an unactivated venv works too). A shell prefix, so that cluster jobs, which
# re-read this file, get the same. Every value on a shell line is quoted (paths: `{x:q}`).
_prefix = [
    "set -euo pipefail;",
    _braced(f'export PYTHONPATH={shlex.quote(str(REPO / "src"))}"${{PYTHONPATH:+:$PYTHONPATH}}" MLFLOW_DISABLE_TELEMETRY=true;'),
]
if DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method:
    _prefix.append(_braced(f'export PATH={shlex.quote(str(Path(sys.executable).parent))}":$PATH";'))
# Snakemake in a terminal: each job draws its progress bar there, not into its log (see
# decoupled/progress.py).
if sys.stderr.isatty() and "DECOUPLED_PROGRESS" not in os.environ:
    _prefix.append("export DECOUPLED_PROGRESS=tty;")
shell.prefix(" ".join(_prefix) + " ")

try:
    validate(config, schema="../../config/schema.yaml")
except WorkflowError as e:
    # Snakemake's message holds the whole schema; keep one line that names the key.
    cause = e.__context__  # the jsonschema ValidationError it was raised from
    raise WorkflowError(describe(cause) if hasattr(cause, "absolute_path") else str(e).splitlines()[0]) from None

# A password in the store's URI is used, never written or printed (decoupled/credentials.py):
# from here on the URI is without it, and the jobs get it in their environment.
_given_uri, config["tracking_uri"] = config["tracking_uri"], without_password(config["tracking_uri"])
# The experiment config, which the training jobs are computed from and the parent run carries
# as params: in the jobs' environment (local jobs inherit it; cluster jobs re-read this file),
# so that no shell line Snakemake prints holds it, and not a param of init_tracking, so that a
# config change does not re-run init_tracking and with it every job.
os.environ.update(DECOUPLED_EXPERIMENT_CONFIG=json.dumps(config, sort_keys=True))

try:
    RUNS = decoupled_grid.runs(config)
    SWEPT = decoupled_grid.swept_axes(config)  # the axes some run varies: their sweep figures
    CLOCKS = decoupled_grid.clocks(config)  # the clocks of its engines: their time figures
    decoupled_claims.of(config, RUNS)  # a claim (report.claims) the grid cannot evaluate is refused now
except UserError as e:
    raise WorkflowError(str(e)) from None

RESULTS = config["output_dir"]
# `snakemake --report` reads the outputs on disk: under another experiment's --configfile (or
# none) it would label that experiment's figures with this one's description and config.
if any(arg == "--report" or arg.startswith("--report=") for arg in sys.argv[1:]):
    if _given_uri != config["tracking_uri"]:  # Snakemake copies the config files into the report
        raise WorkflowError(
            "--report: the config file's tracking_uri holds a password, which the report would show with the config file;"
            " give it as PGPASSWORD, ~/.pgpass or MLFLOW_TRACKING_PASSWORD instead (docs/tracking.md, Passwords)"
        )
    if not any(Path(f"{RESULTS}/{key.path}/metrics.json").is_file() for key in RUNS):
        raise WorkflowError(
            f"--report: experiment '{config['experiment']}' has none of its {len(RUNS)} runs under {RESULTS}/runs/;"
            " give the --configfile it was run with"
        )
DATASET = config["dataset"]["name"]
PREPARED = f"{RESULTS}/data/{DATASET}.pt"
TRACKING = f"{RESULTS}/mlflow/experiment.json"
# The store the jobs log to: MLFLOW_TRACKING_URI wins over the config (as in decoupled.tracking).
TRACKING_URI = without_password(os.environ.get("MLFLOW_TRACKING_URI") or config["tracking_uri"])
# A SQLite store that init_tracking made and that is gone or another now: said before any job
# runs (or "Nothing to be done" hides it); other stores are asked by the onstart hook.
if TRACKING_URI.startswith("sqlite:///") and Path(TRACKING).is_file():
    from decoupled.files import read_json  # noqa: E402
    from decoupled.tracking import check_store  # noqa: E402

    try:
        _made = read_json(TRACKING)
        if _made.get("tracking_uri") == TRACKING_URI:  # else init_tracking runs again, for the new store
            check_store(_made, TRACKING)
    except UserError as e:
        raise WorkflowError(str(e)) from None
RUN_DIR = f"{RESULTS}/runs/{{method}}/{{mode}}/K{{K}}/{{variant}}/seed{{seed}}"
PLOT_CODE = sorted([str(p) for p in (REPO / "src/decoupled/report").glob("*.py")] + [str(REPO / "src/decoupled/claims.py")])


wildcard_constraints:
    method=r"[a-z0-9_]+",
    mode=r"[a-z]+",
    K=r"\d+",
    variant=r"[A-Za-z0-9._]+",
    seed=r"\d+",


def run_key(wildcards):
    return decoupled_grid.RunKey(wildcards.method, wildcards.mode, int(wildcards.K), int(wildcards.seed), wildcards.variant)


@functools.cache
def _job(key):
    """The resolved config of one job, computed once for all the input functions that read it."""
    return decoupled_grid.job_config(config, key)


def job_json(wildcards):
    """The resolved config of one job, as JSON: a param, so that a change of it re-runs the job
    (the job computes it again from $DECOUPLED_EXPERIMENT_CONFIG and its wildcards)."""
    return json.dumps(_job(run_key(wildcards)), sort_keys=True)


def training_code(wildcards):
    """A hash of the package code a training job runs (shared code + its method's files): a
    param, so that editing that code re-runs the job (see decoupled/code_version.py)."""
    return training_code_hash(wildcards.method)


def job_threads(wildcards):
    return decoupled_grid.job_threads(_job(run_key(wildcards)))


def job_gpus(wildcards):
    """GPUs a job uses: one per process on cuda."""
    job = _job(run_key(wildcards))
    return decoupled_engines.of(job).gpus(job)


def launcher(wildcards):
    """What starts a training job: `python -m decoupled`, or, for an engine of several processes,
    its launcher (torchrun, one worker process per module, each running the same command)."""
    job = _job(run_key(wildcards))
    return shlex.join(decoupled_engines.of(job).command(job))


def job_args(wildcards):
    """The job's place in the grid, as `decoupled train` takes it with the experiment config,
    and MLflow tags naming the rule and its wildcards, so a run can be traced to its job."""
    key = run_key(wildcards)
    place = {"--method": key.method, "--mode": key.mode, "--K": key.K, "--seed": key.seed, "--variant": key.variant}
    wc = ",".join(f"{k}={v}" for k, v in wildcards.items())
    return shlex.join([str(x) for option in place.items() for x in option] + ["--tag", "rule=train", "--tag", f"wildcards={wc}"])


def run_dirs():
    return [f"{RESULTS}/{key.path}" for key in RUNS]


def config_digest():
    """A short digest of the experiment config: a param, so that a config change re-runs the
    report (the parent run carries the config the report was made from, and a changed config
    gets a parent run of its own, see decoupled/tracking.py) without the config itself, or the
    run list, in the params that `snakemake --report` prints under every table and figure."""
    return config_digest_of(config)


def report_tables():
    tables = tables_for(config["report"])
    return [f"{RESULTS}/tables/{table.name}.{ext}" for table in tables for ext in TABLE_FORMATS]


def report_figures():
    """The figures the report writes: a sweep figure only when the grid sweeps its axis, a time
    figure only when one of its engines keeps its clock."""
    return [f"{RESULTS}/figures/{figure.name}.{ext}" for figure in figures_for(SWEPT, CLOCKS) for ext in FIGURE_FORMATS]


def report_outputs():
    return [*report_tables(), *report_figures()]


# How `snakemake --report` shows each table and figure (decoupled/layout.py): its subcategory
# and the name in its list; the caption is workflow/report/{name}.rst.
REPORT_ENTRIES = {output.name: (output.subcategory, output.title) for output in TABLES + FIGURES}
# Shown as the "format" label, in alphabetical order: HTML first ("raw CSV" after it), PNG
# before "vector PDF", so that the report opens a table as HTML and a figure as PNG.
REPORT_FORMATS = {"html": "HTML", "csv": "raw CSV", "md": "Markdown", "tex": "LaTeX", "png": "PNG", "pdf": "vector PDF"}


def for_report(paths, category, kind):
    """``paths`` marked for `snakemake --report`, each with its caption, subcategory and labels."""
    marked = []
    for path in paths:
        name, ext = Path(path).stem, Path(path).suffix[1:]
        subcategory, title = REPORT_ENTRIES[name]
        labels = {kind: title, "format": REPORT_FORMATS.get(ext, ext)}
        caption = REPO / f"workflow/report/{name}.rst"
        caption = str(caption) if caption.is_file() else None
        marked.append(report(path, caption=caption, category=category, subcategory=subcategory, labels=labels))
    return marked


# The parent run follows the workflow: RUNNING while Snakemake runs jobs, FINISHED or FAILED
# when it ends (with its log named), and runs still RUNNING under results/runs/ then (their
# process was killed) FAILED: no run is left RUNNING after any workflow.
def _hook_python():
    """An interpreter with the package's dependencies: Snakemake's own, or under --use-conda
    the tracking (else train, report) rule's env once Snakemake has made it."""
    if DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method:
        return sys.executable
    envs = {
        Path(str(env.file)).name: Path(env.address) / "bin/python"
        for env in getattr(getattr(workflow, "dag", None), "conda_envs", {}).values()
    }
    for name in ("tracking.yaml", "train.yaml", "report.yaml"):
        if name in envs and envs[name].exists():
            return str(envs[name])
    return None


_HELD = []  # the output folder's lock, held by this Snakemake process until it ends


def hold_output_dir():
    """Stop, before any job, if another workflow writes this output_dir (another working
    directory with the same absolute output_dir: Snakemake locks only its own)."""
    try:
        _HELD.append(decoupled_rundir.hold_output_dir(RESULTS))
    except UserError as e:
        raise WorkflowError(str(e)) from None


def workflow_state(state, log=None):
    """Run `decoupled workflow-state`; at the start, its failure (the store is gone, say) stops
    the workflow before any job runs."""
    log = ", ".join(map(str, log)) if isinstance(log, (list, tuple)) else log  # a list in Snakemake 9
    if not Path(TRACKING).is_file():
        return  # init_tracking has not run: it makes the parent run of this config
    python = _hook_python()
    if python is None:
        print(f"decoupled: the MLflow parent run stays as it is: no conda env of this workflow is built yet", file=sys.stderr)
        return
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    command = [
        python,
        "-m",
        "decoupled",
        "workflow-state",
        "--tracking",
        TRACKING,
        "--config-json",
        json.dumps(config, sort_keys=True),
        "--state",
        state,
        "--runs-dir",
        f"{RESULTS}/runs",
        "--log",
        str(log or "the terminal"),
    ]
    # a failure prints its one line; at the end, the workflow's own result stands
    if subprocess.run(command, env=env).returncode != 0 and state == "started":
        raise WorkflowError("the MLflow parent run of this config could not be opened (above); no job was started")
