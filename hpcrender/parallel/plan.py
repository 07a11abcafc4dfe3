"""Patch parallelism put around an unmodified diffusers UNet and taken off again: the plan and its handle (shared with
transformer.py), and `parallelize_unet(model, plan, group)`, which swaps its Conv2d and GroupNorm layers for band-parallel ones, installs band attention processors and a forward
pre-hook that counts the denoising steps; `remove()` restores the originals."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from hpcrender.config import GroupNormMode, HaloMode, Mode
from hpcrender.errors import BadInput, DoesNotFit
from hpcrender.parallel.attention import BandAttnProcessor
from hpcrender.parallel.bands import (
    Band, ComputeKind, ComputeSpec, LayerKind, LayerSpec, Tokens, band_rows, conv_halo, keeps_band_geometry,
    layer_scale,
)
from hpcrender.parallel.conv import BandConv2d, needs_halo
from hpcrender.parallel.downsample import BandDownsample, is_padded_downsample
from hpcrender.parallel.exchange import DEFAULT_BUCKET_BYTES, Exchange
from hpcrender.parallel.groupnorm import BandGroupNorm


@dataclass(frozen=True)
class PatchPlan:
    """How one rank of a band group runs a model: the exchange mode, GroupNorm mode, warm-up steps, the bands (rows
    of the model's input feature map, in rank order) and this rank's index among them, whether displaced steps
    exchange halo rows fresh or use the previous step's, and how many forwards make one denoising step (Heun's
    two: each keeps its own stale activations, from the same call of the step before)."""

    mode: Mode
    groupnorm: GroupNormMode
    warmup_steps: int
    bands: tuple[Band, ...]
    rank: int
    bucket_bytes: int = DEFAULT_BUCKET_BYTES  # largest flat buffer of one asynchronous collective
    halo: HaloMode = HaloMode.STALE
    calls_per_step: int = 1
    # Where this model's sets of exchange buffers number from (their p2p tags): another model parallelized on the same
    # group beside it (a ControlNet beside its UNet) has its buckets in flight at the same time.
    first_buffer_set: int = 0

    def __post_init__(self):
        if self.mode is Mode.NONE:
            raise BadInput("a patch plan needs mode naive, sync or displaced, not none")
        if self.warmup_steps < 0:
            raise BadInput(f"warm-up steps must be >= 0, got {self.warmup_steps}")
        if not self.bands:
            raise BadInput("a patch plan needs at least one band")
        stop = 0
        for band in self.bands:
            if band.start != stop or band.size < 1:
                raise BadInput(f"bands must be contiguous, non-empty and start at row 0: {self.bands}")
            stop = band.stop
        if not 0 <= self.rank < len(self.bands):
            raise BadInput(f"rank {self.rank} is outside the plan's {len(self.bands)} bands")
        if self.bucket_bytes < 1:
            raise BadInput(f"bucket size must be positive, got {self.bucket_bytes}")
        if self.calls_per_step < 1:
            raise BadInput(f"a denoising step makes at least one forward, got {self.calls_per_step}")
        if self.first_buffer_set < 0:
            raise BadInput(f"the first set of exchange buffers must be >= 0, got {self.first_buffer_set}")

    def sync_step(self, step: int) -> bool:
        """Whether `step` exchanges fresh activations and waits for them: every step in sync mode; in displaced
        mode the warm-up, and always the first step (nothing stale exists yet)."""
        return self.mode is Mode.SYNC or (self.mode is Mode.DISPLACED and step < max(self.warmup_steps, 1))

    def groupnorm_exchanged(self, step: int) -> bool:
        """Whether GroupNorm sends statistics at `step`."""
        return self.mode is not Mode.NAIVE and (self.sync_step(step) or self.groupnorm is not GroupNormMode.SEPARATE)

    @property
    def buffer_sets(self) -> int:
        """Sets of exchange buffers a rank keeps: one per call of a step in displaced mode (a call's stale
        activations are the same call's of the step before), else one (every exchange is fresh)."""
        return self.calls_per_step if self.mode is Mode.DISPLACED else 1


# p2p tags a set of exchange buffers may use (its buckets'); the next set's start above them.
TAGS_PER_SET = 1 << 16


class BandContext:
    """What the band layers of one parallelized model share: the plan, the exchange, and where the image is."""

    def __init__(self, plan: PatchPlan, group):
        self.plan = plan
        self.mode = plan.mode
        self.groupnorm = plan.groupnorm
        self.fresh_halos = plan.halo is HaloMode.FRESH
        self.bands = plan.bands
        self.rank = plan.rank
        self.size = len(plan.bands)
        # One set of buffers per call of a step (PatchPlan.buffer_sets); `exchange` is the current call's.
        self.exchanges = [Exchange(group, plan.rank, self.size, plan.bucket_bytes,
                                   tag_base=(plan.first_buffer_set + k) * TAGS_PER_SET)
                          for k in range(plan.buffer_sets)]
        self.exchange = self.exchanges[0]
        self.step = 0
        self.call = 0
        self.sync_step = True
        self._rows: dict[int, tuple[int, ...]] = {}

    def rows_at(self, local_rows: int) -> tuple[int, ...]:
        """Rows of every band in a feature map where this rank's band has `local_rows` rows."""
        rows = self._rows.get(local_rows)
        if rows is None:
            rows = band_rows(self.bands, layer_scale(self.bands, self.rank, local_rows))
            if rows[self.rank] != local_rows:
                raise DoesNotFit(f"a feature map with {local_rows} rows in band {self.rank} of {self.bands} does "
                                 "not line up with the bands")
            self._rows[local_rows] = rows
        return rows


class Parallelized:
    """A model running patch-parallel; `remove()` gives back the original model.

    Each forward of the model is a denoising step, or one of its plan.calls_per_step calls (Heun: forwards 2i and
    2i + 1 are step i's, as diffusers' Heun samplers list their timesteps): a forward pre-hook starts the call after
    the previous forward's (the first after begin_image() is step 0's call 0), so that any loop over timesteps -
    ours, a diffusers pipeline's - drives the model as it is. begin_step(i) before a forward makes that forward step
    i's first call instead (to repeat a step, say); the count goes on from there.
    """

    def __init__(self, model: nn.Module, plan: PatchPlan, ctx: BandContext,
                 swaps: list[tuple[nn.Module, str, nn.Module]], processors: list[tuple[Attention, BandAttnProcessor, list]]):
        self.model = model
        self.plan = plan
        self.ctx = ctx
        self._swaps = swaps
        self._processors = processors
        self._sync_steps: set[int] = set()
        self._async_steps: set[int] = set()
        self._removed = False
        self._next = (0, 0)     # (step, call) the next forward starts, unless begin_step said otherwise
        self._explicit = False  # begin_step was called for the next forward
        self._hook = model.register_forward_pre_hook(self._before_forward)

    def _before_forward(self, module: nn.Module, args) -> None:
        if self._explicit:
            self._explicit = False
        else:
            self._start_call(*self._next)
        step, call = self.ctx.step, self.ctx.call + 1
        self._next = (step, call) if call < self.plan.calls_per_step else (step + 1, 0)

    @property
    def step(self) -> int:
        """The step the model's last forward ran as (0 before the first)."""
        return self.ctx.step

    def begin_image(self) -> None:
        """Start an image: step counter, stale buffers and cached text keys/values are reset."""
        self._next = (0, 0)
        self._explicit = False
        ctx = self.ctx
        for exchange in ctx.exchanges:
            exchange.begin_image()
        ctx.exchange = ctx.exchanges[0]
        ctx.step = ctx.call = 0
        ctx.sync_step = True
        ctx.exchange.begin_step(0)
        for _, processor, _ in self._processors:
            processor.reset()
        self._sync_steps.clear()
        self._async_steps.clear()

    def begin_step(self, step: int, call: int = 0) -> None:
        """Make the model's next forward call `call` of denoising step `step` (0-based); without it, the forward
        pre-hook counts."""
        if not 0 <= call < self.plan.calls_per_step:
            raise BadInput(f"call {call} of a step of {self.plan.calls_per_step} call(s)")
        self._start_call(step, call)
        self._explicit = True

    def _start_call(self, step: int, call: int) -> None:
        """Before the forward of call `call` of step `step`: fresh blocking exchange in sync steps, the call's own
        stale activations and asynchronous exchange otherwise."""
        ctx = self.ctx
        ctx.step, ctx.call = step, call
        ctx.exchange = ctx.exchanges[call % len(ctx.exchanges)]
        # The registration pass (an image's first exchanging step) is synchronous whatever the step number.
        ctx.sync_step = self.plan.sync_step(step) or not ctx.exchange.slots
        ctx.exchange.begin_step(step)
        if self.plan.mode is Mode.DISPLACED and not ctx.sync_step:
            ctx.exchange.bucket()
        if self.plan.mode is not Mode.NAIVE and ctx.size > 1:
            (self._sync_steps if ctx.sync_step else self._async_steps).add(step)

    def stats(self) -> dict:
        """Per step of the current image (all its calls): bytes this rank sent and seconds it waited on
        communication."""
        sent = _per_step(exchange.bytes_sent for exchange in self.ctx.exchanges)
        waits = _per_step(exchange.wait_seconds for exchange in self.ctx.exchanges)
        stats = {
            "mode": self.plan.mode.value, "groupnorm": self.plan.groupnorm.value, "halo": self.plan.halo.value,
            "ranks": self.ctx.size,
            "rank": self.plan.rank, "warmup_steps": self.plan.warmup_steps,
            "bytes_sent": sent, "wait_seconds": [round(s, 6) for s in waits],
            "bytes_total": sum(sent), "wait_seconds_total": round(sum(waits), 6),
            "sync_steps": len(self._sync_steps), "async_steps": len(self._async_steps),
        }
        if self.plan.calls_per_step > 1:
            stats["calls_per_step"] = self.plan.calls_per_step
        return stats

    def remove(self) -> None:
        """Finish what is in flight and restore the original modules and attention processors."""
        if self._removed:
            return
        self._hook.remove()
        for exchange in self.ctx.exchanges:
            exchange.release()
        for parent, name, original in reversed(self._swaps):
            parent._modules[name] = original
        for attn, processor, order in self._processors:
            attn.set_processor(processor.original)
            if set(order) == set(attn._modules):  # set_processor may have moved a module processor to the end
                items = [(key, attn._modules[key]) for key in order]
                attn._modules.clear()
                attn._modules.update(items)
            processor.reset()
        self._removed = True


def _per_step(series) -> list:
    """Per-step sums over the exchanges' per-step lists (of different lengths: Heun's last step has one call)."""
    total: list = []
    for values in series:
        for i, value in enumerate(values):
            if i < len(total):
                total[i] += value
            else:
                total.append(value)
    return total


# The model's input convolution (UNet and VAE alike): it reads the sampler's latent, so its halo is always fresh.
INPUT_CONV = "conv_in"


def _band_layer(module: nn.Module, ctx: BandContext, name: str) -> nn.Module | None:
    """The band-parallel stand-in for `module`, None when it needs none (it only reads its own rows)."""
    if isinstance(module, (BandConv2d, BandGroupNorm, BandDownsample)):
        raise BadInput(f"{name} is already band-parallel; remove() the earlier plan first")
    if is_padded_downsample(module):  # a VAE encoder's: its zero row is the image's, not each band's
        return BandDownsample(module, ctx, name)
    if isinstance(module, nn.GroupNorm):
        if type(module) is not nn.GroupNorm:
            raise DoesNotFit(f"{name}: {type(module).__name__} cannot be split into bands")
        return BandGroupNorm(module, ctx)
    if isinstance(module, nn.Conv2d):
        if not needs_halo(module):
            return None
        kernel, stride, padding, dilation = (module.kernel_size[0], module.stride[0], module.padding[0],
                                             module.dilation[0])
        if type(module) is not nn.Conv2d or module.padding_mode != "zeros":
            raise DoesNotFit(f"{name}: {type(module).__name__} with {module.padding_mode} padding cannot be split "
                             "into bands")
        if not keeps_band_geometry(kernel, stride, padding, dilation):
            raise DoesNotFit(f"{name}: a convolution with kernel {kernel}, stride {stride}, padding {padding} does "
                             "not keep band boundaries on output rows")
        return BandConv2d(module, ctx, name, fresh=name == INPUT_CONV)
    if isinstance(module, nn.ConvTranspose2d) and (module.kernel_size[0] != module.stride[0] or module.padding[0]):
        raise DoesNotFit(f"{name}: an overlapping transposed convolution cannot be split into bands")
    return None


def _swap_layers(model: nn.Module, ctx: BandContext) -> list[tuple[nn.Module, str, nn.Module]]:
    """Swap every layer that needs one for its band-parallel stand-in, under every name it is registered as.

    All stand-ins are made before the first swap, so a layer that cannot be split leaves the model untouched. A
    module that is stood in for as a whole is not looked into."""
    names = {id(m): n for n, m in model.named_modules()}
    stand_ins: dict[int, nn.Module | None] = {}
    places = []

    def visit(parent: nn.Module) -> None:
        for name, child in parent._modules.items():
            if child is None:
                continue
            if id(child) not in stand_ins:
                stand_ins[id(child)] = _band_layer(child, ctx, names.get(id(child), name))
                if stand_ins[id(child)] is None:
                    visit(child)
            if stand_ins[id(child)] is not None:
                places.append((parent, name, child))

    visit(model)
    for parent, name, child in places:
        parent._modules[name] = stand_ins[id(child)]
    return places


def _install_processors(model: nn.Module, ctx: BandContext) -> list[tuple[Attention, BandAttnProcessor, list]]:
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    if any(isinstance(m.processor, BandAttnProcessor) for m in attentions):
        raise BadInput("the model's attention is already band-parallel; remove() the earlier plan first")
    installed = []
    for module in attentions:
        order = list(module._modules)
        processor = BandAttnProcessor(ctx, module.processor)
        module.set_processor(processor)
        installed.append((module, processor, order))
    return installed


def check_group(plan: PatchPlan, group) -> None:
    """The process group must hold one rank per band, this one at the plan's band."""
    size = len(plan.bands)
    if group is None:
        if size != 1:
            raise DoesNotFit(f"{size} bands need a process group of {size} ranks")
    else:
        if dist.get_world_size(group) != size:
            raise DoesNotFit(f"{size} bands but a process group of {dist.get_world_size(group)} ranks")
        if dist.get_rank(group) != plan.rank:
            raise DoesNotFit(f"the plan is for band {plan.rank} but this is rank {dist.get_rank(group)} of its group")


def parallelize_unet(model: nn.Module, plan: PatchPlan, group) -> Parallelized:
    """Run UNet `model` on this rank's band of `plan`, exchanging with the other bands over `group` (see
    parallelize.parallelize)."""
    check_group(plan, group)
    ctx = BandContext(plan, group)
    swaps = _swap_layers(model, ctx)
    try:
        processors = _install_processors(model, ctx)
    except BaseException:
        for parent, name, original in reversed(swaps):
            parent._modules[name] = original
        raise
    handle = Parallelized(model, plan, ctx, swaps, processors)
    handle.begin_image()
    return handle


def unet_layers(unet: nn.Module, latent_width: int) -> tuple[LayerSpec, ...]:
    """The exchanging layers of a diffusers UNet2DConditionModel, each with the scale and width of its input
    (down block i and its downsampler read level i, up block i level n-1-i, its upsampler's conv one level finer)."""
    levels = len(unet.down_blocks)
    widths = _level_widths(unet, latent_width)
    specs = []
    for path, module in unet.named_modules():
        level = _unet_level(path, levels)
        scale, width = Fraction(1, 2 ** level), widths[level]
        if type(module) is nn.Conv2d and needs_halo(module):
            halo = conv_halo(module.kernel_size[0], module.stride[0], module.padding[0], module.dilation[0])
            specs.append(LayerSpec(LayerKind.HALO_CONV, scale, width, channels=module.in_channels, halo=halo))
        elif type(module) is nn.GroupNorm:
            specs.append(LayerSpec(LayerKind.GROUP_NORM, scale, width, groups=module.num_groups))
        elif isinstance(module, Attention) and not module.is_cross_attention:
            specs.append(LayerSpec(LayerKind.SELF_ATTENTION, scale, width, channels=2 * module.inner_kv_dim))
    return tuple(specs)


def unet_compute(unet: nn.Module, latent_width: int) -> tuple[ComputeSpec, ...]:
    """The multiplying layers of a diffusers UNet2DConditionModel (its convolutions, linear layers and attention
    products), each with the scale and width of its input as unet_layers gives them: what step_macs counts."""
    levels = len(unet.down_blocks)
    widths = _level_widths(unet, latent_width)
    text_kv = {id(m.to_k) for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention}
    text_kv |= {id(m.to_v) for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention}
    specs = []
    for path, module in unet.named_modules():
        level = _unet_level(path, levels)
        scale, width = Fraction(1, 2 ** level), widths[level]
        if isinstance(module, nn.Conv2d):
            specs.append(ComputeSpec(ComputeKind.CONV, scale, width, in_channels=module.in_channels,
                                     out_channels=module.out_channels, groups=module.groups,
                                     kernel=tuple(module.kernel_size), stride=module.stride[0],
                                     padding=module.padding[0], dilation=module.dilation[0],
                                     halo=type(module) is nn.Conv2d and needs_halo(module)))
        elif isinstance(module, nn.Linear):
            if id(module) in text_kv:
                tokens = Tokens.TEXT
            elif ".attentions." in f".{path}":
                tokens = Tokens.SPATIAL
            else:
                tokens = Tokens.IMAGE
            specs.append(ComputeSpec(ComputeKind.LINEAR, scale, width, in_channels=module.in_features,
                                     out_channels=module.out_features, tokens=tokens, text_kv=id(module) in text_kv))
        elif isinstance(module, Attention):
            specs.append(ComputeSpec(ComputeKind.ATTENTION, scale, width,
                                     channels=module.to_k.out_features + module.to_v.out_features,
                                     self_attention=not module.is_cross_attention))
    return tuple(specs)


def _level_widths(unet: nn.Module, latent_width: int) -> list[int]:
    """Columns of every level's feature map, from the latent's through the downsamplers."""
    widths = [latent_width]
    for block in unet.down_blocks[:-1]:
        conv = block.downsamplers[0].conv
        span = conv.dilation[1] * (conv.kernel_size[1] - 1) + 1
        widths.append((widths[-1] + 2 * conv.padding[1] - span) // conv.stride[1] + 1)
    return widths


def _unet_level(path: str, levels: int) -> int:
    parts = path.split(".")
    if parts[0] == "mid_block":
        return levels - 1
    if len(parts) < 2:
        return 0
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "up_blocks":
        level = levels - 1 - int(parts[1])
        return level - 1 if "upsamplers" in parts else level
    return 0


class _LiveBytes(TorchDispatchMode):
    """Bytes of the tensors a forward allocates that are alive at once, at their peak: storages counted from the op
    that creates them until the last tensor viewing them is freed (inputs and weights are not counted)."""

    def __init__(self):
        super().__init__()
        self.views: dict[int, int] = {}
        self.now = 0
        self.peak = 0

    def _free(self, key: int, nbytes: int) -> None:
        self.views[key] -= 1
        if not self.views[key]:
            del self.views[key]
            self.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage._cdata, storage.nbytes()
            if key not in self.views:
                if key in inputs:  # a view of an input or a weight
                    continue
                self.views[key] = 0
                self.now += nbytes
                self.peak = max(self.peak, self.now)
            self.views[key] += 1
            weakref.finalize(t, self._free, key, nbytes)
        return out


class _FusedAttention(TorchFunctionMode):
    """Scaled dot-product attention as the fused kernels of CPUs and GPUs run it: its output and no score matrix
    (on the meta device it would otherwise expand into the unfused products)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            query, value = args[0], args[2] if len(args) > 2 else kwargs["value"]
            return query.new_empty(*query.shape[:-1], value.shape[-1])
        return func(*args, **(kwargs or {}))


def unet_activation_bytes(unet: nn.Module, batch: int, rows: int, width: int, text_tokens: int) -> int | None:
    """Peak bytes of the activations of one forward of `unet` (on the meta device: shapes only) over a latent of
    `rows` x `width`, in the parameters' dtype; None for conditioning this cannot make up (not SD/SDXL's)."""
    config = unet.config
    dtype = next(unet.parameters()).dtype
    kwargs = {"encoder_hidden_states": torch.empty(batch, text_tokens, config.cross_attention_dim, dtype=dtype,
                                                   device="meta")}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.empty(batch, pooled, dtype=dtype, device="meta"),
                                       "time_ids": torch.empty(batch, 6, dtype=dtype, device="meta")}
    elif config.addition_embed_type is not None or config.class_embed_type is not None:
        return None
    sample = torch.empty(batch, config.in_channels, rows, width, dtype=dtype, device="meta")
    tracker = _LiveBytes()
    with torch.no_grad(), _FusedAttention(), tracker:
        unet(sample, torch.tensor(500.0, device="meta"), **kwargs)
    return tracker.peak
