# Creates the MLflow store, experiment and parent run once, before any training job: done by
# many jobs at once it loses runs (see decoupled/tracking.py).
# Only the experiment's name and store are its params: every job depends on its output, so
# its re-running re-runs them all. The store is the one the jobs use (MLFLOW_TRACKING_URI, if
# set, wins over the config), so the command Snakemake prints names it, and another store gets
# the runs logged to it. The parent run it creates carries the experiment config as
# params all the same: the config comes in $DECOUPLED_EXPERIMENT_CONFIG (common.smk), which
# Snakemake does not watch; the report gives a changed config a parent run of its own.
# A local rule under a cluster executor (a second of work, not worth a place in the queue).
rule init_tracking:
    output:
        TRACKING,
    log:
        f"{RESULTS}/logs/init_tracking.log",
    localrule: True
    conda:
        "../../envs/tracking.yaml"
    params:
        experiment=config["experiment"],
        tracking_uri=TRACKING_URI,
    shell:
        "DECOUPLED_JOB_LOG={log:q} python -m decoupled init-tracking --experiment {params.experiment:q} --tracking-uri {params.tracking_uri:q}"
        ' --describe-json "$DECOUPLED_EXPERIMENT_CONFIG" --out {output:q} 2>&1 | tee -a {log:q}'
