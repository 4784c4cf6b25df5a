"""Tests for the CIFAR-100 and ImageNet32 readers on small files written in their real formats."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from decoupled import data
from decoupled.errors import UserError

IMAGENET32_TRAIN = [f"train_data_batch_{i}" for i in range(1, 11)]
IMAGENET32_STEMS = [*IMAGENET32_TRAIN, "val_data"]


def rows(images: np.ndarray) -> np.ndarray:
    """(N, 3, 32, 32) -> the published rows: the red plane, then green, then blue."""
    return np.concatenate([images[:, c].reshape(len(images), -1) for c in range(3)], axis=1)


def raises_one_line(match: str, call, *args, **kwargs) -> str:
    with pytest.raises(UserError, match=match) as e:
        call(*args, **kwargs)
    message = str(e.value)
    assert "\n" not in message
    return message


class RunsCode:
    """A pickle that, when loaded, creates a directory: proof that it was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


# ---------------------------------------------------------------------------------------
# CIFAR-100

CIFAR100_SPLITS = {"train": 6, "test": 4}
# fine labels 0..99 (top and bottom included) whose coarse labels all differ from them
FINE = {"train": [0, 99, 42, 7, 63, 99], "test": [88, 1, 50, 0]}


def make_cifar100(parent: Path, names: list[str] | None = None):
    """A small ``cifar-100-python`` directory; returns (md5 checksums, {stem: (images, fine labels)})."""
    rng = np.random.default_rng(2)
    directory = parent / "cifar-100-python"
    directory.mkdir(parents=True)
    checksums, arrays = {}, {}
    for stem, n in CIFAR100_SPLITS.items():
        images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        fine = FINE[stem]
        batch = {
            b"filenames": [f"{stem}_{i}.png".encode() for i in range(n)],
            b"batch_label": f"{stem} batch".encode(),
            b"fine_labels": fine,
            b"coarse_labels": [(f + 1) % 20 for f in fine],  # never equal to the fine label here
            b"data": rows(images),
        }
        checksums[stem] = write_pickle(directory / stem, batch, protocol=2)
        arrays[stem] = (images, fine)
    meta = {
        b"fine_label_names": [n.encode() for n in (names or data.CIFAR100_CLASSES)],
        b"coarse_label_names": [f"super{i}".encode() for i in range(20)],
    }
    checksums["meta"] = write_pickle(directory / "meta", meta, protocol=2)
    return checksums, arrays


def write_pickle(path: Path, obj, protocol: int = pickle.DEFAULT_PROTOCOL) -> str:
    """Pickle ``obj`` to ``path``; returns the md5 of the file (CIFAR-100's digests are md5)."""
    content = pickle.dumps(obj, protocol=protocol)
    path.write_bytes(content)
    return hashlib.md5(content).hexdigest()


@pytest.mark.parametrize("point_at", ["parent", "batches_dir"])
def test_cifar100_round_trip_with_fine_labels(tmp_path, point_at):
    checksums, arrays = make_cifar100(tmp_path)
    root = tmp_path if point_at == "parent" else tmp_path / "cifar-100-python"
    raw = data.read_raw("cifar100", root, checksums=checksums)
    assert raw.train_x.shape == (6, 3, 32, 32) and raw.test_x.shape == (4, 3, 32, 32)
    assert raw.train_x.dtype == torch.uint8 and raw.train_y.dtype == torch.int64
    assert torch.equal(raw.train_x, torch.from_numpy(arrays["train"][0]))
    assert torch.equal(raw.test_x, torch.from_numpy(arrays["test"][0]))
    assert raw.train_y.tolist() == FINE["train"] and raw.test_y.tolist() == FINE["test"]  # fine, not coarse
    assert raw.classes == data.CIFAR100_CLASSES and raw.classes[99] == "worm"
    assert raw.source == str(tmp_path / "cifar-100-python")


def test_cifar100_class_names_come_from_meta(tmp_path):
    names = [f"name{i}" for i in range(100)]
    checksums, _ = make_cifar100(tmp_path, names=names)
    assert data.read_raw("cifar100", tmp_path, checksums=checksums).classes == names


