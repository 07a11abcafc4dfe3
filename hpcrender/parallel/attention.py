"""Attention processor for a band: self-attention queries the band against keys/values of the whole image (fresh
for the own band, fresh or stale for the others); cross-attention stays local with the text keys/values cached."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from hpcrender.config import Mode
from hpcrender.errors import DoesNotFit
from hpcrender.parallel.exchange import SlotKind, SlotSpec

# Processors whose cross-attention is plain attention over the text: those may have their text keys cached.
PLAIN_PROCESSORS = (AttnProcessor, AttnProcessor2_0)


class BandAttnProcessor:
    """Installed with `attn.set_processor`; goes through attn.to_q/to_k/to_v/to_out, so wrapped projections (LoRA)
    keep working. Cross-attention of a non-plain original processor (IP-Adapter, ...) is left to that processor."""

    def __init__(self, ctx, original):
        self.ctx = ctx
        self.original = original
        self._text: tuple | None = None   # (source, its version, key, value)
        self._counts: dict[int, tuple[int, ...]] = {}

    def reset(self) -> None:
        """Forget the cached text keys/values and token counts (a new image)."""
        self._text = None
        self._counts.clear()

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        if encoder_hidden_states is not None and not isinstance(self.original, PLAIN_PROCESSORS):
            return self._delegate(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, tokens, _ = hidden_states.shape
        exchanging = encoder_hidden_states is None and self.ctx.size > 1 and self.ctx.mode is not Mode.NAIVE

        if attention_mask is not None:
            if exchanging:
                raise DoesNotFit("a self-attention mask cannot be split into bands")
            length = tokens if encoder_hidden_states is None else encoder_hidden_states.shape[1]
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            key, value = attn.to_k(hidden_states), attn.to_v(hidden_states)
            if exchanging:
                key, value = self._whole_image(key, value)
        else:
            key, value = self._text_kv(attn, encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, value.shape[-1] // attn.heads).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                       is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * hidden_states.shape[-1])
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    # -- self-attention: keys and values of every band ------------------------------------------------------------

    def _band_tokens(self, tokens: int, device: torch.device) -> tuple[int, ...]:
        """Tokens of every band at this layer, learnt from the group once per image (the registration pass).

        Cheaper ratios would miss a last band that holds rows past the coarsest feature map's last whole row.
        """
        counts = self._counts.get(tokens)
        if counts is None:
            counts = self.ctx.exchange.gather_counts(tokens, device)
            self._counts[tokens] = counts
        return counts

    def _whole_image(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = self.ctx
        batch, tokens, ck = key.shape
        cv = value.shape[-1]
        counts = self._band_tokens(tokens, key.device)
        padded = max(counts)
        slot = ctx.exchange.slot(self, SlotSpec(SlotKind.GATHER, batch * padded * (ck + cv), 0, key.dtype,
                                                key.device))
        if ctx.sync_step:
            self._give(slot["send"], key, value, padded)
            ctx.exchange.exchange_now(slot)
            return self._assemble(slot, key, value, counts, padded)
        ctx.exchange.wait(slot)
        whole = self._assemble(slot, key, value, counts, padded)  # copies the stale bands out
        self._give(slot["send"], key, value, padded)
        ctx.exchange.post(slot)
        return whole

    @staticmethod
    def _split(flat: torch.Tensor, batch: int, padded: int, ck: int, cv: int) -> tuple[torch.Tensor, torch.Tensor]:
        cut = batch * padded * ck
        return flat[:cut].view(batch, padded, ck), flat[cut:].view(batch, padded, cv)

    def _give(self, send: torch.Tensor, key: torch.Tensor, value: torch.Tensor, padded: int) -> None:
        k, v = self._split(send, key.shape[0], padded, key.shape[-1], value.shape[-1])
        k[:, :key.shape[1]].copy_(key)
        v[:, :value.shape[1]].copy_(value)

    def _assemble(self, slot, key, value, counts, padded) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = [], []
        for band, n in enumerate(counts):
            if band == self.ctx.rank:
                keys.append(key)
                values.append(value)
            else:
                k, v = self._split(slot["recv"][band], key.shape[0], padded, key.shape[-1], value.shape[-1])
                keys.append(k[:, :n])
                values.append(v[:, :n])
        return torch.cat(keys, dim=1), torch.cat(values, dim=1)

    # -- cross-attention: local, text keys/values once per image ----------------------------------------------------

    def _text_kv(self, attn, encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._text
        if cached is not None and cached[0] is encoder_hidden_states and cached[1] == encoder_hidden_states._version:
            return cached[2], cached[3]
        source = encoder_hidden_states
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        self._text = (source, source._version, key, value)
        return key, value

    def _delegate(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb) -> torch.Tensor:
        accepted = inspect.signature(self.original.__call__).parameters
        extra = {"temb": temb} if "temb" in accepted and temb is not None else {}
        return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                             attention_mask=attention_mask, **extra)
