"""LoRA adapters on a loaded pipeline, through diffusers' own loaders: `load_lora_weights` with an adapter name each,
`set_adapters` with the scales, then `fuse_lora` into the weights for speed. Taking them off again restores the
weights bit for bit: diffusers' `unfuse_lora` subtracts what it added, which float rounding does not undo exactly, so
the layers' own weights are kept (on the host) while adapters are fused, and copied back after `unload_lora_weights`.
That is how a job never inherits another job's LoRA from the model cache.

Before anything renders, `check_targets` asks whether each LoRA names a layer of its job's model, from the model's
configs (its denoiser built on the meta device, no weights) and diffusers' own reading of the file (Kohya keys
converted as diffusers converts them when loading).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import diffusers
import torch
from diffusers.utils import convert_unet_state_dict_to_peft
from peft.tuners.tuners_utils import BaseTunerLayer

from hpcrender.config import Job, Lora
from hpcrender.errors import BadInput
from hpcrender.models import component_config_of
from hpcrender.models.lora import matched_layers, target_layers
from hpcrender.parallel.bands import is_flux_config, is_transformer_config

ADAPTER_NAME = "lora{}"  # the i-th LoRA of a job

# The pipeline class whose LoRA loader reads a family's files, by the denoiser's class and config.
_TRANSFORMER_PIPELINES = {"SD3Transformer2DModel": "StableDiffusion3Pipeline", "FluxTransformer2DModel": "FluxPipeline"}


@dataclass
class Fused:
    """The adapters fused into a pipeline now, and the weights they were fused into."""

    loras: tuple                      # (sha256, scale) of each, in order: what a job asks for is compared to it
    components: tuple[str, ...]       # the pipeline's components that hold adapters
    originals: dict = field(default_factory=dict)  # (component, module name) -> {parameter name: host tensor}


def wanted(loras: tuple[Lora, ...]) -> tuple:
    return tuple((lora.sha256, lora.scale) for lora in loras)


def _loader_refusal(pipe_name: str) -> str:
    return f"diffusers has no LoRA loader for {pipe_name} pipelines"


def load_unfused(pipe, loras: tuple[Lora, ...]) -> list[str]:
    """diffusers' default: each LoRA loaded as its own adapter and weighted by its scale, not fused (every wrapped
    layer runs its own weights and then its low-rank update); the adapters' names. BadInput (one line, naming the
    LoRA's key) for a file that names no layer of this pipeline."""
    if not hasattr(pipe, "load_lora_weights"):
        raise BadInput(f"{loras[0].where}: {_loader_refusal(type(pipe).__name__)}")
    names = [ADAPTER_NAME.format(i) for i in range(len(loras))]
    for name, lora in zip(names, loras):
        pipe.load_lora_weights(lora.path, adapter_name=name)
        if not any(name in found for found in pipe.get_list_adapters().values()):
            raise BadInput(f"{lora.where}: matches no layer of the model (diffusers loaded no weight of it)")
    pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])
    return names


def put_on(pipe, loras: tuple[Lora, ...]) -> Fused:
    """Load the LoRAs (load_unfused) and fuse them, keeping the weights they are fused into. On failure the pipeline
    is left as it was."""
    try:
        names = load_unfused(pipe, loras)
        components = tuple(c for c, found in pipe.get_list_adapters().items() if found)
        originals = {
            (component, name): {key: p.detach().to("cpu", copy=True)
                                for key, p in module.get_base_layer().named_parameters(recurse=False)}
            for component in components
            for name, module in getattr(pipe, component).named_modules() if isinstance(module, BaseTunerLayer)
        }
        pipe.fuse_lora(components=list(components), lora_scale=1.0, adapter_names=names)
    except BaseException:
        if hasattr(pipe, "get_list_adapters") and any(pipe.get_list_adapters().values()):
            pipe.unload_lora_weights()  # nothing fused yet: the layers' weights are still their own
        raise
    return Fused(wanted(loras), components, originals)


def take_off(pipe, fused: Fused) -> None:
    """Unfuse and unload the adapters, then give every layer its own weights back, bit for bit."""
    pipe.unfuse_lora(components=list(fused.components))
    pipe.unload_lora_weights()
    for (component, name), params in fused.originals.items():
        module = getattr(pipe, component).get_submodule(name)
        for key, value in params.items():
            getattr(module, key).data.copy_(value)


