"""GroupNorm over one band with statistics of the whole image: per-band (count, sum x, sum x^2) in float64, pooled
over the bands fresh (sync), the other bands' from the previous step with this band's fresh (stale), the previous
step's whole-image means moved by this band's change of its own (corrected), or not at all (separate)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hpcrender.config import GroupNormMode, Mode
from hpcrender.parallel.exchange import SlotKind, SlotSpec


def band_moments(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(batch, groups, 3) float64: count, sum x and sum x^2 of each group of `x` (batch, channels, ...)."""
    batch, channels = x.shape[:2]
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()  # half-precision moments would round the variance to three digits
    spatial = x[0, 0].numel()
    # ATen's fused GroupNorm kernel gives each group's mean and 1/std (biased, eps 0) far faster than var_mean.
    _, mean, rstd = torch.native_group_norm(x.contiguous(), None, None, batch, channels, spatial, groups, 0.0)
    mean = mean.double()
    var = rstd.double().pow(-2)
    count = torch.full_like(mean, channels // groups * spatial)
    return torch.stack([count, count * mean, count * (var + mean * mean)], dim=-1)


def mean_var(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance (as nn.GroupNorm uses) of pooled moments."""
    count, total, squares = moments.unbind(-1)
    mean = total / count
    return mean, squares / count - mean * mean


def corrected_moments(stale_full: torch.Tensor, stale_local: torch.Tensor, fresh_local: torch.Tensor) -> torch.Tensor:
    """The whole image's moments now: the previous step's mean and E[x^2], each moved by this band's change of its
    own mean and E[x^2] since then, i.e. every other band is assumed to drift as this one does (DistriFusion's
    corrected GroupNorm). Correcting the pooled *sums* instead would move only this band's share: the same as
    stale statistics for the other bands, measurably further from single-device."""
    count = stale_full[..., :1]
    local_count = fresh_local[..., :1]
    means = stale_full[..., 1:] / count + (fresh_local[..., 1:] - stale_local[..., 1:]) / local_count
    return torch.cat([count, count * means], dim=-1)


def stale_moments(stale_full: torch.Tensor, stale_local: torch.Tensor, fresh_local: torch.Tensor) -> torch.Tensor:
    """The other bands' moments of the previous step pooled with this band's fresh ones."""
    return stale_full + (fresh_local - stale_local)


def pooled_mean_var(full: torch.Tensor, local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance from the whole image's moments; where that variance is not positive (stale or corrected
    moments can make it so), the local band's variance is used instead."""
    mean, var = mean_var(full)
    _, local_var = mean_var(local)
    return mean, torch.where(var > 0, var, local_var.clamp_min(0))


def normalize(x: torch.Tensor, groups: int, mean: torch.Tensor, var: torch.Tensor, eps: float,
              weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """nn.GroupNorm's output with the given per-(batch, group) mean and variance.

    Like ATen's own kernels: y = x * scale + shift per (batch, channel), in float32 at least.
    """
    batch, channels = x.shape[:2]
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    rstd = torch.rsqrt(var + eps).to(compute)
    scale = rstd.repeat_interleave(channels // groups, dim=1)
    shift = -mean.to(compute).repeat_interleave(channels // groups, dim=1) * scale
    if weight is not None:
        scale = scale * weight.to(compute)
        shift = shift * weight.to(compute)
    if bias is not None:
        shift = shift + bias.to(compute)
    per_channel = (batch, channels) + (1,) * (x.dim() - 2)
    y = torch.addcmul(shift.view(per_channel), x.to(compute), scale.view(per_channel))
    return y.to(x.dtype)


class BandGroupNorm(nn.Module):
    """Stands in for an nn.GroupNorm (sharing its parameters) in a band of any feature map, 3-D or 4-D."""

    def __init__(self, norm: nn.GroupNorm, ctx):
        super().__init__()
        self.num_groups = norm.num_groups
        self.num_channels = norm.num_channels
        self.eps = norm.eps
        self.affine = norm.affine
        self.weight = norm.weight
        self.bias = norm.bias
        self.ctx = ctx

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, band-parallel"

    def _local(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        if ctx.size == 1 or ctx.mode is Mode.NAIVE:
            return self._local(x)
        sync = ctx.sync_step or ctx.groupnorm is GroupNormMode.SYNC
        if not sync and ctx.groupnorm is GroupNormMode.SEPARATE:
            return self._local(x)
        fresh = band_moments(x, self.num_groups)
        slot = ctx.exchange.slot(self, SlotSpec(SlotKind.REDUCE, fresh.numel(), 0, torch.float64, x.device))
        if sync:
            slot["buf"].copy_(fresh.view(-1))
            ctx.exchange.exchange_now(slot)
            full = slot["buf"].view_as(fresh).clone()
        else:
            ctx.exchange.wait(slot)
            stale_full = slot["buf"].view_as(fresh)
            pool = corrected_moments if ctx.groupnorm is GroupNormMode.CORRECTED else stale_moments
            full = pool(stale_full, slot["local"].view_as(fresh), fresh)
            slot["buf"].copy_(fresh.view(-1))
            ctx.exchange.post(slot)
        slot["local"].copy_(fresh.view(-1))
        mean, var = pooled_mean_var(full, fresh)
        return normalize(x, self.num_groups, mean, var, self.eps, self.weight, self.bias)
