"""Where a rank sits in the group that renders one image, and which group layouts can work (no torch here: the run
plan checks layouts before anything is loaded)."""

from __future__ import annotations

from dataclasses import dataclass

from hpcrender.config import Mode
from hpcrender.errors import BadInput


@dataclass(frozen=True)
class GroupLayout:
    """Where this rank sits in the group that renders one image.

    With split_cfg the group's first half runs the unconditional branch and the second half the conditional
    one, each half patch-parallel over the same bands; rank r of one half pairs with rank r of the other.
    """

    size: int
    rank: int
    mode: Mode
    split_cfg: bool = False

    @property
    def branches(self) -> int:
        return 2 if self.split_cfg else 1

    @property
    def patch_ranks(self) -> int:
        return self.size // self.branches

    @property
    def patch_rank(self) -> int:
        return self.rank % self.patch_ranks

    @property
    def branch(self) -> int:
        return self.rank // self.patch_ranks


def check_layout(size: int, split_cfg: bool, guidance: bool) -> None:
    """Reject a group layout that cannot work, before anything is loaded."""
    if split_cfg and not guidance:
        raise BadInput("split_cfg needs classifier-free guidance (guidance_scale > 1)")
    if split_cfg and size % 2:
        raise BadInput(f"split_cfg needs an even number of ranks per image, got {size}")


@dataclass(frozen=True)
class Comms:
    """torch.distributed handles of the group (in group-rank order) and of this rank's branch half."""

    group: object | None
    patch_group: object | None
    global_ranks: tuple[int, ...]
