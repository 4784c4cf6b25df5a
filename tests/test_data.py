"""Tests for decoupled.data on small files written in the real raw formats."""

from __future__ import annotations

import errno
import gzip
import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from decoupled import data
from decoupled.errors import UserError

FASHION_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_STEMS = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]


# ---------------------------------------------------------------------------------------
# Writers for the raw formats


def write_idx(path: Path, array: np.ndarray, compress: bool) -> str:
    """Write ``array`` as an unsigned-byte IDX file; returns the sha256 of the IDX content."""
    header = struct.pack(">I", 0x800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    content = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(content) if compress else content)
    return hashlib.sha256(content).hexdigest()


def make_fashion(directory: Path, compress: bool = True, n_train: int = 30, n_test: int = 20):
    """Small Fashion-MNIST-like IDX files; returns (checksums, {split: (images, labels)})."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    checksums, arrays = {}, {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        images_stem, labels_stem = FASHION_STEMS[split]
        suffix = ".gz" if compress else ""
        checksums[images_stem] = write_idx(directory / (images_stem + suffix), images, compress)
        checksums[labels_stem] = write_idx(directory / (labels_stem + suffix), labels, compress)
        arrays[split] = (images, labels)
    return checksums, arrays


def make_cifar(parent: Path, per_batch: int = 10):
    """A small ``cifar-10-batches-py`` directory; returns (checksums, {stem: (images, labels)})."""
    rng = np.random.default_rng(1)
    directory = parent / "cifar-10-batches-py"
    directory.mkdir(parents=True)
    checksums, arrays = {}, {}
    for stem in CIFAR_STEMS:
        images = rng.integers(0, 256, size=(per_batch, 3, 32, 32), dtype=np.uint8)
        labels = [i % 10 for i in range(per_batch)]
        batch = {
            b"batch_label": stem.encode(),
            b"labels": labels,
            # the published layout: each row is the red plane, then green, then blue
            b"data": np.concatenate([images[:, c].reshape(per_batch, -1) for c in range(3)], axis=1),
            b"filenames": [f"{stem}_{i}.png".encode() for i in range(per_batch)],
        }
        content = pickle.dumps(batch, protocol=2)
        (directory / stem).write_bytes(content)
        checksums[stem] = hashlib.md5(content).hexdigest()
        arrays[stem] = (images, labels)
    return checksums, arrays


@pytest.fixture
def fashion(tmp_path):
    root = tmp_path / "fashion"
    checksums, arrays = make_fashion(root)
    return root, checksums, arrays


# ---------------------------------------------------------------------------------------
# Reading


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "plain"])
def test_idx_round_trip(tmp_path, compress):
    checksums, arrays = make_fashion(tmp_path, compress=compress)
    raw = data.read_raw("fashion_mnist", tmp_path, checksums=checksums)
    for x, y, (images, labels) in ((raw.train_x, raw.train_y, arrays["train"]), (raw.test_x, raw.test_y, arrays["test"])):
        assert x.dtype == torch.uint8 and x.shape == (len(images), 1, 28, 28)
        assert y.dtype == torch.int64
        assert torch.equal(x[:, 0], torch.from_numpy(images))
        assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))
    assert raw.classes[0] == "T-shirt/top" and len(raw.classes) == 10
    assert raw.source == str(tmp_path)


@pytest.mark.parametrize("point_at", ["parent", "batches_dir"])
def test_cifar_round_trip(tmp_path, point_at):
    checksums, arrays = make_cifar(tmp_path)
    root = tmp_path if point_at == "parent" else tmp_path / "cifar-10-batches-py"
    raw = data.read_raw("cifar10", root, checksums=checksums)
    assert raw.train_x.shape == (50, 3, 32, 32) and raw.test_x.shape == (10, 3, 32, 32)
    assert raw.train_x.dtype == torch.uint8 and raw.train_y.dtype == torch.int64
    first_images, first_labels = arrays["data_batch_1"]
    assert torch.equal(raw.train_x[:10], torch.from_numpy(first_images))
    assert raw.train_y[:10].tolist() == first_labels
    assert torch.equal(raw.test_x, torch.from_numpy(arrays["test_batch"][0]))
    assert raw.classes[0] == "airplane"


def test_cifar_rows_are_channel_major(tmp_path):
    """A pixel written at offset 2*1024 + row*32 + col must land in the blue channel."""
    _, arrays = make_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    batch = pickle.loads(path.read_bytes(), encoding="bytes")
    batch[b"data"][0] = 0
    batch[b"data"][0, 2 * 1024 + 5 * 32 + 7] = 201
    path.write_bytes(pickle.dumps(batch))
    images, _ = data.read_cifar_batch(path)
    assert images[0, 2, 5, 7] == 201
    assert images[0].sum() == 201


def test_fashion_checksum_mismatch_names_the_file(fashion):
    root, checksums, _ = fashion
    checksums = {**checksums, "train-images-idx3-ubyte": "0" * 64}
    with pytest.raises(UserError, match="checksum mismatch") as e:
        data.read_raw("fashion_mnist", root, checksums=checksums)
    message = str(e.value)
    assert str(root / "train-images-idx3-ubyte.gz") in message and "\n" not in message
    # and the check can be turned off
    data.read_raw("fashion_mnist", root, checksums=checksums, verify_checksums=False)


def test_cifar_checksum_mismatch_names_the_file(tmp_path):
    checksums, _ = make_cifar(tmp_path)
    checksums["test_batch"] = "f" * 32
    with pytest.raises(UserError, match=r"checksum mismatch for .*test_batch: md5"):
        data.read_raw("cifar10", tmp_path, checksums=checksums)


def test_default_checksums_reject_small_files(fashion):
    root, _, _ = fashion
    with pytest.raises(UserError, match="checksum mismatch"):
        data.read_raw("fashion_mnist", root)


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "plain"])
def test_truncated_idx_is_corrupt(tmp_path, compress):
    make_fashion(tmp_path, compress=compress)
    path = tmp_path / ("t10k-images-idx3-ubyte" + (".gz" if compress else ""))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match="corrupt") as e:
        data.read_raw("fashion_mnist", tmp_path, verify_checksums=False)
    assert str(path) in str(e.value)


def test_wrong_idx_magic_is_corrupt(tmp_path):
    make_fashion(tmp_path, compress=False)
    path = tmp_path / "train-labels-idx1-ubyte"
    write_idx(path, np.zeros((30, 2), dtype=np.uint8), compress=False)  # 2-D where labels are 1-D
    with pytest.raises(UserError, match=r"corrupt: IDX magic number is 0x00000802"):
        data.read_raw("fashion_mnist", tmp_path, verify_checksums=False)


def test_unpicklable_cifar_batch_is_corrupt(tmp_path):
    make_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match=r"data_batch_3 is corrupt"):
        data.read_raw("cifar10", tmp_path, verify_checksums=False)


def test_cifar_batch_without_keys_is_corrupt(tmp_path):
    make_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), dtype=np.uint8)}))
    with pytest.raises(UserError, match=r"test_batch is corrupt"):
        data.read_raw("cifar10", tmp_path, verify_checksums=False)


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10"])
def test_missing_root_names_the_path(tmp_path, name):
    missing = tmp_path / "no-such-dir"
    with pytest.raises(UserError, match="does not exist") as e:
        data.read_raw(name, missing)
    assert str(missing) in str(e.value)


def test_missing_file_names_it(fashion):
    root, checksums, _ = fashion
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte"):
        data.read_raw("fashion_mnist", root, checksums=checksums)


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(UserError, match="unknown dataset 'mnist9'"):
        data.read_raw("mnist9")
    with pytest.raises(UserError, match="unknown dataset 'mnist9'"):
        data.prepare("mnist9", tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_not_found_without_download(tmp_path, monkeypatch):
    monkeypatch.setattr(data.fashion_mnist, "DEFAULT_DIR", str(tmp_path / "absent"))
    with pytest.raises(UserError, match="download is off") as e:
        data.read_raw("fashion_mnist")
    assert str(tmp_path / "absent") in str(e.value)


def test_download_reads_torchvision_raw_files(tmp_path, monkeypatch):
    """The download path must read torchvision's raw files with the same reader and checks."""
    import torchvision.datasets

    monkeypatch.setattr(data.fashion_mnist, "DEFAULT_DIR", str(tmp_path / "absent"))
    written = {}

    class FakeFashionMNIST:  # stands in for the network: lays out files as torchvision does
        def __init__(self, root, train, download):
            assert download
            written["checksums"], written["arrays"] = make_fashion(Path(root) / "FashionMNIST" / "raw")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashionMNIST)
    download_dir = tmp_path / "downloads"
    with pytest.raises(UserError, match="checksum mismatch"):
        data.read_raw("fashion_mnist", download=True, download_dir=download_dir)
    raw = data.read_raw("fashion_mnist", download=True, download_dir=download_dir, checksums=written["checksums"])
    assert raw.source == str(download_dir / "FashionMNIST" / "raw")
    assert torch.equal(raw.test_x[:, 0], torch.from_numpy(written["arrays"]["test"][0]))


