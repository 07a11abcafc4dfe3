"""ControlNet conditioning as diffusers' ControlNet pipelines apply it: the conditioning image prepared as their
control image processor prepares it, the steps each ControlNet is kept for (control_guidance_start/end), and its
residuals for the UNet, summed over several ControlNets as MultiControlNetModel sums them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from hpcrender.config import ControlNetConfig

# diffusers' VaeImageProcessor resizes with Lanczos (its `resample` default), as for an init image.
CONTROL_IMAGE_RESAMPLE = "LANCZOS"


def load_control_image(path: str, width: int, height: int) -> torch.Tensor:
    """A conditioning image as (1, 3, height, width) float32 in [0, 1], as VaeImageProcessor(do_convert_rgb=True,
    do_normalize=False) makes it: resized to the job's size with a Lanczos filter in the file's own mode (RGBA with
    its alpha premultiplied, as Pillow resizes it), then made RGB, not normalized."""
    with Image.open(path) as image:
        image.load()
        if image.size != (width, height):
            image = image.resize((width, height), resample=getattr(Image.Resampling, CONTROL_IMAGE_RESAMPLE))
        pixels = np.array(image.convert("RGB")).astype(np.float32)[None] / 255.0
    return torch.from_numpy(pixels.transpose(0, 3, 1, 2))  # a (1, H, W, 3) array seen as NCHW, as diffusers has it


def kept(call: int, calls: int, start: float, end: float) -> float:
    """1.0 when a ControlNet applies at denoiser call `call` of `calls` run (the calls of the run's timesteps: for
    img2img those after its strength's cut), else 0.0: diffusers' controlnet_keep, float arithmetic and all."""
    return 1.0 - float(call / calls < start or (call + 1) / calls > end)


@dataclass
class Control:
    """One ControlNet of a render: the model (band-parallel beside the UNet when the UNet is), its settings and the
    conditioning image's rows of this rank's band, batched as the UNet's input is (twice under classifier-free
    guidance), on the device in the ControlNet's dtype."""

    model: torch.nn.Module
    config: ControlNetConfig
    image: torch.Tensor

    def scale_at(self, call: int, calls: int) -> float:
        """diffusers' cond_scale at that call: the conditioning scale times whether the ControlNet is kept."""
        return self.config.scale * kept(call, calls, self.config.start, self.config.end)


def control_image_band(pixels: torch.Tensor, rows: slice | None, batch: int, device, dtype) -> torch.Tensor:
    """The conditioning image as one ControlNet call reads it: this band's pixel rows (rows None: the whole image),
    repeated for the batch as prepare_image repeats and concatenates it."""
    if rows is not None:
        pixels = pixels[:, :, rows].contiguous()
    image = pixels.repeat_interleave(1, dim=0).to(device=device, dtype=dtype)
    return torch.cat([image] * 2) if batch == 2 else image


def control_residuals(controls: list[Control], scales: list[float], call_model, model_in: torch.Tensor, t,
                      embeds: torch.Tensor, added: dict | None):
    """The down-block and mid-block residuals of the ControlNets whose scale is not 0 at this call, summed in order
    as MultiControlNetModel sums them; None when none applies (a ControlNet at scale 0 adds exact zeros, which the
    UNet's sums do not notice). call_model(control) is called before each ControlNet's forward (its band plan's
    step)."""
    down, mid = None, None
    for control, scale in zip(controls, scales):
        if scale == 0.0:
            continue
        call_model(control)
        d, m = control.model(model_in, t, encoder_hidden_states=embeds, controlnet_cond=control.image,
                             conditioning_scale=scale, guess_mode=False, added_cond_kwargs=added, return_dict=False)
        if down is None:
            down, mid = d, m
        else:
            down = [prev + cur for prev, cur in zip(down, d)]
            mid = mid + m
    return None if down is None else (down, mid)
