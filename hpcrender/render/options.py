"""What does not apply to a job's model, refused: before anything is loaded (from the model's configs, for the run
plan's checks) and once it is loaded (from its facts). No torch here: `validate` and `plan` use it."""

from __future__ import annotations

from hpcrender.config import Job, Mode
from hpcrender.errors import BadInput
from hpcrender.models import controlnet_config_of, scheduler_config_of, unet_config_of
from hpcrender.models.facts import ModelFacts
from hpcrender.models.reference import Family
from hpcrender.parallel.bands import is_flux_config, is_transformer_config, transformer_alignment
from hpcrender.render.samplers import sampler_problem


PIPEFUSION_UNET = ("mode = 'pipefusion' cuts a diffusion transformer's blocks (PixArt, SD3, Flux) into stages; a "
                   "UNet's skip connections cross every stage: use 'displaced'")


def check_model_options(job: Job) -> None:
    """Refuse, before anything is loaded, what does not apply to the job's model: a sampler or a timestep spacing
    (render.samplers.sampler_problem: all but euler and heun for a flow-matching model, heun for Flux, spacing for
    flow matching and lcm), split_cfg for Flux (no classifier-free guidance), a transformer's image that is not whole
    patches (the VAEs of all three families scale by 8)."""
    try:
        config = scheduler_config_of(job.model)
        denoiser = unet_config_of(job.model)
    except Exception:  # noqa: BLE001 - a model that does not load is the job's failure, reported when it is loaded
        return
    check_controlnets(job, denoiser)
    if job.parallel.mode is Mode.PIPEFUSION and denoiser is not None and not is_transformer_config(denoiser):
        raise BadInput(PIPEFUSION_UNET)
    flux = denoiser is not None and is_transformer_config(denoiser) and is_flux_config(denoiser)
    problem = None if config is None else sampler_problem(job.scheduler, job.timestep_spacing, config,
                                                         Family.FLUX if flux else None, job.steps)
    if problem:
        raise BadInput(problem)
    if denoiser is None or not is_transformer_config(denoiser):
        return
    if job.parallel.split_cfg and is_flux_config(denoiser):
        raise BadInput("split_cfg needs classifier-free guidance, which Flux does not use (its guidance scale "
                       "is an input of the model)")
    _check_patches(job, 8 * transformer_alignment(denoiser))


def model_options_key(job: Job) -> tuple:
    """Everything of `job` that check_model_options reads: jobs with equal keys pass or fail it alike, so that a plan
    checks a manifest's many alike jobs once."""
    return (job.model, job.scheduler, job.timestep_spacing, job.steps, job.parallel.split_cfg, job.parallel.mode,
            job.width, job.height,
            tuple(c.model for c in job.controlnets), None if job.gigapixel is None else job.gigapixel.controlnet)


# What a ControlNet must share with the UNet it conditions: its residuals are added to the UNet's, block by block, and
# it reads the same latent, text states and SDXL's added inputs.
CONTROLNET_MATCHES = ("in_channels", "block_out_channels", "layers_per_block", "cross_attention_dim",
                      "addition_embed_type")


def controlnet_problem(controlnet: dict, denoiser: dict) -> str | None:
    """Why a ControlNet of config `controlnet` cannot condition the denoiser of config `denoiser`, or None."""
    if is_transformer_config(denoiser):
        return ("ControlNet applies to the UNets of SD 1.x/2.x and SDXL; this model is a diffusion transformer "
                "(PixArt, SD3, Flux)")
    kind = controlnet.get("_class_name", "ControlNetModel")
    if kind != "ControlNetModel":
        return f"a {kind}, not a diffusers ControlNetModel"
    for key in CONTROLNET_MATCHES:
        mine, theirs = controlnet.get(key), denoiser.get(key)
        if _as_tuple(mine) != _as_tuple(theirs):  # a config.json holds lists where a built config has tuples
            return f"made for another UNet: its {key} is {mine!r}, the model's {theirs!r}"
    return None


def _as_tuple(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def check_controlnets(job: Job, denoiser: dict | None) -> None:
    """Refuse, before anything is loaded, a ControlNet on a diffusion transformer or one made for another UNet (as
    far as the configs can be read without a download)."""
    refs = [(c.model, "controlnet" if len(job.controlnets) == 1 else f"controlnet[{i}]")
            for i, c in enumerate(job.controlnets)]
    if job.gigapixel is not None and job.gigapixel.controlnet is not None:
        refs.append((job.gigapixel.controlnet, "gigapixel.controlnet"))
    if not refs or denoiser is None:
        return
    for ref, where in refs:
        if is_transformer_config(denoiser):
            raise BadInput(f"{where}: {controlnet_problem({}, denoiser)}")
        try:
            config = controlnet_config_of(ref)
        except Exception:  # noqa: BLE001 - a ControlNet that does not load is the job's failure when it is loaded
            continue
        problem = None if config is None else controlnet_problem(config, denoiser)
        if problem:
            raise BadInput(f"{where}{'' if where.startswith('gigapixel') else '.model'}: {ref}: {problem}")


def _check_patches(job: Job, step: int) -> None:
    if job.width % step or job.height % step:
        raise BadInput(f"{job.width}x{job.height}: this model needs a width and height that are multiples of {step} "
                       "px (whole patches)")


def check_size(facts: ModelFacts, job: Job) -> None:
    """A transformer's image must be whole patches (Flux: whole 2x2 packs), as its diffusers pipeline demands."""
    if facts.transformer:
        _check_patches(job, facts.pixel_alignment)
