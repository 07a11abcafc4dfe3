"""Band arithmetic of patch parallelism: row bands of the latent, their rows at every feature-map scale, conv halos,
and the bytes one rank sends per step. Pure: no torch."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

from hpcrender.errors import DoesNotFit

GROUPNORM_STAT_BYTES = 3 * 8  # count, sum x, sum x^2 per (batch, group), in float64
TOKEN_COUNT_BYTES = 8         # a self-attention layer's token count, sent once per image (registration pass)
MAX_SCALE_EXPONENT = 16       # feature maps from 2**-16 to 2**16 times the input rows


@dataclass(frozen=True)
class Band:
    """Rows [start, stop) of a feature map."""

    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def split_rows(rows: int, parts: int) -> tuple[Band, ...]:
    """`rows` cut into `parts` contiguous bands whose sizes differ by at most one, the larger ones first."""
    if parts < 1:
        raise DoesNotFit(f"cannot split rows into {parts} bands: need at least one")
    if rows < parts:
        raise DoesNotFit(f"{rows} rows cannot be split into {parts} bands of at least one row")
    size, extra = divmod(rows, parts)
    bands, start = [], 0
    for i in range(parts):
        stop = start + size + (1 if i < extra else 0)
        bands.append(Band(start, stop))
        start = stop
    return tuple(bands)


def latent_bands(latent_rows: int, align: int, parts: int, pixels_per_row: int = 8) -> tuple[Band, ...]:
    """Bands of latent rows whose boundaries fall on rows of the coarsest feature map (`align` latent rows each).

    The coarse rows are shared out as evenly as `split_rows` does; latent rows past the last whole coarse row
    (a height that is no multiple of `align`) go to the last band, which ends at the image's edge.
    """
    if align < 1:
        raise DoesNotFit(f"alignment must be at least 1 row, got {align}")
    coarse = latent_rows // align
    if coarse < parts:
        step = align * pixels_per_row
        raise DoesNotFit(f"a height of {latent_rows * pixels_per_row} px gives {coarse} row(s) of the coarsest feature "
                         f"map (one per {step} px), fewer than its {parts} ranks: make it at least {parts * step} px "
                         "high or give it fewer ranks (ranks_per_image)")
    bands = [Band(b.start * align, b.stop * align) for b in split_rows(coarse, parts)]
    bands[-1] = Band(bands[-1].start, latent_rows)
    return tuple(bands)


def image_bands(height: int, vae_scale: int, align: int, parts: int) -> tuple[Band, ...]:
    """The latent row bands of an image `height` px high: the one place bands are computed (the run plan and the
    pipeline both call it), with the model's own VAE scale."""
    if vae_scale < 1:
        raise DoesNotFit(f"VAE scale must be at least 1, got {vae_scale}")
    return latent_bands(height // vae_scale, align, parts, pixels_per_row=vae_scale)


def vae_scale(vae_config: Mapping | object) -> int:
    """Pixel rows per latent row of a VAE: 2 per down block but the last (8 for SD, SDXL and their kin)."""
    channels = vae_config["block_out_channels"] if isinstance(vae_config, Mapping) else vae_config.block_out_channels
    return 2 ** (len(channels) - 1)


def _config_get(config: Mapping | object, key: str, default=None):
    return config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)


def is_transformer_config(config: Mapping | object) -> bool:
    """A diffusion transformer's config (patch embedding, no down blocks) rather than a UNet's."""
    return _config_get(config, "down_block_types") is None and _config_get(config, "patch_size") is not None


def is_flux_config(config: Mapping | object) -> bool:
    """A Flux transformer's config: 2x2-packed latents, RoPE positions, no classifier-free guidance."""
    return _config_get(config, "axes_dims_rope") is not None or \
        _config_get(config, "_class_name") == "FluxTransformer2DModel"


def transformer_alignment(config: Mapping | object) -> int:
    """Latent rows per token row of a diffusion transformer: its patch size (PixArt, SD3: 2), times 2 for Flux,
    whose pipeline packs 2x2 latent pixels into each token before its patch-1 embedding."""
    patch = int(_config_get(config, "patch_size"))
    return 2 * patch if is_flux_config(config) else patch


