# A local rule under a cluster executor: it may download, and compute nodes often have no internet.
rule prepare_data:
    localrule: True
    output:
        PREPARED,
    params:
        dataset=json.dumps(config["dataset"], sort_keys=True),
    log:
        f"{RESULTS}/logs/prepare_data/{DATASET}.log",
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m decoupled prepare-data --dataset-json {params.dataset:q} --out {output} 2>&1 | tee {log}"
