"""The GPU path's decisions, checked on CPUs with fakes: which communicator split_cfg's partners swap on, which
stream a step waits for, and when a failure on every rank of a group must still end the run."""

from __future__ import annotations

import types

import pytest
import torch

import hpcrender.render.stages as stages
from hpcrender.config import DType, Job, Mode, ParallelConfig
from hpcrender.models.shapes import model_shape
from hpcrender.parallel import gather
from hpcrender.parallel.layout import Comms, GroupLayout
from hpcrender.render.stages import branch_partner
from hpcrender.run.kinds import failure_ends_world
from hpcrender.run.plan import job_memory as plan_job_memory


# --- split_cfg's partner exchange ---------------------------------------------------------------------------

def job_memory(job, size):
    return plan_job_memory(job, size, model_shape)


@pytest.mark.parametrize("size", [2, 4, 6, 8])
def test_branch_partners_pair_each_band_of_one_half_with_the_same_band_of_the_other(size):
    layouts = [GroupLayout(size=size, rank=r, mode=Mode.SYNC, split_cfg=True) for r in range(size)]
    partners = [branch_partner(layout) for layout in layouts]
    for layout, partner in zip(layouts, partners):
        assert partners[partner] == layout.rank  # a pairing
        other = layouts[partner]
        assert (other.branch, other.patch_rank) == (1 - layout.branch, layout.patch_rank)


class FakeDist:
    """Stands in for torch.distributed: records the point-to-point ops and delivers `reply` to every receive."""

    def __init__(self, reply: torch.Tensor):
        self.reply = reply
        self.ops: list = []

    @staticmethod
    def isend(*args, **kwargs):
        raise AssertionError("batched only")

    @staticmethod
    def irecv(*args, **kwargs):
        raise AssertionError("batched only")

    def P2POp(self, op, tensor, peer=None, group=None, tag=0, group_peer=None):  # noqa: N802 - torch's name
        return types.SimpleNamespace(op=op, tensor=tensor, peer=peer, group=group, group_peer=group_peer)

    def batch_isend_irecv(self, ops):
        self.ops.extend(ops)
        for op in ops:
            if op.op is self.irecv:
                op.tensor.copy_(self.reply)
        return [types.SimpleNamespace(wait=lambda: None) for _ in ops]


@pytest.mark.parametrize("rank", range(4))
def test_branch_exchange_swaps_on_the_image_group_with_its_partner(monkeypatch, rank):
    # The second of two image groups of 4 ranks (world ranks 4-7): the world is not the group to swap on.
    group = object()
    fake = FakeDist(reply=torch.full((1, 2), -1.0))
    monkeypatch.setattr(gather, "dist", fake)
    layout = GroupLayout(size=4, rank=rank, mode=Mode.SYNC, split_cfg=True)
    comms = Comms(group=group, patch_group=object(), global_ranks=(4, 5, 6, 7))
    mine = torch.full((1, 2), float(rank))
    both = stages.guidance_pair(mine, layout, comms)
    partner = 4 + branch_partner(layout)
    assert [(op.op, op.peer, op.group) for op in fake.ops] == [(fake.isend, partner, group),
                                                              (fake.irecv, partner, group)]
    # [uncond, cond]: the first half runs the unconditional branch
    expected = [mine, fake.reply] if layout.branch == 0 else [fake.reply, mine]
    assert torch.equal(both, torch.cat(expected))


# --- what a step waits for -----------------------------------------------------------------------------------

def test_a_step_on_cuda_waits_for_its_compute_stream_only(monkeypatch):
    waited = []

    def current_stream(device):
        return types.SimpleNamespace(synchronize=lambda: waited.append(torch.device(device)))

    def synchronize(device=None):
        raise AssertionError("torch.cuda.synchronize waits for NCCL's streams too")

    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    stages._sync("cuda:1")
    assert waited == [torch.device("cuda:1")]


def test_a_step_on_the_cpu_waits_for_nothing(monkeypatch):
    def touched(*args, **kwargs):
        raise AssertionError("no CUDA call on a CPU")

    monkeypatch.setattr(torch.cuda, "current_stream", touched)
    monkeypatch.setattr(torch.cuda, "synchronize", touched)
    stages._sync("cpu")
    stages._sync(torch.device("cpu"))


# --- a failure on every rank of a group ----------------------------------------------------------------------

@pytest.mark.parametrize("device", ["cpu", "cuda:0", "cuda:3"])
@pytest.mark.parametrize("issued", [False, True])
def test_only_a_failure_after_an_nccl_collective_ends_the_run(device, issued):
    # gloo's collectives complete on the host; NCCL's may still be queued, in different numbers per rank.
    assert failure_ends_world(device, issued) is (issued and device.startswith("cuda"))