def unet_alignment(unet_config: Mapping | object) -> int:
    """Latent rows per row of a UNet's coarsest feature map: 2 ** (number of downsampling blocks); for a diffusion
    transformer's config, its token rows (transformer_alignment).

    Every down block but the last halves the feature map: 8 for SD 1.x/2.x, 4 for SDXL.
    """
    if is_transformer_config(unet_config):
        return transformer_alignment(unet_config)
    blocks = _config_get(unet_config, "down_block_types")
    return 2 ** (len(blocks) - 1)


def conv_halo(kernel: int, stride: int, padding: int, dilation: int = 1) -> tuple[int, int]:
    """Rows a convolution needs above and below a band of its input (band starts on a multiple of `stride`).

    Output row o reads input rows o*stride - padding ... o*stride - padding + span - 1, so a band [s, e) producing
    outputs [s/stride, e/stride) reads rows [s - padding, e + span - stride - padding). A negative second value
    means the band's own last rows are not read.
    """
    span = dilation * (kernel - 1) + 1
    return padding, span - stride - padding


def keeps_band_geometry(kernel: int, stride: int, padding: int, dilation: int = 1) -> bool:
    """True when a convolution maps H rows to ceil(H / stride) for every H ("same" padding).

    Only then do the output's band boundaries sit at the input's boundaries divided by the stride.
    """
    span = dilation * (kernel - 1) + 1
    return span % 2 == 1 and 2 * padding == span - 1


def band_rows(bands: Sequence[Band], scale: Fraction) -> tuple[int, ...]:
    """Rows of every band in a feature map with `scale` rows per input row.

    Interior boundaries scale exactly (bands are aligned); the image's last row scales up to ceil(rows * scale),
    which is what stride-2 "same" convolutions give.
    """
    cuts = [bands[0].start * scale] + [b.stop * scale for b in bands[:-1]]
    if any(c.denominator != 1 for c in cuts):
        raise DoesNotFit(f"band boundaries {[b.start for b in bands]} do not fall on rows of a feature map "
                         f"with {scale} rows per input row")
    cuts.append(Fraction(math.ceil(bands[-1].stop * scale)))
    return tuple(int(b - a) for a, b in zip(cuts, cuts[1:]))


def layer_scale(bands: Sequence[Band], rank: int, local_rows: int) -> Fraction:
    """Rows per input row of a feature map in which band `rank` has `local_rows` rows.

    Aligned bands give the ratio exactly; the last band may hold a remainder, so its ratio is rounded to the power
    of two (feature maps of UNets and VAE decoders halve and double) that reproduces its row count.
    """
    band = bands[rank]
    ratio = Fraction(local_rows, band.size)
    if rank < len(bands) - 1 or _is_power_of_two(ratio):
        return ratio
    for exponent in range(-MAX_SCALE_EXPONENT, MAX_SCALE_EXPONENT + 1):
        scale = Fraction(2) ** exponent
        try:
            if band_rows(bands, scale)[rank] == local_rows:
                return scale
        except DoesNotFit:
            continue
    return ratio


def _is_power_of_two(value: Fraction) -> bool:
    n, d = value.numerator, value.denominator
    return n > 0 and n & (n - 1) == 0 and d & (d - 1) == 0


class LayerKind(enum.Enum):
    HALO_CONV = "halo_conv"            # convolution reading rows of the neighbouring bands
    SELF_ATTENTION = "self_attention"  # keys/values of the whole image
    GROUP_NORM = "group_norm"          # statistics of the whole image


@dataclass(frozen=True)
class LayerSpec:
    """What one exchanging layer of a model sends, in terms of its feature map.

    scale: its input's rows per latent row; width: its input's columns; channels: input channels (HALO_CONV) or
    key plus value channels (SELF_ATTENTION); halo: conv_halo of a HALO_CONV; groups: of a GROUP_NORM.
    """

    kind: LayerKind
    scale: Fraction
    width: int
    channels: int = 0
    halo: tuple[int, int] = (0, 0)
    groups: int = 0


def layer_bytes(layer: LayerSpec, bands: Sequence[Band], rank: int, batch: int, element_size: int) -> int:
    """Bytes `rank` sends for one call of `layer`.

    A conv sends its last `above` rows to the band below it and its first `below` rows to the band above it;
    attention contributes its keys and values padded to the largest band; GroupNorm its statistics.
    """
    if layer.kind is LayerKind.HALO_CONV:
        above, below = layer.halo
        rows = (above if rank < len(bands) - 1 else 0) + (max(below, 0) if rank > 0 else 0)
        return rows * batch * layer.channels * layer.width * element_size
    if layer.kind is LayerKind.SELF_ATTENTION:
        tokens = max(band_rows(bands, layer.scale)) * layer.width
        return batch * tokens * layer.channels * element_size
    return batch * layer.groups * GROUPNORM_STAT_BYTES


