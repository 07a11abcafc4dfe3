"""Start a World and torch.distributed, sum ranks over the world and over rank groups; rank 0 prints each rank's
report as one JSON line (gathered, so that the lines of several ranks never interleave).

usage: env_world.py [GROUP_SIZE]   (GROUP_SIZE > 0 also checks World.new_groups with consecutive groups)
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.distributed as dist

from hpcrender.run.environment import World, guarded
from hpcrender.run.schedule import rank_groups



def _timeout_s(group) -> float | None:
    """The collective timeout a gloo group was made with (None on other backends)."""
    backend = group._get_backend(torch.device("cpu")) if str(dist.get_backend(group)) == "gloo" else None
    return backend.options._timeout.total_seconds() if backend is not None else None


world = World.start()
with guarded(world):
    world.init_torch_distributed()
    env = world.env
    total = torch.tensor([float(env.rank + 1)], device=env.device)
    dist.all_reduce(total)  # NCCL alone on GPUs: every tensor on the device
    on_device = total.clone()
    report = {
        "world_size": env.world_size, "rank": env.rank, "local_rank": env.local_rank,
        "local_size": env.local_size, "node_index": env.node_index, "device": env.device,
        "threads": env.threads, "launcher": env.launcher.value, "dist_size": dist.get_world_size(),
        "sum": total.item(), "device_sum": on_device.item(), "backend": str(dist.get_backend()),
        "max": world.allreduce_max(env.rank), "ranks": world.allgather(env.rank),
        "collective_timeout_s": _timeout_s(dist.group.WORLD),
    }
    # World.barrier while rank 0 works 0.5 s without MPI: the others wait it out asleep, not spinning a core.
    if env.rank == 0:
        time.sleep(0.5)
    wall, cpu = time.perf_counter(), time.process_time()
    world.barrier()
    report.update(barrier_wall_s=time.perf_counter() - wall, barrier_cpu_s=time.process_time() - cpu)
    group_size = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    if group_size:
        groups = rank_groups(env.world_size, group_size)
        handles = world.new_groups(groups)
        mine = [h for h in handles if h is not None]
        group_total = torch.tensor([float(env.rank + 1)], device=env.device)
        dist.all_reduce(group_total, group=mine[0])
        report.update(groups_joined=len(mine), group_sum=group_total.item(),
                      group_members=dist.get_process_group_ranks(mine[0]), group_timeout_s=_timeout_s(mine[0]))
    gathered = world.allgather(report)
    if env.rank == 0:
        print("\n".join(json.dumps(r) for r in gathered), flush=True)
world.close()
