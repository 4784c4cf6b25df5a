"""ImageNet, streamed from image folders: its reader on small folders the tests write in the real
layout (and archives with a wrong MD5), the seeded order and transforms of its loader, and its
jobs on every engine."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from decoupled import grid
from decoupled.data import load_prepared, prepare
from decoupled.data.batches import BatchStream
from decoupled.data.folders import FolderDataset
from decoupled.data.imagenet import IMAGENET_MEAN, IMAGENET_STD, read_imagenet
from decoupled.errors import UserError

CLASSES = ["n01440764", "n01443537", "n01484850"]  # WordNet ids, as ImageNet's folders are named


def picture(rng, size=(40, 30)) -> Image.Image:
    """An RGB image whose three channels differ (a channel swap shows)."""
    w, h = size
    pixels = np.stack([rng.integers(0, 80, (h, w)), rng.integers(80, 160, (h, w)), rng.integers(160, 256, (h, w))], axis=2)
    return Image.fromarray(pixels.astype(np.uint8))


def image_folder(root, per_class=(6, 2), classes=CLASSES, seed=0):
    """train/ and val/ with a folder of PNG images per class (lossless: pixels can be compared)."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                picture(rng).save(root / split / c / f"{c}_{i}.png")
    return root


def prepared(tmp_path, crop=16, resize=20, **kwargs):
    root = image_folder(tmp_path / "imagenet", **kwargs)
    out = tmp_path / "imagenet.pt"
    prepare("imagenet", out, root, crop_size=crop, resize_size=resize)
    return load_prepared(out)


def test_the_reader_indexes_train_and_val_as_imagefolder_numbers_the_classes(tmp_path):
    index = read_imagenet(image_folder(tmp_path))
    assert index.classes == CLASSES
    assert len(index.train_files) == 18 and len(index.test_files) == 6
    assert index.train_files[0] == f"train/{CLASSES[0]}/{CLASSES[0]}_0.png"  # relative to the root
    # the label of each file is its folder's place among the sorted classes, from 0
    assert [CLASSES[c] for c in index.train_y.tolist()] == [f.split("/")[1] for f in index.train_files]
    assert index.test_y.tolist() == [0, 0, 1, 1, 2, 2]
    assert (index.mean, index.std) == (IMAGENET_MEAN, IMAGENET_STD)  # the authors' constants


def test_a_prepared_streamed_dataset_holds_files_not_images(tmp_path):
    data = prepared(tmp_path)
    assert isinstance(data, FolderDataset)
    assert (data.n_train, data.n_test, data.num_classes, data.input_shape) == (18, 6, 3, (3, 16, 16))
    stored = torch.load(tmp_path / "imagenet.pt", weights_only=True)
    assert stored["streamed"] and "train_x" not in stored
    assert stored["root"] == str((tmp_path / "imagenet").resolve())


def test_a_subset_picks_as_many_files_of_every_class(tmp_path):
    root = image_folder(tmp_path / "imagenet")
    prepare("imagenet", tmp_path / "sub.pt", root, subset_per_class=2, test_subset_per_class=1)
    data = load_prepared(tmp_path / "sub.pt")
    assert sorted(data.train_y.tolist()) == [0, 0, 1, 1, 2, 2] and sorted(data.test_y.tolist()) == [0, 1, 2]
    assert all(f.split("/")[1] == CLASSES[c] for f, c in zip(data.train_files, data.train_y.tolist()))


@pytest.mark.parametrize("damage, message", [
    (lambda root: [p.rename(root / "val" / p.name) for p in sorted((root / "val").rglob("*.png"))] and None, "holds images but no class folders"),
    (lambda root: (root / "val" / CLASSES[2]).rename(root / "val" / "n99999999"), "its class folders are not train/'s"),
    (lambda root: [p.unlink() for p in (root / "train" / CLASSES[1]).iterdir()], "Found no valid file for the classes n01443537"),
])
def test_a_wrong_layout_is_one_line_naming_the_folder(tmp_path, damage, message):
    root = image_folder(tmp_path / "imagenet")
    damage(root)
    if message.startswith("holds"):
        for c in CLASSES:
            (root / "val" / c).rmdir()
    with pytest.raises(UserError, match=message) as raised:
        read_imagenet(root)
    assert str(root) in str(raised.value) and "\n" not in str(raised.value)


def test_a_directory_of_neither_folders_nor_archives_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"is not an ImageNet directory: expected train/ and val/"):
        read_imagenet(tmp_path)