def test_cifar100_table_is_torchvisions_alphabetical_list():
    assert len(data.CIFAR100_CLASSES) == 100 == len(set(data.CIFAR100_CLASSES))
    assert data.CIFAR100_CLASSES == sorted(data.CIFAR100_CLASSES)
    assert data.DATASETS["cifar100"].classes is data.CIFAR100_CLASSES


def test_cifar100_rows_are_channel_major(tmp_path):
    """A pixel written at offset 2*1024 + row*32 + col must land in the blue channel."""
    make_cifar100(tmp_path)
    path = tmp_path / "cifar-100-python" / "test"
    batch = pickle.loads(path.read_bytes(), encoding="bytes")
    batch[b"data"][:] = 0
    batch[b"data"][1, 2 * 1024 + 5 * 32 + 7] = 201
    path.write_bytes(pickle.dumps(batch, protocol=2))
    raw = data.read_raw("cifar100", tmp_path, verify_checksums=False)
    assert raw.test_x[1, 2, 5, 7] == 201 and raw.test_x.sum() == 201


@pytest.mark.parametrize("stem", ["train", "test", "meta"])
def test_cifar100_checksum_mismatch_names_the_file(tmp_path, stem):
    checksums, _ = make_cifar100(tmp_path)
    checksums[stem] = "f" * 32
    message = raises_one_line(r"checksum mismatch for .*: md5", data.read_raw, "cifar100", tmp_path, checksums=checksums)
    assert str(tmp_path / "cifar-100-python" / stem) + ":" in message
    data.read_raw("cifar100", tmp_path, checksums=checksums, verify_checksums=False)  # and the check can be turned off


def test_cifar100_default_checksums_reject_small_files(tmp_path):
    make_cifar100(tmp_path)
    raises_one_line("checksum mismatch", data.read_raw, "cifar100", tmp_path)


def test_cifar100_checks_the_checksum_before_unpickling(tmp_path):
    checksums, _ = make_cifar100(tmp_path)
    marker = tmp_path / "code-ran"
    write_pickle(tmp_path / "cifar-100-python" / "meta", RunsCode(marker))
    raises_one_line(r"checksum mismatch for .*meta", data.read_raw, "cifar100", tmp_path, checksums=checksums)
    assert not marker.exists()


def test_cifar100_unpicklable_batch_is_corrupt(tmp_path):
    make_cifar100(tmp_path)
    path = tmp_path / "cifar-100-python" / "train"
    path.write_bytes(path.read_bytes()[:200])
    message = raises_one_line("is corrupt: cannot unpickle", data.read_raw, "cifar100", tmp_path, verify_checksums=False)
    assert message.startswith(str(path))


@pytest.mark.parametrize(
    "batch, complaint",
    [
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, r"not an image batch .*b'fine_labels'"),  # CIFAR-10's keys
        ({b"data": np.zeros((2, 32, 32, 3), np.uint8), b"fine_labels": [0, 1]}, r"b'data' is not a uint8 array"),
        ({b"data": np.zeros((2, 3072), np.float32), b"fine_labels": [0, 1]}, r"b'data' is not a uint8 array"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0]}, r"2 images but 1 labels"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 100]}, r"labels range 0..100, expected 0..99"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [-1, 5]}, r"labels range -1..5, expected 0..99"),
    ],
    ids=["cifar10_keys", "hwc_data", "float_data", "too_few_labels", "label_100", "label_negative"],
)
def test_cifar100_wrong_layout_is_corrupt(tmp_path, batch, complaint):
    make_cifar100(tmp_path)
    path = tmp_path / "cifar-100-python" / "test"
    path.write_bytes(pickle.dumps(batch, protocol=2))
    message = raises_one_line(complaint, data.read_raw, "cifar100", tmp_path, verify_checksums=False)
    assert message.startswith(f"{path} is corrupt")


