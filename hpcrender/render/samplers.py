"""The samplers a manifest names, over the model's own noise schedule, with their timesteps set as the model's
diffusers pipeline sets them.

diffusers is imported inside the functions: the run plan's checks (`validate`, `plan`) use this file without torch.
"""

from __future__ import annotations

import numpy as np

from hpcrender.config import SchedulerName
from hpcrender.errors import BadInput
from hpcrender.models.facts import ModelFacts
from hpcrender.models.reference import Family


def is_flow_matching(config) -> bool:
    """A sampler config of the flow-matching kind (SD3, Flux): only samplers of that kind apply to its model."""
    return "shift" in config or str(config.get("_class_name", "")).startswith("FlowMatch")


def make_scheduler(name: SchedulerName, config):
    """The manifest's sampler over the model's own noise schedule. Flow-matching models take euler only (their
    FlowMatchEulerDiscreteScheduler); BadInput for the others."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if is_flow_matching(config):
        from diffusers import FlowMatchEulerDiscreteScheduler

        if name is not SchedulerName.EULER:
            raise BadInput(f"scheduler {name.value!r} does not apply to a flow-matching model (SD3, Flux): use "
                           "\"euler\"")
        return FlowMatchEulerDiscreteScheduler.from_config(config)
    if name is SchedulerName.EULER:
        return EulerDiscreteScheduler.from_config(config)
    if name is SchedulerName.DDIM:
        return DDIMScheduler.from_config(config)
    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")


def set_timesteps(scheduler, facts: ModelFacts, steps: int, latent_rows: int, latent_cols: int, device) -> None:
    """The sampler's timesteps for `steps` steps, as the model's diffusers pipeline sets them: Flux's sigmas and
    both flow models' resolution-dependent shift `mu` from the whole image's token count (never a band's)."""
    fam = facts.family
    config = scheduler.config
    if not fam.flow_matching:
        scheduler.set_timesteps(steps, device=device)
        return
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    patch = facts.alignment
    tokens = (latent_rows // patch) * (latent_cols // patch)
    kwargs = {}
    if fam is Family.FLUX or config.get("use_dynamic_shifting", None):
        kwargs["mu"] = calculate_shift(tokens, config.get("base_image_seq_len", 256),
                                       config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                       config.get("max_shift", 1.15 if fam is Family.FLUX else 1.16))
    if fam is Family.FLUX and not config.get("use_flow_sigmas", False):
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=device, **kwargs)
    else:
        scheduler.set_timesteps(steps, device=device, **kwargs)
