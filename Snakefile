# Decoupled training experiments: data -> training -> evaluation -> tables and figures.
# Run `snakemake --cores all` (add `--use-conda` to let Snakemake build the envs in envs/).
# The rules live in workflow/rules/; the work is done by the `decoupled` package's CLI (src/).
from snakemake.utils import min_version

min_version("9.0")


# One meaning per experiment file: `--configfile X` is read as `decoupled ... --config X` reads
# it, X's keys over the schema's defaults (validated in common.smk); the default experiment,
# config/config.yaml, only when no --configfile is given. From any working directory.
if not workflow.overwrite_configfiles:

    configfile: f"{workflow.basedir}/config/config.yaml"


# `snakemake --report results/report.html`: this text, then the figures and tables that
# workflow/rules/report.smk marks for the report, with captions from workflow/report/.
report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/tracking.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        report_outputs(),


onstart:
    hold_output_dir()
    workflow_state("started")


onsuccess:
    workflow_state("succeeded", log)


onerror:
    workflow_state("failed", log)
