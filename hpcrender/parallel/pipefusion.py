"""PipeFusion put around an unmodified diffusion transformer (PixArt-Sigma, SD3, Flux.1): this rank is one stage of
a pipeline, holding a contiguous run of the blocks (parallel.pipeline), the embedders if it is the first stage and
the output head if it is the last. The latent's patches go through the stages one after another, each patch one
call of the model's own forward on every stage:

- the first stage's patch embedding adds the whole image's positions sliced to the patch (as for bands); a later
  stage's returns the tokens the stage before sent (and its context embedder the text stream, SD3 and Flux);
- the blocks before this stage's pass their inputs on; after its last, the tokens go to the next stage and the
  forward ends there; the last stage runs the head and returns the patch's output;
- every image attention keeps the whole image's keys and values, overwritten patch by patch: the patches before
  the current one are this step's, those after it the previous step's (stale); the text's are always fresh.

Warm-up steps send the whole latent as one patch (nothing stale). After each step the last stage broadcasts the
model's whole output to the other stages, so that every rank runs the sampler step alike and holds the same latent
(checkpoints, stochastic noise and the decode need nothing else).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from hpcrender.config import Mode
from hpcrender.errors import BadInput, DoesNotFit
from hpcrender.parallel.attention import BandAttnProcessor
from hpcrender.parallel.bands import Band, is_flux_config
from hpcrender.parallel.pipeline import HEAD_MODULES, HEAD_PARAMETERS, PipelineLayout, block_lists, entry_names
from hpcrender.parallel.transformer import (
    BandPatchEmbed, FluxBandAttnProcessor, JointBandAttnProcessor, TextLength, stand_in_processor,
)


@dataclass(frozen=True)
class PipePlan:
    """One rank's part of a pipefusion group: the layout, this rank's stage, the warm-up, and how many forwards make
    one denoising step (Heun's two: each keeps its own stale keys and values)."""

    layout: PipelineLayout
    stage: int
    warmup_steps: int
    calls_per_step: int = 1

    def __post_init__(self):
        if not 0 <= self.stage < len(self.layout.stages):
            raise BadInput(f"stage {self.stage} is outside the layout's {len(self.layout.stages)} stages")
        if self.warmup_steps < 0:
            raise BadInput(f"warm-up steps must be >= 0, got {self.warmup_steps}")
        if self.calls_per_step < 1:
            raise BadInput(f"a denoising step makes at least one forward, got {self.calls_per_step}")

    @property
    def stages(self) -> int:
        return len(self.layout.stages)

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.stages - 1

    def sync_step(self, step: int) -> bool:
        """Whether `step` sends the whole latent through the stages (the warm-up; always the first step)."""
        return step < max(self.warmup_steps, 1)


class StageOutput(Exception):
    """Raised after a stage's last block, not the model's: the forward ends there with what goes to the next
    stage."""

    def __init__(self, hidden: torch.Tensor, text: torch.Tensor | None):
        super().__init__()
        self.hidden = hidden
        self.text = text


class PipeContext:
    """What the stand-ins of one pipelined model share: the plan, the group, the current patch and the traffic."""

    mode = Mode.PIPEFUSION

    def __init__(self, plan: PipePlan, group, ranks: tuple[int, ...]):
        self.plan = plan
        self.group = group
        self.ranks = ranks          # global rank of each stage
        self.size = plan.stages
        self.text = TextLength()
        self.patches: tuple[Band, ...] = ()
        self.index = 0              # of the current patch
        self.keep = True            # store this patch's keys and values for a later pipelined step
        self.call = 0
        self.batch = 1
        self.received_text: torch.Tensor | None = None
        self.sent = 0
        self.waited = 0.0
        self.dtype = torch.float32
        self.device = torch.device("cpu")

    @property
    def token_span(self) -> tuple[int, int, int]:
        """Image tokens [start, stop) of the current patch, of the whole image's."""
        layout = self.plan.layout
        per_row = layout.latent_width // layout.align
        patch = self.patches[self.index]
        total = self.patches[-1].stop // layout.align * per_row
        return patch.start // layout.align * per_row, patch.stop // layout.align * per_row, total

    # BandPatchEmbed reads the bands and the rank of its context: here the patches and the current one.
    @property
    def bands(self) -> tuple[Band, ...]:
        return self.patches

    @property
    def rank(self) -> int:
        return self.index

    def receive(self, tokens: int) -> torch.Tensor:
        """The current patch's tokens from the stage before (and its text stream, kept for TextEntry)."""
        layout, plan = self.plan.layout, self.plan
        source = self.ranks[plan.stage - 1]
        t0 = time.perf_counter()
        hidden = torch.empty(self.batch, tokens, layout.inner, dtype=self.dtype, device=self.device)
        dist.recv(hidden, src=source, group=self.group, tag=2 * self.index)
        self.received_text = None
        if layout.text_crosses(plan.stage - 1):
            text = torch.empty(self.batch, self.text.tokens, layout.inner, dtype=self.dtype, device=self.device)
            dist.recv(text, src=source, group=self.group, tag=2 * self.index + 1)
            self.received_text = text
        self.waited += time.perf_counter() - t0
        return hidden

    def send(self, out: StageOutput) -> list:
        """Post the stage's output for the current patch to the next stage; the requests to wait for."""
        layout, plan = self.plan.layout, self.plan
        target = self.ranks[plan.stage + 1]
        hidden = out.hidden.contiguous()
        pending = [(dist.isend(hidden, dst=target, group=self.group, tag=2 * self.index), hidden)]
        self.sent += hidden.numel() * hidden.element_size()
        if layout.text_crosses(plan.stage):
            if out.text is None:
                raise DoesNotFit(f"stage {plan.stage}'s last block gave no text stream for the next stage")
            text = out.text.contiguous()
            pending.append((dist.isend(text, dst=target, group=self.group, tag=2 * self.index + 1), text))
            self.sent += text.numel() * text.element_size()
        return pending


class _PatchKV:
    """An image attention's keys and values of the whole image, kept between patches and steps: the current patch's
    written over its rows, the whole buffer returned (a whole-latent patch returns its own, as one device would)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def reset(self) -> None:
        super().reset()
        self._kv.clear()

    def _whole_image(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = self.ctx
        start, stop, total = ctx.token_span
        whole = start == 0 and stop == total
        if whole and not ctx.keep:
            return key, value
        kept = self._kv.get(ctx.call)
        shape_k, shape_v = (key.shape[0], total, key.shape[-1]), (value.shape[0], total, value.shape[-1])
        if kept is None or kept[0].shape != shape_k or kept[1].shape != shape_v:
            if not whole:
                raise DoesNotFit("a pipelined step needs the keys and values of a step before it (the warm-up)")
            kept = (key.new_empty(shape_k), value.new_empty(shape_v))
            self._kv[ctx.call] = kept
        kept[0][:, start:stop].copy_(key)
        kept[1][:, start:stop].copy_(value)
        return (key, value) if whole else kept


class PatchAttnProcessor(_PatchKV, BandAttnProcessor):
    """PixArt's self-attention over the current patch (its cross-attention to the text is local)."""


class JointPatchAttnProcessor(_PatchKV, JointBandAttnProcessor):
    """SD3's joint attention over the current patch and the whole text."""


class FluxPatchAttnProcessor(_PatchKV, FluxBandAttnProcessor):
    """Flux's attention over [text; current patch]."""


class StageEntry(nn.Module):
    """Stands in for the patch embedding (PixArt's and SD3's PatchEmbed, Flux's x_embedder): the first stage embeds
    the patch with the whole image's positions; a later one receives the stage before's tokens."""

    def __init__(self, original: nn.Module, ctx: PipeContext):
        super().__init__()
        self.original = original
        self.ctx = ctx
        self.banded = BandPatchEmbed(original, ctx) if not isinstance(original, nn.Linear) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        if ctx.plan.first:
            return self.banded(x) if self.banded is not None else self.original(x)
        start, stop, _ = ctx.token_span
        return ctx.receive(stop - start)


class TextEntry(nn.Module):
    """Stands in for the context embedder (SD3, Flux): a later stage takes the text stream the stage before sent."""

    def __init__(self, original: nn.Module, ctx: PipeContext):
        super().__init__()
        self.original = original
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ctx.plan.first:
            return self.original(x)
        if self.ctx.received_text is None:
            raise DoesNotFit("no text stream came from the stage before")
        return self.ctx.received_text


class Passed(nn.Module):
    """Stands in for a block another stage holds: its inputs go on unchanged (blocks before this stage's), or it is
    never reached (after it)."""

    def __init__(self, joint: bool):
        super().__init__()
        self.joint = joint

    def forward(self, hidden_states=None, *args, encoder_hidden_states=None, **kwargs):
        if self.joint:
            return encoder_hidden_states, hidden_states
        return hidden_states


class StageExit(nn.Module):
    """Stands in for the stage's last block when a later stage follows: runs it, then ends the forward."""

    def __init__(self, original: nn.Module, joint: bool):
        super().__init__()
        self.original = original
        self.joint = joint

    def forward(self, *args, **kwargs):
        out = self.original(*args, **kwargs)
        if self.joint:
            text, hidden = out
            raise StageOutput(hidden, text)
        raise StageOutput(out, None)


def held_parameter_bytes(model: nn.Module) -> int:
    """Bytes of the parameters this rank holds (those not on the meta device)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)


def release(model: nn.Module, plan: PipePlan) -> None:
    """Give back the memory of what this stage never runs: the other stages' blocks, the embedders off the first
    stage, the head off the last (moved to the meta device; the model is then this stage's only)."""
    stage = plan.layout.stages[plan.stage]
    for index, (blocks, key) in enumerate(block_lists(model)):
        if not stage.start <= index < stage.stop:
            blocks._modules[key].to("meta")
    entry, text = entry_names(model)
    if not plan.first:
        for name in (entry, text):
            if name is not None:
                getattr(model, name).to("meta")
    if not plan.last:
        for name in HEAD_MODULES:
            getattr(model, name).to("meta")
        for name in HEAD_PARAMETERS:
            param = model._parameters.get(name)
            if param is not None:
                model._parameters[name] = nn.Parameter(param.detach().to("meta"), requires_grad=False)
    model._hpcrender_stage = cut_of(plan)


def cut_of(plan: PipePlan) -> tuple:
    """What a released model still holds: its stages and which one it is."""
    return stage_cut(plan.layout, plan.stage)


def stage_cut(layout: PipelineLayout, stage: int) -> tuple:
    return (layout.stages, stage)


class PipeFused:
    """A model running as one stage of a pipeline; `forward(run_patch, model_in)` is one denoiser call of a step,
    `remove()` restores the stand-ins' originals (a released model keeps only its stage's weights)."""

    def __init__(self, model: nn.Module, plan: PipePlan, ctx: PipeContext, swaps, processors, hooks):
        self.model = model
        self.plan = plan
        self.ctx = ctx
        self._swaps = swaps
        self._processors = processors
        self._hooks = hooks
        self._removed = False
        self.begin_image()

    def begin_image(self) -> None:
        """Start an image: step counter, kept keys and values, traffic."""
        self._next = (0, 0)
        self._warm = False
        self._sent: list[int] = []
        self._waits: list[float] = []
        self._sync_steps: set[int] = set()
        self._async_steps: set[int] = set()
        for _, processor, _ in self._processors:
            processor.reset()

    def forward(self, run_patch, model_in: torch.Tensor) -> torch.Tensor:
        """One denoiser call over the whole latent `model_in` (every rank has it): run_patch(rows of model_in) calls
        the model's forward as its pipeline does; the model's whole output, on every stage."""
        plan, ctx = self.plan, self.ctx
        step, call = self._next
        self._next = (step, call + 1) if call + 1 < plan.calls_per_step else (step + 1, 0)
        sync = plan.sync_step(step) or not self._warm
        rows = model_in.shape[2]
        ctx.patches = (Band(0, rows),) if sync else plan.layout.patches
        if ctx.patches[-1].stop != rows:
            raise DoesNotFit(f"the pipeline's patches cover {ctx.patches[-1].stop} latent rows, the latent has {rows}")
        ctx.keep = not sync or not plan.sync_step(step + 1)
        ctx.call, ctx.batch = call, model_in.shape[0]
        ctx.dtype, ctx.device = next(p for p in self.model.parameters() if not p.is_meta).dtype, model_in.device
        ctx.sent, ctx.waited = 0, 0.0
        outputs, pending = [], []
        for index in range(len(ctx.patches)):
            ctx.index = index
            patch = ctx.patches[index]
            try:
                out = run_patch(model_in[:, :, patch.start:patch.stop])
            except StageOutput as o:
                if plan.last:
                    raise
                pending.extend(ctx.send(o))
                continue
            if not plan.last:
                raise DoesNotFit(f"stage {plan.stage} ran the model to its end: its last block was not cut")
            outputs.append(out)
        t0 = time.perf_counter()
        for request, _ in pending:
            request.wait()
        if plan.last:
            whole = torch.cat(outputs, dim=2).contiguous() if len(outputs) > 1 else outputs[0].contiguous()
        else:
            whole = torch.empty(self._output_shape(model_in), dtype=ctx.dtype, device=ctx.device)
        dist.broadcast(whole, src=ctx.ranks[-1], group=ctx.group)
        ctx.waited += time.perf_counter() - t0
        if plan.last:
            ctx.sent += whole.numel() * whole.element_size() * (plan.stages - 1)
        self._warm = True
        (self._sync_steps if sync else self._async_steps).add(step)
        self._add(step, ctx.sent, ctx.waited)
        return whole

    def _output_shape(self, model_in: torch.Tensor) -> tuple[int, ...]:
        layout = self.plan.layout
        return (model_in.shape[0], layout.out_channels, model_in.shape[2], model_in.shape[3])

    def _add(self, step: int, sent: int, waited: float) -> None:
        while len(self._sent) <= step:
            self._sent.append(0)
            self._waits.append(0.0)
        self._sent[step] += sent
        self._waits[step] += waited

    def stats(self) -> dict:
        """Per step of the current image: bytes this rank sent and seconds it waited on communication."""
        plan = self.plan
        stage = plan.layout.stages[plan.stage]
        return {
            "mode": Mode.PIPEFUSION.value, "ranks": plan.stages, "rank": plan.stage,
            "warmup_steps": plan.warmup_steps, "stage_blocks": [stage.start, stage.stop],
            "patches": [[p.start, p.stop] for p in plan.layout.patches],
            "bytes_sent": list(self._sent), "wait_seconds": [round(s, 6) for s in self._waits],
            "bytes_total": sum(self._sent), "wait_seconds_total": round(sum(self._waits), 6),
            "sync_steps": len(self._sync_steps), "async_steps": len(self._async_steps),
            "parameter_bytes": held_parameter_bytes(self.model),
        }

    def remove(self) -> None:
        """Restore the original modules, attention processors and forward."""
        if self._removed:
            return
        for hook in self._hooks:
            hook.remove()
        for parent, name, original in reversed(self._swaps):
            parent._modules[name] = original
        for attn, processor, order in self._processors:
            attn.set_processor(processor.original)
            if set(order) == set(attn._modules):
                items = [(key, attn._modules[key]) for key in order]
                attn._modules.clear()
                attn._modules.update(items)
            processor.reset()
        self._removed = True


def _inputs_hook(ctx: PipeContext, flux: bool):
    """Forward pre-hook: note the text length (Flux's single-stream blocks and the text stream's receive), and cut
    Flux's whole-image RoPE ids to the current patch."""

    def hook(module, args, kwargs):
        states = kwargs.get("encoder_hidden_states")
        if states is not None:
            ctx.text.tokens = states.shape[1]
        ids = kwargs.get("img_ids")
        if not flux or ids is None:
            return None
        start, stop, total = ctx.token_span
        flat = ids[0] if ids.ndim == 3 else ids
        if flat.shape[0] != total:
            raise DoesNotFit(f"{flat.shape[0]} image ids for an image of {total} tokens")
        kwargs = dict(kwargs)
        kwargs["img_ids"] = flat[start:stop]
        return args, kwargs

    return hook


def check_held(model: nn.Module, plan: PipePlan) -> None:
    """A model released for one stage serves that stage only."""
    cut = getattr(model, "_hpcrender_stage", None)
    if cut is not None and cut != cut_of(plan):
        raise BadInput(f"this model holds only stage {cut[1]} of {cut[0]}'s weights; load it again for another "
                       "stage or mode")


def pipefuse(model: nn.Module, plan: PipePlan, group, ranks: tuple[int, ...], hold_only: bool = True) -> PipeFused:
    """Run diffusion transformer `model` as stage plan.stage of a pipeline over `group` (`ranks`: the global rank of
    each stage). hold_only: give back the memory of the other stages' weights first (release); the model then
    serves this stage alone. remove() restores the model's modules (and, without hold_only, the model bit for bit)."""
    if len(ranks) != plan.stages:
        raise DoesNotFit(f"{plan.stages} stages but {len(ranks)} ranks")
    places = block_lists(model)
    if len(places) != len(plan.layout.blocks):
        raise DoesNotFit(f"the model has {len(places)} blocks, the layout {len(plan.layout.blocks)}")
    if plan.layout.stages[-1].stop != len(places):
        raise DoesNotFit(f"the stages {plan.layout.stages} do not cover the model's {len(places)} blocks")
    check_held(model, plan)
    ctx = PipeContext(plan, group, tuple(ranks))
    joint = plan.layout.joint
    stage = plan.layout.stages[plan.stage]
    processors, swaps = [], []
    for name, module in model.named_modules():
        if isinstance(module, (StageEntry, Passed, StageExit)):
            raise BadInput(f"{name} is already pipelined; remove() the earlier plan first")
    for index, (blocks, key) in enumerate(places):
        block = blocks._modules[key]
        if stage.start <= index < stage.stop:
            for name, module in block.named_modules():
                if hasattr(module, "set_processor") and hasattr(module, "processor"):
                    kinds = (PatchAttnProcessor, JointPatchAttnProcessor, FluxPatchAttnProcessor)
                    processor = stand_in_processor(module, name, ctx, ctx.text, kinds)
                    processors.append((module, processor, list(module._modules)))
            if index == stage.stop - 1 and not plan.last:
                swaps.append((blocks, key, block, StageExit(block, joint)))
        else:
            swaps.append((blocks, key, block, Passed(joint)))
    entry, text = entry_names(model)
    swaps.append((model, entry, getattr(model, entry), StageEntry(getattr(model, entry), ctx)))
    if text is not None:
        swaps.append((model, text, getattr(model, text), TextEntry(getattr(model, text), ctx)))
    # Everything is built before the first change: a refusal above leaves the model as it was.
    if hold_only:
        release(model, plan)
    for parent, key, _, stand_in in swaps:
        parent._modules[key] = stand_in
    for module, processor, _ in processors:
        module.set_processor(processor)
    hooks = [model.register_forward_pre_hook(_inputs_hook(ctx, is_flux_config(model.config)), with_kwargs=True)]
    return PipeFused(model, plan, ctx, [(p, k, o) for p, k, o, _ in swaps], processors, hooks)
