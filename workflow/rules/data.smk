# A local rule under a cluster executor: it may download, and compute nodes often have no internet.
rule prepare_data:
    output:
        PREPARED,
    log:
        f"{RESULTS}/logs/prepare_data/{DATASET}.log",
    localrule: True
    conda:
        "../../envs/data.yaml"
    params:
        dataset=json.dumps(config["dataset"], sort_keys=True),
    shell:
        "DECOUPLED_JOB_LOG={log:q} python -m decoupled prepare-data --dataset-json {params.dataset:q} --out {output:q} 2>&1 | tee -a {log:q}"