# --- wait times in meta.json ---------------------------------------------------------------------------------

class FakeEvent:
    """A CUDA event on a stream that stalled `stall_ms` between the two records."""

    made: list = []
    stall_ms = 250.0

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.recorded = self.synchronized = False
        FakeEvent.made.append(self)

    def record(self, stream=None):
        self.recorded = True

    def synchronize(self):
        self.synchronized = True

    def elapsed_time(self, end):
        assert self.recorded and end.recorded and end.synchronized
        return FakeEvent.stall_ms


def ticking_clock(step_s: float):
    now = [0.0]

    def clock():
        now[0] += step_s
        return now[0]

    return clock


def test_a_wait_on_cuda_is_timed_by_the_stream_and_read_without_a_sync_inside_the_step(monkeypatch):
    from hpcrender.parallel import exchange as exchange_module

    monkeypatch.setattr(FakeEvent, "made", [])
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(exchange_module.time, "perf_counter", ticking_clock(0.001))  # NCCL: the host waits ~0
    ex = exchange_module.Exchange(None, 0, 1)
    ex.begin_step(0)
    ex._timed(lambda: None, torch.device("cuda:0"))
    ex.begin_step(1)
    ex._timed(lambda: None, torch.device("cuda:0"))
    ex._timed(lambda: None, torch.device("cuda:0"))
    assert len(FakeEvent.made) == 6 and not any(e.synchronized for e in FakeEvent.made)
    assert ex.wait_seconds == pytest.approx([0.25, 0.5])
    assert ex.wait_seconds == pytest.approx([0.25, 0.5])  # read once


def test_a_wait_that_blocks_the_host_on_cuda_counts_the_host_time(monkeypatch):
    from hpcrender.parallel import exchange as exchange_module

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(FakeEvent, "stall_ms", 0.0)
    monkeypatch.setattr(exchange_module.time, "perf_counter", ticking_clock(2.0))  # gloo carrying CUDA tensors
    ex = exchange_module.Exchange(None, 0, 1)
    ex.begin_step(0)
    ex._timed(lambda: None, torch.device("cuda:0"))
    assert ex.wait_seconds == pytest.approx([2.0])


def test_a_wait_on_the_cpu_is_host_time(monkeypatch):
    from hpcrender.parallel import exchange as exchange_module

    def no_events(*args, **kwargs):
        raise AssertionError("no CUDA events on a CPU")

    monkeypatch.setattr(torch.cuda, "Event", no_events)
    monkeypatch.setattr(exchange_module.time, "perf_counter", ticking_clock(0.5))
    ex = exchange_module.Exchange(None, 0, 1)
    ex.begin_step(0)
    ex._timed(lambda: None, torch.device("cpu"))
    assert ex.wait_seconds == pytest.approx([0.5])
    ex.begin_image()
    assert ex.wait_seconds == []


# --- memory a rank needs, before anything is loaded -----------------------------------------------------------

def sdxl_job(side: int, mode: Mode = Mode.DISPLACED, split_cfg: bool = False) -> Job:
    return Job(name="x", prompt="x", width=side, height=side, seed=0, model="builtin:sdxl", dtype=DType.FLOAT16,
               parallel=ParallelConfig(mode=mode, split_cfg=split_cfg))


@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_sdxl_at_4096_in_fp16_holds_the_whole_image_s_keys_and_values_on_every_rank(ranks):
    need = job_memory(sdxl_job(4096), ranks)
    received = need.buffers.keys_values * ranks / (ranks + 1)  # the rest is this band's own send buffer
    assert 13.0e9 < received < 14.0e9  # 60 layers at 128^2 tokens and 10 at 256^2, x 2 for CFG
    assert 5.0e9 < need.weights < 5.3e9  # 2.6 G parameters
    assert need.total > need.weights + received


def test_split_cfg_halves_the_keys_and_values_and_naive_or_one_rank_holds_none():
    full = job_memory(sdxl_job(4096), 4)
    assert job_memory(sdxl_job(4096, split_cfg=True), 8).buffers.keys_values * 2 == full.buffers.keys_values
    assert job_memory(sdxl_job(4096, Mode.NAIVE), 4).buffers.total == 0
    assert job_memory(sdxl_job(4096, Mode.NONE), 1).buffers.total == 0
    assert job_memory(sdxl_job(4096, Mode.SYNC), 4) == full
