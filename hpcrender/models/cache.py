"""The pipelines a rank has loaded, each with its facts: a manifest's jobs usually share one model."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hpcrender.models import load_controlnet, load_pipeline
from hpcrender.models.adapters import Fused, put_on, take_off, wanted
from hpcrender.models.facts import ModelFacts, facts_of


@dataclass(frozen=True)
class LoadedModel:
    pipe: object
    facts: ModelFacts  # asked of the pipeline once, when it was loaded


@dataclass
class ModelCache:
    """Pipelines by (reference, dtype), one at a time: memory, not load time, is the scarce thing. The LoRAs fused
    into the cached pipeline are those of the last job served; another job's are put on only after they are taken
    off, so that a job's image never depends on the job before it."""

    device: str
    cache: dict = field(default_factory=dict)
    fused: Fused | None = None
    controls: dict = field(default_factory=dict)  # ControlNets by (reference, dtype): the current job's only

    def get(self, ref: str, dtype, loras: tuple = (), cut=None) -> LoadedModel:
        """The pipeline of `ref` in `dtype` (config.DType) with `loras` (config.Lora) fused and its facts, its VAE in
        float32 (fp16 VAEs overflow on decode, and the decode is a small part of the time).

        cut: what a pipefusion render will keep of the denoiser (parallel.pipefusion.cut_of), else None. A denoiser
        that kept only one stage's weights serves that stage again, with the same LoRAs, and is loaded anew for
        anything else."""
        key = (ref, dtype)
        held = self._held(key)
        if held is not None and (held != cut or wanted(loras) != (self.fused.loras if self.fused else ())):
            self.cache.clear()
        if key not in self.cache:
            self.cache.clear()
            self.fused = None
            pipe = load_pipeline(ref, dtype=getattr(torch, dtype.value), device=self.device)
            pipe.vae.to(torch.float32)
            self.cache[key] = LoadedModel(pipe, facts_of(pipe))
        loaded = self.cache[key]
        if wanted(loras) != (self.fused.loras if self.fused else ()):
            if self.fused is not None:
                take_off(loaded.pipe, self.fused)
                self.fused = None
            if loras:
                self.fused = put_on(loaded.pipe, loras)
        return loaded

    def _held(self, key):
        loaded = self.cache.get(key)
        if loaded is None:
            return None
        denoiser = getattr(loaded.pipe, "transformer", None)
        return getattr(denoiser, "_hpcrender_stage", None)

    def controlnets(self, refs, dtype) -> tuple:
        """The ControlNetModel of each reference in `refs`, in `dtype` (config.DType); those another job used and this
        one does not are dropped first."""
        keys = [(ref, dtype) for ref in refs]
        for key in [k for k in self.controls if k not in keys]:
            del self.controls[key]
        for key in keys:
            if key not in self.controls:
                self.controls[key] = load_controlnet(key[0], dtype=getattr(torch, dtype.value), device=self.device)
        return tuple(self.controls[key] for key in keys)
