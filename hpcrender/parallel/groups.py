"""The torch.distributed groups of a phase's rank groups (and of their split_cfg halves), made on every rank in the
same order, as torch.distributed requires."""

from __future__ import annotations

from collections.abc import Sequence

from hpcrender.parallel.layout import Comms


def make_comms(world, groups: Sequence[tuple[int, ...]], size: int, split: bool) -> dict[bool, Comms]:
    """This rank's Comms keyed by split_cfg, for rank groups `groups` of `size` consecutive ranks; with `split`,
    also the halves of each group for split_cfg (a group of odd size has no halves: its jobs are refused earlier)."""
    rank = world.env.rank
    mine = tuple(groups[rank // size])
    if size == 1:
        single = Comms(group=None, patch_group=None, global_ranks=mine)
        return {False: single, True: single}
    handles = world.new_groups(groups)
    whole = handles[rank // size]
    out = {False: Comms(group=whole, patch_group=whole, global_ranks=mine)}
    if split and size % 2 == 0:
        halves = [h for grp in groups for h in (grp[: size // 2], grp[size // 2:])]
        half_handles = world.new_groups(halves)
        h = (rank // size) * 2 + (rank % size) // (size // 2)
        out[True] = Comms(group=whole, patch_group=half_handles[h], global_ranks=mine)
    else:
        out[True] = out[False]
    return out
