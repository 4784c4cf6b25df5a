# Every run's final checkpoint on the test set, in one job for the whole experiment: a process
# start (torch, MLflow) costs more than evaluating a run, so one start serves them all.
rule evaluate:
    input:
        data=PREPARED,
        tracking=TRACKING,
        checkpoints=expand("{run}/checkpoint.pt", run=run_dirs()),
    output:
        expand("{run}/eval.json", run=run_dirs()),
    log:
        f"{RESULTS}/logs/evaluate.log",
    conda:
        "../../envs/train.yaml"
    params:
        runs=run_dirs(),
    shell:
        "DECOUPLED_JOB_LOG={log:q} python -m decoupled evaluate --run {params.runs:q} --data {input.data:q} --tracking {input.tracking:q}"
        " --out {output:q} 2>&1 | tee -a {log:q}"