@pytest.mark.parametrize(
    "meta", [{b"coarse_label_names": []}, {b"fine_label_names": [b"a"] * 20}, ["not", "a", "dict"]], ids=["no_key", "twenty", "list"]
)
def test_cifar100_wrong_meta_is_corrupt(tmp_path, meta):
    make_cifar100(tmp_path)
    path = tmp_path / "cifar-100-python" / "meta"
    path.write_bytes(pickle.dumps(meta, protocol=2))
    raises_one_line(rf"^{path} is corrupt: b'fine_label_names'", data.read_raw, "cifar100", tmp_path, verify_checksums=False)


@pytest.mark.parametrize("stem", ["train", "test", "meta"])
def test_cifar100_missing_file_names_it(tmp_path, stem):
    checksums, _ = make_cifar100(tmp_path)
    (tmp_path / "cifar-100-python" / stem).unlink()
    message = raises_one_line("missing dataset file", data.read_raw, "cifar100", tmp_path, checksums=checksums)
    assert message.endswith(str(tmp_path / "cifar-100-python" / stem))


def test_cifar100_not_found_without_root_or_download(tmp_path):
    raises_one_line("cifar100 not found: no root given .*cifar-100-python", data.read_raw, "cifar100")
    raises_one_line("does not exist", data.read_raw, "cifar100", tmp_path / "absent")


def test_cifar100_download_reads_torchvision_files(tmp_path, monkeypatch):
    import torchvision.datasets

    written = {}

    class FakeCIFAR100:  # stands in for the network: lays out files as torchvision does
        def __init__(self, root, train, download):
            assert download
            written["checksums"], written["arrays"] = make_cifar100(Path(root))

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", FakeCIFAR100)
    download_dir = tmp_path / "downloads"
    raw = data.read_raw("cifar100", download=True, download_dir=download_dir, verify_checksums=False)
    assert raw.source == str(download_dir / "cifar-100-python")
    assert torch.equal(raw.test_x, torch.from_numpy(written["arrays"]["test"][0]))


def test_prepare_and_load_cifar100_normalizes_each_channel(tmp_path):
    checksums, _ = make_cifar100(tmp_path / "raw")
    out = tmp_path / "cifar100.pt"
    summary = data.prepare("cifar100", out, tmp_path / "raw", checksums=checksums)
    assert summary["n_train"] == 6 and summary["n_test"] == 4 and summary["shape"] == [3, 32, 32]
    ds = data.load_prepared(out)
    assert (ds.name, ds.num_classes, ds.in_channels, ds.image_size) == ("cifar100", 100, 3, 32)
    assert ds.train_y.tolist() == FINE["train"] and ds.test_y.tolist() == FINE["test"]
    per_channel = ds.train_x.transpose(0, 1).reshape(3, -1)
    assert per_channel.mean(dim=1) == pytest.approx([0, 0, 0], abs=1e-5)
    assert per_channel.std(dim=1, unbiased=False) == pytest.approx([1, 1, 1], abs=1e-4)


# ---------------------------------------------------------------------------------------
# ImageNet32

# labels as the files hold them, 1..1000 (both ends included); read as 0..999
TRAIN_LABELS = [1, 1000, 500, 2, 999, 1, 17, 1000, 3, 250]  # one image per training batch
VAL_LABELS = [1000, 1, 432, 77]


