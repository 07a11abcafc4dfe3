"""A work queue over MPI: groups take the next unit when they are free, no rank spent as a master.

The queue is a counter in an MPI window on world rank 0, advanced with an atomic Fetch_and_op by each group's first
rank; every rank holds the same list of units, so the counter's value names the unit. A group that renders cheap
units takes more of them, and a slow or failing one holds nobody up. What a unit produces never depends on which
group took it or when (seeds and noise come from the job), so the bytes do not depend on the schedule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

import numpy as np

Unit = TypeVar("Unit")


class WorkQueue(Generic[Unit]):
    """Units handed out in order, each exactly once. Creating and freeing are collective over `comm` (the world);
    take() is called by group leaders only and involves no other rank's participation."""

    def __init__(self, comm, units: Sequence[Unit]):
        from mpi4py import MPI

        self._mpi = MPI
        self.units = tuple(units)
        self._comm = comm
        itemsize = MPI.INT64_T.Get_size()
        self._win = MPI.Win.Allocate(itemsize if comm.Get_rank() == 0 else 0, itemsize, comm=comm)
        if comm.Get_rank() == 0:
            np.frombuffer(self._win.tomemory(), dtype=np.int64)[0] = 0
        comm.Barrier()  # the counter is zero before anyone takes

    def take(self) -> Unit | None:
        """The next unit, or None once all are taken."""
        index = self.take_index()
        return None if index is None else self.units[index]

    def take_index(self) -> int | None:
        MPI = self._mpi
        one = np.ones(1, dtype=np.int64)
        got = np.zeros(1, dtype=np.int64)
        self._win.Lock(0, MPI.LOCK_SHARED)
        self._win.Fetch_and_op(one, got, 0, 0, MPI.SUM)
        self._win.Unlock(0)
        index = int(got[0])
        return index if index < len(self.units) else None

    def free(self) -> None:
        """Collective: every rank calls it once its group has stopped taking."""
        self._win.Free()
