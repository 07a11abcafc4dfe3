"""Job kinds: what a unit of work is, and what a kind is given to render one into the job's store.

A kind only uses the group's protocol (run.protocol) and the context below, so the kinds (run.image: an image, one
unit per job; gigapixel.kind: levels of tiles) sit side by side without touching the protocol, the queue or the
runner's loop, which picks one per job (runner.kind_of).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hpcrender.config import Job
from hpcrender.run.environment import Backend, torch_backend
from hpcrender.run.protocol import GroupProtocol

# How long ranks that failed wait for the rest of their group to fail as well before ending the world (a failure
# that every rank meets, such as a model that cannot be loaded, arrives everywhere within this).
FAIL_TOGETHER_S = 20.0
# How often a group's first rank writes its steps done into the job's state file.
PROGRESS_RECORD_S = 5.0


@dataclass(frozen=True)
class Unit:
    """One piece of work the queue hands out: a job, or a part of one (`part`, for kinds that cut jobs up)."""

    job: int          # index into the manifest's jobs
    part: tuple = ()


@dataclass(frozen=True)
class RenderOptions:
    out: Path
    resume: bool = True
    save_latent: bool = False
    array: tuple[int, int] | None = None   # (index, count) of a job array
    debug: bool = False


@dataclass
class UnitContext:
    """What a kind needs to render a unit on this rank's group."""

    world: object
    protocol: GroupProtocol
    comms: dict          # parallel.layout.Comms by split_cfg
    models: object       # models.cache.ModelCache
    progress: object     # run.progress.Progress
    options: RenderOptions
    stop: object         # StopFlag


def failure_ends_world(device: str, collective_issued: bool) -> bool:
    """Whether a job that failed on every rank of its group must end the run instead of letting the group go on.

    gloo completes each collective on the host, so ranks that all failed are in step again. NCCL's wait() does not
    block the host: once the job's first collective is issued, the failed ranks (out of memory, typically) may have
    queued different numbers of them, and the next job would hang on a communicator out of step."""
    return collective_issued and torch_backend(device) is Backend.NCCL


def store_path(out: Path, job: Job) -> Path:
    return out / job.name / "tiles.h5"
