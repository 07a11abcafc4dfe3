"""Communication buffers of one band group: a slot per exchanging layer, blocking exchanges for synchronous steps,
and bucketed asynchronous ones for displaced steps (launched as a bucket fills, waited at the layer's next use)."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

DEFAULT_BUCKET_BYTES = 4 << 20
SYNC_TAG = 0  # p2p tag of blocking halo exchanges; bucket i uses i + 1


class SlotKind(enum.Enum):
    HALO = "halo"      # boundary rows with the neighbouring bands (point-to-point)
    GATHER = "gather"  # one tensor from every band (all-gather of equal, padded sizes)
    REDUCE = "reduce"  # float64 statistics summed over the bands (all-reduce)


@dataclass(frozen=True)
class SlotSpec:
    """Sizes in elements. HALO: `up` is the size of the messages that travel up the image (a band's first rows, to
    the band above it), `down` of those that travel down (a band's last rows, to the band below). GATHER/REDUCE:
    `up` is the size, `down` is 0."""

    kind: SlotKind
    up: int
    down: int
    dtype: torch.dtype
    device: torch.device
    fresh: bool = False  # exchanged fresh in every step (start/finish), never bucketed


@dataclass(eq=False)
class Slot:
    """One layer's views into the communication buffers.

    HALO: to_prev/from_next hold `up` elements, to_next/from_prev `down`. GATHER: send (n,), recv (bands, n).
    REDUCE: buf (n,), sent as this band's statistics and summed in place; local (n,), the statistics last sent.
    """

    spec: SlotSpec
    buffers: dict[str, torch.Tensor]
    bucket: Bucket | None = None
    posted_step: int = -1

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.buffers[name]


@dataclass(eq=False)
class Bucket:
    kind: SlotKind
    index: int
    slots: list[Slot]
    flat: dict[str, torch.Tensor] = field(default_factory=dict)
    filled: int = 0
    pending: list = field(default_factory=list)


# Flat buffers per kind: (name, the SlotSpec field giving each slot's share).
_LAYOUT = {
    SlotKind.HALO: (("to_prev", "up"), ("from_next", "up"), ("to_next", "down"), ("from_prev", "down")),
    SlotKind.GATHER: (("send", "up"), ("recv", "up")),
    SlotKind.REDUCE: (("buf", "up"), ("local", "up")),  # `local`: this band's statistics, kept, never sent
}


def _all_gather_flat(output: torch.Tensor, tensor: torch.Tensor, group, async_op: bool):
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(output, tensor, group=group, async_op=async_op)


class Exchange:
    """The buffers and in-flight communication of one rank in a group of `size` bands.

    Layers register a slot on their first call of an image (the registration pass); `bucket()` then lays the slots
    out in flat buffers, grouped by kind in call order up to `bucket_bytes` each.
    """

    def __init__(self, group, rank: int, size: int, bucket_bytes: int = DEFAULT_BUCKET_BYTES, tag_base: int = 0):
        self.group = group
        self.rank = rank
        self.size = size
        self.bucket_bytes = bucket_bytes
        self.tag_base = tag_base  # where this exchange's bucket tags start: another set's buckets may be in flight
        self.prev = dist.get_global_rank(group, rank - 1) if group is not None and rank > 0 else None
        self.next = dist.get_global_rank(group, rank + 1) if group is not None and rank < size - 1 else None
        self.slots: dict[object, Slot] = {}
        self.buckets: list[Bucket] = []
        self.step = 0
        self.bytes_sent: list[int] = []
        self._wait_seconds: list[float] = []
        self._timing: list[tuple[int, float, object, object]] = []  # CUDA waits not yet read: step, host s, events

    # -- bookkeeping -------------------------------------------------------------------------------------------

    def begin_image(self) -> None:
        """Forget every slot and the counts: the next step registers the slots afresh."""
        self.release()
        self.bytes_sent.clear()
        self._timing.clear()
        self._wait_seconds.clear()

    def release(self) -> None:
        """Finish what is in flight and free the buffers (the counts stay readable)."""
        self.drain()
        self.slots.clear()
        self.buckets.clear()

    def begin_step(self, step: int) -> None:
        self.step = step
        while len(self.bytes_sent) <= step:
            self.bytes_sent.append(0)
            self._wait_seconds.append(0.0)

    def _count(self, nbytes: int) -> None:
        self.bytes_sent[self.step] += nbytes

    @property
    def wait_seconds(self) -> list[float]:
        """Seconds waited on communication per step (CUDA waits are read once their events have completed)."""
        for step, host, start, end in self._timing:
            end.synchronize()
            self._wait_seconds[step] += max(host, start.elapsed_time(end) / 1000)
        self._timing.clear()
        return self._wait_seconds

    def _timed(self, wait: Callable[[], None], device: torch.device) -> None:
        """Time `wait`. On CUDA also with events on the compute stream: NCCL's wait() returns at once and stalls the
        stream instead, while gloo's blocks the host; the longer of the two is what the step lost."""
        cuda = device.type == "cuda"
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        wait()
        host = time.perf_counter() - t0
        if cuda:
            end.record()
            self._timing.append((self.step, host, start, end))  # read later: no host sync inside a step
        else:
            self._wait_seconds[self.step] += host

    # -- registration --------------------------------------------------------------------------------------------

    def slot(self, key: object, spec: SlotSpec) -> Slot:
        """The slot of `key` (a layer), registered with standalone buffers on its first call."""
        found = self.slots.get(key)
        if found is not None:
            if found.spec != spec:
                raise RuntimeError(f"a layer's exchange changed shape within an image ({found.spec} -> {spec}); "
                                   "call begin_image() between images")
            return found
        if self.buckets:
            raise RuntimeError("a layer ran for the first time after the first step of an image: its stale "
                               "activations do not exist")
        buffers = {}
        for name, size_of in _LAYOUT[spec.kind]:
            n = getattr(spec, size_of)
            shape = (self.size, n) if name == "recv" else (n,)
            buffers[name] = torch.zeros(shape, dtype=spec.dtype, device=spec.device)
        found = Slot(spec, buffers)
        self.slots[key] = found
        return found

    def bucket(self) -> None:
        """Lay every slot out in flat per-bucket buffers, keeping what the slots hold (the last exchange's data).
        Fresh slots keep their own buffers."""
        if self.buckets:
            return
        open_buckets: dict[tuple, tuple[Bucket, int]] = {}
        for slot in self.slots.values():
            spec = slot.spec
            if spec.fresh:
                continue
            key = (spec.kind, spec.dtype, spec.device)
            nbytes = (spec.up + spec.down) * spec.dtype.itemsize
            current = open_buckets.get(key)
            if current is None or (current[1] + nbytes > self.bucket_bytes and current[0].slots):
                current = (Bucket(spec.kind, len(self.buckets), []), 0)
                self.buckets.append(current[0])
            current[0].slots.append(slot)
            open_buckets[key] = (current[0], current[1] + nbytes)
        for bucket in self.buckets:
            self._lay_out(bucket)

    def _lay_out(self, bucket: Bucket) -> None:
        first = bucket.slots[0].spec
        for name, size_of in _LAYOUT[bucket.kind]:
            total = sum(getattr(s.spec, size_of) for s in bucket.slots)
            flat = torch.zeros((self.size, total) if name == "recv" else (total,), dtype=first.dtype,
                               device=first.device)
            bucket.flat[name] = flat
            offset = 0
            for slot in bucket.slots:
                n = getattr(slot.spec, size_of)
                view = flat[..., offset:offset + n]
                view.copy_(slot.buffers[name])
                slot.buffers[name] = view
                offset += n
        for slot in bucket.slots:
            slot.bucket = bucket

    # -- blocking exchange (synchronous steps) -------------------------------------------------------------------

    def gather_counts(self, n: int, device: torch.device) -> tuple[int, ...]:
        """Every band's value of `n` (a layer's token count), blocking; part of the registration pass."""
        if self.size == 1:
            return (n,)
        mine = torch.tensor([n], dtype=torch.int64, device=device)
        every = torch.zeros(self.size, dtype=torch.int64, device=device)
        self._count(mine.numel() * mine.element_size())
        self._timed(lambda: _all_gather_flat(every, mine, self.group, async_op=False), mine.device)
        return tuple(int(v) for v in every.tolist())

    def exchange_now(self, slot: Slot) -> None:
        """Exchange one slot and wait for it: afterwards its receive buffers hold the other bands' fresh data."""
        self.finish(self.start(slot), slot)

    def finish(self, works: list, slot: Slot) -> None:
        """Wait for what start(slot) launched."""
        if works:
            self._timed(lambda: [w.wait() for w in works], slot.spec.device)

    def start(self, slot: Slot) -> list:
        """Launch the exchange of one slot without waiting for it (finish() waits): a layer computes what does not
        need the other bands meanwhile."""
        if self.size == 1:
            return []
        kind = slot.spec.kind
        if kind is SlotKind.HALO:
            works = self._halo_ops(slot.buffers, SYNC_TAG)
        elif kind is SlotKind.GATHER:
            send, recv = slot["send"], slot["recv"]
            self._count(send.numel() * send.element_size())
            if recv.is_contiguous():  # standalone buffers: no per-band copies
                works = [_all_gather_flat(recv.view(-1), send, self.group, async_op=True)]
            else:  # a view into a bucket's buffer, strided over the bands
                works = [dist.all_gather(list(recv.unbind(0)), send, group=self.group, async_op=True)]
        else:
            self._count(slot["buf"].numel() * slot["buf"].element_size())
            works = [dist.all_reduce(slot["buf"], group=self.group, async_op=True)]
        return works

    def _halo_ops(self, buffers: dict[str, torch.Tensor], tag: int) -> list:
        ops = []
        for peer, send, recv in ((self.prev, "to_prev", "from_prev"), (self.next, "to_next", "from_next")):
            if peer is None:
                continue
            if buffers[send].numel():
                ops.append(dist.P2POp(dist.isend, buffers[send], peer, self.group, tag))
                self._count(buffers[send].numel() * buffers[send].element_size())
            if buffers[recv].numel():
                ops.append(dist.P2POp(dist.irecv, buffers[recv], peer, self.group, tag))
        return dist.batch_isend_irecv(ops) if ops else []

    # -- asynchronous exchange (displaced steps) -----------------------------------------------------------------

    def wait(self, slot: Slot) -> None:
        """Wait for the bucket exchange that brings `slot` the other bands' activations of the previous step."""
        bucket = slot.bucket
        if bucket is None:
            raise RuntimeError("asynchronous exchange before the slots were laid out in buckets")
        if bucket.pending:
            works, bucket.pending = bucket.pending, []
            self._timed(lambda: [w.wait() for w in works], slot.spec.device)

    def post(self, slot: Slot) -> None:
        """`slot` holds this band's fresh data: launch its bucket once every slot in it has been posted."""
        if slot.posted_step == self.step:
            raise RuntimeError("a parallelized layer ran twice in one displaced step; call begin_step(i) before "
                               "each forward")
        slot.posted_step = self.step
        bucket = slot.bucket
        bucket.filled += 1
        if bucket.filled < len(bucket.slots):
            return
        bucket.filled = 0
        if self.size == 1:
            return
        flat = bucket.flat
        if bucket.kind is SlotKind.HALO:
            bucket.pending = list(self._halo_ops(flat, SYNC_TAG + 1 + self.tag_base + bucket.index))
        elif bucket.kind is SlotKind.GATHER:
            self._count(flat["send"].numel() * flat["send"].element_size())
            bucket.pending = [_all_gather_flat(flat["recv"].view(-1), flat["send"], self.group, async_op=True)]
        else:
            self._count(flat["buf"].numel() * flat["buf"].element_size())
            bucket.pending = [dist.all_reduce(flat["buf"], group=self.group, async_op=True)]

    def drain(self) -> None:
        """Wait for everything in flight (before buffers are dropped or the layers removed)."""
        for bucket in self.buckets:
            if bucket.pending:
                works, bucket.pending = bucket.pending, []
                for w in works:
                    w.wait()
