"""The samplers a manifest names, over the model's own noise schedule, with their timesteps set as the model's
diffusers pipeline sets them.

diffusers is imported inside the functions: the run plan's checks (`validate`, `plan`) use this file without torch.
"""

from __future__ import annotations

import numpy as np

from hpcrender.config import SchedulerName, TimestepSpacing
from hpcrender.errors import BadInput
from hpcrender.models.facts import ModelFacts
from hpcrender.models.reference import Family

# Each name as diffusers' scheduler overview maps the A1111/k-diffusion samplers: the class, built from the model's
# own scheduler config, and what it is initialised with on top of that config.
SAMPLERS: dict[SchedulerName, tuple[str, dict]] = {
    SchedulerName.EULER: ("EulerDiscreteScheduler", {}),
    SchedulerName.EULER_A: ("EulerAncestralDiscreteScheduler", {}),
    SchedulerName.HEUN: ("HeunDiscreteScheduler", {}),
    SchedulerName.DDIM: ("DDIMScheduler", {}),
    SchedulerName.DPMPP_2M: ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    SchedulerName.DPMPP_2M_KARRAS: ("DPMSolverMultistepScheduler",
                                    {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    SchedulerName.DPMPP_2M_SDE: ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    SchedulerName.DPMPP_2M_SDE_KARRAS: ("DPMSolverMultistepScheduler",
                                        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    SchedulerName.UNIPC: ("UniPCMultistepScheduler", {}),
    SchedulerName.LCM: ("LCMScheduler", {}),
}
# What applies to a flow-matching model (SD3, Flux). Its stochastic samplers are left out: diffusers' SD3 and Flux
# pipelines pass no generator to the sampler's step, so their noise would come from torch's global generator.
FLOW_SAMPLERS: dict[SchedulerName, tuple[str, dict]] = {
    SchedulerName.EULER: ("FlowMatchEulerDiscreteScheduler", {}),
    SchedulerName.HEUN: ("FlowMatchHeunDiscreteScheduler", {}),
}
# Samplers whose 'leading' timesteps diffusers spaces num_train_timesteps // (steps + 1) apart (DPM-Solver++ without
# Karras sigmas, UniPC): from num_train_timesteps steps on, every step gets the same timestep.
LEADING_STEP_RATIO = (SchedulerName.DPMPP_2M, SchedulerName.DPMPP_2M_SDE, SchedulerName.UNIPC)
# LCM's timesteps are its own (evenly spaced over `original_inference_steps` of its distillation schedule).
LCM_ORIGINAL_STEPS = 50


def is_flow_matching(config) -> bool:
    """A sampler config of the flow-matching kind (SD3, Flux): only samplers of that kind apply to its model."""
    return "shift" in config or str(config.get("_class_name", "")).startswith("FlowMatch")


def sampler_problem(name: SchedulerName, spacing: TimestepSpacing | None, config, family: Family | None = None,
                    steps: int | None = None) -> str | None:
    """Why `name` (with `spacing`) cannot run over the model's scheduler `config`, in one line naming the key; None
    when it can. `family` and `steps` add what only they tell (None: not known yet)."""
    if is_flow_matching(config):
        if name not in FLOW_SAMPLERS:
            return (f"scheduler {name.value!r} does not apply to a flow-matching model (SD3, Flux): use "
                    f"{' or '.join(repr(n.value) for n in FLOW_SAMPLERS)}")
        if name is SchedulerName.HEUN and (family is Family.FLUX or config.get("use_dynamic_shifting", False)):
            return ("scheduler 'heun' does not apply to Flux or a resolution-dependent shift: diffusers' "
                    "FlowMatchHeunDiscreteScheduler takes neither Flux's sigmas nor a shift mu; use 'euler'")
        if spacing is not None:
            return (f"timestep_spacing {spacing.value!r} does not apply to a flow-matching model (SD3, Flux): its "
                    "sigmas are shifted, not spaced")
        return None
    if name is SchedulerName.LCM:
        if spacing is not None:
            return f"timestep_spacing {lcm_spacing_problem(spacing)}"
        limit = int(config.get("original_inference_steps", LCM_ORIGINAL_STEPS))
        if steps is not None and steps > limit:
            return f"scheduler 'lcm' takes at most {limit} steps (its original_inference_steps), got {steps}"
    if name in LEADING_STEP_RATIO and steps is not None:
        train = int(config.get("num_train_timesteps", 1000))
        used = spacing.value if spacing is not None else config.get("timestep_spacing", "linspace")
        if used == TimestepSpacing.LEADING.value and train // (steps + 1) == 0:
            return (f"scheduler {name.value!r} with 'leading' timestep spacing gives all {steps} steps the same "
                    f"timestep (diffusers spaces them {train} // (steps + 1) = 0 apart): use at most {train - 1} "
                    "steps, or timestep_spacing = \"trailing\"")
    return None


def lcm_spacing_problem(spacing: TimestepSpacing) -> str:
    """Why a timestep spacing is refused with lcm (the manifest says it at the key's line)."""
    return (f"{spacing.value!r} does not apply to lcm: its timesteps are LCM's own, evenly spaced over its "
            "distillation schedule")


def make_scheduler(name: SchedulerName, config, spacing: TimestepSpacing | None = None,
                   family: Family | None = None):
    """The manifest's sampler over the model's own noise schedule, with `spacing` instead of the config's own when
    given. BadInput for what does not apply (sampler_problem)."""
    problem = sampler_problem(name, spacing, config, family)
    if problem:
        raise BadInput(problem)
    class_name, init = (FLOW_SAMPLERS if is_flow_matching(config) else SAMPLERS)[name]
    if spacing is not None:
        init = {**init, "timestep_spacing": spacing.value}
    import diffusers

    return getattr(diffusers, class_name).from_config(config, **init)


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
