#!/usr/bin/env bash
# Mutation testing of src/decoupled/methods/, engines/, quantize.py and the batches engines draw
# (data/batches.py, data/folders.py) with mutmut (PyPI).
# mutmut changes one thing at a time in those files (an operator, a constant, a call left out)
# and runs the tests that cover the changed function; a mutant that every test still passes
# (a *survivor*) is a behaviour no test pins: kill it with a test, or explain why it is
# equivalent. Not part of CI: on 2 cores it takes hours. Settings: [tool.mutmut] in
# pyproject.toml. Writes mutants/ (scratch) and results/mutation/{results.txt,summary.json}.
#   scripts/mutation-test.sh              # everything, resuming where a killed run stopped
#   scripts/mutation-test.sh 'decoupled.methods.dni*'   # only the mutants whose names match
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
[ -x "$python" ] || { echo "mutation-test: run scripts/setup.sh first" >&2; exit 1; }
"$python" -m pip show mutmut >/dev/null 2>&1 || "$python" -m pip install --quiet 'mutmut==3.8.1'
export MLFLOW_DISABLE_TELEMETRY=true PYTHONDONTWRITEBYTECODE=1
.venv/bin/mutmut run --max-children "${MUTMUT_CHILDREN:-2}" "$@"
mkdir -p results/mutation
.venv/bin/mutmut results --all true > results/mutation/results.txt
"$python" - <<'PY'
import collections, json, re
counts = collections.Counter()
for line in open("results/mutation/results.txt"):
    if match := re.match(r"\s*(\S+): (\w[\w ]*)$", line):
        counts[match[2]] += 1
json.dump(dict(counts), open("results/mutation/summary.json", "w"), indent=1)
print("mutation-test:", ", ".join(f"{n} {status}" for status, n in counts.most_common()), "(results/mutation/results.txt)")
PY
