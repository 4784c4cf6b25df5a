rule evaluate:
    input:
        data=PREPARED,
        tracking=TRACKING,
        checkpoint=f"{RUN_DIR}/checkpoint.pt",
    output:
        f"{RUN_DIR}/eval.json",
    log:
        f"{RESULTS}/logs/evaluate/{{method}}_{{mode}}_K{{K}}_{{variant}}_seed{{seed}}.log",
    conda:
        "../../envs/train.yaml"
    params:
        run_dir=lambda wildcards, input: Path(input.checkpoint).parent,
    shell:
        "DECOUPLED_JOB_LOG={log:q} python -m decoupled evaluate --run {params.run_dir} --data {input.data} --tracking {input.tracking}"
        " --out {output} 2>&1 | tee -a {log}"
