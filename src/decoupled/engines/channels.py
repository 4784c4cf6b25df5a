"""Messages between neighbouring worker processes, over torch.distributed point-to-point.

A message is a small header ``[kind, step]`` and, for ``DATA``, a fixed list of tensors whose
shapes both sides know (activations and labels forward; a gradient backward). Each direction
of each module boundary gets its own process group: NCCL ignores tags, so forward and backward
traffic must not share one, and each group is then used by one thread per process.

* ``Outbox``: non-blocking sends, at most ``max_in_flight`` unfinished. A receiver that falls
  behind stops receiving (its inbox is full), so the sender waits there: back-pressure, and
  memory stays bounded.
* ``Inbox``: a thread blocks on the receives and hands whole messages to the worker's main
  thread through a queue, so the worker computes while the next message arrives.

A peer that dies, or sends nothing for ``timeout_s``, raises ``PeerLost`` in the worker rather
than leaving it waiting forever.
"""

from __future__ import annotations

import collections
import datetime
import queue
import threading
import time
from typing import NamedTuple

import torch
import torch.distributed as dist

from decoupled.errors import UserError

DATA, END_EPOCH, STOP = range(3)  # message kinds


class PeerLost(UserError):
    """A neighbouring worker died or stopped answering."""


class Message(NamedTuple):
    kind: int
    step: int  # the sender's step count when it sent this
    tensors: list[torch.Tensor]


class TensorSpec(NamedTuple):
    shape: tuple[int, ...]
    dtype: torch.dtype


class Outbox:
    def __init__(self, peer: int, group, max_in_flight: int, timeout_s: float, device: torch.device, what: str):
        self.peer, self.group, self.device, self.what = peer, group, device, what
        self.max_in_flight, self.timeout = max_in_flight, datetime.timedelta(seconds=timeout_s)
        self.in_flight: collections.deque = collections.deque()  # (works, tensors kept alive until sent)
        self.bytes_sent = 0
        self.sent = 0  # messages, so that a checkpoint can wait until the receiver has them all
        self.wait_s = 0.0  # time spent waiting for the receiver (back-pressure)

    def send(self, kind: int, step: int, tensors: list[torch.Tensor] = ()) -> None:
        header = torch.tensor([kind, step], dtype=torch.int64, device=self.device)
        payload = [header, *(t.contiguous() for t in tensors)]
        works = [dist.isend(t, self.peer, group=self.group) for t in payload]
        self.in_flight.append((works, payload))
        self.bytes_sent += sum(t.numel() * t.element_size() for t in payload)
        self.sent += 1
        while len(self.in_flight) > self.max_in_flight:
            self._wait_oldest()

    def flush(self) -> None:
        while self.in_flight:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        works, _ = self.in_flight.popleft()
        start = time.perf_counter()
        try:
            for work in works:
                work.wait(self.timeout)
        except RuntimeError as e:
            raise PeerLost(f"{self.what}: worker {self.peer} stopped receiving ({first_line(e)})") from None
        self.wait_s += time.perf_counter() - start