def make_imagenet32(root: Path, layout: str = "flat", npz: bool = False):
    """Small ImageNet32 files; returns (sha256 per stem, {stem: (images, file labels)}).

    ``layout``: "flat" (all files in ``root``) or "archives" (``Imagenet32_train/`` and
    ``Imagenet32_val/``, with ``_npz`` for the .npz archives, as they unpack).
    """
    rng = np.random.default_rng(3)
    checksums, arrays = {}, {}
    labels_of = {stem: [label] for stem, label in zip(IMAGENET32_TRAIN, TRAIN_LABELS)} | {"val_data": VAL_LABELS}
    for stem in IMAGENET32_STEMS:
        labels = labels_of[stem]
        images = rng.integers(0, 256, size=(len(labels), 3, 32, 32), dtype=np.uint8)
        batch = {"data": rows(images), "labels": labels}
        if stem != "val_data":
            batch["mean"] = rows(images).mean(axis=0)
        folder = root
        if layout == "archives":
            folder = root / ("Imagenet32_train" if stem != "val_data" else "Imagenet32_val")
            folder = folder.with_name(folder.name + "_npz") if npz else folder
        folder.mkdir(parents=True, exist_ok=True)
        if npz:
            buffer = io.BytesIO()
            np.savez(buffer, **batch)
            content = buffer.getvalue()
            path = folder / f"{stem}.npz"
        else:
            content = pickle.dumps(batch)  # Python 3's pickle, str keys
            path = folder / stem
        path.write_bytes(content)
        checksums[stem] = hashlib.sha256(content).hexdigest()
        arrays[stem] = (images, labels)
    return checksums, arrays


@pytest.mark.parametrize("layout, npz", [("flat", False), ("archives", False), ("archives", True), ("flat", True)],
                         ids=["flat", "archives", "archives_npz", "flat_npz"])  # fmt: skip
def test_imagenet32_round_trip_labels_from_zero(tmp_path, layout, npz):
    checksums, arrays = make_imagenet32(tmp_path, layout, npz)
    raw = data.read_raw("imagenet32", tmp_path, checksums=checksums)
    assert raw.train_x.shape == (10, 3, 32, 32) and raw.test_x.shape == (4, 3, 32, 32)
    assert raw.train_x.dtype == torch.uint8 and raw.train_y.dtype == torch.int64
    train_images = np.concatenate([arrays[s][0] for s in IMAGENET32_TRAIN])
    assert torch.equal(raw.train_x, torch.from_numpy(train_images))
    assert torch.equal(raw.test_x, torch.from_numpy(arrays["val_data"][0]))
    # the files count from 1, the labels read count from 0
    assert raw.train_y.tolist() == [label - 1 for label in TRAIN_LABELS]
    assert raw.test_y.tolist() == [999, 0, 431, 76]
    assert raw.classes == [str(i) for i in range(1000)]
    assert raw.source == str(tmp_path)


def test_imagenet32_rows_are_channel_major(tmp_path):
    """A pixel written at offset 2*1024 + row*32 + col must land in the blue channel."""
    make_imagenet32(tmp_path)
    path = tmp_path / "val_data"
    batch = pickle.loads(path.read_bytes())
    batch["data"][:] = 0
    batch["data"][2, 2 * 1024 + 5 * 32 + 7] = 201
    batch["data"][3, 1 * 1024 + 31 * 32 + 0] = 9
    path.write_bytes(pickle.dumps(batch))
    raw = data.read_raw("imagenet32", tmp_path, verify_checksums=False)
    assert raw.test_x[2, 2, 5, 7] == 201 and raw.test_x[3, 1, 31, 0] == 9 and raw.test_x.sum() == 210


def test_imagenet32_without_checksums_refuses_and_never_unpickles(tmp_path):
    make_imagenet32(tmp_path)
    marker = tmp_path / "code-ran"
    (tmp_path / "train_data_batch_1").write_bytes(pickle.dumps(RunsCode(marker)))
    message = raises_one_line("no checksum known for", data.read_raw, "imagenet32", tmp_path)
    assert str(tmp_path / "train_data_batch_1") in message and "dataset.verify_checksums: false" in message
    assert not marker.exists()


@pytest.mark.parametrize("stem", ["train_data_batch_10", "val_data"])
def test_imagenet32_checksum_mismatch_names_the_file(tmp_path, stem):
    checksums, _ = make_imagenet32(tmp_path)
    checksums[stem] = "0" * 64
    message = raises_one_line(r"checksum mismatch for .*: sha256", data.read_raw, "imagenet32", tmp_path, checksums=checksums)
    assert str(tmp_path / stem) + ":" in message
    data.read_raw("imagenet32", tmp_path, checksums=checksums, verify_checksums=False)  # and the check can be turned off


