"""Glue for running the workflow through Snakemake's SLURM executor (workflow/profiles/slurm).

Imported by workflow/rules/common.smk; needs neither torch nor the plugin itself.

snakemake-executor-plugin-slurm (2.8.0) reads each job's state from ``sacct --parsable2`` and
compares it as is with the states that mean failure. sacct writes a job that someone
``scancel``-ed as ``CANCELLED by <uid>``, which matches none of them, so the plugin takes the
job for still running and Snakemake waits for it for ever. :func:`patch_status_query` wraps the
plugin's query so that every state is cut to its first word: the job then fails with
"SLURM status is: 'CANCELLED'" and Snakemake cleans up and exits as after any failed job.
"""

from __future__ import annotations

import sys

PLUGIN = "snakemake_executor_plugin_slurm"


def base_state(state: str) -> str:
    """SLURM's job state without its detail: 'CANCELLED by 0' -> 'CANCELLED'."""
    words = state.split()
    return words[0] if words else state


def patch_status_query() -> bool:
    """Make the SLURM plugin's status query return base states; True if it was patched now.

    Does nothing when the plugin has not been loaded (Snakemake loads its executor plugins
    before it reads the workflow), lacks the function, or is patched already.
    """
    plugin = sys.modules.get(PLUGIN)
    query = getattr(plugin, "query_job_status", None)
    if query is None or getattr(query, "base_states", False):
        return False

    async def query_job_status(command, logger):
        states, seconds = await query(command, logger)
        if states is not None:
            states = {job: base_state(state) for job, state in states.items()}
        return states, seconds

    query_job_status.base_states = True
    query_job_status.__wrapped__ = query
    plugin.query_job_status = query_job_status
    return True
