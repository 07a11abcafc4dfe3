"""Who renders what: a job array's share of the manifest, rank groups, and jobs balanced over the groups.

Pure arithmetic; every rank computes the same answer from the same inputs, so no messages are needed.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

from hpcrender.errors import BadInput, DoesNotFit
from hpcrender.run.environment import SlurmInfo


def array_shard(n_jobs: int, index: int, count: int) -> tuple[int, ...]:
    """Indices of the jobs that array task `index` of `count` renders: job i when i % count == index."""
    if n_jobs < 0:
        raise BadInput(f"number of jobs must be >= 0, got {n_jobs}")
    if count < 1:
        raise BadInput(f"array count must be >= 1, got {count}")
    if not 0 <= index < count:
        raise BadInput(f"array index must be in 0..{count - 1}, got {index}")
    return tuple(range(index, n_jobs, count))


def slurm_array_index(slurm: SlurmInfo | None) -> tuple[int, int] | None:
    """(index, count) of this Slurm array task, or None outside an array.

    The index is (ID - MIN) // STEP, not the id: `--array=1-7:3` runs ids 1, 4, 7 as shards 0, 1, 2.
    """
    if slurm is None or slurm.array_task_id is None:
        return None
    task, first, last = slurm.array_task_id, slurm.array_task_min, slurm.array_task_max
    if first is None or (last is None and slurm.array_task_count is None):
        raise BadInput("SLURM_ARRAY_TASK_ID is set without SLURM_ARRAY_TASK_MIN/MAX: "
                       "give --array-index and --array-count instead")
    step = slurm.array_task_step or 1
    span = None if last is None else (last - first) // step + 1
    count = slurm.array_task_count if slurm.array_task_count is not None else span
    offset = task - first
    index = offset // step
    # A list such as --array=0,3,8 reports STEP=1, MAX=8 and COUNT=3: its ids do not map onto 0..COUNT-1,
    # and every task of it must refuse, not only those whose index falls outside.
    if offset < 0 or offset % step or index >= count or (span is not None and span != count):
        raise BadInput(f"Slurm array task {task} (min {first}, step {step}, count {count}) is not part of a "
                       "regular range: submit with --array=A-B[:S], or give --array-index/--array-count")
    return index, count


def rank_groups(world_size: int, ranks_per_image: int) -> tuple[tuple[int, ...], ...]:
    """Consecutive groups of `ranks_per_image` ranks (0: one group of all ranks).

    Consecutive ranks share a node under block placement, which keeps a group's band exchange local.
    """
    if world_size < 1:
        raise BadInput(f"world size must be >= 1, got {world_size}")
    if ranks_per_image < 0:
        raise BadInput(f"ranks_per_image must be >= 0, got {ranks_per_image}")
    size = ranks_per_image or world_size
    if world_size % size:
        raise DoesNotFit(f"{world_size} ranks do not divide into groups of {size}")
    return tuple(tuple(range(start, start + size)) for start in range(0, world_size, size))


def assign_jobs(costs: Sequence[float], n_groups: int) -> tuple[tuple[int, ...], ...]:
    """Job indices for each group, longest processing time first; manifest order within a group.

    Deterministic: ties in cost go to the earlier job, ties in load to the lower group.
    """
    if n_groups < 1:
        raise BadInput(f"number of groups must be >= 1, got {n_groups}")
    for i, c in enumerate(costs):
        if not math.isfinite(c) or c < 0:
            raise BadInput(f"job {i}: cost must be finite and >= 0, got {c}")
    # The least loaded group (lowest number on a tie) from a heap of (load, group): n log g, not n * g, for 100,000
    # jobs on many groups.
    loads = [(0.0, g) for g in range(n_groups)]
    shares: list[list[int]] = [[] for _ in range(n_groups)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, g = loads[0]
        heapq.heapreplace(loads, (load + costs[i], g))
        shares[g].append(i)
    return tuple(tuple(sorted(s)) for s in shares)


def queue_order(costs: Sequence[float]) -> tuple[int, ...]:
    """The order a work queue hands jobs out in: largest cost first (ties: manifest order), so that the long jobs
    start early and the short ones fill the gaps at the end, as longest-processing-time-first does statically."""
    for i, c in enumerate(costs):
        if not math.isfinite(c) or c < 0:
            raise BadInput(f"job {i}: cost must be finite and >= 0, got {c}")
    return tuple(sorted(range(len(costs)), key=lambda i: (-costs[i], i)))


# Above ~16 Mpx self-attention's quadratic term is as large as the linear one: the single-GPU SDXL
# latencies of DistriFusion (5.0 s at 1 Mpx, 23.7 s at 4.2 Mpx, 140 s at 14.7 Mpx) fit a*p + b*p^2 with a/b ~ 16.
_QUADRATIC_MPX = 16.0


def job_cost(width: int, height: int, steps: int) -> float:
    """Relative cost of rendering one image, in units of one denoising step at 1 Mpx."""
    for name, value in (("width", width), ("height", height), ("steps", steps)):
        if value < 1:
            raise BadInput(f"{name} must be >= 1, got {value}")
    mpx = width * height / 2**20
    return steps * mpx * (1.0 + mpx / _QUADRATIC_MPX)
