"""What the simulated engines promise, in either mode: an epoch's seconds, losses, steps and
delays as reported, stop requests, the batches and their augmentation, the time budget's
schedule, staleness summaries."""

import collections
import time

import pytest
import torch

from decoupled.engines.base import EpochInterrupted, StopRequest
from decoupled.data.batches import BatchStream, TensorTestSet
from decoupled.engines.schedule import CategoricalSchedule
from decoupled.engines.simulated import SimulatedEngine
from decoupled.engines.simulated_async import AsyncSimulator
from decoupled.engines.staleness import staleness_summary

from test_async import async_cfg, data
from test_methods import make
from test_resume import StopAtCheck


def engine(mode, augment="none", seed=0):
    _, dgl = make("dgl", K=2, total_steps=16)
    x, y = data(n=16 * 8)
    if mode == "sync":
        return SimulatedEngine(dgl, BatchStream(x, y, 16, seed, augment=augment))
    return AsyncSimulator(dgl, BatchStream(x, y, 16, seed, augment=augment), seed, async_cfg(schedule="event"))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_the_clock_reads_the_time_once_the_datas_device_is_done(mode, monkeypatch):
    """On a GPU the host returns from launching a module's kernels before they run: every time
    the engines read (through clock.settled_time, as test_async's FakeTime shows) first waits for
    the device the data is on. No GPU here: torch.cuda.synchronize is stood in for."""
    from decoupled.engines.clock import settled_time

    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    settled_time(torch.device("cpu"))
    assert waited == []
    settled_time(torch.device("cuda", 1))
    assert waited == [torch.device("cuda", 1)]
    assert engine(mode).device == torch.device("cpu")


