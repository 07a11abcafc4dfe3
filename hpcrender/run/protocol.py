"""The small agreements of one rank group, over its own MPI communicator: stop, skip, resume, take work, fail
together, abort. Tensors go through torch.distributed; these go through MPI so that they never wait behind the
group's asynchronous exchanges. The group's ranks are consecutive world ranks, so rank r here is rank r of the group.
"""

from __future__ import annotations

import enum
from typing import Any

from hpcrender.run.environment import idle_barrier


class Outcome(str, enum.Enum):
    """How a unit of work ended on its group."""

    DONE = "done"        # rendered and written
    SKIPPED = "skipped"  # already done by an earlier run
    FAILED = "failed"    # recorded as failed; the group takes the next unit
    STOPPED = "stopped"  # a signal came: finished steps are in a checkpoint, the group takes nothing more


class GroupProtocol:
    """One rank's side of its group's agreements; every operation is collective over the group."""

    def __init__(self, comm, index: int, ranks: tuple[int, ...]):
        self.comm = comm            # mpi4py communicator of the group
        self.index = index          # the group's number in its phase
        self.ranks = ranks          # its world ranks
        self.rank = comm.Get_rank()

    @property
    def leader(self) -> bool:
        """The group's first rank: it takes work, reads checkpoints and writes everything the group produces."""
        return self.rank == 0

    @property
    def size(self) -> int:
        return len(self.ranks)

    def stop(self, requested: bool) -> bool:
        """Whether any rank of the group was asked to stop: the whole group stops after the same step."""
        from mpi4py import MPI

        return bool(self.comm.allreduce(int(requested), op=MPI.MAX))

    def between_steps(self, stop: bool, checkpoint: bool) -> tuple[bool, bool]:
        """(stop, checkpoint) for the whole group after the same step, in one agreement: any rank's stop request
        wins; a checkpoint (the leader's clock says one is due) is taken by every rank together."""
        from mpi4py import MPI

        code = self.comm.allreduce(2 if stop else int(checkpoint), op=MPI.MAX)
        return code == 2, code == 1

    def leaders(self, value: Any) -> Any:
        """The leader's `value` on every rank: one answer for the whole group (skip, resume, what to take next)."""
        return self.comm.bcast(value if self.leader else None, root=0)

    def skip(self, done: bool) -> bool:
        """Whether the unit is already done, as its leader found it."""
        return bool(self.leaders(done))

    def resume(self, checkpoint):
        """The leader's checkpoint (or None) on every rank: one read, one answer."""
        return self.leaders(checkpoint)

    def take(self, queue) -> int | None:
        """The index of the work queue's next unit for this group, or None when the queue is empty."""
        return self.leaders(queue.take_index() if self.leader else None)

    def gather(self, value: Any) -> list:
        """Every rank's `value`, in group order, on every rank."""
        return self.comm.allgather(value)

    def fail_together(self, grace_s: float) -> bool:
        """After a failure inside the group's collective work: whether every rank of the group failed too.

        Ranks that failed together all arrive here within moments and go on to their next unit in step. A rank that
        did not fail is blocked in a collective that waits for this one and never arrives: after grace_s the
        failing ranks must end the world, or that rank would hang until the collective's timeout and then run out
        of step.
        """
        if self.size == 1:
            return True
        return idle_barrier(self.comm, poll_s=0.01, timeout_s=grace_s)

    def free(self) -> None:
        self.comm.Free()
