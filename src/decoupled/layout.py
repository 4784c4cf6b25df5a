"""Where the workflow's outputs live, named once for the workflow and the package alike.

Imports nothing heavy: Snakemake reads it to list its outputs, in an environment that may
have neither torch nor pandas.
"""

# Every table is written as .csv, .md and .tex; every figure as .png and .pdf.
TABLE_NAMES = ["summary", "main"]
TABLE_FORMATS = ["csv", "md", "tex"]
FIGURE_NAMES = ["test_acc_vs_epoch", "acc_vs_wall_time", "layerwise_acc", "acc_vs_slowdown", "acc_vs_buffer_size", "acc_vs_K"]
FIGURE_FORMATS = ["png", "pdf"]
