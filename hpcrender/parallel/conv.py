"""Conv2d over one band of rows: halo rows from the neighbouring bands (fresh or stale), zero rows at the image's
top and bottom edges, zero padding only in width."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hpcrender.config import Mode
from hpcrender.errors import DoesNotFit
from hpcrender.parallel.bands import conv_halo, conv_strips
from hpcrender.parallel.exchange import SlotKind, SlotSpec


def needs_halo(conv: nn.Conv2d) -> bool:
    """True when the convolution reads rows outside the band it writes."""
    above, below = conv_halo(conv.kernel_size[0], conv.stride[0], _row_padding(conv), conv.dilation[0])
    return above > 0 or below > 0


def _row_padding(conv: nn.Conv2d) -> int:
    if isinstance(conv.padding, str):
        raise DoesNotFit(f"{conv} has padding {conv.padding!r}; bands need explicit 'same' padding")
    return conv.padding[0]


class BandConv2d(nn.Module):
    """Stands in for an nn.Conv2d (sharing its parameters) on a band of its input's rows.

    Halo rows are fresh in synchronous steps, and in displaced steps too for the model's input convolution
    (`fresh`: its input is the sampler's latent, a few rows of a few channels) and under HaloMode.FRESH. A fresh
    halo travels while the band's interior is convolved and is waited for only by the boundary rows: stale halo
    rows make most of displaced mode's error (BENCHMARKS.md), for the smallest share of its bytes.
    """

    def __init__(self, conv: nn.Conv2d, ctx, name: str = "", fresh: bool = False):
        super().__init__()
        self.fresh = fresh
        self.weight = conv.weight
        self.bias = conv.bias
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.dilation, self.groups = (conv.kernel_size, conv.stride, conv.dilation,
                                                                     conv.groups)
        self.padding = conv.padding
        self.halo = conv_halo(conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0])
        self.ctx = ctx
        self.name = name
        self._checked: set[int] = set()

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, halo={self.halo}, band-parallel{', fresh' if self.fresh else ''}")

    def _check(self, rows: tuple[int, ...]) -> None:
        """The neighbours hold enough rows for the halo, and every band starts on a multiple of the stride."""
        above, below = self.halo
        stride = self.stride[0]
        for i, n in enumerate(rows):
            # band i gives its first `below` rows to band i - 1 and its last `above` rows to band i + 1
            if (i > 0 and n < below) or (i < len(rows) - 1 and n < above):
                raise DoesNotFit(f"convolution {self.name or self} needs {max(above, below)} rows from each "
                                 f"neighbouring band but band {i} has {n} rows at that level; use fewer ranks")
            if i < len(rows) - 1 and n % stride:
                raise DoesNotFit(f"convolution {self.name or self} has stride {stride} but band {i} has {n} rows "
                                 f"at that level; band boundaries must fall on its output rows")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        if ctx.size == 1 or ctx.mode is Mode.NAIVE:
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        batch, channels, height, width = x.shape
        rows = ctx.rows_at(height)
        if height not in self._checked:
            self._check(rows)
            self._checked.add(height)
        above, below = self.halo
        sent_up, sent_down = max(below, 0), above  # rows this band gives the band above / below it
        per_row = batch * channels * width
        fresh = self.fresh or ctx.fresh_halos
        slot = ctx.exchange.slot(self, SlotSpec(SlotKind.HALO, sent_up * per_row, sent_down * per_row, x.dtype,
                                                x.device, fresh=fresh))
        first, last = ctx.rank == 0, ctx.rank == ctx.size - 1
        if ctx.sync_step or fresh:
            # Fresh halo rows, exchanged while the band's interior is convolved.
            self._give(x, slot, sent_up, sent_down)
            works = ctx.exchange.start(slot)
            return self._band_conv(x, slot, first, last, lambda: ctx.exchange.finish(works, slot))
        ctx.exchange.wait(slot)
        out = self._band_conv(x, slot, first, last)  # reads the stale rows before the buffers are reused
        self._give(x, slot, sent_up, sent_down)
        ctx.exchange.post(slot)
        return out

    def _band_conv(self, x: torch.Tensor, slot, first: bool, last: bool, arrived=None) -> torch.Tensor:
        """The convolution of the band with its halos, without copying the band: the whole band is convolved with
        zero rows above and below, then the few output rows that read those zeros in place of a neighbour's rows
        are recomputed from thin strips of the band and the halo."""
        above, below = self.halo
        stride, pad = self.stride[0], self.padding[0]
        cover = conv_strips(x.shape[2], self.kernel_size[0], stride, pad, self.dilation[0], first, last)
        top, top_end, bottom = cover.top, cover.top_end, cover.bottom
        if cover.extend:
            # a band too thin for strips: convolve an extended copy instead
            if arrived is not None:
                arrived()
            extended = self._extend(x, slot, above, below, first, last)
            return F.conv2d(extended, self.weight, self.bias, self.stride, (0, self.padding[1]), self.dilation,
                            self.groups)
        out = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if arrived is not None:  # the halo rows are needed from here on
            arrived()
        batch, channels, _, width = x.shape
        rows_only = (0, self.padding[1])
        if top:
            strip = torch.cat([slot["from_prev"].view(batch, channels, above, width), x[:, :, :top_end]], dim=2)
            out[:, :, :top] = F.conv2d(strip, self.weight, self.bias, self.stride, rows_only, self.dilation,
                                       self.groups)
        if bottom is not None:
            strip = torch.cat([x[:, :, bottom * stride - pad:], slot["from_next"].view(batch, channels, below, width)],
                              dim=2)
            out[:, :, bottom:] = F.conv2d(strip, self.weight, self.bias, self.stride, rows_only, self.dilation,
                                          self.groups)
        return out

    @staticmethod
    def _give(x: torch.Tensor, slot, sent_up: int, sent_down: int) -> None:
        """This band's boundary rows into the send buffers."""
        if sent_up:
            slot["to_prev"].view(x.shape[0], x.shape[1], sent_up, x.shape[3]).copy_(x[:, :, :sent_up])
        if sent_down:
            slot["to_next"].view(x.shape[0], x.shape[1], sent_down, x.shape[3]).copy_(x[:, :, -sent_down:])

    def _extend(self, x: torch.Tensor, slot, above: int, below: int, first: bool, last: bool) -> torch.Tensor:
        """The band with the rows the convolution reads around it: halo rows inside the image, the conv's own zero
        padding at the image's top and bottom edges."""
        batch, channels, height, width = x.shape
        pad = self.padding[0]
        parts = []
        if first:
            if pad:
                parts.append(x.new_zeros(batch, channels, pad, width))
        elif above:
            parts.append(slot["from_prev"].view(batch, channels, above, width))
        if last:
            parts.append(x)
            if pad:
                parts.append(x.new_zeros(batch, channels, pad, width))
        elif below >= 0:
            parts.append(x)
            if below:
                parts.append(slot["from_next"].view(batch, channels, below, width))
        else:
            parts.append(x[:, :, :height + below])
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0].contiguous()