def test_imagenet32_checksum_table_missing_a_file_names_it(tmp_path):
    checksums, _ = make_imagenet32(tmp_path)
    del checksums["val_data"]
    message = raises_one_line("no checksum known for", data.read_raw, "imagenet32", tmp_path, checksums=checksums)
    assert str(tmp_path / "val_data") in message


def test_imagenet32_unpicklable_batch_is_corrupt(tmp_path):
    make_imagenet32(tmp_path)
    path = tmp_path / "train_data_batch_4"
    path.write_bytes(path.read_bytes()[:300])
    message = raises_one_line("is corrupt: cannot unpickle", data.read_raw, "imagenet32", tmp_path, verify_checksums=False)
    assert message.startswith(str(path))


def test_imagenet32_damaged_npz_is_corrupt(tmp_path):
    make_imagenet32(tmp_path, "archives", npz=True)
    path = tmp_path / "Imagenet32_val_npz" / "val_data.npz"
    path.write_bytes(path.read_bytes()[:-40])
    raises_one_line(rf"^{path} is corrupt: cannot read it as .npz", data.read_raw, "imagenet32", tmp_path, verify_checksums=False)


def test_imagenet32_npz_with_objects_is_refused_unloaded(tmp_path):
    """An .npz holding pickled objects is never unpickled: allow_pickle=False."""
    make_imagenet32(tmp_path, npz=True)
    path = tmp_path / "val_data.npz"
    np.savez(path, data=np.zeros((1, 3072), np.uint8), labels=np.array([RunsCode(tmp_path / "code-ran")], dtype=object))
    raises_one_line(rf"^{path} is corrupt", data.read_raw, "imagenet32", tmp_path, verify_checksums=False)
    assert not (tmp_path / "code-ran").exists()


@pytest.mark.parametrize(
    "batch, complaint",
    [
        ({b"data": np.zeros((1, 3072), np.uint8), b"labels": [1]}, r"not an image batch .*'data' and 'labels'"),  # bytes keys
        ({"data": np.zeros((1, 32, 32, 3), np.uint8), "labels": [1]}, r"'data' is not a uint8 array"),
        ({"data": np.zeros((1, 3072), np.int64), "labels": [1]}, r"'data' is not a uint8 array"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [1]}, r"2 images but 1 labels"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": ["a", "b"]}, r"'labels' is not a list of integers"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 5]}, r"labels range 0..5, expected 1..1000"),  # 0-indexed
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [1, 1001]}, r"labels range 1..1001, expected 1..1000"),
    ],
    ids=["bytes_keys", "hwc_data", "int64_data", "too_few_labels", "string_labels", "label_0", "label_1001"],
)
def test_imagenet32_wrong_layout_is_corrupt(tmp_path, batch, complaint):
    make_imagenet32(tmp_path)
    path = tmp_path / "train_data_batch_2"
    path.write_bytes(pickle.dumps(batch))
    message = raises_one_line(complaint, data.read_raw, "imagenet32", tmp_path, verify_checksums=False)
    assert message.startswith(f"{path} is corrupt")


@pytest.mark.parametrize("stem", ["train_data_batch_7", "val_data"])
def test_imagenet32_missing_file_names_it(tmp_path, stem):
    checksums, _ = make_imagenet32(tmp_path, "archives")
    folder = "Imagenet32_val" if stem == "val_data" else "Imagenet32_train"
    (tmp_path / folder / stem).unlink()
    message = raises_one_line("missing dataset file", data.read_raw, "imagenet32", tmp_path, checksums=checksums)
    assert str(tmp_path / stem) in message and f"{folder}/" in message


@pytest.mark.parametrize("download", [False, True])
def test_imagenet32_without_root_says_where_to_get_it(download):
    message = raises_one_line("imagenet32 not found", data.read_raw, "imagenet32", download=download)
    assert "https://image-net.org/download-images.php" in message and "Downsampled ImageNet 32x32" in message
    assert "train_data_batch_1" in message and "Imagenet32_train/" in message