def test_an_evaluation_reads_back_to_the_host_a_fixed_number_of_times_however_many_batches():
    """On a GPU every value read back to the host (``.item()``) waits for all queued kernels:
    the evaluation sums its counts and its loss on the device and reads them once, at the end."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from decoupled.evaluate import evaluate

    class HostReads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func is torch.ops.aten._local_scalar_dense.default  # what .item() runs
            return func(*args, **(kwargs or {}))

    net, _ = make("dgl", K=2)
    x, y = data(n=64)

    def reads(batch_size: int) -> tuple[int, dict]:
        with HostReads() as host_reads:
            result = evaluate(net, TensorTestSet(x, y).batches(batch_size))
        return host_reads.count, result

    (one_batch, whole), (eight_batches, batched) = reads(64), reads(8)
    assert one_batch == eight_batches
    assert batched["test_acc_per_module"] == whole["test_acc_per_module"]
    assert batched["test_loss"] == pytest.approx(whole["test_loss"], rel=1e-5)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_an_epochs_seconds_are_the_time_it_took_a_stop_included(mode):
    sim = engine(mode)
    began = time.perf_counter()
    seconds = sim.run_epoch()["seconds"]
    assert 0 < seconds <= time.perf_counter() - began
    # stopped part-way, then resumed: the epoch's seconds add up both parts
    sim.stop = StopAtCheck(3)  # a SIGTERM in the middle of the epoch
    began = time.perf_counter()
    with pytest.raises(EpochInterrupted):
        sim.run_epoch()
    first_part = time.perf_counter() - began
    assert 0 < sim.partial["seconds"] <= first_part
    sim.stop = None
    began = time.perf_counter()
    seconds = sim.run_epoch()["seconds"]
    assert sim.partial is None and 0 < seconds <= first_part + time.perf_counter() - began


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_stop_request_stops_an_engine_only_once_set_and_only_between_steps(mode):
    sim, stop = engine(mode), StopRequest()
    assert not stop.is_set() and not stop.between_steps  # a signal now stops the job at once
    sim.stop, between = stop, []
    module_step = sim.method.module_step

    def spy(k, inputs, labels):
        between.append(stop.between_steps)
        return module_step(k, inputs, labels)

    sim.method.module_step = spy
    sim.run_epoch()  # a request nobody set stops nothing
    assert between and all(between) and not stop.between_steps
    stop.set()
    with pytest.raises(EpochInterrupted):
        sim.run_epoch()
    assert not stop.between_steps


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_the_engines_augment_the_batches_as_configured(mode):
    seen = {}
    for augment in ("none", "crop_flip"):
        sim = engine(mode, augment)
        module_step, inputs = sim.method.module_step, []

        def spy(k, x, labels, module_step=module_step, inputs=inputs):
            if k == 0:
                inputs.append(x)
            return module_step(k, x, labels)

        sim.method.module_step = spy
        sim.run_epoch()
        seen[augment] = inputs
    x, _ = data(n=16 * 8)
    raw = {img.numpy().tobytes() for img in x}
    assert all(img.numpy().tobytes() in raw for batch in seen["none"] for img in batch)
    assert sum(img.numpy().tobytes() not in raw for batch in seen["crop_flip"] for img in batch) > 16 * 8 // 2


def test_batches_are_a_seeded_permutation_per_pass_without_the_last_partial_batch():
    x, y = torch.arange(50.0)[:, None], torch.arange(50)  # image i is labelled i
    stream = BatchStream(x, y, batch_size=8, seed=0)
    assert stream.batches_per_pass == 6  # 50 // 8: the last 2 images wait for another pass
    passes = [[stream.next() for _ in range(6)] for _ in range(3)]
    orders = []
    for batches in passes:
        assert all(images.shape == (8, 1) and torch.equal(images[:, 0].long(), labels) for images, labels in batches)
        order = torch.cat([labels for _, labels in batches]).tolist()
        assert len(set(order)) == 48  # no image twice in a pass
        orders.append(order)
    assert orders[0] != orders[1] != orders[2]  # a new permutation each pass
    again, other = BatchStream(x, y, 8, seed=0), BatchStream(x, y, 8, seed=1)
    assert torch.cat([again.next()[1] for _ in range(6)]).tolist() == orders[0]
    assert torch.cat([other.next()[1] for _ in range(6)]).tolist() != orders[0]
    # augmentation draws from the stream's own generator: torch's global one is left alone
    augmented = BatchStream(torch.randn(50, 1, 8, 8), y, 8, seed=0, augment="crop_flip")
    torch.manual_seed(0)
    augmented.next()
    drawn_after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(drawn_after, torch.rand(1))


def test_a_time_budget_epoch_plays_the_schedules_epoch_in_order():
    """Every tick of the schedule's epoch goes to its worker, in order: a worker steps or idles
    (no input yet, or a full queue above); what reached the output is the top module's steps."""
    _, ddg = make("ddg", K=3, total_steps=32)
    x, y = data(n=16 * 16)
    sim = AsyncSimulator(ddg, BatchStream(x, y, 16, 0), 0, async_cfg(schedule="categorical", slowdown_factor=4, slowed_module=2, buffer_size=8, budget="time"))
    expected = list(CategoricalSchedule([1.0, 1.0, 4.0], seed=0).epoch(16))
    ticks, worker_tick = [], sim.worker_tick

    def spy(k):
        ticks.append(k)
        return worker_tick(k)

    sim.worker_tick = spy
    stats = sim.run_epoch()
    assert ticks == expected
    steps, idle = stats["steps_per_module"], stats["idle_per_module"]
    assert [steps[k] + idle[k] for k in range(3)] == [expected.count(k) for k in range(3)]
    assert steps[1] > steps[2] > 0 and stats["images"] == steps[2] * 16
    # the second epoch counts its own idle ticks only
    second = sim.run_epoch()
    assert sum(idle) > 0 and [a + b for a, b in zip(idle, second["idle_per_module"])] == sim.idle


def test_staleness_is_summarised_as_mean_max_and_histogram():
    assert staleness_summary(collections.Counter()) == {"mean": None, "max": None, "histogram": {}}
    assert staleness_summary(collections.Counter({4: 1, 1: 2})) == {"mean": 2.0, "max": 4, "histogram": {"1": 2, "4": 1}}


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("method", ["dgl", "dni", "ddg"])
def test_an_epochs_losses_are_the_mean_of_what_each_module_reported(mode, method):
    _, m = make(method, K=3, total_steps=12)
    x, y = data(n=16 * 6)
    sim = SimulatedEngine(m, BatchStream(x, y, 16, 0)) if mode == "sync" else AsyncSimulator(m, BatchStream(x, y, 16, 0), 0, async_cfg(schedule="event", slowdown_factor=2, slowed_module=1))
    reported, module_step = [[] for _ in range(3)], m.module_step

    def spy(k, inputs, labels):
        step = module_step(k, inputs, labels)
        if step.loss is not None:
            reported[k].append(step.loss.item())
        return step

    m.module_step = spy
    for _ in range(2):  # the second epoch: its own losses only
        for r in reported:
            r.clear()
        losses = sim.run_epoch()["train_loss_per_module"]
        assert losses[2] is not None  # (a lower async module may have made all its steps before)
        assert losses == [pytest.approx(sum(r) / len(r)) if r else None for r in reported]


