"""The MPI work queue on its own: groups of GROUP_SIZE consecutive ranks take units as they free up.

usage: queue_checks.py UNITS GROUP_SIZE
Each group's leader takes units through GroupProtocol.take; every rank of the group sees the same unit, sleeps a
time that depends on the group (so that groups run at different speeds), and records it. Rank 0 prints one JSON line:
the world size, the units each group took in order, and whether every rank of a group agreed.
"""

from __future__ import annotations

import json
import sys
import time

from mpi4py import MPI

from hpcrender.run.protocol import GroupProtocol
from hpcrender.run.queue import WorkQueue

units, size = int(sys.argv[1]), int(sys.argv[2])
world = MPI.COMM_WORLD
rank = world.Get_rank()
g = rank // size
group = GroupProtocol(world.Split(g, rank), g, tuple(range(g * size, (g + 1) * size)))
queue = WorkQueue(world, [f"unit-{i}" for i in range(units)])
taken = []
while (index := group.take(queue)) is not None:
    taken.append(queue.units[index])
    time.sleep(0.002 * (1 + 4 * g))  # group 0 is the fastest
agreed = all(t == taken for t in group.gather(taken))
queue.free()

# Rank 0 holds the counter; while it computes without calling MPI (a long step, a composition), the other groups
# must still be able to take work.
busy = WorkQueue(world, list(range(12)))
after_sleep = []
if group.leader:
    first = busy.take_index()
    if rank == 0:
        time.sleep(1.5)
    while (index := busy.take_index()) is not None:
        after_sleep.append(index)
        time.sleep(0.01)
busy.free()
group.free()
report = world.gather({"rank": rank, "group": g, "taken": taken, "agreed": agreed, "busy": after_sleep})
if rank == 0:
    groups = {r["group"]: r["taken"] for r in report}
    print(json.dumps({"world_size": world.Get_size(), "groups": groups, "agreed": all(r["agreed"] for r in report),
                      "taken_by_rank0_after_its_busy_time": report[0]["busy"]}))