def test_prepare_and_load_imagenet32_normalizes_each_channel(tmp_path):
    checksums, _ = make_imagenet32(tmp_path / "raw", "archives")
    out = tmp_path / "imagenet32.pt"
    summary = data.prepare("imagenet32", out, tmp_path / "raw", verify_checksums=False)
    assert summary["n_train"] == 10 and summary["n_test"] == 4 and summary["shape"] == [3, 32, 32]
    ds = data.load_prepared(out)
    assert (ds.name, ds.num_classes, ds.in_channels, ds.image_size) == ("imagenet32", 1000, 3, 32)
    assert ds.train_y.tolist() == [label - 1 for label in TRAIN_LABELS] and ds.test_y.tolist() == [999, 0, 431, 76]
    per_channel = ds.train_x.transpose(0, 1).reshape(3, -1)
    assert per_channel.mean(dim=1) == pytest.approx([0, 0, 0], abs=1e-5)
    assert per_channel.std(dim=1, unbiased=False) == pytest.approx([1, 1, 1], abs=1e-4)
    with pytest.raises(UserError, match="no checksum known"):  # the default, verify_checksums=True, needs checksums
        data.prepare("imagenet32", tmp_path / "other.pt", tmp_path / "raw")
    assert not (tmp_path / "other.pt").exists()
    data.prepare("imagenet32", tmp_path / "other.pt", tmp_path / "raw", checksums=checksums)
    assert torch.equal(data.load_prepared(tmp_path / "other.pt").test_x, ds.test_x)


@pytest.mark.parametrize("name", ["cifar100", "imagenet32"])
def test_registered(name):
    assert data.dataset_spec(name).name == name


def test_fixed_constants_normalize_in_place_of_the_training_sets_statistics(tmp_path):
    """dataset.normalize: the papers' fixed mean and std (the GN-DGL code's CIFAR-10 constants
    for CIFAR-100), not the training set's own."""
    checksums, arrays = make_cifar100(tmp_path / "raw")
    constants = {"mean": [0.4914, 0.4822, 0.4467], "std": [0.2471, 0.2435, 0.2616]}
    data.prepare("cifar100", tmp_path / "fixed.pt", tmp_path / "raw", checksums=checksums, normalize=constants)
    ds = data.load_prepared(tmp_path / "fixed.pt")
    raw = torch.from_numpy(arrays["test"][0]).float() / 255
    expected = (raw - torch.tensor(constants["mean"]).view(1, 3, 1, 1)) / torch.tensor(constants["std"]).view(1, 3, 1, 1)
    assert torch.allclose(ds.test_x, expected, atol=1e-5)
    with pytest.raises(UserError, match=r"^config key 'dataset.normalize.std': 1 values for images of 3 channel\(s\)$"):
        data.prepare("cifar100", tmp_path / "bad.pt", tmp_path / "raw", checksums=checksums, normalize={"mean": [0, 0, 0], "std": [1]})
    assert not (tmp_path / "bad.pt").exists()


def test_the_paper_configs_normalize_as_their_authors_code():
    from decoupled import config

    cifar = {"mean": [125.3 / 255, 123.0 / 255, 113.9 / 255], "std": [63.0 / 255, 62.1 / 255, 66.7 / 255]}
    fdg_dgl = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2023, 0.1994, 0.2010]}  # the FDG code's and the DGL code's CIFAR-10 constants
    for name, expected in (("paper/gn_dgl_resnet32", cifar), ("paper/gn_dgl_resnet32_cifar100", cifar), ("paper/infopro_dgl_resnet32", cifar),
                           ("paper/gn_dgl_resnet32_imagenet32", {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}),
                           ("paper/fdg_resnet56", fdg_dgl), ("paper/fdg_wrn28_10_speed", fdg_dgl), ("paper/dgl_ddg_resnet110", fdg_dgl),
                           ("paper_dni_cifar10", fdg_dgl)):
        normalize = config.load(Path(__file__).parents[1] / "config" / f"{name}.yaml")["dataset"]["normalize"]
        for key in ("mean", "std"):
            assert normalize[key] == pytest.approx(expected[key], abs=1e-8), name