def test_archives_whose_md5_is_not_imagenets_are_refused_naming_the_file(tmp_path):
    """torchvision's ImageNet checks the archives before it unpacks them; the devkit first."""
    (tmp_path / "ILSVRC2012_devkit_t12.tar.gz").write_bytes(b"not the devkit")
    (tmp_path / "ILSVRC2012_img_val.tar").write_bytes(b"not the images")
    with pytest.raises(UserError) as raised:
        read_imagenet(tmp_path)
    assert str(raised.value) == f"{tmp_path / 'ILSVRC2012_devkit_t12.tar.gz'}: its MD5 is not the one torchvision knows for it (damaged or not ImageNet's)"
    (tmp_path / "ILSVRC2012_devkit_t12.tar.gz").unlink()
    with pytest.raises(UserError, match="ILSVRC2012_devkit_t12.tar.gz: missing$"):
        read_imagenet(tmp_path)


def test_an_unreadable_image_is_one_line_naming_it_from_a_worker_too(tmp_path):
    data = prepared(tmp_path)
    broken = tmp_path / "imagenet" / data.train_files[0]
    broken.write_bytes(b"not a png")
    for workers in (0, 2):
        stream = data.train_stream(18, 0, "none", torch.device("cpu"), workers)
        with pytest.raises(UserError, match=f"^cannot read image {broken}: ") as raised:
            stream.next()
        assert "\n" not in str(raised.value)


def test_the_order_is_the_in_memory_streams_and_the_images_do_not_depend_on_the_workers(tmp_path):
    """One seeded order on every engine: each pass the permutation BatchStream draws from the
    same seed; each image's crop and flip its own, whichever worker decodes it."""
    data = prepared(tmp_path)
    in_memory = BatchStream(torch.zeros(data.n_train, 1), data.train_y, 4, seed=3)
    runs = []
    for workers in (0, 1, 2):
        stream = data.train_stream(4, 3, "resized_crop_flip", torch.device("cpu"), workers)
        batches = [stream.next() for _ in range(2 * stream.batches_per_pass)]  # two passes
        assert [y.tolist() for _, y in batches] == [in_memory.next()[1].tolist() for _ in batches]
        in_memory = BatchStream(torch.zeros(data.n_train, 1), data.train_y, 4, seed=3)
        runs.append(torch.cat([x for x, _ in batches]))
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    other_seed = data.train_stream(4, 4, "resized_crop_flip", torch.device("cpu"), 0)
    assert not torch.equal(other_seed.next()[0], runs[0][:4])


def test_a_stream_resumed_from_its_state_goes_on_with_the_same_batches(tmp_path):
    data = prepared(tmp_path)
    whole = data.train_stream(4, 0, "resized_crop_flip", torch.device("cpu"), 0)
    expected = [whole.next() for _ in range(6)]  # past the end of the first pass (4 batches)
    first = data.train_stream(4, 0, "resized_crop_flip", torch.device("cpu"), 2)
    for _ in range(3):
        first.next()
    resumed = data.train_stream(4, 0, "resized_crop_flip", torch.device("cpu"), 2)
    resumed.load_state_dict(first.state_dict())
    for x, y in expected[3:]:
        got_x, got_y = resumed.next()
        assert torch.equal(got_x, x) and torch.equal(got_y, y)


