"""A work queue over MPI: groups take the next unit when they are free, no rank spent as a master.

The queue is a counter in an MPI window on world rank 0, advanced with an atomic Fetch_and_op by each group's first
rank; every rank holds the same list of units, so the counter's value names the unit. A group that renders cheap
units takes more of them, and a slow or failing one holds nobody up. What a unit produces never depends on which
group took it or when (seeds and noise come from the job), so the bytes do not depend on the schedule.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Generic, TypeVar

import numpy as np

Unit = TypeVar("Unit")
# How often rank 0 lets MPI make progress while its own thread computes: a passive-target atomic on its window
# completes only when rank 0's MPI library runs (MPICH without an asynchronous progress thread), so without this a
# group would wait to take work for as long as rank 0 spends in one denoising step, a composition or a sleep.
PROGRESS_POKE_S = 0.02


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
        self._stop = threading.Event()
        self._poker = None
        self._poke_comm = comm.Dup()  # collective; nothing is ever sent on it
        if comm.Get_rank() == 0:
            np.frombuffer(self._win.tomemory(), dtype=np.int64)[0] = 0
            self._poker = threading.Thread(target=self._poke, name="hpcrender-queue-progress", daemon=True)
            self._poker.start()
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

    def _poke(self) -> None:
        """Rank 0's helper thread: an Iprobe on a communicator nothing is sent on, every PROGRESS_POKE_S, drives
        MPI's progress engine (mpi4py starts MPI with MPI_THREAD_MULTIPLE) and costs next to no CPU."""
        while not self._stop.wait(PROGRESS_POKE_S):
            self._poke_comm.Iprobe(source=self._mpi.ANY_SOURCE, tag=self._mpi.ANY_TAG)

    def free(self) -> None:
        """Collective: every rank calls it once its group has stopped taking."""
        if self._poker is not None:
            self._stop.set()
            self._poker.join()
        self._poke_comm.Free()
        self._win.Free()
