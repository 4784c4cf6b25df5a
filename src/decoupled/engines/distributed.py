"""Real parallel workers: one process per module on torch.distributed, launched by torchrun.

Worker k (process rank k) owns module k: it alone runs ``method.module_step(k, ...)`` and
``method.receive_gradient(k, ...)``, the same method code as in the simulator. Worker 0 reads
the mini-batches; activations and labels go forward to worker k+1 through ``channels``;
gradients (DNI's true gradients, DDG/FDG's delayed ones) go back to worker k-1 for methods
whose modules exchange them (the ``sends_gradients`` trait; an activation is then used once,
because a gradient comes back for it). gloo on CPU, NCCL on GPU.

* **sync**: the lockstep pipeline of the simulator. Every worker takes each batch once, in
  order; worker k applies the gradient of the batch of step b at the end of its step
  b + ``method.gradient_delay(k)`` (gradients arrive in the order of their batches, so it
  waits for exactly those), so a sync run computes exactly what ``SimulatedEngine`` computes
  on the same data order, while the workers overlap in time. With delay 0 a worker waits for
  the one above (locked).
* **async**: every worker at its own pace. DGL's worker k trains on a replay buffer of the
  activations it has received (reusing them while worker k-1 is slow); the others take each
  activation once from a bounded queue and apply gradients as they arrive. The slowed
  worker (``async.slowed_module``) sleeps (S-1) times its compute time after each step.
  With ``async.budget: updates`` every DGL worker makes one epoch's steps per epoch; one that
  is done keeps forwarding, without learning, while a worker above it is not, and the epoch
  ends when all are done (the workers tell each other through torchrun's store). Unlike the
  simulator, faster workers wait there at every epoch's end, where the modules are shared.
  Methods with queues make one step per activation, so every worker makes worker 0's steps
  under either budget.

* **neuron groups** (GN-DGL, ``model.groups`` G > 1; sync mode): K x G workers, worker
  (k, g) = rank k G + g training group g of module k (``method.group_step``). A module's groups
  exchange their outputs and their heads' logits at every step (an all-gather among them);
  each sends its channels of the module's output to every group of the next module, which
  joins them (``channels.Gather``). Per-module numbers are then those of its groups together.

What crosses a boundary is ``boundary.payload``: the activations, or with ``model.quantize``
their packed codes and the codebook, rebuilt by the receiver (``boundary.received``).

An epoch is one pass of worker 0 over the data; an END_EPOCH message follows it down the
pipeline. Then the workers share their modules' weights (each broadcasts its own), so every
process holds the whole network; evaluation is split over the workers; per-worker numbers
(busy and idle seconds, steps, mean input-queue depth, bytes sent, staleness, when each
worker ended its last step) are gathered. Anything in flight (pending gradients, replay
buffers) carries over to the next epoch.
"""

from __future__ import annotations

import collections
import datetime
import os
import time

import torch
import torch.distributed as dist

from decoupled.data.batches import Batches
from decoupled.engines import boundary
from decoupled.engines.base import Engine, train_stream
from decoupled.engines.buffers import Entry, ReplayBuffer
from decoupled.engines.channels import DATA, END_EPOCH, STOP, Fanout, Gather, Inbox, Message, Outbox, PeerLost, TensorSpec, first_line
from decoupled.engines.clock import settled_time
from decoupled.engines.losses import LossTally
from decoupled.engines.staleness import staleness_summary
from decoupled.errors import UserError
from decoupled.evaluate import evaluate
from decoupled.methods.base import Method


# One process per module, started by torchrun; real workers' wall clock. A locked method
# (backprop) has no such form: its modules wait for one backward pass.
# With neuron groups (GN-DGL's model.groups G > 1): one process per group, K x G, in sync mode.
SPEC = {"name": "distributed", "processes": "per_module", "launcher": "torchrun", "section": "distributed", "clock": "wall clock",
        "runs_locked": False, "group_workers": "sync", "classes": {"sync": "distributed:DistributedEngine", "async": "distributed:DistributedEngine"}}


