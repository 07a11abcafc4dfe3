"""Pipeline arithmetic of PipeFusion (displaced patch pipeline parallelism): a diffusion transformer's blocks in
order, what each costs, their split into stages of balanced compute, the latent's patches on whole token rows, and
the bytes each stage sends per step. No torch here: the functions of a loaded model only read its structure (which
blocks, embedders and head it has), so that the run plan can count a model built on the meta device.

A group of K ranks is K stages, each holding a contiguous run of the blocks (stage 0 also the embedders, the last
also the output head). A step sends the latent's M patches through the stages one after another; a stage keeps
every attention layer's keys and values of the whole image, overwritten patch by patch, so that the patches
before the current one are this step's and those after it the previous step's (warm-up steps send the whole latent
as one patch).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hpcrender.errors import DoesNotFit
from hpcrender.parallel.bands import Band, is_flux_config, latent_bands, transformer_alignment


class BlockKind(enum.Enum):
    PIXART = "pixart"      # self-attention, cross-attention to the text, feed-forward (the text is not changed)
    JOINT = "joint"        # SD3's / Flux's: an image and a text stream, attending jointly
    SINGLE = "single"      # Flux's single-stream: [text; image] as one sequence


@dataclass(frozen=True)
class Block:
    """One transformer block: its kind, whether it has SD3.5's second (image-only) attention, and whether it is
    SD3's last, whose text stream ends inside it (context_pre_only)."""

    kind: BlockKind
    dual: bool = False
    text_ends: bool = False


@dataclass(frozen=True)
class Stage:
    """Blocks [start, stop) of the model's block order (Flux: joint blocks, then single-stream ones)."""

    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def _get(config: Mapping | object, key: str, default=None):
    return config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)


def is_joint_config(config: Mapping | object) -> bool:
    """SD3's and Flux's transformers carry a text stream through their blocks; PixArt's does not change the text."""
    return is_flux_config(config) or _get(config, "joint_attention_dim") is not None


def model_blocks(config: Mapping | object) -> tuple[Block, ...]:
    """The transformer's blocks in the order its forward runs them, from its config."""
    layers = int(_get(config, "num_layers"))
    if is_flux_config(config):
        return (Block(BlockKind.JOINT),) * layers + (Block(BlockKind.SINGLE),) * int(_get(config, "num_single_layers"))
    if is_joint_config(config):
        dual = set(_get(config, "dual_attention_layers", ()) or ())
        return tuple(Block(BlockKind.JOINT, dual=i in dual, text_ends=i == layers - 1) for i in range(layers))
    return (Block(BlockKind.PIXART),) * layers


def width(config: Mapping | object) -> int:
    """Channels of a token between two blocks: heads x head width."""
    return int(_get(config, "num_attention_heads")) * int(_get(config, "attention_head_dim"))


def block_macs(block: Block, tokens: int, text: int, inner: int, batch: int) -> int:
    """Multiply-accumulates of one call of `block` over `tokens` image tokens and `text` text tokens, `inner`
    channels wide, for `batch` images: projections and feed-forwards (4x wide) per token, attention's two products
    (the text's cross-attention keys and values of PixArt are computed once per image, not counted)."""
    d = inner
    if block.kind is BlockKind.PIXART:
        per_image = tokens * 14 * d * d + 2 * tokens * tokens * d + 2 * tokens * text * d
    elif block.kind is BlockKind.JOINT:
        seq = tokens + text
        text_macs = text * 3 * d * d + (0 if block.text_ends else text * 9 * d * d)
        per_image = tokens * 12 * d * d + text_macs + 2 * seq * seq * d
        if block.dual:
            per_image += tokens * 4 * d * d + 2 * tokens * tokens * d
    else:
        seq = tokens + text
        per_image = seq * 12 * d * d + 2 * seq * seq * d
    return batch * per_image


def balanced_stages(costs: Sequence[int], parts: int) -> tuple[Stage, ...]:
    """`costs` (one per block, in order) cut into `parts` contiguous non-empty stages so that the costliest stage
    costs as little as possible; of the cuts that reach it, the one whose earlier stages are the longest (as
    bands.split_rows gives the extra rows to the first bands)."""
    n = len(costs)
    if parts < 1:
        raise DoesNotFit(f"a pipeline needs at least one stage, got {parts}")
    if n < parts:
        raise DoesNotFit(f"{n} transformer block(s) cannot be cut into {parts} stages of at least one block: give "
                         f"the job at most {n} ranks per image (ranks_per_image)")
    if any(c < 0 for c in costs):
        raise DoesNotFit(f"block costs must be >= 0: {tuple(costs)}")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # tail[k][j]: the least possible costliest stage when blocks j.. are cut into k stages
    tail = [[inf] * (n + 1) for _ in range(parts + 1)]
    tail[0][n] = 0
    for k in range(1, parts + 1):
        for j in range(n - k, -1, -1):
            tail[k][j] = min(max(prefix[e] - prefix[j], tail[k - 1][e]) for e in range(j + 1, n - k + 2))
    best = tail[parts][0]
    stages, start = [], 0
    for k in range(parts, 0, -1):
        stop = max(e for e in range(start + 1, n - k + 2)
                   if prefix[e] - prefix[start] <= best and tail[k - 1][e] <= best)
        stages.append(Stage(start, stop))
        start = stop
    return tuple(stages)


