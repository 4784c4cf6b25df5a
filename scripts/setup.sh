#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine (Python >= 3.11, no conda needed):
#   - Fashion-MNIST from Debian's package dataset-fashion-mnist, where apt is available
#     (elsewhere the data is downloaded through torchvision on first use);
#   - a virtual environment .venv with this package, Snakemake and pytest;
#   - with --test-services, also the Debian servers the tests start and stop themselves:
#     SLURM (slurmctld, slurmd, slurmdbd, munge) with MariaDB for its accounting, PostgreSQL
#     (MLflow's server mode), and chromium, the browser of the MLflow UI test. CI runs
#     `scripts/setup.sh --test-services`, which then fails when apt-get cannot install them
#     (CI's tests fail rather than skip without them).
# Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-python3}"
packages=()
test_services=0
if [ "${1:-}" = "--test-services" ]; then
    test_services=1
    for tool in slurmctld:slurm-wlm slurmdbd:slurmdbd munged:munge mariadbd:mariadb-server; do
        command -v "${tool%%:*}" >/dev/null || [ -x "/usr/sbin/${tool%%:*}" ] || packages+=("${tool#*:}")
    done
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || packages+=(postgresql)
    command -v chromium >/dev/null || packages+=(chromium)
fi
[ -d /usr/share/datasets/fashion-mnist ] || packages+=(dataset-fashion-mnist)
# Debian's own python3 has no venv/ensurepip until python3-venv is installed.
"$python" -c "import ensurepip, venv" 2>/dev/null || packages+=(python3-venv)
if [ ${#packages[@]} -gt 0 ] && command -v apt-get >/dev/null; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "setup: installing ${packages[*]} with apt-get" >&2
    if ! { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}"; } >&2; then
        if [ "$test_services" = 1 ]; then  # the tests need them all: stop here, saying so
            echo "setup: error: apt-get could not install ${packages[*]}; the tests need them (CI fails what would skip)" >&2
            exit 1
        fi
        echo "setup: warning: apt-get failed: without dataset-fashion-mnist the data is downloaded by torchvision" >&2
    fi
elif [ ${#packages[@]} -gt 0 ] && [ "$test_services" = 1 ]; then
    echo "setup: error: no apt-get to install ${packages[*]}, which the tests need; install them by hand" >&2
    exit 1
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $python" >&2
    "$python" -m venv .venv
fi
echo "setup: installing the package and its dependencies into .venv" >&2
.venv/bin/python -m pip install --quiet --upgrade pip
# the versions the tests ran with (envs/pins.txt, which the conda envs pin too)
.venv/bin/python -m pip install --quiet -c envs/pins.txt -e '.[test]'
echo "setup: done. Activate with: . .venv/bin/activate" >&2