def join_workers(workers: int, device: str, timeout_s: float, pin_cores: bool = False, threads: int = 1) -> torch.device:
    """Join the process group torchrun set up; returns this worker's device.

    With ``pin_cores`` a CPU worker first binds itself to cores of its own (``worker_cores``),
    before the process group starts its threads, so that they inherit the binding. GPU workers
    are left alone: there the cores near each GPU matter (torchrun's ``--numa-binding``).
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise UserError("engine 'distributed' runs one process per module: launch with torchrun --nproc-per-node K (the workflow and `decoupled train` do)")
    world = int(os.environ["WORLD_SIZE"])
    if world != workers:
        raise UserError(f"engine 'distributed' needs one process per module (per neuron group): {workers} workers, but torchrun started {world}")
    if pin_cores and device == "cpu" and hasattr(os, "sched_setaffinity"):
        local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        cores = worker_cores(sorted(os.sched_getaffinity(0)), local_rank, local_world, threads)
        if cores is not None:
            os.sched_setaffinity(0, cores)
    if device == "cuda":
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(local)
    else:
        local = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        # Joining may wait for worker 0 to open its MLflow run (seconds on a busy store): the
        # peer timeout applies to the groups the engine makes once all have joined.
        joining = datetime.timedelta(seconds=max(timeout_s, JOIN_TIMEOUT_S))
        dist.init_process_group(backend, timeout=joining, device_id=local if device == "cuda" else None)
    return local


JOIN_TIMEOUT_S = 600


def worker_cores(allowed: list[int], local_rank: int, local_world: int, threads: int) -> list[int] | None:
    """The CPUs worker ``local_rank`` of a node keeps to itself: the ``threads`` after those of
    the workers before it, among the CPUs the job may use (``allowed``: a SLURM allocation or a
    cgroup may give fewer than the machine has). None when the node's workers do not all fit:
    then sharing is unavoidable and the OS places them.

    Why bind at all: unbound, the OS may move the workers of a pipeline, and their receiving
    threads, between cores at every wake-up (what binding gained, measured: docs/engines.md).
    """
    if local_world * threads > len(allowed):
        return None
    return allowed[local_rank * threads : (local_rank + 1) * threads]


class DistributedEngine(Engine):
    @classmethod
    def setup(cls, job):
        """Join the K workers (torchrun started them); this worker's device."""
        train = job["train"]
        return join_workers(job["run"]["K"] * job["model"].get("groups", 1), train["device"], job["distributed"]["timeout_s"], job["distributed"]["pin_cores"], train["threads"])

    @classmethod
    def agreed(cls, compute):
        choice = [compute() if dist.get_rank() == 0 else None]  # worker 0's, so that all build the same network
        dist.broadcast_object_list(choice, src=0)
        return choice[0]

    @classmethod
    def for_job(cls, method, data, job, device):
        # the data stays on the host: worker 0 reads the batches and sends them on (the others never draw one)
        batches = train_stream(data, job, torch.device("cpu"))
        return cls(method, batches, job.get("async"), asynchronous=job["run"]["mode"] == "async", distributed_cfg=job["distributed"], device=device)

    def __init__(self, method: Method, batches: Batches, async_cfg: dict, *, asynchronous: bool, distributed_cfg: dict, device: torch.device):
        net = method.net
        K, G = net.K, net.groups
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.method, self.K, self.G = method, K, G
        self.k, self.g = divmod(self.rank, G)  # worker (k, g): group g of module k (g = 0 without groups)
        self.is_main = self.rank == 0
        self.asynchronous, self.device = asynchronous, device
        self.batch_size = batches.batch_size
        self.batches = batches
        self.gradients_travel = method.traits.sends_gradients
        self.replay = asynchronous and method.traits.input_buffer == "replay"
        timeout, in_flight = distributed_cfg["timeout_s"], distributed_cfg["max_in_flight"]
        self.timeout_s = timeout
        # every process creates every group, in the same order (new_group is collective)
        limit = datetime.timedelta(seconds=timeout)
        self.everyone = dist.new_group(timeout=limit)  # the end-of-epoch collectives
        # a group of module b sends to each group of module b+1 (its own part of the module's output)
        rank = lambda b, g: b * G + g  # noqa: E731
        forward = {(b, g, h): dist.new_group([rank(b, g), rank(b + 1, h)], timeout=limit) for b in range(K - 1) for g in range(G) for h in range(G)}
        backward = [dist.new_group([b, b + 1], timeout=limit) for b in range(K - 1)] if self.gradients_travel else []
        # a module's groups exchange their outputs and heads' logits at every step
        modules = [dist.new_group([rank(b, g) for g in range(G)], timeout=limit) for b in range(K)] if G > 1 else []
        self.module_group = modules[self.k] if G > 1 else None
        act_specs = _boundary_specs(net, batches.input_shape, batches.batch_size, device)
        label_spec = TensorSpec((batches.batch_size,), torch.long)
        k, g = self.k, self.g
        self.to_next = Fanout([Outbox(rank(k + 1, h), forward[k, g, h], in_flight, timeout, device, f"module {k} -> {k + 1}" + (f", group {g} -> {h}" if G > 1 else ""))
                               for h in range(G)]) if k < K - 1 else None
        self.act_specs = act_specs
        self.exchanged_bytes = 0  # sent to the other groups of this module
        if k > 0:
            shape = list(act_specs[k - 1].shape)
            shape[1] //= G  # each group of module k-1 sends its channels
            payload_specs = [TensorSpec(*spec) for spec in boundary.payload_specs(net, k - 1, tuple(shape), act_specs[k - 1].dtype)]
            self.from_prev = Gather([Inbox(rank(k - 1, h), forward[k - 1, h, g], [*payload_specs, label_spec], in_flight, timeout, device,
                                           f"module {k - 1} -> {k}" + (f", group {h} -> {g}" if G > 1 else "")) for h in range(G)])
        else:
            self.from_prev = None
        self.to_prev = Outbox(k - 1, backward[k - 1], in_flight, timeout, device, f"gradients {k} -> {k - 1}") if k > 0 and self.gradients_travel else None
        # unbounded: gradients only come back for batches this worker sent, a bounded number
        self.from_next = Inbox(k + 1, backward[k], [act_specs[k]], 0, timeout, device, f"gradients {k + 1} -> {k}") if k < K - 1 and self.gradients_travel else None
        self.buffer = ReplayBuffer(async_cfg["buffer_size"], async_cfg["max_reuse"]) if self.replay and k > 0 else None
        self.slowdown = async_cfg["slowdown_factor"] if asynchronous and async_cfg["slowed_module"] == k else 1.0
        self.equal_updates = self.replay and async_cfg["budget"] == "updates"
        self.store = dist.PrefixStore("decoupled/done", dist.distributed_c10d._get_default_store()) if self.equal_updates else None
        self.epochs_done, self.seconds_before = 0, 0.0  # epochs and their seconds so far
        self.steps = 0  # this worker's steps so far
        self.newest_input = -1  # the producer's step count of the newest activation received
        self.forwarded_at: collections.deque[int] = collections.deque()  # steps awaiting a gradient
        self.input_staleness, self.grad_staleness = collections.Counter(), collections.Counter()
        self._start_epoch_tally()

    def _start_epoch_tally(self) -> None:
        """What each epoch reports from scratch: losses, compute and waiting seconds, queue depths."""
        self.losses = LossTally(self.K)
        self.busy_s, self.receive_wait_s, self.queue_depths = 0.0, 0.0, []
        self.last_step_end = time.perf_counter()

    # --- one epoch -------------------------------------------------------------------------

    def run_epoch(self) -> dict:
        self.method.net.train()
        self._start_epoch_tally()
        steps_before = self.epoch_first_step = self.steps
        waits_before, bytes_before = self._outbox_wait(), self._bytes_sent()
        start = time.perf_counter()
        if not self.asynchronous:
            self._sync_epoch()
        elif self.equal_updates:
            self._equal_updates_epoch()
        else:
            self._async_epoch()
        loop_s = time.perf_counter() - start
        self._share_modules()
        local = {
            "loss": self.losses.means()[self.k],
            "steps": self.steps - steps_before,
            "busy_s": self.busy_s,
            "idle_s": self.receive_wait_s + self._outbox_wait() - waits_before,
            "loop_s": loop_s,
            "queue_depth": sum(self.queue_depths) / len(self.queue_depths) if self.queue_depths else 0.0,
            "finish_time_s": self.seconds_before + max(self.last_step_end - start, 0.0),
            "cores": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "bytes_sent": self._bytes_sent() - bytes_before,
            "quantizer": q.take_stats() if (q := self.method.net.quantizer(self.k)) is not None and self.g == 0 else None,
            "input_staleness": staleness_summary(self.input_staleness),
            "grad_staleness": staleness_summary(self.grad_staleness),
        }
        workers = [None] * self.world
        self._together("gathering the workers' numbers", dist.all_gather_object, workers, local, group=self.everyone)
        seconds = max(w["loop_s"] for w in workers)
        workers = _per_module(workers, self.G)
        traffic = boundary.epoch_stats([w["bytes_sent"] for w in workers], workers[0]["steps"] * self.batch_size, [w["quantizer"] for w in workers[:-1]])
        self.epochs_done, self.seconds_before = self.epochs_done + 1, self.seconds_before + seconds
        stats = {
            "train_loss_per_module": [w["loss"] for w in workers],
            "images": workers[-1]["steps"] * self.batch_size,  # what reached the network's output
            "seconds": seconds,
            "steps_per_module": [w["steps"] for w in workers],
            "images_per_s_per_module": [w["steps"] * self.batch_size / seconds for w in workers],
            "busy_s_per_module": [w["busy_s"] for w in workers],
            "idle_s_per_module": [w["idle_s"] for w in workers],
            "busy_frac_per_module": [w["busy_s"] / seconds for w in workers],
            "queue_depth_per_module": [w["queue_depth"] for w in workers],
            **traffic,
            "cores_per_module": [w["cores"] for w in workers],  # the CPUs each worker may run on
            "finish_time_s_per_module": [w["finish_time_s"] for w in workers],  # seconds of training when each ended its last step
        }
        if self.asynchronous:
            stats.update(input_staleness=[w["input_staleness"] for w in workers], grad_staleness=[w["grad_staleness"] for w in workers])
        return stats

    def _sync_epoch(self) -> None:
        k, delay = self.k, self.method.gradient_delay(self.k)
        for _ in range(self.steps_per_epoch):
            if k == 0:
                inputs, labels = self.batches.next()
            else:
                inputs, labels = self._receive(self.from_prev).tensors
            self._compute(inputs, labels)
            if self.from_next is not None:
                self._apply_gradients_through(self.steps - 1 - delay)

    def _apply_gradients_through(self, batch: int) -> None:
        """Hand module k, in order, the gradients of every batch it forwarded up to step ``batch``
        (one comes back per batch, in order: wait for each)."""
        while self.forwarded_at and self.forwarded_at[0] <= batch:
            self._apply_gradient(self._receive(self.from_next))

    def _equal_updates_epoch(self) -> None:
        """``async.budget: updates`` with replay buffers: this worker makes one epoch's steps;
        then, while a worker above has not, it forwards without learning for it; the epoch
        ends when every worker is done, and END_EPOCH then follows what each one sent."""
        k, K = self.k, self.K
        target = self.steps + self.steps_per_epoch
        done = [f"{self.epochs_done}/{j}" for j in range(K)]  # set by each worker once it is done
        ended = False  # END_EPOCH from the worker below
        while True:
            if k > 0 and not ended:  # with nothing to take, wait: for a step, or briefly once done
                ended = self._refill_buffer(block=len(self.buffer) == 0, wait_s=None if self.steps < target else 0.002)
            if self.steps < target:
                if k == 0:
                    self._compute(*self.batches.next())
                elif (entry := self._take()) is not None:
                    self._compute(entry.inputs, entry.labels)
                if self.steps == target:
                    self.store.set(done[k], "1")
            elif self.store.check(done):
                break
            elif k < K - 1 and not self.store.check(done[k + 1 :]):
                self._forward_without_learning()
            elif k > 0 and not ended:  # keep the worker below from waiting on a full inbox
                ended = self._refill_buffer(block=True, wait_s=0.002)
            else:
                time.sleep(0.002)
        while k > 0 and not ended:  # everything the worker below sent this epoch
            ended = self._refill_buffer(block=True)
        if self.to_next is not None:
            self.to_next.send(END_EPOCH, self.steps)

    def _take(self) -> Entry | None:
        """The replay buffer's next entry, with its input staleness counted."""
        entry = self.buffer.take()
        if entry is not None:
            self.input_staleness[self.newest_input - entry.produced_at] += 1
        return entry

    def _forward_without_learning(self) -> None:
        if self.k == 0:
            inputs, labels = self.batches.next()
        elif (entry := self.buffer.take()) is not None:
            inputs, labels = entry.inputs, entry.labels
        else:
            return
        start = time.perf_counter()
        outputs = self.method.frozen_forward(self.k, inputs.to(self.device, non_blocking=True))
        sent = boundary.payload(self.method.net, self.k, outputs, learn=False)
        self._slow_down(start)
        # made by the final weights: as fresh as the output of the worker's newest step
        self.to_next.send(DATA, self.steps - 1, [*sent, labels.to(self.device, non_blocking=True)])

    def _async_epoch(self) -> None:
        k, fed = self.k, 0
        while True:
            if self.from_next is not None:  # gradients are applied as soon as they are here
                while (message := self._receive(self.from_next, block=False)) is not None:
                    if message.kind == DATA:
                        self._apply_gradient(message)
            if k == 0:
                if fed == self.steps_per_epoch:
                    break
                inputs, labels = self.batches.next()
                fed += 1
            elif self.replay:
                if self._refill_buffer(block=len(self.buffer) == 0):
                    break
                entry = self._take()
                inputs, labels = entry.inputs, entry.labels
            else:
                message = self._receive(self.from_prev)
                if message.kind == END_EPOCH:
                    break
                inputs, labels = message.tensors
                self.input_staleness[self.newest_input - message.step] += 1
            self._compute(inputs, labels)
        if self.to_next is not None:
            self.to_next.send(END_EPOCH, self.steps)

    def _refill_buffer(self, block: bool, wait_s: float | None = None) -> bool:
        """Move every activation that has arrived into the replay buffer, first waiting for one
        if ``block`` (at most ``wait_s`` seconds if given); True once the epoch's END_EPOCH arrives."""
        while (message := self._receive(self.from_prev, block, wait_s)) is not None:
            if message.kind == END_EPOCH:
                return True
            self.buffer.put(Entry(*message.tensors, message.step))
            block = False
        return False

    # --- steps ---------------------------------------------------------------------------------

    def _compute(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        k = self.k
        if k > 0:
            self.queue_depths.append(len(self.from_prev) + (len(self.buffer) if self.buffer is not None else 0))
        inputs, labels = inputs.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        start = time.perf_counter()
        if self.G > 1:  # this worker's group of module k; it sends its channels of the module's output
            outputs, loss, input_grad = self.method.group_step(k, self.g, inputs, labels, self._exchange)
        else:
            outputs, loss, input_grad = self.method.module_step(k, inputs, labels)
        sent = boundary.payload(self.method.net, k, outputs) if self.to_next is not None else None
        self.last_step_end = self._slow_down(start)
        self.losses.add(k, loss)
        if self.to_next is not None:
            self.to_next.send(DATA, self.steps, [*sent, labels])
            if self.gradients_travel:
                self.forwarded_at.append(self.steps)
        if input_grad is not None and self.to_prev is not None:
            self.to_prev.send(DATA, self.steps, [input_grad])
        self.steps += 1
        if self.progress is not None:  # the main worker's (module 0's) steps
            self.progress(self.steps - self.epoch_first_step, self.steps_per_epoch)

    def _exchange(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every group of this module's ``tensor``, in group order (an all-gather among them)."""
        parts = [torch.empty_like(tensor) for _ in range(self.G)]
        self._together("exchanging within a module", dist.all_gather, parts, tensor.contiguous(), group=self.module_group)
        self.exchanged_bytes += (self.G - 1) * tensor.numel() * tensor.element_size()
        return parts

    def _slow_down(self, start: float) -> float:
        """Close a piece of work begun at ``start``: a slowed worker's work takes S times as long.
        Returns when it ends."""
        worked = settled_time(self.device) - start  # busy time must include the kernels
        if self.slowdown > 1:
            time.sleep((self.slowdown - 1) * worked)
        end = time.perf_counter()
        self.busy_s += end - start
        return end

    def _apply_gradient(self, message: Message) -> None:
        self.grad_staleness[self.steps - 1 - self.forwarded_at.popleft()] += 1
        start = time.perf_counter()
        passed_down = self.method.receive_gradient(self.k, message.tensors[0])
        self._slow_down(start)
        if passed_down is not None and self.to_prev is not None:
            self.to_prev.send(DATA, self.steps - 1, [passed_down])

    def _receive(self, inbox: Inbox, block: bool = True, wait_s: float | None = None) -> Message | None:
        start = time.perf_counter()
        message = inbox.get(block, wait_s)
        self.receive_wait_s += time.perf_counter() - start
        if message is not None and inbox is self.from_prev and message.kind == DATA:
            self.newest_input = max(self.newest_input, message.step)
            *sent, labels = message.tensors
            inputs = boundary.received(self.method.net, self.k - 1, sent, self.act_specs[self.k - 1].shape)
            message = Message(message.kind, message.step, [inputs, labels])
        return message

    def _outbox_wait(self) -> float:
        return sum(o.wait_s for o in (self.to_next, self.to_prev) if o is not None)

    def _bytes_sent(self) -> int:
        return self.exchanged_bytes + sum(o.bytes_sent for o in (self.to_next, self.to_prev) if o is not None)

    # --- the whole network, evaluation, checkpoints --------------------------------------------

    def _together(self, what: str, collective, *args, **kwargs) -> None:
        """Run a collective of all workers; a worker that died or hangs ends the job with a clear error."""
        try:
            collective(*args, **kwargs)
        except RuntimeError as e:
            raise PeerLost(f"end of epoch, {what}: a worker did not answer within {self.timeout_s:g} s, or died ({first_line(e)})") from None

    def _share_modules(self) -> None:
        """Every worker broadcasts its module and head (its group's), so each process holds the whole network."""
        for rank in range(self.world):
            for part in self._owned(*divmod(rank, self.G)):
                for tensor in part.state_dict().values():
                    self._together("sharing the modules", dist.broadcast, tensor, src=rank, group=self.everyone)

    def _owned(self, k: int, g: int) -> list[torch.nn.Module]:
        """What worker (k, g) trains: module k, its head and quantizer; with groups, group g's
        branch and head (and the network's classifier on the last module's first group)."""
        net = self.method.net
        if self.G == 1:
            return [net.blocks[k], net.heads[k]] + ([net.quantizers[k]] if k < self.K - 1 else [])
        heads = net.heads[k]
        return [net.blocks[k].branches[g], heads.group_heads[g]] + ([heads.final] if heads.final is not None and g == 0 else [])

    def evaluate(self, net, test, batch_size) -> dict:
        """Each worker evaluates every (K x G)-th test image; the counts are summed."""
        part = evaluate(net, test.batches(batch_size, part=(self.rank, self.world)))
        parts = [None] * self.world
        self._together("gathering the evaluation", dist.all_gather_object, parts, part, group=self.everyone)
        n = sum(p["n_test"] for p in parts)

        def pooled(accuracy) -> float:  # the images right over all workers' shares, of all images
            return sum(round(accuracy(p) * p["n_test"]) for p in parts) / n

        per_module = [pooled(lambda p: p["test_acc_per_module"][m]) for m in range(net.K)]
        loss = sum(p["test_loss"] * p["n_test"] for p in parts) / n
        result = {"test_acc": pooled(lambda p: p["test_acc"]), "test_acc_per_module": per_module, "test_loss": loss, "n_test": n}
        if "test_acc_classifier" in part:  # model.eval_ensemble: test_acc is the ensemble's
            result["test_acc_classifier"] = per_module[-1]
        return result

    def checkpoint_state(self) -> dict:
        """Each worker's method state (its module's optimizer, pending state) and engine state, on worker 0.

        Gradients still travelling down are part of it: every worker first waits until its
        inbox from the worker above holds all that worker has sent, then saves the waiting ones.
        """
        if self.gradients_travel:
            if self.to_prev is not None:
                self.to_prev.flush()
            sent = [None] * self.world
            self._together("counting the messages in flight", dist.all_gather_object, sent, self.to_prev.sent if self.to_prev else 0, group=self.everyone)
            if self.from_next is not None:
                self.from_next.settle(sent[self.k + 1])
        local = {"method": self.method.state_dict(), "engine": self.state_dict()}
        workers = [None] * self.world if self.is_main else None
        self._together("gathering the checkpoint", dist.gather_object, local, workers, dst=0, group=self.everyone)
        return {"workers": workers}

    def load_checkpoint_state(self, state: dict) -> None:
        """Every worker reads the same checkpoint and takes its own module's part."""
        super().load_checkpoint_state(state["workers"][self.rank])

    def state_dict(self) -> dict:
        return {
            "batches": self.batches.state_dict(),
            "steps": self.steps,
            "epochs_done": self.epochs_done,
            "seconds_before": self.seconds_before,
            "newest_input": self.newest_input,
            "buffer": [(e.inputs, e.labels, e.produced_at, e.uses) for e in self.buffer.entries] if self.buffer is not None else None,
            "forwarded_at": list(self.forwarded_at),
            "input_staleness": dict(self.input_staleness),
            "grad_staleness": dict(self.grad_staleness),
            # gradients received but not yet applied; nothing
            # else waits at an epoch's end: activations are all taken within their epoch
            "from_next": self.from_next.snapshot() if self.from_next is not None else [],
        }

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state["batches"])
        self.steps, self.newest_input = state["steps"], state["newest_input"]
        self.epochs_done, self.seconds_before = state["epochs_done"], state["seconds_before"]
        if self.buffer is not None:
            self.buffer.entries = collections.deque(Entry(*e) for e in state["buffer"])
        self.forwarded_at = collections.deque(state["forwarded_at"])
        self.input_staleness = collections.Counter(state["input_staleness"])
        self.grad_staleness = collections.Counter(state["grad_staleness"])
        if self.from_next is not None:
            self.from_next.restore(state["from_next"])

    def close(self) -> None:
        """Tell the neighbours to stop receiving, wait for the last sends, leave the group."""
        for outbox in (self.to_next, self.to_prev):
            if outbox is not None:
                outbox.send(STOP, self.steps)
                outbox.flush()
        for inbox in (self.from_prev, self.from_next):
            if inbox is not None:
                inbox.join()
        self._together("leaving", dist.barrier, group=self.everyone)
        dist.destroy_process_group()


def _per_module(workers: list[dict], G: int) -> list[dict]:
    """The numbers of a module's G group workers as the module's: losses (each group's part of
    the module's loss) and bytes summed, the slowest one's seconds, the first one's steps and
    quantizer (their steps are equal: they exchange at every one), their cores together."""
    if G == 1:
        return workers
    modules = []
    for k in range(len(workers) // G):
        mine = workers[k * G : (k + 1) * G]
        losses = [w["loss"] for w in mine]
        modules.append({
            **mine[0],
            "loss": None if any(v is None for v in losses) else sum(losses),
            "bytes_sent": sum(w["bytes_sent"] for w in mine),
            "cores": sorted({c for w in mine for c in (w["cores"] or [])}) or None,
            "queue_depth": sum(w["queue_depth"] for w in mine) / G,
            **{name: max(w[name] for w in mine) for name in ("busy_s", "idle_s", "loop_s", "finish_time_s")},
        })
    return modules


def _boundary_specs(net, input_shape: tuple[int, ...], batch_size: int, device: torch.device) -> list[TensorSpec]:
    """Shape and dtype of the activations crossing each boundary, from a forward pass in eval
    mode (which leaves BatchNorm's running statistics alone)."""
    was_training = net.training
    net.eval()
    specs = []
    with torch.no_grad():
        h = torch.zeros((batch_size, *input_shape), device=device)
        for block in net.blocks[:-1]:
            h = block(h)
            specs.append(TensorSpec(tuple(h.shape), h.dtype))
    net.train(was_training)
    return specs
