"""What a band group sends between steps rather than inside a layer: the bands gathered into the whole tensor, and
split_cfg's swap of the two guidance branches."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from hpcrender.parallel.bands import Band


def gather_rows(band: torch.Tensor, bands: Sequence[Band], group, dim: int = 2, scale: int = 1) -> torch.Tensor:
    """All-gather uneven row bands along `dim` into the whole tensor, on every rank of `group` (padded to the
    largest band, sliced back); `scale` maps band rows to rows of `band` (a VAE decoder's output is 8x the latent
    rows, its encoder's input 8x)."""
    biggest = max(b.size for b in bands) * scale
    pad = list(band.shape)
    pad[dim] = biggest
    padded = band.new_zeros(pad)
    padded.narrow(dim, 0, band.shape[dim]).copy_(band)
    parts = [torch.empty_like(padded) for _ in bands]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p.narrow(dim, 0, b.size * scale) for p, b in zip(parts, bands)], dim=dim)


def exchange_branch(prediction: torch.Tensor, branch: int, partner: int, group) -> torch.Tensor:
    """split_cfg: swap this rank's branch prediction with `partner`'s (a global rank); returns [uncond, cond].

    On the image group's own communicator, where every rank swaps at once: NCCL wants the first batched
    point-to-point on a communicator to involve all its ranks, and the world holds other groups' ranks that never
    take part."""
    other = torch.empty_like(prediction)
    ops = [dist.P2POp(dist.isend, prediction.contiguous(), partner, group),
           dist.P2POp(dist.irecv, other, partner, group)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return torch.cat([prediction, other]) if branch == 0 else torch.cat([other, prediction])


def array_from_leader(array, shape: tuple[int, ...], layout, comms):
    """The group's first rank's float32 numpy array, on every rank of the group (the others pass None)."""
    if layout.size == 1:
        return array
    tensor = torch.from_numpy(array) if layout.rank == 0 else torch.empty(shape, dtype=torch.float32)
    dist.broadcast(tensor, src=comms.global_ranks[0], group=comms.group)
    return tensor.numpy()


def objects_from_leader(obj, layout, comms):
    """The group's first rank's picklable `obj`, on every rank of the group."""
    if layout.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=comms.global_ranks[0], group=comms.group)
    return box[0]
