import os
import socket
from pathlib import Path

import pytest

from no_skips_in_ci import pytest_runtest_makereport  # noqa: F401  (a hook: CI fails what would skip)

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

REPO = Path(__file__).resolve().parents[1]
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

needs_fashion_mnist = pytest.mark.skipif(
    not FASHION_DIR.is_dir(), reason="Fashion-MNIST not installed (scripts/setup.sh installs dataset-fashion-mnist)"
)


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def fashion_subset(tmp_path_factory):
    """A class-balanced subset of the real Fashion-MNIST, prepared once per test session."""
    if not FASHION_DIR.is_dir():
        pytest.skip("Fashion-MNIST not installed (scripts/setup.sh installs dataset-fashion-mnist)")
    from decoupled.data import prepare

    out = tmp_path_factory.mktemp("data") / "fashion_mnist.pt"
    prepare("fashion_mnist", out, subset_per_class=200, test_subset_per_class=100)
    return out