def test_download_failure_is_a_user_error(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(root, train=True, download=False):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz\nmore detail")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(UserError, match=r"could not download cifar10 into .*: Error downloading") as e:
        data.read_raw("cifar10", download=True, download_dir=tmp_path / "dl")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------
# Subsets


def test_balanced_subset_is_exact_and_deterministic():
    y = torch.arange(100) % 10
    x = torch.arange(100).view(100, 1, 1, 1)
    sx, sy = data.balanced_subset(x, y, 3, seed=7)
    assert torch.bincount(sy, minlength=10).tolist() == [3] * 10
    assert torch.equal(sx.flatten() % 10, sy)  # images stay paired with their labels
    assert len(set(sx.flatten().tolist())) == 30  # no image taken twice
    again_x, again_y = data.balanced_subset(x, y, 3, seed=7)
    assert torch.equal(sx, again_x) and torch.equal(sy, again_y)
    other_x, _ = data.balanced_subset(x, y, 3, seed=8)
    assert not torch.equal(sx, other_x)
    assert sy.tolist() != sorted(sy.tolist())  # the order is shuffled, not grouped by class


def test_balanced_subset_rejects_too_few():
    y = torch.tensor([0, 0, 0, 1, 2, 2, 2])
    with pytest.raises(UserError, match="class 1 has only 1"):
        data.balanced_subset(torch.zeros(7, 1, 1, 1), y, 2)


# ---------------------------------------------------------------------------------------
# prepare / load_prepared


def test_prepare_and_load_fashion(fashion, tmp_path):
    root, checksums, _ = fashion
    out = tmp_path / "prepared" / "fashion.pt"
    summary = data.prepare(
        "fashion_mnist", out, root, checksums=checksums, subset_per_class=2, test_subset_per_class=1, seed=3
    )
    assert summary == {"name": "fashion_mnist", "n_train": 20, "n_test": 10, "source": str(root), "shape": [1, 28, 28]}
    stored = torch.load(out, weights_only=True)
    assert stored["subset_per_class"] == 2 and stored["test_subset_per_class"] == 1
    assert stored["train_x"].dtype == torch.uint8 and stored["train_y"].dtype == torch.int64

    ds = data.load_prepared(out)
    assert ds.train_x.shape == (20, 1, 28, 28) and ds.test_x.shape == (10, 1, 28, 28)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert (ds.name, ds.num_classes, ds.in_channels, ds.image_size) == ("fashion_mnist", 10, 1, 28)
    assert torch.bincount(ds.train_y).tolist() == [2] * 10
    assert ds.train_x.mean().item() == pytest.approx(0, abs=1e-5)
    assert ds.train_x.std(unbiased=False).item() == pytest.approx(1, abs=1e-4)
    assert sorted(p.name for p in out.parent.iterdir()) == ["fashion.pt"]


def test_prepare_and_load_cifar_normalizes_each_channel(tmp_path):
    checksums, _ = make_cifar(tmp_path / "raw")
    out = tmp_path / "cifar.pt"
    data.prepare("cifar10", out, tmp_path / "raw", checksums=checksums)
    ds = data.load_prepared(out)
    assert ds.train_x.shape == (50, 3, 32, 32) and (ds.in_channels, ds.image_size) == (3, 32)
    per_channel = ds.train_x.transpose(0, 1).reshape(3, -1)
    assert per_channel.mean(dim=1) == pytest.approx([0, 0, 0], abs=1e-5)
    assert per_channel.std(dim=1, unbiased=False) == pytest.approx([1, 1, 1], abs=1e-4)


def test_prepare_leaves_no_file_on_checksum_failure(fashion, tmp_path):
    root, checksums, _ = fashion
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(UserError, match="checksum mismatch"):
        data.prepare("fashion_mnist", out_dir / "f.pt", root, checksums={**checksums, "t10k-images-idx3-ubyte": "0" * 64})
    assert list(out_dir.iterdir()) == []


def test_prepare_leaves_no_file_when_writing_fails(fashion, tmp_path, monkeypatch):
    root, checksums, _ = fashion
    out_dir = tmp_path / "out"

    write_bytes = Path.write_bytes

    def half_written(path, content):
        write_bytes(path, bytes(content[:100]))
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(Path, "write_bytes", half_written)
    with pytest.raises(OSError, match="No space left on device") as caught:
        data.prepare("fashion_mnist", out_dir / "f.pt", root, checksums=checksums)
    assert caught.value.filename == str(out_dir / "f.pt")  # the file meant, not its temporary twin
    assert list(out_dir.iterdir()) == []


def test_load_prepared_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(UserError, match="prepared dataset not found") as e:
        data.load_prepared(tmp_path / "nope.pt")
    assert str(tmp_path / "nope.pt") in str(e.value)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="not a prepared dataset file"):
        data.load_prepared(junk)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(UserError, match="missing name"):
        data.load_prepared(other)


# ---------------------------------------------------------------------------------------
# The real data, where the Debian package is installed


@pytest.mark.skipif(not Path(data.fashion_mnist.DEFAULT_DIR).is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_debian_fashion_mnist():
    raw = data.read_raw("fashion_mnist")  # default checksums: verified against the known digests
    assert raw.source == data.fashion_mnist.DEFAULT_DIR
    assert raw.train_x.shape == (60000, 1, 28, 28) and raw.test_x.shape == (10000, 1, 28, 28)
    assert torch.bincount(raw.train_y).tolist() == [6000] * 10
    assert torch.bincount(raw.test_y).tolist() == [1000] * 10