def expected_bytes(layers: Sequence[LayerSpec], bands: Sequence[Band], rank: int, batch: int, element_size: int,
                   groupnorm_stats: bool = True, registration: bool = False) -> int:
    """Bytes `rank` sends in one exchanging step of a model made of `layers` (one call each).

    groupnorm_stats=False for steps whose GroupNorm exchanges nothing (separate statistics after the warm-up);
    registration=True for an image's first step, where self-attention layers also share their token counts.
    A group of one band sends nothing.
    """
    if len(bands) < 2:
        return 0
    total = 0
    for layer in layers:
        if groupnorm_stats or layer.kind is not LayerKind.GROUP_NORM:
            total += layer_bytes(layer, bands, rank, batch, element_size)
        if registration and layer.kind is LayerKind.SELF_ATTENTION:
            total += TOKEN_COUNT_BYTES
    return total


def transformer_layers(config: Mapping | object, latent_width: int) -> tuple[LayerSpec, ...]:
    """The exchanging layers of a diffusion transformer (PixArt-Sigma, SD3/3.5, Flux.1) from its config: one
    self-attention per image attention (PixArt's attn1; SD3's joint attention and SD3.5's second, image-only one;
    Flux's joint and single-stream blocks), each sending its image tokens' keys and values. Token rows are
    transformer_alignment latent rows; text tokens are never sent."""
    align = transformer_alignment(config)
    heads = int(_config_get(config, "num_attention_heads"))
    inner = heads * int(_config_get(config, "attention_head_dim"))
    blocks = int(_config_get(config, "num_layers"))
    if is_flux_config(config):
        blocks += int(_config_get(config, "num_single_layers"))
    else:
        blocks += len(_config_get(config, "dual_attention_layers", ()) or ())
    if latent_width % align:
        raise DoesNotFit(f"a latent {latent_width} columns wide is not whole tokens of {align} columns")
    layer = LayerSpec(LayerKind.SELF_ATTENTION, Fraction(1, align), latent_width // align, channels=2 * inner)
    return (layer,) * blocks


def transformer_step_bytes(config: Mapping | object, bands: Sequence[Band], rank: int, latent_width: int, batch: int,
                           element_size: int, registration: bool = False) -> int:
    """Bytes `rank` sends in one exchanging step (sync, or displaced after its warm-up) of a diffusion transformer
    over `bands` (latent rows): every image attention's keys and values of the band, padded to the largest band,
    for `batch` images (2 with classifier-free guidance unless split_cfg, else 1). registration=True for an
    image's first step, which also shares each layer's token count. 0 for one band."""
    return expected_bytes(transformer_layers(config, latent_width), bands, rank, batch, element_size,
                          registration=registration)


@dataclass(frozen=True)
class BufferBytes:
    """Bytes of the communication buffers one rank of a band group holds through an image, by kind of layer."""

    halos: int = 0        # each conv's boundary rows, sent and received, both ways
    keys_values: int = 0  # each self-attention layer's keys and values of every band (the whole image) + its own
    statistics: int = 0   # each GroupNorm's float64 statistics: the pooled sum and this band's last

    @property
    def total(self) -> int:
        return self.halos + self.keys_values + self.statistics


def exchange_buffers(layers: Sequence[LayerSpec], bands: Sequence[Band], batch: int, element_size: int) -> BufferBytes:
    """What the exchange slots of a model made of `layers` allocate on every rank (the same on each, and the same
    once laid out in buckets).

    Stale keys and values are kept for every band, padded to the largest: the whole image's, whatever the number
    of bands, which is what makes them the largest part at high resolution. A group of one band holds none.
    """
    if len(bands) < 2:
        return BufferBytes()
    halos = keys_values = statistics = 0
    for layer in layers:
        if layer.kind is LayerKind.HALO_CONV:
            above, below = layer.halo
            rows = above + max(below, 0)
            halos += 2 * rows * batch * layer.channels * layer.width * element_size
        elif layer.kind is LayerKind.SELF_ATTENTION:
            padded = max(band_rows(bands, layer.scale)) * layer.width
            keys_values += (len(bands) + 1) * batch * padded * layer.channels * element_size
        else:
            statistics += 2 * batch * layer.groups * GROUPNORM_STAT_BYTES
    return BufferBytes(halos, keys_values, statistics)


def gathered_keys_values(layers: Sequence[LayerSpec], bands: Sequence[Band], rank: int, batch: int,
                         element_size: int) -> int:
    """Bytes a band's self-attention holds beyond a forward of the band alone: the other bands' keys and values,
    joined to its own for the layer being computed (the largest such layer; one at a time); 0 with one band."""
    if len(bands) < 2:
        return 0
    extra = 0
    for layer in layers:
        if layer.kind is LayerKind.SELF_ATTENTION:
            rows = band_rows(bands, layer.scale)
            extra = max(extra, batch * (sum(rows) - rows[rank]) * layer.width * layer.channels * element_size)
    return extra


@dataclass(frozen=True)
class MemoryEstimate:
    """What one rank needs for a job: the UNet's weights, the exchange buffers, and the peak of the activations of
    one forward of its band (0 where they could not be worked out); the text encoders and VAE come on top."""

    weights: int
    buffers: BufferBytes
    activations: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.buffers.total + self.activations

    @property
    def step(self) -> int:
        """What a denoising loop adds to a loaded model: the buffers (allocated in its first step) and activations."""
        return self.buffers.total + self.activations


def memory_estimate(layers: Sequence[LayerSpec], parameters: int, bands: Sequence[Band], batch: int,
                    element_size: int, activations: int = 0, buffer_sets: int = 1) -> MemoryEstimate:
    """The estimate for a model of `parameters` weights and exchanging `layers` on `bands` (one band: no exchange),
    whose band's forward holds `activations` bytes at its peak, with `buffer_sets` sets of exchange buffers (displaced
    Heun keeps one per call of a step)."""
    one = exchange_buffers(layers, bands, batch, element_size)
    buffers = BufferBytes(one.halos * buffer_sets, one.keys_values * buffer_sets, one.statistics * buffer_sets)
    return MemoryEstimate(parameters * element_size, buffers, activations)


# --- compute per step: multiply-accumulates of a band -------------------------------------------------------------

@dataclass(frozen=True)
class ConvStrips:
    """How a band-parallel convolution covers its band's output rows (see conv.BandConv2d._band_conv).

    extend: the band with its halo rows is copied and convolved once. Otherwise the whole band is convolved with
    zero rows at its edges, then outputs [0, top) are recomputed from a strip of the halo above and band rows
    [0, top_end), and outputs [bottom, end) from band rows [bottom * stride - padding, end) and the halo below
    (bottom None: nothing below to recompute).
    """

    extend: bool
    top: int
    top_end: int
    bottom: int | None


def conv_strips(height: int, kernel: int, stride: int, padding: int, dilation: int, first: bool,
                last: bool) -> ConvStrips:
    """The cover for a band of `height` input rows; first/last: the band touches the image's top/bottom edge."""
    above, below = conv_halo(kernel, stride, padding, dilation)
    span = dilation * (kernel - 1) + 1
    top = -(-padding // stride) if not first and above > 0 else 0
    top_end = (top - 1) * stride - padding + span
    bottom = -(-(height + padding - span + 1) // stride) if not last and below > 0 else None
    extend = bool((top and top_end > height) or (bottom is not None and (bottom < top or bottom * stride < padding)))
    return ConvStrips(extend, top, top_end, bottom)


def conv_output_rows(rows: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    """Output rows of a convolution over `rows` input rows padded by `padding` on both sides."""
    span = dilation * (kernel - 1) + 1
    return max((rows + 2 * padding - span) // stride + 1, 0)


def band_conv_rows(height: int, kernel: int, stride: int, padding: int, dilation: int, first: bool,
                   last: bool) -> int:
    """Output rows a band-parallel convolution computes for a band of `height` input rows: its own output rows,
    plus the edge rows that the strips recompute (the halo's only extra compute)."""
    above, below = conv_halo(kernel, stride, padding, dilation)
    cover = conv_strips(height, kernel, stride, padding, dilation, first, last)
    if cover.extend:
        extended = (padding if first else above) + height + (padding if last else below)
        return conv_output_rows(extended, kernel, stride, 0, dilation)
    rows = conv_output_rows(height, kernel, stride, padding, dilation)
    if cover.top:
        rows += conv_output_rows(above + cover.top_end, kernel, stride, 0, dilation)
    if cover.bottom is not None:
        rows += conv_output_rows(height - (cover.bottom * stride - padding) + below, kernel, stride, 0, dilation)
    return rows


class ComputeKind(enum.Enum):
    CONV = "conv"            # a Conv2d: rows x columns x out x in / groups x kernel area
    LINEAR = "linear"        # an nn.Linear applied to feature-map tokens, text tokens or one vector per image
    ATTENTION = "attention"  # the two matrix products of scaled dot-product attention


class Tokens(enum.Enum):
    """What a linear layer or an attention's queries run over."""

    SPATIAL = "spatial"  # the band's tokens of its feature map
    TEXT = "text"        # the prompt's tokens (cross-attention keys and values)
    IMAGE = "image"      # one vector per image (time and pooled-text embeddings)


@dataclass(frozen=True)
class ComputeSpec:
    """One multiplying layer of a model, in terms of its input feature map (scale: rows per latent row; width:
    columns), as bands.LayerSpec does for the exchanging ones.

    CONV: in/out channels, groups, kernel (rows, columns), stride, padding, dilation (rows; columns alike), and
    halo: whether it is band-parallel (reads rows of its neighbours). LINEAR: in/out features and tokens; text_kv
    marks a cross-attention key/value projection, which a band-parallel model computes once per image.
    ATTENTION: channels = key plus value channels (all heads); self_attention: keys of every band, else the text's.
    """

    kind: ComputeKind
    scale: Fraction = Fraction(1)
    width: int = 0
    in_channels: int = 0
    out_channels: int = 0
    groups: int = 1
    kernel: tuple[int, int] = (1, 1)
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    halo: bool = False
    tokens: Tokens = Tokens.SPATIAL
    text_kv: bool = False
    channels: int = 0
    self_attention: bool = False


def layer_macs(spec: ComputeSpec, bands: Sequence[Band], rank: int, batch: int, text_tokens: int,
               exchanging: bool, text_kv_cached: bool = False) -> int:
    """Multiply-accumulates of one call of `spec` on band `rank` (one band: the whole image).

    exchanging: the model runs patch-parallel with exchange (sync or displaced on more than one band): halo
    convolutions recompute their edge rows and self-attention queries the keys of the whole image; otherwise
    every layer sees its band alone (naive).
    """
    rows = band_rows(bands, spec.scale)
    own = rows[rank]
    if spec.kind is ComputeKind.CONV:
        kh, kw = spec.kernel
        out_width = conv_output_rows(spec.width, kw, spec.stride, spec.padding, spec.dilation)
        if exchanging and spec.halo:
            out_rows = band_conv_rows(own, kh, spec.stride, spec.padding, spec.dilation, rank == 0,
                                      rank == len(bands) - 1)
        else:
            out_rows = conv_output_rows(own, kh, spec.stride, spec.padding, spec.dilation)
        per_output = spec.out_channels * (spec.in_channels // spec.groups) * kh * kw
        return batch * out_rows * out_width * per_output
    positions = {Tokens.SPATIAL: own * spec.width, Tokens.TEXT: text_tokens, Tokens.IMAGE: 1}
    if spec.kind is ComputeKind.LINEAR:
        if spec.text_kv and text_kv_cached:
            return 0
        return batch * positions[spec.tokens] * spec.in_channels * spec.out_channels
    if spec.self_attention:
        keys = (sum(rows) if exchanging else own) * spec.width
    else:
        keys = text_tokens
    return batch * positions[spec.tokens] * keys * spec.channels


def step_macs(specs: Sequence[ComputeSpec], bands: Sequence[Band], rank: int, batch: int, text_tokens: int,
              exchanging: bool, text_kv_cached: bool = False) -> int:
    """Multiply-accumulates of one forward of a model made of `specs` (one call each) on band `rank`.

    text_kv_cached: a band-parallel model's steps after an image's first, whose cross-attention keys and values of
    the text are kept from it.
    """
    return sum(layer_macs(s, bands, rank, batch, text_tokens, exchanging, text_kv_cached) for s in specs)