# Text tokens assumed for a model whose tokenizers cannot be read before loading (the real
# checkpoints' pipelines: PixArt-Sigma's T5 300, SD3's CLIP 77 + T5 256, Flux's T5 512).
DEFAULT_TEXT_TOKENS = {"pixart": 300, "sd3": 333, "flux": 512}


def default_text_tokens(config: Mapping | object) -> int:
    if is_flux_config(config):
        return DEFAULT_TEXT_TOKENS["flux"]
    return DEFAULT_TEXT_TOKENS["sd3" if is_joint_config(config) else "pixart"]


def image_tokens(config: Mapping | object, latent_rows: int, latent_width: int) -> int:
    align = transformer_alignment(config)
    return (latent_rows // align) * (latent_width // align)


def model_stages(config: Mapping | object, parts: int, latent_rows: int, latent_width: int,
                 text: int) -> tuple[Stage, ...]:
    """The stages of a transformer of `config` on `parts` ranks for a latent of latent_rows x latent_width and `text`
    text tokens: balanced by block_macs at the whole image's tokens (one image: the split does not depend on the
    batch)."""
    tokens = image_tokens(config, latent_rows, latent_width)
    inner = width(config)
    costs = [block_macs(b, tokens, text, inner, 1) for b in model_blocks(config)]
    return balanced_stages(costs, parts)


def pipeline_patches(latent_rows: int, align: int, patches: int) -> tuple[Band, ...]:
    """The latent's `patches` patches of whole token rows (`align` latent rows each), the larger first; rows past the
    last whole token row belong to the last patch."""
    rows = latent_rows // align
    if patches > rows:
        raise DoesNotFit(f"pipeline_patches = {patches}: the latent has {rows} token row(s), and a patch needs at "
                         "least one: give fewer patches")
    return latent_bands(latent_rows, align, patches)


def patch_count(setting: int, stages: int) -> int:
    """The patches a step is cut into: `pipeline_patches` (0: as many as stages); fewer than the stages leaves a
    stage idle in every step."""
    count = setting or stages
    if count < stages:
        raise DoesNotFit(f"pipeline_patches = {setting} is fewer than the pipeline's {stages} stages: every step "
                         f"would leave a stage without work (give at least {stages}, or 0 for as many as stages)")
    return count


@dataclass(frozen=True)
class PipelineLayout:
    """A pipefusion job's stages and patches, with what crosses between stages per step."""

    stages: tuple[Stage, ...]
    patches: tuple[Band, ...]      # latent rows
    align: int                     # latent rows per token row
    latent_width: int
    inner: int                     # channels of a token between blocks
    text_tokens: int               # sent beside every patch where the text stream crosses a stage edge (SD3, Flux)
    joint: bool
    out_channels: int
    blocks: tuple[Block, ...]

    def tokens(self, patch: Band) -> int:
        return (patch.size // self.align) * (self.latent_width // self.align)

    def text_crosses(self, stage: int) -> bool:
        """Whether the text stream goes on past stage `stage`'s last block (SD3's ends in its last block)."""
        if not self.joint or stage == len(self.stages) - 1:
            return False
        return not self.blocks[self.stages[stage].stop - 1].text_ends

    def step_bytes(self, stage: int, batch: int, element: int, sync: bool) -> int:
        """Bytes stage `stage` sends in one step: each patch's tokens (and the text stream where it crosses) to the
        next stage; the last stage the model's whole output to every other stage (broadcast: what each sampler
        step needs). A sync step sends the whole latent as one patch."""
        last = len(self.stages) - 1
        if stage == last:
            rows = self.patches[-1].stop
            return batch * self.out_channels * rows * self.latent_width * element * last
        total_tokens = sum(self.tokens(p) for p in self.patches)
        count = 1 if sync else len(self.patches)
        text = batch * self.text_tokens * self.inner * element * count if self.text_crosses(stage) else 0
        return batch * total_tokens * self.inner * element + text


def pipeline_layout(config: Mapping | object, stages: int, setting: int, latent_rows: int, latent_width: int,
                    text_tokens: int, out_channels: int, cut: tuple[Stage, ...] | None = None) -> PipelineLayout:
    """The layout of a pipefusion job on `stages` ranks with `pipeline_patches = setting`, or DoesNotFit saying why
    it cannot work (before anything is loaded). cut: stages fixed beforehand (a gigapixel job's, from its largest
    tile, for all its units: a rank keeps one stage's weights throughout); else balanced for this latent."""
    align = transformer_alignment(config)
    if latent_width % align:
        raise DoesNotFit(f"a latent {latent_width} columns wide is not whole tokens of {align} columns")
    count = patch_count(setting, stages)
    if cut is None:
        cut = model_stages(config, stages, latent_rows, latent_width, text_tokens)
    elif len(cut) != stages or cut[-1].stop != len(model_blocks(config)):
        raise DoesNotFit(f"stages {cut} are not {stages} stages of the model's {len(model_blocks(config))} blocks")
    patches = pipeline_patches(latent_rows, align, count)
    return PipelineLayout(stages=cut, patches=patches, align=align, latent_width=latent_width, inner=width(config),
                          text_tokens=text_tokens, joint=is_joint_config(config), out_channels=out_channels,
                          blocks=model_blocks(config))


def output_channels(config: Mapping | object) -> int:
    """Channels of the denoiser's output as the render unpacks it: PixArt's with its learnt variance (twice the
    latent's), Flux's 2x2-packed tokens unpacked (a quarter of the token's channels)."""
    if is_flux_config(config):
        return int(_get(config, "out_channels", None) or _get(config, "in_channels")) // 4
    return int(_get(config, "out_channels", None) or _get(config, "in_channels"))


def stage_parameters(split: tuple, stages: Sequence[Stage], stage: int) -> int:
    """Parameters stage `stage` holds, from parameter counts (blocks in order, first stage's only, last stage's
    only, everyone's): its blocks, the embedders on the first, the head on the last, the conditioning on all."""
    blocks, first, last, shared = split
    own = stages[stage]
    held = sum(blocks[own.start:own.stop]) + shared
    if stage == 0:
        held += first
    if stage == len(stages) - 1:
        held += last
    return held


def attention_layers(block: Block) -> int:
    """Image attentions of a block: each keeps the whole image's keys and values in a pipeline."""
    return 2 if block.dual else 1


def kv_buffer_bytes(layout: PipelineLayout, stage: int, batch: int, element: int, calls: int = 1) -> int:
    """Bytes of the keys and values a stage keeps of the whole image (one set per call of a step: Heun's two)."""
    own = layout.stages[stage]
    tokens = sum(layout.tokens(p) for p in layout.patches)
    layers = sum(attention_layers(b) for b in layout.blocks[own.start:own.stop])
    return calls * layers * batch * tokens * 2 * layout.inner * element


# --- a diffusers transformer's structure ---------------------------------------------------------------------

def block_lists(model: object) -> list[tuple[object, str]]:
    """(ModuleList, index) of every block in the order the forward runs them."""
    places = [(model.transformer_blocks, str(i)) for i in range(len(model.transformer_blocks))]
    single = getattr(model, "single_transformer_blocks", None)
    if single is not None:
        places += [(single, str(i)) for i in range(len(single))]
    return places


def entry_names(model: object) -> tuple[str, str | None]:
    """The names of the patch embedding and the context embedder (None: PixArt's text is projected on every stage)."""
    if is_flux_config(model.config):
        return "x_embedder", "context_embedder"
    return "pos_embed", ("context_embedder" if hasattr(model, "context_embedder") else None)


HEAD_MODULES = ("norm_out", "proj_out")
HEAD_PARAMETERS = ("scale_shift_table",)  # PixArt's output modulation


def parameter_split(model: object) -> tuple[tuple[int, ...], int, int, int]:
    """Parameters (counts) of every block in order, of what only the first stage holds (the embedders), of what only
    the last holds (the head), and of what every stage holds (time and text conditioning): on the meta device too."""
    blocks = tuple(sum(p.numel() for p in blocks._modules[key].parameters()) for blocks, key in block_lists(model))
    entry, text = entry_names(model)
    first = sum(p.numel() for name in (entry, text) if name is not None for p in getattr(model, name).parameters())
    last = sum(p.numel() for name in HEAD_MODULES for p in getattr(model, name).parameters())
    last += sum(model._parameters[name].numel() for name in HEAD_PARAMETERS if model._parameters.get(name) is not None)
    shared = sum(p.numel() for p in model.parameters()) - sum(blocks) - first - last
    return blocks, first, last, shared
