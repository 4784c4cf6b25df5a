# One training job: `decoupled train` computes its config from the experiment config (in
# $DECOUPLED_EXPERIMENT_CONFIG, see common.smk) and its place in the grid, so that the shell
# line Snakemake prints is short and holds no config; the resolved job is a param all the same,
# so that a change of it re-runs the job.
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
        args=job_args,
        run_dir=lambda wildcards, output: Path(output.metrics).parent,
        launcher=launcher,
    shell:
        'DECOUPLED_JOB_LOG={log:q} {params.launcher} train --config-json "$DECOUPLED_EXPERIMENT_CONFIG" {params.args}'
        " --data {input.data:q} --tracking {input.tracking:q} --out {params.run_dir:q} 2>&1 | tee -a {log:q}"