def reference(path, transform, seed, crop, resize):
    """The image through torchvision's own ImageNet transforms (the DGL code's), then normalized by the constants."""
    from torchvision import transforms as tv

    steps = [tv.RandomResizedCrop(crop), tv.RandomHorizontalFlip()] if transform == "train" else [tv.Resize(resize), tv.CenterCrop(crop)]
    pipeline = tv.Compose([*steps, tv.ToTensor(), tv.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    torch.manual_seed(seed)
    with Image.open(path) as image:
        return pipeline(image.convert("RGB"))


def test_evaluation_resizes_and_centre_crops_as_the_authors_code(tmp_path):
    data = prepared(tmp_path, crop=16, resize=20)
    (x, y), = list(data.test_set(torch.device("cpu"), 0).batches(100))
    assert y.tolist() == data.test_y.tolist()
    for i, name in enumerate(data.test_files):
        expected = reference(tmp_path / "imagenet" / name, "eval", 0, 16, 20)
        assert torch.allclose(x[i], expected, atol=1e-5), name  # channels in RGB order, ImageNet's constants


def test_training_takes_random_resized_crops_and_flips_drawn_from_each_images_seed(tmp_path):
    data = prepared(tmp_path, crop=16, resize=20)
    stream = data.train_stream(6, 0, "resized_crop_flip", torch.device("cpu"), 0)
    x, _ = stream.next()
    for i, (index, seed) in enumerate(zip(stream.passes.order[:6].tolist(), stream.seeds[:6].tolist())):
        expected = reference(tmp_path / "imagenet" / data.train_files[index], "train", seed, 16, 20)
        assert torch.allclose(x[i], expected, atol=1e-5)
    # the crops differ from the evaluation's, and between the images' seeds
    assert not torch.allclose(x[0], reference(tmp_path / "imagenet" / data.train_files[stream.passes.order[0]], "eval", 0, 16, 20), atol=1e-3)


def test_the_distributed_workers_take_their_share_of_the_test_images(tmp_path):
    data = prepared(tmp_path)
    test = data.test_set(torch.device("cpu"), 0)
    (whole_x, whole_y), = list(test.batches(6))
    shares = [list(test.batches(2, part=(rank, 3))) for rank in range(3)]
    for rank, batches in enumerate(shares):
        x = torch.cat([b[0] for b in batches])
        assert torch.equal(x, whole_x[rank::3]) and torch.equal(torch.cat([b[1] for b in batches]), whole_y[rank::3])


def test_an_in_memory_augment_on_a_streamed_dataset_is_refused_and_the_other_way(tmp_path):
    base = {"experiment": "x", "grid": {"methods": ["dgl"], "modes": ["sync"], "K": [2], "seeds": [0]}, "report": {"claims": []}}
    streamed = dict(base, dataset={"name": "imagenet"}, train={"augment": "crop_flip"})
    with pytest.raises(UserError, match=r"^config key 'train.augment': crop_flip does not apply to imagenet, which is streamed from image files \(it takes: none, resized_crop_flip\)$"):
        grid.runs(streamed)
    in_memory = dict(base, train={"augment": "resized_crop_flip"})
    with pytest.raises(UserError, match=r"resized_crop_flip does not apply to fashion_mnist, which is held in memory"):
        grid.runs(in_memory)
    assert grid.runs(dict(base, dataset={"name": "imagenet"}, train={"augment": "resized_crop_flip"}))


def test_a_prepared_file_whose_images_moved_names_the_folder(tmp_path):
    prepared(tmp_path)
    (tmp_path / "imagenet").rename(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="its images' folder .*imagenet is gone"):
        load_prepared(tmp_path / "imagenet.pt")


def test_a_stand_in_folder_is_written_once_from_an_in_memory_dataset(tmp_path, monkeypatch):
    from decoupled.data import RawData, read_raw

    rng = torch.Generator().manual_seed(0)
    raw = RawData(torch.randint(0, 256, (20, 1, 12, 12), dtype=torch.uint8, generator=rng), torch.arange(20) % 2,
                  torch.randint(0, 256, (6, 1, 12, 12), dtype=torch.uint8, generator=rng), torch.arange(6) % 2, ["a/b", "c"], "memory")
    import decoupled.data as data_module

    monkeypatch.setattr(data_module, "read_raw", lambda name, root, **kw: raw if name == "fashion_mnist" else read_raw(name, root, **kw))
    root = tmp_path / "nested" / "stand_in"  # its parent made too
    (tmp_path / "nested" / ".stand_in.partial" / "train").mkdir(parents=True)  # a crashed attempt's leftovers
    (tmp_path / "nested" / ".stand_in.partial" / "train" / "stale.jpg").write_bytes(b"")
    summary = prepare("imagenet", tmp_path / "a.pt", root, generate_from="fashion_mnist", crop_size=8, resize_size=10, test_subset_per_class=2)
    assert not (root / "train" / "stale.jpg").exists()
    assert sorted(p.name for p in (root / "train").iterdir()) == ["0", "1"]  # the class numbers (a name may hold a slash)
    assert (summary["n_train"], summary["n_test"]) == (20, 4)
    data = load_prepared(tmp_path / "a.pt")
    # each file holds its image (JPEG: nearly), in its label's folder
    first = np.asarray(Image.open(root / data.train_files[0]))
    number = int(data.train_files[0].split("/")[-1].removesuffix(".jpg"))
    assert first.shape == (12, 12) and np.abs(first.astype(int) - raw.train_x[number, 0].numpy().astype(int)).mean() < 8
    assert int(data.train_files[0].split("/")[1]) == raw.train_y[number]
    written = (root / "train" / "0").stat().st_mtime_ns
    prepare("imagenet", tmp_path / "b.pt", root, generate_from="fashion_mnist", crop_size=8, resize_size=10)
    assert (root / "train" / "0").stat().st_mtime_ns == written  # there already: not written again
    assert not list((tmp_path / "nested").glob(".stand_in*"))  # no partial folder left


def test_a_stand_in_of_colour_images_keeps_their_channels(tmp_path):
    from decoupled.data import RawData
    from decoupled.data.folders import write_image_folder

    red = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    red[:, 0] = 200
    write_image_folder(RawData(red, torch.tensor([0, 1]), red[:1], torch.tensor([0]), ["a", "b"], "memory"), tmp_path / "colour")
    pixels = np.asarray(Image.open(next((tmp_path / "colour" / "train" / "0").iterdir())))
    assert pixels.shape == (8, 8, 3) and abs(int(pixels[..., 0].mean()) - 200) <= 3 and pixels[..., 1:].max() <= 8


def job(data_root, engine="simulated", mode="sync", method="dgl"):
    return {"experiment": "imagenet-test", "engine": engine, "dataset": {"name": "imagenet", "root": str(data_root)},
            "model": {"widths": [8, 16], "aux_hidden": 16}, "train": {"epochs": 2, "batch_size": 6, "lr": 0.05, "augment": "resized_crop_flip", "loader_workers": 1},
            "distributed": {"timeout_s": 60}, "async": {"buffer_size": 2}, "report": {"claims": []},
            "grid": {"methods": [method], "modes": [mode], "K": [2], "seeds": [0]}}


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_distributed_workers_train_on_the_stream_what_the_simulator_trains(tmp_path, mode):
    """The same seeded batches reach every engine: worker 0 draws them from the loader."""
    from test_distributed import simulated, train

    data = prepared(tmp_path, crop=16, resize=20, per_class=(8, 2))
    cfg = job(tmp_path / "imagenet", engine="distributed", mode=mode)
    metrics, output = train(tmp_path, cfg, tmp_path / "imagenet.pt")
    reference = simulated(cfg, tmp_path / "imagenet.pt")
    assert metrics["dataset"] == "imagenet" and "epoch 2/2" in output
    if mode == "sync":
        for ours, theirs in zip(metrics["epochs"], reference["epochs"], strict=True):
            assert ours["train_loss_per_module"] == pytest.approx(theirs["train_loss_per_module"], rel=1e-6)
            assert ours["test_acc_per_module"] == pytest.approx(theirs["test_acc_per_module"], abs=1e-9)
    else:  # at their own pace: every worker made its steps of the stream's batches
        assert metrics["epochs"][-1]["steps_per_module"][0] == data.n_train // 6
    json.dumps(metrics)


def test_the_simulators_sync_and_async_draw_the_same_batches_from_the_stream(tmp_path, monkeypatch):
    from decoupled.data.folders import FolderStream
    from decoupled.train import fit

    prepared(tmp_path, crop=16, resize=20, per_class=(8, 2))
    drawn = []
    original = FolderStream.next

    def recording(self):
        x, y = original(self)
        drawn[-1].append((y.tolist(), float(x.sum())))
        return x, y

    monkeypatch.setattr(FolderStream, "next", recording)
    for mode in ("sync", "async"):
        drawn.append([])
        cfg = job(tmp_path / "imagenet", mode=mode)
        (key,) = grid.runs(cfg)
        fit(grid.job_config(cfg, key), load_prepared(tmp_path / "imagenet.pt"))
    sync, asynchronous = drawn
    assert len(sync) == 2 * (24 // 6) and asynchronous[: len(sync)] == sync[: len(asynchronous)]


def test_fixed_constants_replace_imagenets_for_a_streamed_dataset_too(tmp_path):
    root = image_folder(tmp_path / "imagenet")
    prepare("imagenet", tmp_path / "c.pt", root, normalize={"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}, crop_size=16, resize_size=20)
    data = load_prepared(tmp_path / "c.pt")
    assert (data.mean, data.std) == ([0.5] * 3, [0.25] * 3)
    with pytest.raises(UserError, match="'dataset.normalize.mean': 1 values for images of 3 channel"):
        prepare("imagenet", tmp_path / "d.pt", root, normalize={"mean": [0.5], "std": [0.25]})


def test_loader_workers_hold_nothing_the_training_process_had_locked(tmp_path):
    """A worker forked from the training process would keep a lock its other thread held at that
    moment (MLflow's store lock: the next job's start then hung); the workers come from a fork server."""
    import fcntl
    import subprocess
    import sys

    data = prepared(tmp_path)
    lock_path = tmp_path / "store.lock"
    with open(lock_path, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        stream = data.train_stream(4, 0, "none", torch.device("cpu"), 1)
        stream.next()  # its worker starts while the lock is held
    # released: closed here; the worker is still alive, reading ahead
    probe = "import fcntl, sys; fcntl.flock(open(sys.argv[1], 'a'), fcntl.LOCK_EX | fcntl.LOCK_NB)"
    assert subprocess.run([sys.executable, "-c", probe, str(lock_path)], capture_output=True, timeout=60).returncode == 0
    assert stream.next()[0].shape == (4, 3, 16, 16)
