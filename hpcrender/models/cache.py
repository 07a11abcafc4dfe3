"""The pipelines a rank has loaded, each with its facts: a manifest's jobs usually share one model."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hpcrender.models import load_pipeline
from hpcrender.models.facts import ModelFacts, facts_of


@dataclass(frozen=True)
class LoadedModel:
    pipe: object
    facts: ModelFacts  # asked of the pipeline once, when it was loaded


@dataclass
class ModelCache:
    """Pipelines by (reference, dtype), one at a time: memory, not load time, is the scarce thing."""

    device: str
    cache: dict = field(default_factory=dict)

    def get(self, ref: str, dtype) -> LoadedModel:
        """The pipeline of `ref` in `dtype` (config.DType) and its facts, its VAE in float32 (fp16 VAEs overflow on
        decode, and the decode is a small part of the time)."""
        key = (ref, dtype)
        if key not in self.cache:
            self.cache.clear()
            pipe = load_pipeline(ref, dtype=getattr(torch, dtype.value), device=self.device)
            pipe.vae.to(torch.float32)
            self.cache[key] = LoadedModel(pipe, facts_of(pipe))
        return self.cache[key]