class Inbox:
    def __init__(self, peer: int, group, specs: list[TensorSpec], capacity: int, timeout_s: float, device: torch.device, what: str):
        self.peer, self.group, self.specs, self.device, self.what = peer, group, specs, device, what
        self.timeout_s = timeout_s
        self.queue: queue.Queue[Message] = queue.Queue(maxsize=capacity)  # 0 = unbounded
        self.error: str | None = None
        self.received = 0  # messages, counted when they are in the queue
        self.thread = threading.Thread(target=self._receive_all, name=f"inbox-{what}", daemon=True)
        self.thread.start()

    def _receive_all(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        try:
            while True:
                header = torch.empty(2, dtype=torch.int64, device=self.device)
                dist.recv(header, self.peer, group=self.group)
                kind, step = header.tolist()
                tensors = []
                if kind == DATA:
                    for spec in self.specs:
                        tensors.append(torch.empty(spec.shape, dtype=spec.dtype, device=self.device))
                        dist.recv(tensors[-1], self.peer, group=self.group)
                self.queue.put(Message(kind, step, tensors))
                self.received += 1
                if kind == STOP:
                    return
        except Exception as e:  # the peer died or timed out: tell the worker's main thread
            self.error = first_line(e)

    def get(self, block: bool = True, wait_s: float | None = None) -> Message | None:
        """The next message; None when not blocking, or after ``wait_s`` seconds, and none has arrived."""
        now = time.monotonic()
        deadline = now + self.timeout_s
        give_up = None if wait_s is None else now + wait_s
        while True:
            try:
                return self.queue.get(timeout=0.05 if wait_s is None else min(0.05, wait_s)) if block else self.queue.get_nowait()
            except queue.Empty:
                # a message that arrived before the error is still delivered first
                if self.error is not None:
                    raise PeerLost(f"{self.what}: lost worker {self.peer} ({self.error})") from None
                if not block or (give_up is not None and time.monotonic() > give_up):
                    return None
                if time.monotonic() > deadline:
                    raise PeerLost(f"{self.what}: worker {self.peer} sent nothing for {self.timeout_s:g} s") from None

    def __len__(self) -> int:
        return self.queue.qsize()

    def settle(self, sent: int) -> None:
        """Wait until the ``sent`` messages the peer has sent so far are all in the queue."""
        deadline = time.monotonic() + self.timeout_s
        while self.received < sent:
            if self.error is not None:
                raise PeerLost(f"{self.what}: lost worker {self.peer} ({self.error})")
            if time.monotonic() > deadline:
                raise PeerLost(f"{self.what}: {sent - self.received} message(s) of worker {self.peer} did not arrive within {self.timeout_s:g} s")
            time.sleep(0.001)

    def snapshot(self) -> list[list]:
        """The messages waiting in the queue, oldest first, as plain lists (for a checkpoint)."""
        with self.queue.mutex:
            return [[m.kind, m.step, list(m.tensors)] for m in self.queue.queue]

    def restore(self, messages: list[list]) -> None:
        """Put a checkpoint's waiting messages back, before any that arrived since."""
        with self.queue.mutex:
            self.queue.queue.extendleft(Message(kind, step, [t.to(self.device) for t in tensors]) for kind, step, tensors in reversed(messages))
            self.queue.not_empty.notify_all()

    def join(self) -> None:
        self.thread.join(timeout=self.timeout_s)


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


class Fanout:
    """The outboxes to every neuron group of the next module (one, without groups): each message
    goes to each of them."""

    def __init__(self, outboxes: list[Outbox]):
        self.outboxes = outboxes

    def send(self, kind: int, step: int, tensors: list[torch.Tensor] = ()) -> None:
        for outbox in self.outboxes:
            outbox.send(kind, step, tensors)

    def flush(self) -> None:
        for outbox in self.outboxes:
            outbox.flush()

    @property
    def bytes_sent(self) -> int:
        return sum(o.bytes_sent for o in self.outboxes)

    @property
    def sent(self) -> int:
        return self.outboxes[0].sent

    @property
    def wait_s(self) -> float:
        return sum(o.wait_s for o in self.outboxes)


class Gather:
    """The inboxes from every neuron group of the previous module (one, without groups): a message
    is one from each, the groups' activations (their first tensors) joined along the channels in
    group order, the rest (the labels) from the first."""

    def __init__(self, inboxes: list[Inbox]):
        self.inboxes = inboxes

    def get(self, block: bool = True, wait_s: float | None = None) -> Message | None:
        first = self.inboxes[0].get(block, wait_s)
        if first is None or len(self.inboxes) == 1:
            return first
        rest = [inbox.get() for inbox in self.inboxes[1:]]  # the same message from each group: here or on its way
        if first.kind != DATA:
            return first
        joined = torch.cat([first.tensors[0], *(m.tensors[0] for m in rest)], 1)
        return Message(first.kind, first.step, [joined, *first.tensors[1:]])

    def __len__(self) -> int:
        return min(len(inbox) for inbox in self.inboxes)

    def join(self) -> None:
        for inbox in self.inboxes:
            inbox.join()
