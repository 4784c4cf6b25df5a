# The plot code is an input, so editing it re-runs this rule alone: training outputs do not
# depend on it. The runs are those of the metrics.json inputs; the config reaches the command
# in $DECOUPLED_EXPERIMENT_CONFIG (common.smk).
rule report:
    input:
        metrics=expand("{run}/metrics.json", run=run_dirs()),
        evals=expand("{run}/eval.json", run=run_dirs()),
        tracking=TRACKING,
        plot_code=PLOT_CODE,
    output:
        tables=for_report(report_tables(), "Tables", "table"),
        figures=for_report(report_figures(), "Figures", "figure"),
    log:
        f"{RESULTS}/logs/report.log",
    conda:
        "../../envs/report.yaml"
    params:
        tables=lambda wildcards, output: Path(output.tables[0]).parent,
        figures=lambda wildcards, output: Path(output.figures[0]).parent,
        target_accuracy=config["report"]["target_accuracy"],
        config_digest=config_digest(),
    shell:
        "DECOUPLED_JOB_LOG={log:q} python -m decoupled report --metrics {input.metrics:q} --tables {params.tables:q} --figures {params.figures:q}"
        " --target-accuracy {params.target_accuracy}"
        ' --tracking {input.tracking:q} --config-json "$DECOUPLED_EXPERIMENT_CONFIG" 2>&1 | tee -a {log:q}'
