#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine (Python >= 3.11, no conda needed):
#   - Fashion-MNIST from Debian's package dataset-fashion-mnist, where apt is available
#     (elsewhere the data is downloaded through torchvision on first use);
#   - a virtual environment .venv with this package, Snakemake and pytest;
#   - with --test-services, also the Debian servers the tests start and stop themselves:
#     SLURM (slurmctld, slurmd, slurmdbd, munge) with MariaDB for its accounting, and
#     PostgreSQL (MLflow's server mode). CI runs `scripts/setup.sh --test-services`.
# Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-python3}"
packages=()
if [ "${1:-}" = "--test-services" ]; then
    for tool in slurmctld:slurm-wlm slurmdbd:slurmdbd munged:munge mariadbd:mariadb-server; do
        command -v "${tool%%:*}" >/dev/null || [ -x "/usr/sbin/${tool%%:*}" ] || packages+=("${tool#*:}")
    done
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || packages+=(postgresql)
fi
[ -d /usr/share/datasets/fashion-mnist ] || packages+=(dataset-fashion-mnist)
# Debian's own python3 has no venv/ensurepip until python3-venv is installed.
"$python" -c "import ensurepip, venv" 2>/dev/null || packages+=(python3-venv)
if [ ${#packages[@]} -gt 0 ] && command -v apt-get >/dev/null; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "setup: installing ${packages[*]} with apt-get" >&2
    if ! { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}"; } >&2; then
        echo "setup: warning: apt-get failed: without dataset-fashion-mnist the data is downloaded by torchvision; without their servers the SLURM and PostgreSQL tests skip" >&2
    fi
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $python" >&2
    "$python" -m venv .venv
fi
echo "setup: installing the package and its dependencies into .venv" >&2
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
echo "setup: done. Activate with: . .venv/bin/activate" >&2
