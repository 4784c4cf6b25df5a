# Creates the MLflow store, experiment and parent run once, before any training job: done by
# many jobs at once it loses runs (see decoupled/tracking.py).
# A local rule under a cluster executor (a second of work, not worth a place in the queue).
rule init_tracking:
    localrule: True
    output:
        TRACKING,
    params:
        experiment=config["experiment"],
        tracking_uri=config["tracking_uri"],
    log:
        f"{RESULTS}/logs/init_tracking.log",
    conda:
        "../../envs/tracking.yaml"
    shell:
        "python -m decoupled init-tracking --experiment {params.experiment:q} --tracking-uri {params.tracking_uri:q} --out {output} 2>&1 | tee {log}"
