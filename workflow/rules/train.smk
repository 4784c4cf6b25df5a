rule train:
    input:
        data=PREPARED,
        tracking=TRACKING,
    output:
        checkpoint=f"{RUN_DIR}/checkpoint.pt",
        metrics=f"{RUN_DIR}/metrics.json",
        config=f"{RUN_DIR}/config.json",
    log:
        f"{RESULTS}/logs/train/{{method}}_{{mode}}_K{{K}}_{{variant}}_seed{{seed}}.log",
    conda:
        "../../envs/train.yaml"
    threads: job_threads
    resources:
        gpu=job_gpus,
    params:
        job=job_json,
        code=training_code,
        tags=run_tags,
        run_dir=lambda wildcards, output: Path(output.metrics).parent,
        launcher=launcher,
    shell:
        "DECOUPLED_JOB_LOG={log:q} {params.launcher} train --job-json {params.job:q} --data {input.data} --tracking {input.tracking}"
        " --out {params.run_dir} {params.tags} 2>&1 | tee -a {log}"
