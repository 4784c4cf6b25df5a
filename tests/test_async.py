"""The async simulator: schedules, buffers, staleness, and its reference case (sync DGL)."""

import collections

import pytest
import torch

from decoupled import config
from decoupled.data.batches import BatchStream
from decoupled.engines.buffers import Entry, FifoQueue, ReplayBuffer
from decoupled.engines.simulated import SimulatedEngine
from decoupled.engines.simulated_async import AsyncSimulator

from test_methods import assert_same_params, make


def async_cfg(**changes):
    cfg = config.validate({"experiment": "t", "grid": {"methods": ["dgl"]}})["async"]
    return {**cfg, **changes}


def data(n=96, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def entry(i):
    return Entry(torch.full((1,), float(i)), torch.zeros(1, dtype=torch.long), produced_at=i)


def test_async_dgl_without_slowdown_and_buffer_one_is_sync_dgl():
    x, y = data()
    sync_net, sync_dgl = make("dgl", K=3)
    async_net, async_dgl = make("dgl", K=3)
    SimulatedEngine(sync_dgl, BatchStream(x, y, 16, 0)).run_epoch()
    sim = AsyncSimulator(async_dgl, BatchStream(x, y, 16, 0), 0, async_cfg(schedule="event", buffer_size=1))
    stats = sim.run_epoch()
    assert stats["steps_per_module"] == [6, 6, 6] and stats["idle_per_module"] == [0, 0, 0]
    assert all(s["max"] == 0 for s in stats["input_staleness"][1:])  # every input is fresh
    assert_same_params(sync_net, async_net)


@pytest.mark.parametrize("budget", ["updates", "time"])
@pytest.mark.parametrize("schedule", ["categorical", "event"])
def test_simulator_is_deterministic_under_a_seed(schedule, budget):
    def run(seed):
        x, y = data()
        _, dgl = make("dgl", K=3)
        sim = AsyncSimulator(dgl, BatchStream(x, y, 16, seed), seed, async_cfg(schedule=schedule, slowdown_factor=2, slowed_module=1, budget=budget))
        stats = [sim.run_epoch() for _ in range(2)]
        return [(s["train_loss_per_module"], s["steps_per_module"], s["input_staleness"]) for s in stats]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_event_schedule_steps_follow_the_slowdown_exactly():
    x, y = data(n=16 * 24)
    _, dgl = make("dgl", K=3)
    sim = AsyncSimulator(dgl, BatchStream(x, y, 16, 0), 0, async_cfg(schedule="event", slowdown_factor=4, slowed_module=1, budget="time"))
    stats = sim.run_epoch()
    assert stats["steps_per_module"][0] == 24 and stats["steps_per_module"][1] == 6
    # module 2 reads module 1's replay buffer: it keeps training on recent entries
    assert stats["steps_per_module"][2] == 24 - stats["idle_per_module"][2]
    # the replay rule favours fresh data: the slow module always takes module 0's newest output
    assert stats["input_staleness"][1]["max"] == 0


@pytest.mark.parametrize("lazy", [False, True])
def test_categorical_schedule_draws_follow_the_1_over_S_weights(lazy):
    from decoupled.engines.schedule import CategoricalSchedule, durations

    schedule = CategoricalSchedule(durations(3, 4, 1), seed=0)  # weights 1, 1/4, 1
    ticks = [schedule.next() for _ in range(9000)] if lazy else list(schedule.epoch(4000))
    assert len(ticks) == 9000  # an epoch of 4000 normal steps: 4000 x (1 + 1/4 + 1) ticks
    counts = torch.bincount(torch.tensor(ticks), minlength=3).double()
    expected = torch.tensor([4, 1, 4], dtype=torch.float64) / 9 * 9000
    sigma = (expected * (1 - expected / 9000)).sqrt()
    assert ((counts - expected).abs() < 4 * sigma).all(), counts  # binomial spread: 4 sigma


@pytest.mark.parametrize("lazy", [False, True])
def test_categorical_schedule_draws_from_its_own_seeded_generator(lazy):
    from decoupled.engines.schedule import CategoricalSchedule, durations

    def ticks(seed, global_seed):
        torch.manual_seed(global_seed)  # whatever else draws from torch's global generator
        schedule = CategoricalSchedule(durations(3, 2, 1), seed=seed)
        return [schedule.next() for _ in range(200)] if lazy else list(schedule.epoch(80))

    assert ticks(0, global_seed=1) == ticks(0, global_seed=2)
    assert ticks(0, global_seed=1) != ticks(1, global_seed=1)


def test_a_full_fifo_queue_frees_its_slot_when_the_entry_size_puts_back_is_taken():
    queue = FifoQueue(size=2)
    assert queue.slot_free_at() == 0.0  # entries 0 and 1 have a slot each from the start
    queue.put(entry(0))
    assert queue.slot_free_at() == 0.0
    queue.put(entry(1))
    queue.take(), queue.take_times.append(5.0)  # entry 0 taken at 5 s
    assert queue.slot_free_at() == 5.0  # entry 2 goes into entry 0's slot
    queue.put(entry(2))
    queue.take(), queue.take_times.append(7.0)
    assert queue.slot_free_at() == 7.0  # entry 3 into entry 1's


@pytest.mark.parametrize("method", ["dgl", "dni", "ddg", "fdg"])
@pytest.mark.parametrize("slowed", [0, 2])
def test_equal_updates_budget_gives_every_module_the_steps_of_sync_mode(method, slowed):
    x, y = data(n=16 * 10)  # 10 steps per epoch, 3 epochs
    _, m = make(method, K=3, total_steps=30)
    sim = AsyncSimulator(m, BatchStream(x, y, 16, 0), 0, async_cfg(slowdown_factor=3, slowed_module=slowed))
    epochs = [sim.run_epoch() for _ in range(3)]
    assert [sum(e["steps_per_module"][k] for e in epochs) for k in range(3)] == [30, 30, 30]
    # epoch i ends as soon as the last module has made its 10 i steps; faster ones may be ahead
    assert [min(sum(e["steps_per_module"][k] for e in epochs[: i + 1]) for k in range(3)) for i in range(3)] == [10, 20, 30]
    if method in ("dgl", "dni"):  # each module's LR schedule ran on its own 30 updates
        assert [s.last_epoch for s in m.schedulers[:3]] == [30, 30, 30]


@pytest.mark.parametrize("method", ["dgl", "ddg"])
def test_time_budget_gives_the_slowed_module_fewer_steps(method):
    x, y = data(n=16 * 24)
    _, m = make(method, K=3, total_steps=48)
    sim = AsyncSimulator(m, BatchStream(x, y, 16, 0), 0, async_cfg(schedule="event", slowdown_factor=4, slowed_module=0, budget="time"))
    for _ in range(2):  # every epoch: the same schedule time
        steps = sim.run_epoch()["steps_per_module"]
        assert steps[0] == 6  # a quarter of the epoch's 24
        if method == "ddg":  # each activation once: the modules above wait for the slowed one
            assert steps[1] <= 6 and steps[2] <= 6


def test_replay_buffer_serves_least_used_then_most_recent():
    buffer = ReplayBuffer(size=3)
    for i in range(4):
        buffer.put(entry(i))  # 0 is evicted: the buffer keeps the last 3
    taken = [buffer.take().produced_at for _ in range(6)]
    assert taken == [3, 2, 1, 3, 2, 1]
    limited = ReplayBuffer(size=3, max_reuse=2)
    for i in range(2):
        limited.put(entry(i))
    assert [limited.take().produced_at for _ in range(4)] == [1, 0, 1, 0]
    assert len(limited) == 0 and limited.take() is None


def test_fifo_queue_is_in_order_and_bounded():
    queue = FifoQueue(size=2)
    queue.put(entry(0)), queue.put(entry(1))
    assert queue.full()
    assert [queue.take().produced_at, queue.take().produced_at] == [0, 1]
    assert queue.take() is None


def test_fifo_back_pressure_makes_the_fast_producer_wait():
    x, y = data(n=16 * 20)
    _, dni = make("dni", K=2)
    sim = AsyncSimulator(dni, BatchStream(x, y, 16, 0), 0, async_cfg(schedule="event", slowdown_factor=4, slowed_module=1, buffer_size=2, budget="time"))
    stats = sim.run_epoch()
    assert stats["steps_per_module"][1] == 5
    # module 0 may only run 2 batches ahead of module 1, so it idles most ticks
    assert stats["steps_per_module"][0] <= stats["steps_per_module"][1] + 2 + 1
    assert stats["idle_per_module"][0] > 0
    assert len(sim.buffers[1]) <= 2


@pytest.mark.parametrize("method", ["dni", "ddg", "fdg"])
def test_gradients_are_as_stale_as_the_schedule_makes_them(method):
    x, y = data(n=16 * 24)
    _, m = make(method, K=3)
    sim = AsyncSimulator(m, BatchStream(x, y, 16, 0), 0, async_cfg(schedule="event", slowdown_factor=3, slowed_module=2, buffer_size=4))
    stats = sim.run_epoch()
    steps, staleness, inputs = stats["steps_per_module"], stats["grad_staleness"], stats["input_staleness"]
    assert staleness[2]["mean"] is None  # the top module computes its own loss
    # each input consumed counted once; the slowed top module's queue of 4 stays full, so it
    # takes activations its producer made 3 steps ago, and their gradients come back as old
    assert sum(inputs[2]["histogram"].values()) == steps[2] and inputs[2]["max"] == 3
    assert staleness[1]["max"] == 3
    # one gradient back per step of the top module (the last ones may still be on their way)
    assert sum(staleness[1]["histogram"].values()) + len(sim.inbox[1]) == steps[2]
    if method == "dni":  # module 1 sends its true gradient at once: as old as what it consumed
        assert sum(staleness[0]["histogram"].values()) + len(sim.inbox[0]) == steps[1]
        assert staleness[0]["max"] == inputs[1]["max"]
    else:  # module 1 passes a gradient on only once its own came back: older still
        assert staleness[0]["max"] > staleness[1]["max"]
    assert all(torch.isfinite(p).all() for p in m.net.parameters())


@pytest.mark.parametrize("augment", ["crop_flip", "crop_flip_reflect"])
def test_crop_flip_shifts_by_every_offset_and_flips_half_the_images(augment):
    from decoupled.data.batches import crop_flip

    n, size, padding = 600, 8, 4  # the default padding
    x = torch.arange(n * size * size, dtype=torch.float32).reshape(n, 1, size, size) + 1  # every pixel distinct, none 0
    mode = {"crop_flip": "constant", "crop_flip_reflect": "reflect"}[augment]
    out = crop_flip(x, torch.Generator().manual_seed(0), mode=mode)
    assert out.shape == x.shape
    # reflected padding brings in no zeros; the stream's augment picks the padding
    assert (out == 0).any() == (mode == "constant")
    stream = BatchStream(x, torch.zeros(n), n, seed=0, augment=augment)
    assert (stream.next()[0] == 0).any() == (mode == "constant")
    offsets, flips = [], []
    for i in range(n):  # each image is a window of its padded self, maybe mirrored
        padded = torch.nn.functional.pad(x[i], (padding,) * 4, mode=mode)
        found = [(t, l, f) for t in range(2 * padding + 1) for l in range(2 * padding + 1) for f in (False, True)
                 if torch.equal(out[i], padded[:, t : t + size, l : l + size].flip(2) if f else padded[:, t : t + size, l : l + size])]
        # a reflected window at the edge can equal the mirror of its neighbour: count the unambiguous ones
        assert len(found) == 1 or (mode == "reflect" and found), i
        if len(found) == 1:
            offsets.append(found[0][:2])
            flips.append(found[0][2])
    tops, lefts = {t for t, _ in offsets}, {l for _, l in offsets}
    assert tops == set(range(2 * padding + 1))  # every shift, independently drawn
    assert lefts == set(range(2 * padding + 1)) or (mode == "reflect" and lefts >= set(range(2, 2 * padding - 1)))  # (edge ones ambiguous)
    assert len(set(offsets)) > (60 if mode == "constant" else 40)
    assert len(flips) > n * 0.4 and 0.4 < sum(flips) / len(flips) < 0.6
    assert torch.equal(crop_flip(x, torch.Generator().manual_seed(0), mode=mode), out)  # seeded...
    assert not torch.equal(crop_flip(x, torch.Generator().manual_seed(1), mode=mode), out)  # ...by its generator alone



@pytest.mark.parametrize("augment", ["none", "crop_flip", "crop_flip_reflect"])
def test_batches_stay_on_the_datas_device(augment):
    """With train.device cuda the data lives on the GPU: a batch's indices and its crops and flips,
    drawn by CPU generators, must go to the data's device, not the images to the CPU. The meta
    device stands in for a GPU here: a CPU tensor mixed into its ops fails as it would on cuda."""

    x, y = torch.zeros(40, 3, 8, 8, device="meta"), torch.zeros(40, dtype=torch.long, device="meta")
    images, labels = BatchStream(x, y, 8, seed=0, augment=augment).next()
    assert images.device.type == labels.device.type == "meta" and images.shape == (8, 3, 8, 8)


class FakeTime:
    """perf_counter advancing by ``cost`` seconds per call: every piece of work costs exactly that."""

    def __init__(self, cost=1.0):
        self.now, self.cost = 0.0, cost

    def perf_counter(self):
        self.now += self.cost
        return self.now


def test_parallel_clock_of_a_sync_pipeline(monkeypatch):
    from decoupled.engines import clock  # the simulated engines read the time through clock.settled_time

    monkeypatch.setattr(clock, "time", FakeTime())
    x, y = data(n=16 * 6)
    _, dgl = make("dgl", K=3)
    stats = SimulatedEngine(dgl, BatchStream(x, y, 16, 0)).run_epoch()
    assert stats["finish_time_s_per_module"] == [6, 7, 8]  # a pipeline: module k starts one step late
    _, backprop = make("backprop", K=3)
    stats = SimulatedEngine(backprop, BatchStream(x, y, 16, 0)).run_epoch()
    assert stats["sim_time_s"] == 18  # locked: the next batch waits for the last backward
    # DNI: module 0 fits its synthesizer to a batch's true gradient once module 1 has sent it
    # (same step): forward, wait, fit, 3 s a batch
    _, dni = make("dni", K=2)
    assert SimulatedEngine(dni, BatchStream(x, y, 16, 0)).run_epoch()["finish_time_s_per_module"] == [18, 17]
    # DDG: module 0 alternates a forward and the gradient of the batch before (2 s a batch,
    # 6 forwards and 5 gradients); module 1 takes each batch as module 0 hands it on
    _, ddg = make("ddg", K=2)
    assert SimulatedEngine(ddg, BatchStream(x, y, 16, 0)).run_epoch()["finish_time_s_per_module"] == [11, 11]


def test_parallel_clock_counts_the_slowdown_and_the_waits(monkeypatch):
    from decoupled.engines import clock

    monkeypatch.setattr(clock, "time", FakeTime())
    x, y = data(n=16 * 6)
    _, dgl = make("dgl", K=2, total_steps=6)
    stats = AsyncSimulator(dgl, BatchStream(x, y, 16, 0), 0, async_cfg(schedule="event", slowdown_factor=3, slowed_module=0)).run_epoch()
    assert stats["steps_per_module"] == [6, 6]
    assert stats["finish_time_s_per_module"][0] == 18 and stats["sim_time_s"] == 18  # 6 steps of 3 s
    assert stats["finish_time_s_per_module"][1] < 18  # module 1 replays while module 0 is slow
    # DNI: the top module, slowed 4x, waits for nothing but its first input (ready at 1 s)
    _, dni = make("dni", K=2, total_steps=6)
    sim = AsyncSimulator(dni, BatchStream(x, y, 16, 0), 0, async_cfg(schedule="event", slowdown_factor=4, slowed_module=1, buffer_size=2))
    made, put = [], sim.buffers[1].put
    sim.buffers[1].put = lambda entry: (made.append(entry.ready_at), put(entry))
    stats = sim.run_epoch()
    assert stats["finish_time_s_per_module"][1] == 1 + 6 * 4
    # module 1 starts its steps at 1, 5, 9, ...; with a queue of 2, module 0 starts step b
    # (1 s, so made at start + 1) only once module 1 has taken entry b-2 and freed its slot
    starts = [1 + 4 * j for j in range(6)]
    assert all(made[b] - 1 >= starts[b - 2] for b in range(2, 6))
    # module 0 waits for gradients: it ends applying the fifth, sent at 21 s (the sixth is sent
    # by the run's last step)
    assert stats["finish_time_s_per_module"][0] == 21 + 1


def spy_frozen_forwards(sim):
    """Record (module, every module's step count) at each forward without learning."""
    calls, frozen_forward = [], sim.method.frozen_forward

    def spy(k, inputs):
        calls.append((k, list(sim.steps)))
        return frozen_forward(k, inputs)

    sim.method.frozen_forward = spy
    return calls


def test_a_finished_module_keeps_forwarding_for_the_replay_buffer_above(monkeypatch):
    """DGL, equal updates, the top module slowed: modules 0 and 1 finish first, then feed it
    fresh batches through their final weights (as the DGL code does) rather than leaving it
    to replay the last few forever. Those forwards take time on their workers' clocks."""
    from decoupled.engines import clock

    c = 0.01  # seconds per piece of work: below the 1 s a wrong default start time would show
    monkeypatch.setattr(clock, "time", FakeTime(c))
    x, y = data(n=16 * 12)
    _, dgl = make("dgl", K=3, total_steps=12)
    sim = AsyncSimulator(dgl, BatchStream(x, y, 16, 0), 0, async_cfg(schedule="event", slowdown_factor=4, slowed_module=2, buffer_size=2))
    take, uses = sim.buffers[2].take, []

    def spy_take():
        entry = take()
        uses.append(entry.uses)
        return entry

    sim.buffers[2].take = spy_take
    frozen = spy_frozen_forwards(sim)
    stats = sim.run_epoch()
    assert stats["steps_per_module"] == [12, 12, 12]
    # modules 0 and 1 were done after 3 of module 2's steps; it never had to reuse an input,
    # and what they sent was as fresh as their newest output (staleness 0)
    assert uses == [1] * 12 and sim.input_staleness[2] == {0: 12}
    forwards = collections.Counter(k for k, _ in frozen)
    assert forwards[0] > 0 and forwards[1] > 0
    # module 0 never waits: its 12 steps and its forwards, back to back; module 1 waits one
    # unit for its first input; module 2 starts on the freshest of the first 4 outputs
    # (ready at 5 units: the event schedule's order) and then never waits
    finish = stats["finish_time_s_per_module"]
    assert finish[0] == pytest.approx((12 + forwards[0]) * c) and finish[1] == pytest.approx((1 + 12 + forwards[1]) * c)
    assert finish[2] == pytest.approx((5 + 12 * 4) * c)


def test_a_finished_module_stops_forwarding_when_no_module_above_learns():
    """The bottom module slowed: modules 1 and 2 make their updates on replays long before it,
    and since nothing above either still learns, neither forwards without learning."""
    x, y = data(n=16 * 12)
    for slowed in (0, 1, 2):
        _, dgl = make("dgl", K=3, total_steps=12)
        sim = AsyncSimulator(dgl, BatchStream(x, y, 16, 0), 0, async_cfg(schedule="event", slowdown_factor=4, slowed_module=slowed, buffer_size=2))
        frozen = spy_frozen_forwards(sim)
        sim.run_epoch()
        assert all(min(steps[k + 1 :]) < 12 for k, steps in frozen)
        assert bool(frozen) == (slowed > 0)


@pytest.mark.parametrize("seed", [0, 1])
def test_no_worker_starts_on_an_activation_before_it_was_made(monkeypatch, seed):
    """Categorical schedule, so that a finished worker's forwards can run ahead of the worker
    above it in simulated time: every output is ready when its worker's clock has made it,
    and no worker starts on an input before it is ready (forwards without learning included)."""
    from decoupled.engines import clock

    monkeypatch.setattr(clock, "time", FakeTime(0.01))
    x, y = data(n=16 * 12)
    _, dgl = make("dgl", K=3, total_steps=12)
    sim = AsyncSimulator(dgl, BatchStream(x, y, 16, seed), seed, async_cfg(schedule="categorical", slowdown_factor=4, slowed_module=2, buffer_size=2))
    taken, early, puts = {}, [], []
    for k in (1, 2):
        buffer = sim.buffers[k]

        def spy_put(entry, k=k, put=buffer.put):
            puts.append((entry.ready_at, sim.clock.free_at[k - 1]))
            put(entry)

        def spy_take(k=k, take=buffer.take):
            taken[k] = entry = take()
            return entry

        buffer.put, buffer.take = spy_put, spy_take
    run = sim.clock.run

    def spy_run(k, seconds, ready):
        start, end = run(k, seconds, ready)
        entry = taken.pop(k, None)
        if entry is not None and start < entry.ready_at:
            early.append((k, start, entry.ready_at))
        return start, end

    sim.clock.run = spy_run
    frozen = spy_frozen_forwards(sim)
    sim.run_epoch()
    assert frozen and len(puts) > 24  # forwards without learning happened
    assert all(made == free for made, free in puts) and early == []


@pytest.mark.parametrize("method", ["dni", "dgl"])
def test_the_parallel_clock_resumes_where_it_stopped(monkeypatch, method):
    """Resumed from its state after epoch 1, a run's clock ends where the uninterrupted one's
    does (queue slots taken and gradients in flight included)."""
    from decoupled.engines import clock

    def run(resume_after=None):
        monkeypatch.setattr(clock, "time", FakeTime())
        x, y = data(n=16 * 6)
        cfg = async_cfg(schedule="event", slowdown_factor=3, slowed_module=1, buffer_size=2)
        _, m = make(method, K=2, total_steps=12)
        sim = AsyncSimulator(m, BatchStream(x, y, 16, 0), 0, cfg)
        first = sim.run_epoch()
        if resume_after is not None:  # a fresh engine, from the state (the network's weights stay)
            state = sim.state_dict()
            sim = AsyncSimulator(m, BatchStream(x, y, 16, 0), 0, cfg)
            sim.load_state_dict(state)
        return first, sim.run_epoch()

    assert run(resume_after=1)[1]["finish_time_s_per_module"] == run()[1]["finish_time_s_per_module"]


def test_the_async_state_holds_the_queues_take_times():
    x, y = data(n=16 * 6)
    cfg = async_cfg(schedule="event", slowdown_factor=3, slowed_module=1, buffer_size=2)
    _, dni = make("dni", K=2, total_steps=12)
    sim = AsyncSimulator(dni, BatchStream(x, y, 16, 0), 0, cfg)
    sim.run_epoch()
    fresh = AsyncSimulator(dni, BatchStream(x, y, 16, 0), 0, cfg)
    fresh.load_state_dict(sim.state_dict())
    assert list(sim.buffers[1].take_times) and list(fresh.buffers[1].take_times) == list(sim.buffers[1].take_times)


@pytest.mark.parametrize("max_reuse", [None, 1])
def test_the_simulator_gives_dgl_replay_buffers_of_the_configured_size_and_reuse(max_reuse):
    """The bottom module slowed: the fast modules above replay what they have, at most
    buffer_size entries, each at most max_reuse times."""
    x, y = data(n=16 * 12)
    _, dgl = make("dgl", K=3, total_steps=12)
    sim = AsyncSimulator(dgl, BatchStream(x, y, 16, 0), 0, async_cfg(schedule="event", slowdown_factor=4, slowed_module=0, buffer_size=2, max_reuse=max_reuse, budget="time"))
    sizes, uses = [], []
    take = sim.buffers[1].take

    def spy_take():
        sizes.append(len(sim.buffers[1].entries))
        entry = take()
        if entry is not None:
            uses.append(entry.uses)
        return entry

    sim.buffers[1].take = spy_take
    sim.run_epoch()
    assert sim.steps[0] == 3  # module 0's outputs: one more than the buffer holds
    if max_reuse is None:  # the buffer fills up to its size, and entries are served again
        assert max(sizes) == 2 and max(uses) > 1
    else:  # each entry served once, then dropped
        assert max(sizes) <= 2 and uses == [1] * 3


def test_the_simulator_refuses_a_slowed_module_or_an_augmentation_that_does_not_exist():
    x, y = data()
    _, dgl = make("dgl", K=3)
    with pytest.raises(ValueError, match="slowed module 3 does not exist with K=3"):
        AsyncSimulator(dgl, BatchStream(x, y, 16, 0), 0, async_cfg(slowdown_factor=2, slowed_module=3))
    with pytest.raises(ValueError, match="unknown augment 'flip'"):
        BatchStream(x, y, 16, 0, augment="flip")
