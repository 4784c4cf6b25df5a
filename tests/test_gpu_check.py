"""benchmarks/gpu_check.py: the GPU check's stand-in data and its jobs, run here on the CPU.

What it measures needs a GPU (images/s, utilisation); what it trains and on what data is
tested here: CIFAR-10's shape made from Fashion-MNIST, and the grid's jobs for --epochs.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import needs_fashion_mnist

from decoupled.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_fashion_mnist
def test_the_stand_in_is_fashion_mnist_padded_to_cifars_shape(gpu_check):
    from decoupled.data import read_raw

    data, about = gpu_check.dataset(None, None, 10)
    assert data.train_x.shape == (100, 3, 32, 32) and data.test_x.shape == (10000, 3, 32, 32) and data.num_classes == 10
    assert "stand-in for CIFAR" in about["name"]
    # one channel repeated, a 2-pixel frame of zeros (normalized) around the 28x28 image
    assert torch.equal(data.test_x[:, 0], data.test_x[:, 1]) and torch.equal(data.test_x[:, 0], data.test_x[:, 2])
    raw = read_raw("fashion_mnist", None)
    zero = data.test_x[0, 0, 0, 0]
    assert (data.test_x[:, :, :2] == zero).all() and (data.test_x[:, :, :, -2:] == zero).all()
    inside = data.test_x[:, 0, 2:30, 2:30]
    assert torch.equal(torch.argsort(inside[0].flatten(), stable=True), torch.argsort(raw.test_x[0, 0].float().flatten(), stable=True))
    assert torch.equal(data.test_y, raw.test_y.long())


@needs_fashion_mnist
def test_it_trains_the_grids_jobs_for_the_epochs_asked(tmp_path):
    out = tmp_path / "gpu_check.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--config", "config/smoke.yaml", "--methods", "dgl,fdg",
                    "--K", "2", "--seeds", "0", "--epochs", "2", "--subset-per-class", "20", "--device", "cpu", "--out", str(out)],
                   check=True, cwd=REPO, capture_output=True, timeout=600)
    report = json.loads(out.read_text())
    assert {(job["method"], job["mode"], job["K"]) for job in report["jobs"]} == {(m, mode, 2) for m in ("dgl", "fdg") for mode in ("sync", "async")}
    assert all(len(job["images_per_s_per_epoch"]) == 2 and min(job["images_per_s_per_epoch"]) > 0 for job in report["jobs"])
    assert report["data"]["n_train"] == 200 and "stand-in" in report["data"]["name"]


def test_with_a_cifar_root_it_reads_cifar10_as_it_is(gpu_check, tmp_path, monkeypatch):
    """--cifar-root: the real batches' format (small files written here, their checksums in
    place of the published ones), neither padded nor repeated, normalized per channel."""
    import functools

    from decoupled.data import read_raw

    from test_data import make_cifar

    checksums, arrays = make_cifar(tmp_path)
    monkeypatch.setattr(gpu_check, "read_raw", functools.partial(read_raw, checksums=checksums))
    data, about = gpu_check.dataset(str(tmp_path), None, None)
    assert about["name"] == "CIFAR-10" and data.name == "cifar10"
    assert data.train_x.shape == (50, 3, 32, 32) and data.test_x.shape == (10, 3, 32, 32)
    torch.testing.assert_close(data.train_x.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(data.train_x.std((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    images, labels = arrays["test_batch"]
    # the test images keep their pixels' order: normalization is one increasing map per channel
    assert torch.equal(torch.argsort(data.test_x[3, 1].flatten(), stable=True), torch.argsort(torch.from_numpy(images[3, 1]).float().flatten(), stable=True))
    assert data.test_y.tolist() == labels
    # a config's dataset.normalize (its authors' constants) in place of the statistics
    fixed, _ = gpu_check.dataset(str(tmp_path), None, None, normalize={"mean": [0.5] * 3, "std": [0.25] * 3})
    expected = (torch.from_numpy(images).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(fixed.test_x, expected, atol=1e-5, rtol=0)


def test_with_a_data_root_it_reads_cifar100_and_imagenet32_as_they_are(gpu_check, tmp_path, monkeypatch):
    """--dataset cifar100 / imagenet32 with --data-root: their real formats (small files written
    here), 100 and 1000 classes, ImageNet32's 1-indexed labels from 0, neither padded nor repeated."""
    import functools

    from decoupled.data import read_raw

    from test_datasets_more import make_cifar100, make_imagenet32

    md5s, arrays = make_cifar100(tmp_path / "c100")
    monkeypatch.setattr(gpu_check, "read_raw", functools.partial(read_raw, checksums=md5s))
    data, about = gpu_check.dataset(str(tmp_path / "c100"), None, None, "cifar100")
    assert about["name"] == "CIFAR-100 (fine labels)" and data.name == "cifar100" and data.num_classes == 100
    assert data.test_x.shape[1:] == (3, 32, 32) and data.test_y.tolist() == list(arrays["test"][1])

    sha256s, arrays = make_imagenet32(tmp_path / "i32")
    monkeypatch.setattr(gpu_check, "read_raw", functools.partial(read_raw, checksums=sha256s))
    data, about = gpu_check.dataset(str(tmp_path / "i32"), None, None, "imagenet32")
    assert data.name == "imagenet32" and data.num_classes == 1000 and data.test_y.tolist() == [label - 1 for label in arrays["val_data"][1]]
    monkeypatch.setattr(gpu_check, "read_raw", read_raw)  # no checksum known: refused unless told to trust the files
    with pytest.raises(UserError, match="no checksum known for .*val_data|no checksum known for .*train_data_batch_1"):
        gpu_check.dataset(str(tmp_path / "i32"), None, None, "imagenet32")
    assert gpu_check.dataset(str(tmp_path / "i32"), None, None, "imagenet32", verify_checksums=False)[0].num_classes == 1000


@needs_fashion_mnist
def test_it_streams_an_imagenet_config_from_a_stand_in_folder(tmp_path):
    out = tmp_path / "gpu_check.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--config", "config/paper/dgl_vgg13_imagenet_cpu.yaml", "--methods", "dgl",
                    "--dataset", "imagenet", "--epochs", "1", "--subset-per-class", "10", "--device", "cpu", "--out", str(out)],
                   check=True, cwd=REPO, capture_output=True, timeout=600)
    report = json.loads(out.read_text())
    assert [(job["method"], job["K"]) for job in report["jobs"]] == [("dgl", 4)]
    assert report["data"]["n_train"] == 100 and report["data"]["n_test"] == 100 and "streamed (a stand-in)" in report["data"]["name"]
