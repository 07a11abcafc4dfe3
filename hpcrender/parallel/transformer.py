"""Patch parallelism for diffusion transformers (PixArt-Sigma, SD3, Flux.1) put around the unmodified model: each
rank embeds and runs its band's image tokens; self-attention, and the image half of joint attention, query them
against keys/values of the whole image (fresh for the own band, fresh or one step stale for the others). Positions
are the whole image's, sliced to the band. Text tokens are computed whole on every rank: their keys/values are local,
and so is cross-attention to them.

Norms, AdaLN modulation and feed-forwards act per token, so attention is the only layer that exchanges anything.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hpcrender.config import Mode
from hpcrender.errors import BadInput, DoesNotFit
from hpcrender.parallel.attention import BandAttnProcessor
from hpcrender.parallel.bands import is_flux_config, transformer_alignment
from hpcrender.parallel.plan import BandContext, Parallelized, PatchPlan, check_group


def _exchanging(ctx) -> bool:
    return ctx.size > 1 and ctx.mode is not Mode.NAIVE


class BandPatchEmbed(nn.Module):
    """Stands in for diffusers' PatchEmbed (PixArt, SD3): embeds the band's patches and adds the whole image's
    position table - the sin-cos grid of the whole size, or SD3's table centre-cropped to the whole size - sliced to
    the band's token rows. The model's own would build the table of the band alone."""

    def __init__(self, original: nn.Module, ctx: BandContext):
        super().__init__()
        self.original = original
        self.ctx = ctx
        self._tables: dict[tuple, torch.Tensor] = {}

    def _whole_table(self, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        """The position table PatchEmbed.forward would add to a whole latent of rows x cols."""
        embed = self.original
        key = (rows, cols, device)
        table = self._tables.get(key)
        if table is not None:
            return table
        if embed.pos_embed_max_size:
            table = embed.cropped_pos_embed(rows, cols)
        else:
            grid = (rows // embed.patch_size, cols // embed.patch_size)
            if (embed.height, embed.width) != grid:
                from diffusers.models.embeddings import get_2d_sincos_pos_embed

                table = get_2d_sincos_pos_embed(embed_dim=embed.pos_embed.shape[-1], grid_size=grid,
                                                base_size=embed.base_size,
                                                interpolation_scale=embed.interpolation_scale, device=device,
                                                output_type="pt").float().unsqueeze(0)
            else:
                table = embed.pos_embed
        self._tables[key] = table
        return table

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        embed = self.original
        band = self.ctx.bands[self.ctx.rank]
        if latent.shape[-2] != band.size:
            raise DoesNotFit(f"the patch embedding got {latent.shape[-2]} latent rows, its band has {band.size}")
        cols = latent.shape[-1]
        x = embed.proj(latent)
        if embed.flatten:
            x = x.flatten(2).transpose(1, 2)
        if embed.layer_norm:
            x = embed.norm(x)
        if embed.pos_embed is None:
            return x.to(x.dtype)
        patch = embed.patch_size
        table = self._whole_table(self.ctx.bands[-1].stop, cols, x.device)
        per_row = cols // patch
        table = table[:, band.start // patch * per_row:band.stop // patch * per_row]
        return (x + table).to(x.dtype)


class JointBandAttnProcessor(BandAttnProcessor):
    """SD3's joint attention (JointAttnProcessor2_0) over a band: the band's image queries and the whole text's,
    against the whole image's keys/values and the text's own (computed on every rank, never exchanged). An
    image-only attention (SD3.5's second one) is plain band self-attention."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args, **kwargs):
        if not _exchanging(self.ctx):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if attention_mask is not None:
            raise DoesNotFit("a joint-attention mask cannot be split into bands")
        batch, tokens = hidden_states.shape[:2]
        query = attn.to_q(hidden_states)
        key, value = self._whole_image(attn.to_k(hidden_states), attn.to_v(hidden_states))
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            text_q = attn.add_q_proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            text_k = attn.add_k_proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            text_v = attn.add_v_proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_added_q is not None:
                text_q = attn.norm_added_q(text_q)
            if attn.norm_added_k is not None:
                text_k = attn.norm_added_k(text_k)
            query = torch.cat([query, text_q], dim=2)
            key = torch.cat([key, text_k], dim=2)
            value = torch.cat([value, text_v], dim=2)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is not None:
            out, text = out[:, :tokens], out[:, tokens:]
            if not attn.context_pre_only:
                text = attn.to_add_out(text)
        out = attn.to_out[1](attn.to_out[0](out))
        return (out, text) if encoder_hidden_states is not None else out


class TextLength:
    """How many text tokens lead Flux's single-stream sequence [text; image] in the current forward."""

    tokens: int = 0


class FluxBandAttnProcessor(BandAttnProcessor):
    """Flux's attention (FluxAttnProcessor) over a band: the joint blocks' [text; band] queries and the single-stream
    blocks' likewise, against the text's keys/values (local) and the whole image's, exchanged after the rotary
    embedding so that no rank needs another band's positions."""

    def __init__(self, ctx, original, text: TextLength):
        super().__init__(ctx, original)
        self.text = text

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None):
        if not _exchanging(self.ctx):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        if attention_mask is not None:
            raise DoesNotFit("an attention mask cannot be split into bands")
        query, key, value, text_q, text_k, text_v = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            text_q = attn.norm_added_q(text_q.unflatten(-1, (-1, attn.head_dim)))
            text_k = attn.norm_added_k(text_k.unflatten(-1, (-1, attn.head_dim)))
            text_v = text_v.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([text_q, query], dim=1)
            key = torch.cat([text_k, key], dim=1)
            value = torch.cat([text_v, value], dim=1)
            text_tokens = encoder_hidden_states.shape[1]
        else:
            text_tokens = self.text.tokens
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        heads = key.shape[2]
        image_k, image_v = self._whole_image(key[:, text_tokens:].flatten(2), value[:, text_tokens:].flatten(2))
        key = torch.cat([key[:, :text_tokens], image_k.unflatten(-1, (heads, -1))], dim=1)
        value = torch.cat([value[:, :text_tokens], image_v.unflatten(-1, (heads, -1))], dim=1)
        out = dispatch_attention_fn(query, key, value, attn_mask=None,
                                    backend=getattr(self.original, "_attention_backend", None))
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        text, out = out.split_with_sizes([text_tokens, out.shape[1] - text_tokens], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(text.contiguous())


def stand_in_processor(module: nn.Module, name: str, ctx, text: TextLength, kinds=None):
    """The processor that stands in for `module`'s: kinds = (plain, joint, Flux) classes, the band ones by default
    (pipefusion passes its own)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, JointAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    plain, joint, flux = kinds or (BandAttnProcessor, JointBandAttnProcessor, FluxBandAttnProcessor)
    original = module.processor
    if isinstance(original, BandAttnProcessor):
        raise BadInput("the model's attention is already band-parallel or pipelined; remove() the earlier plan first")
    if type(original) in (AttnProcessor, AttnProcessor2_0):
        return plain(ctx, original)
    if type(original) is JointAttnProcessor2_0:
        return joint(ctx, original)
    if type(original) is FluxAttnProcessor:
        return flux(ctx, original, text)
    raise DoesNotFit(f"{name}: attention processor {type(original).__name__} cannot be split into bands or stages")


class TransformerParallelized(Parallelized):
    """Parallelized with Flux's forward pre-hook too (band positions, the text length); remove() takes it off."""

    def __init__(self, *args, extra_hooks=(), **kwargs):
        super().__init__(*args, **kwargs)
        self._extra_hooks = list(extra_hooks)

    def remove(self) -> None:
        if not self._removed:
            for hook in self._extra_hooks:
                hook.remove()
        super().remove()


def _flux_inputs(ctx: BandContext, align: int, text: TextLength):
    """Forward pre-hook of a Flux transformer: the whole image's RoPE ids (img_ids) become the band's, and the text
    length is noted for the single-stream blocks. Ids already of the band's length are left as they are."""

    def hook(module, args, kwargs):
        ids = kwargs.get("img_ids")
        states = kwargs.get("encoder_hidden_states")
        if states is not None:
            text.tokens = states.shape[1]
        if ids is None:
            return None
        band = ctx.bands[ctx.rank]
        rows = ctx.bands[-1].stop // align
        flat = ids[0] if ids.ndim == 3 else ids
        if flat.shape[0] % rows:
            raise DoesNotFit(f"{flat.shape[0]} image ids do not fill {rows} token rows")
        per_row = flat.shape[0] // rows
        if flat.shape[0] == band.size // align * per_row:
            return None
        kwargs = dict(kwargs)
        kwargs["img_ids"] = flat[band.start // align * per_row:band.stop // align * per_row]
        return args, kwargs

    return hook


def parallelize_transformer(model: nn.Module, plan: PatchPlan, group) -> Parallelized:
    """Run diffusion transformer `model` on this rank's band of `plan` (bands in latent rows, on whole token rows),
    exchanging with the other bands over `group`. Used like parallelize.parallelize; remove() restores the model."""
    from diffusers.models.embeddings import PatchEmbed

    check_group(plan, group)
    align = transformer_alignment(model.config)
    for band in plan.bands[:-1]:
        if band.stop % align:
            raise DoesNotFit(f"band edges must fall on token rows ({align} latent rows each): {plan.bands}")
    ctx = BandContext(plan, group)
    text = TextLength()
    processors, swaps = [], []
    for name, module in model.named_modules():
        if isinstance(module, BandPatchEmbed):
            raise BadInput(f"{name} is already band-parallel; remove() the earlier plan first")
        if hasattr(module, "set_processor") and hasattr(module, "processor"):
            processors.append((module, stand_in_processor(module, name, ctx, text), list(module._modules)))
    for parent in model.modules():
        for child_name, child in parent._modules.items():
            if type(child) is PatchEmbed:
                swaps.append((parent, child_name, child))
    # Everything is built before the first change: a refusal above leaves the model as it was.
    for parent, child_name, child in swaps:
        parent._modules[child_name] = BandPatchEmbed(child, ctx)
    for module, processor, _ in processors:
        module.set_processor(processor)
    hooks = []
    if is_flux_config(model.config):  # 2x2-packed tokens, positions given as RoPE ids
        hooks.append(model.register_forward_pre_hook(_flux_inputs(ctx, align, text), with_kwargs=True))
    handle = TransformerParallelized(model, plan, ctx, swaps, processors, extra_hooks=hooks)
    handle.begin_image()
    return handle
