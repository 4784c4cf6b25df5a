"""Mutation testing of the code that only runs inside torchrun's worker processes.

mutmut finds which tests cover a function by recording calls in the test process; the
distributed engine's functions run in workers that torchrun starts, so mutmut lists their
mutants as "no tests". A mutant is switched on by the environment variable
MUTANT_UNDER_TEST, which the workers inherit: this script takes a seeded random sample of
those mutants (after `scripts/mutation-test.sh` has written mutants/) and runs the
distributed engine's tests on each, in mutants/. A mutant is killed when a test fails.
Writes results/mutation/through_torchrun.json (through_torchrun_named.json for named mutants).

    .venv/bin/python scripts/mutation_through_torchrun.py --sample 20 [--seed 0]
    .venv/bin/python scripts/mutation_through_torchrun.py MUTANT...   # these mutants instead
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULES = ("decoupled.engines.distributed.", "decoupled.engines.channels.")
TESTS = ["tests/test_distributed.py", "-k", "not workflow and not outside_torchrun and not pinning and not keep_cores"]


def worker_mutants() -> list[str]:
    """Every mutant of the modules that run inside the workers (mutmut lists them as "no tests")."""
    listing = subprocess.run([str(REPO / ".venv/bin/mutmut"), "results", "--all", "true"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
    return sorted(m[1] for m in re.finditer(r"^\s*(\S+): ", listing, re.M) if m[1].startswith(MODULES))


def run_tests(mutant: str, timeout_s: float) -> tuple[str, float, str]:
    env = {**os.environ, "MUTANT_UNDER_TEST": mutant, "MLFLOW_DISABLE_TELEMETRY": "true",
           "PYTHONPATH": str(REPO / "mutants/src")}  # the mutated copy, not the installed package
    command = [str(REPO / ".venv/bin/python"), "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *TESTS]
    start = time.monotonic()
    try:
        done = subprocess.run(command, cwd=REPO / "mutants", env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - start, ""
    failed = re.findall(r"^FAILED (\S+)", done.stdout, re.M)
    return ("survived" if done.returncode == 0 else "killed"), time.monotonic() - start, ",".join(failed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mutants", nargs="*", help="these mutants instead of a sample")
    parser.add_argument("--sample", type=int, default=20, help="how many mutants to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=900, help="per mutant (a hung worker times out)")
    args = parser.parse_args()
    if not (REPO / "mutants").is_dir():
        sys.exit("mutation_through_torchrun: run scripts/mutation-test.sh first (it writes mutants/)")
    # today's tests (mutmut copied them when it last ran; the tests find the package beside them)
    shutil.copytree(REPO / "tests", REPO / "mutants/tests", dirs_exist_ok=True)
    # the setup check mutmut makes too: with MUTANT_UNDER_TEST=fail every mutated function raises
    if run_tests("fail", args.timeout_s)[0] != "killed":
        sys.exit("mutation_through_torchrun: the tests pass with every function failing: the workers do not run mutants/")
    candidates = worker_mutants()
    sample = args.mutants or random.Random(args.seed).sample(candidates, min(args.sample, len(candidates)))
    out = REPO / "results/mutation" / ("through_torchrun_named.json" if args.mutants else "through_torchrun.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, mutant in enumerate(sample, 1):
        status, seconds, failed = run_tests(mutant, args.timeout_s)
        rows.append({"mutant": mutant, "status": status, "seconds": round(seconds, 1), "failed_tests": failed})
        print(f"[{i}/{len(sample)}] {mutant}: {status} ({seconds:.0f} s) {failed}", flush=True)
        counts = {s: sum(r["status"] == s for r in rows) for s in ("killed", "survived", "timeout")}
        # after each mutant, so that a run stopped part-way keeps what it measured
        out.write_text(json.dumps({"candidates": len(candidates), "seed": args.seed, "counts": counts, "mutants": rows}, indent=1))
    print("mutation_through_torchrun:", counts, f"of {len(candidates)} candidates ({out.relative_to(REPO)})")


if __name__ == "__main__":
    main()
