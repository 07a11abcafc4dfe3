"""The VAE encoder's downsampler over one band of rows: diffusers pads the whole image with one zero row at the
bottom (and a column at the right) before a stride-2 convolution without padding, so a band needs the next band's
first row, and only the image's last band reads the zero row."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hpcrender.errors import DoesNotFit
from hpcrender.parallel.exchange import SlotKind, SlotSpec


def is_padded_downsample(module: nn.Module) -> bool:
    """diffusers' Downsample2D in its padding=0 form (VAE encoders): a zero row and column padded, then the conv."""
    return (type(module).__name__ == "Downsample2D" and getattr(module, "use_conv", False)
            and getattr(module, "padding", None) == 0)


class BandDownsample(nn.Module):
    """Stands in for such a Downsample2D (sharing its convolution's parameters) on a band whose rows start on an
    even row of the image; the halo row is always exchanged fresh and blocking (an encode is one pass)."""

    def __init__(self, down: nn.Module, ctx, name: str = ""):
        super().__init__()
        conv = down.conv
        if getattr(down, "norm", None) is not None:
            raise DoesNotFit(f"{name}: a downsampler with its own norm cannot be split into bands")
        if (type(conv) is not nn.Conv2d or tuple(conv.kernel_size) != (3, 3) or tuple(conv.stride) != (2, 2)
                or tuple(conv.padding) != (0, 0) or tuple(conv.dilation) != (1, 1)):
            raise DoesNotFit(f"{name}: only a 3x3 stride-2 padded downsampler can be split into bands, got {conv}")
        self.weight = conv.weight
        self.bias = conv.bias
        self.groups = conv.groups
        self.ctx = ctx
        self.name = name

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, kernel_size=3, stride=2, band-parallel, fresh"

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        ctx = self.ctx
        batch, channels, height, width = x.shape
        if height % 2:
            raise DoesNotFit(f"{self.name}: band {ctx.rank} has {height} rows at a stride-2 downsampler; bands must "
                             "hold an even number of rows at every level")
        if ctx.size == 1:
            below = x.new_zeros(batch, channels, 1, width)
        else:
            per_row = batch * channels * width
            slot = ctx.exchange.slot(self, SlotSpec(SlotKind.HALO, per_row, 0, x.dtype, x.device, fresh=True))
            slot["to_prev"].view(batch, channels, 1, width).copy_(x[:, :, :1])
            ctx.exchange.exchange_now(slot)
            last = ctx.rank == ctx.size - 1
            below = (x.new_zeros(batch, channels, 1, width) if last
                     else slot["from_next"].view(batch, channels, 1, width))
        extended = F.pad(torch.cat([x, below], dim=2), (0, 1, 0, 0))
        return F.conv2d(extended, self.weight, self.bias, 2, 0, 1, self.groups)
