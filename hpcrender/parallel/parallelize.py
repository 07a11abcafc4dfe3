"""The one call: `parallelize(model, plan, group)` puts patch parallelism around a diffusers UNet or diffusion
transformer, unmodified; the handle's `remove()` restores it bit for bit."""

from __future__ import annotations

from torch import nn

from hpcrender.parallel.bands import is_transformer_config
from hpcrender.parallel.plan import Parallelized, PatchPlan, parallelize_unet
from hpcrender.parallel.transformer import parallelize_transformer


def parallelize(model: nn.Module, plan: PatchPlan, group) -> Parallelized:
    """Run `model` on this rank's band of `plan`, exchanging with the other bands over `group` (the K ranks in band
    order; None only for a single band). The model is used as before, one forward per denoising step; call
    begin_image() between images; remove() restores it."""
    if is_transformer_config(getattr(model, "config", {})):
        return parallelize_transformer(model, plan, group)
    return parallelize_unet(model, plan, group)