@pytest.mark.parametrize("method,staleness", [("dgl", [{}, {}]), ("dni", [{"0": 6}, {"0": 6}]), ("ddg", [{"2": 4}, {"1": 5}])])
def test_a_sync_epoch_reports_every_modules_steps_and_each_gradients_delay(method, staleness):
    """In sync mode every module takes every batch; a gradient reaches module k
    ``gradient_delay(k)`` steps after its batch (DNI: in the same step; DDG: K-1-k), so the
    last ones of the epoch are still on their way."""
    _, m = make(method, K=3)
    x, y = data(n=16 * 6)
    stats = SimulatedEngine(m, BatchStream(x, y, 16, 0)).run_epoch()
    assert stats["steps_per_module"] == [6, 6, 6] and stats["images"] == 6 * 16
    assert [s["histogram"] for s in stats["grad_staleness"]] == [*staleness, {}]


@pytest.mark.parametrize("mode, budget", [("sync", None), ("async", "updates"), ("async", "time")])
def test_an_engine_reports_its_progress_through_the_epoch(mode, budget):
    """What the progress bar shows: done/total after each step, from the epoch's first step to
    its last, in every epoch (the second counts from its own start, not the run's)."""
    sim = engine(mode)
    if budget is not None:
        sim.budget = budget
    for _ in range(2):
        seen = []
        sim.progress = lambda done, total: seen.append((done, total))
        sim.run_epoch()
        totals = {total for _, total in seen}
        assert len(totals) == 1 and seen[-1][0] == seen[-1][1] > 0
        done = [d for d, _ in seen]
        assert done == sorted(done) and done[0] <= 1
        if mode == "sync":
            assert seen == [(s, 8) for s in range(1, 9)]  # one call per batch of the 8 per epoch
        elif budget == "updates":
            assert seen[-1] == (8, 8)  # the slowest module's updates, of the epoch's 8
        else:
            assert seen == [(i, len(seen)) for i in range(1, len(seen) + 1)]  # one per tick of the epoch's schedule


def test_an_engine_is_known_by_its_spec_alone():
    """The engines' SPECs (read without torch) are the schema's engines, and nothing outside
    src/decoupled/engines/ asks which engine a job has: adding one touches its file and the schema."""
    import re

    from conftest import REPO
    from decoupled import config, engines

    assert engines.names() == sorted(config.schema()["properties"]["engine"]["enum"])
    outside = [p for p in [*(REPO / "src/decoupled").rglob("*.py"), *(REPO / "workflow").rglob("*.smk"), REPO / "Snakefile"] if "engines" not in p.parts]
    asks = [f"{p.relative_to(REPO)}:{i}" for p in outside for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"""["']distributed["']""", line)]
    assert asks == []
    job = {"run": {"K": 3}, "train": {"device": "cuda"}}
    assert [engines.spec(n).process_count(job) for n in ("simulated", "distributed")] == [1, 3]
    assert engines.spec("distributed").gpus(job) == 3 and engines.spec("simulated").gpus({**job, "train": {"device": "cpu"}}) == 0
    assert engines.spec("distributed").command(job) == ["torchrun", "--standalone", "--nnodes=1", "--nproc-per-node=3", "-m", "decoupled"]
    assert engines.spec("simulated").command(job) == ["python", "-m", "decoupled"]


def test_a_test_set_in_memory_gives_every_image_once_in_order_and_each_worker_its_share():
    x, y = torch.arange(10.0).view(10, 1), torch.arange(10)
    test = TensorTestSet(x, y)
    batches = list(test.batches(4))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b[0] for b in batches]), x) and torch.equal(torch.cat([b[1] for b in batches]), y)
    shares = [torch.cat([b[1] for b in test.batches(2, part=(rank, 3))]).tolist() for rank in range(3)]
    assert shares == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
