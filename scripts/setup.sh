#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine (Python >= 3.11, no conda needed):
#   - Fashion-MNIST from Debian's package dataset-fashion-mnist, where apt is available
#     (elsewhere the data is downloaded through torchvision on first use);
#   - a virtual environment .venv with this package, Snakemake and pytest.
# Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-python3}"
packages=()
[ -d /usr/share/datasets/fashion-mnist ] || packages+=(dataset-fashion-mnist)
# Debian's own python3 has no venv/ensurepip until python3-venv is installed.
"$python" -c "import ensurepip, venv" 2>/dev/null || packages+=(python3-venv)
if [ ${#packages[@]} -gt 0 ] && command -v apt-get >/dev/null; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "setup: installing ${packages[*]} with apt-get" >&2
    if ! { $sudo apt-get update -qq && $sudo apt-get install -y -qq "${packages[@]}"; } >&2; then
        echo "setup: warning: apt-get failed; without dataset-fashion-mnist the data is downloaded by torchvision" >&2
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