def _pipeline_class(config: dict):
    """The diffusers pipeline class whose `lora_state_dict` reads LoRA files for a model of this denoiser config;
    None for a family diffusers has no LoRA loader for (PixArt-Sigma)."""
    if is_transformer_config(config):
        name = "FluxTransformer2DModel" if is_flux_config(config) else config.get("_class_name", "")
        pipeline = _TRANSFORMER_PIPELINES.get(name)
        return None if pipeline is None else getattr(diffusers, pipeline)
    sdxl = config.get("addition_embed_type") == "text_time"
    return diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline


def _denoiser_modules(config: dict) -> dict[str, int | None]:
    """The denoiser's layers with their input features, from its config alone (built on the meta device: no
    memory, no weights)."""
    if is_transformer_config(config):
        name = "FluxTransformer2DModel" if is_flux_config(config) else config["_class_name"]
        cls = getattr(diffusers, name)
    else:
        cls = diffusers.UNet2DConditionModel
    settings = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = cls.from_config(settings)
    return {name: getattr(module, "in_features", getattr(module, "in_channels", None))
            for name, module in model.named_modules() if name}


def check_targets(jobs) -> None:
    """Refuse, before anything renders, a LoRA that names no layer of its job's model, or a model diffusers has no
    LoRA loader for. Models whose configs are not on this machine (a hub id not in the cache) are checked when they
    load (put_on)."""
    modules: dict[str, tuple] = {}
    read: dict[tuple, dict] = {}
    problems = []
    for job in jobs:
        if not job.loras:
            continue
        if job.model not in modules:
            modules[job.model] = _model_layers(job)
        pipeline, denoiser = modules[job.model]
        if denoiser is None:
            continue
        if pipeline is None:
            problems.extend(f"{lora.where}: {_loader_refusal('PixArt-Sigma')}" for lora in job.loras)
            continue
        for lora in job.loras:
            key = (pipeline, lora.sha256)
            if key not in read:
                read[key] = target_layers(_converted_shapes(pipeline, lora))
            layers = read[key]
            component = "transformer" if is_transformer_pipeline(pipeline) else "unet"
            named, found, mismatch = matched_layers(layers, {component: denoiser, "denoiser": denoiser})
            if mismatch is not None:
                name, theirs, ours = mismatch
                problems.append(f"{lora.where}: made for another model: its {name!r} takes {theirs} features, "
                                f"{job.model}'s takes {ours}")
            elif not found:
                example = min((name for names in layers.values() for name in names), default=None)
                what = f"none of the {named} layers it names, e.g. {example!r}, is in it" if named else \
                    "its keys name no layer"
                problems.append(f"{lora.where}: matches no layer of {job.model} ({what})")
    if problems:
        raise BadInput("\n".join(dict.fromkeys(problems)))


def is_transformer_pipeline(pipeline) -> bool:
    return pipeline.__name__ in _TRANSFORMER_PIPELINES.values()


def _model_layers(job: Job) -> tuple:
    try:
        config = component_config_of(job.model, "denoiser")
    except Exception:  # noqa: BLE001 - a model that does not load is the job's failure, reported when it is loaded
        return None, None
    if config is None:
        return None, None
    return _pipeline_class(config), _denoiser_modules(config)


def _converted_shapes(pipeline, lora: Lora) -> dict[str, tuple[int, ...]]:
    """The LoRA's tensors' names and shapes as diffusers' loader for `pipeline` reads them (Kohya and other formats
    converted)."""
    try:
        state = pipeline.lora_state_dict(lora.path)
    except Exception as error:  # noqa: BLE001 - diffusers' reasons are many; each is this file's problem
        first = (str(error).splitlines() or [type(error).__name__])[0]
        raise BadInput(f"{lora.where}: diffusers cannot read it as a LoRA for this model: {first}") from None
    if isinstance(state, tuple):
        state = state[0]
    if not is_transformer_pipeline(pipeline):  # diffusers' older attention-processor names, as the UNet loads them
        state = convert_unet_state_dict_to_peft(dict(state))
    return {key: tuple(getattr(value, "shape", ())) for key, value in state.items()}
