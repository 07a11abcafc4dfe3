"""Typed, frozen configuration: what a manifest and the command line resolve to.

Parsed once at the boundary (manifest.py, cli.py) and passed explicitly; nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path


class Mode(str, enum.Enum):
    NONE = "none"            # each image on one rank; ranks share the job list
    NAIVE = "naive"          # bands with no exchange (baseline)
    SYNC = "sync"            # bands exchanging fresh activations every step (exact)
    DISPLACED = "displaced"  # DistriFusion: synchronous warm-up, then stale async exchange
    PIPEFUSION = "pipefusion"  # transformer blocks in stages, one per rank; patches through them, stale K/V

    @property
    def banded(self) -> bool:
        """Whether the mode cuts the latent into bands, one per rank (naive, sync, displaced)."""
        return self in (Mode.NAIVE, Mode.SYNC, Mode.DISPLACED)


class GroupNormMode(str, enum.Enum):
    CORRECTED = "corrected"  # stale whole-image mean and E[x^2], moved by the fresh local band's change
    STALE = "stale"          # the other bands' stats from the previous step, this band's fresh
    SYNC = "sync"            # fresh full stats every step (blocking)
    SEPARATE = "separate"    # each band its own stats


class HaloMode(str, enum.Enum):
    STALE = "stale"  # displaced steps use the previous step's halo rows (DistriFusion)
    FRESH = "fresh"  # displaced steps too exchange halo rows fresh, while the band's interior is convolved


class SchedulerName(str, enum.Enum):
    """The samplers by the names people use (A1111/k-diffusion), built as diffusers' scheduler overview maps them
    (render.samplers)."""

    EULER = "euler"
    EULER_A = "euler_a"
    HEUN = "heun"
    DDIM = "ddim"
    DPMPP_2M = "dpmpp_2m"
    DPMPP = "dpmpp_2m"  # the name before there were several DPM-Solver++ variants; "dpmpp" in a manifest too
    DPMPP_2M_KARRAS = "dpmpp_2m_karras"
    DPMPP_2M_SDE = "dpmpp_2m_sde"
    DPMPP_2M_SDE_KARRAS = "dpmpp_2m_sde_karras"
    UNIPC = "unipc"
    LCM = "lcm"

    @classmethod
    def _missing_(cls, value):
        return cls.DPMPP_2M if value == DPMPP_ALIAS else None

    @property
    def calls_per_step(self) -> int:
        """Denoiser calls per step: Heun's second-order correction evaluates the model again at the step's end
        (diffusers' HeunDiscreteScheduler, like its flow-matching twin, interleaves both in one list of timesteps;
        the last step is a plain Euler step of one call)."""
        return 2 if self is SchedulerName.HEUN else 1

    def denoiser_calls(self, steps: int) -> int:
        """Denoiser calls of `steps` steps run to the end of the schedule."""
        return self.calls_per_step * steps - (self.calls_per_step - 1) if steps else 0

    @property
    def stochastic(self) -> bool:
        """Draws fresh noise in every step (from the job's generator, as diffusers' pipelines pass it)."""
        return self in (SchedulerName.EULER_A, SchedulerName.DPMPP_2M_SDE, SchedulerName.DPMPP_2M_SDE_KARRAS,
                        SchedulerName.LCM)


DPMPP_ALIAS = "dpmpp"


class TimestepSpacing(str, enum.Enum):
    """Where a schedule of few steps puts its timesteps (Lin et al. 2023, table 2): `trailing` starts at the last
    training timestep, which Turbo and Lightning models are distilled for; unset, the model's own config decides."""

    LEADING = "leading"
    TRAILING = "trailing"
    LINSPACE = "linspace"


class DType(str, enum.Enum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


@dataclass(frozen=True)
class ParallelConfig:
    mode: Mode = Mode.DISPLACED
    warmup_steps: int = 4
    groupnorm: GroupNormMode = GroupNormMode.CORRECTED
    halo: HaloMode = HaloMode.STALE
    split_cfg: bool = False
    ranks_per_image: int = 0  # 0: all ranks render each image together
    pipeline_patches: int = 0  # pipefusion: patches per step (0: as many as stages)


def runs_synchronous_throughout(parallel: ParallelConfig, steps_run: int) -> bool:
    """A displaced render whose warm-up covers every step it runs: no step uses stale activations."""
    return parallel.mode in (Mode.DISPLACED, Mode.PIPEFUSION) and max(parallel.warmup_steps, 1) >= steps_run


@dataclass(frozen=True)
class GigapixelConfig:
    base: int = 1024      # longest side of the base render
    tile: int = 1024      # tile side for each refinement level
    overlap: int = 128
    strength: float = 0.35
    controlnet: str | None = None  # a tile ControlNet: every tile conditioned on its upscaled reference box


@dataclass(frozen=True)
class InitImage:
    """img2img: the image a job starts from and how much of the schedule is run again over it."""

    path: str        # absolute
    sha256: str      # of the file's bytes: a changed image is a changed job
    strength: float  # (0, 1]


@dataclass(frozen=True)
class Lora:
    """A LoRA adapter put on a job's model (models.lora): its file's content counts, not where it lies."""

    path: str        # absolute
    sha256: str      # of the file's bytes: a changed LoRA is a changed image
    scale: float = 1.0
    where: str = ""  # FILE:LINE: label of its `path` key, for the problems only loading the model can find


@dataclass(frozen=True)
class ControlNetConfig:
    """One ControlNet a job is conditioned on: diffusers' controlnet_conditioning_scale and control_guidance_start/end
    (the fractions of the run's denoiser calls it is applied between)."""

    model: str       # builtin:NAME, an absolute folder or a hub id
    image: str       # absolute path of the conditioning image
    sha256: str      # of the image file's bytes: a changed image is a changed job
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0


def derive_seed(name: str) -> int:
    """Stable seed for a job (or sweep sample) without `seed`: the same on every machine and Python,
    0 <= seed < 2**32."""
    digest = hashlib.sha256(b"hpcrender-seed:" + name.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big")


def first_step(steps: int, strength: float) -> int:
    """Index of the first denoising step run at `strength`, as diffusers' img2img pipelines cut the schedule
    (get_timesteps): the last int(steps * strength) steps are run, with Python's float rounding kept so that the
    same steps are run as there."""
    return steps - min(int(steps * strength), steps)


@dataclass(frozen=True)
class Job:
    name: str
    prompt: str
    width: int
    height: int
    seed: int
    model: str = "builtin:tiny-sdxl"
    steps: int = 20
    guidance_scale: float = 5.0
    scheduler: SchedulerName = SchedulerName.EULER
    timestep_spacing: TimestepSpacing | None = None  # None: the model's own scheduler config's
    dtype: DType = DType.FLOAT32
    negative_prompt: str = ""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    gigapixel: GigapixelConfig | None = None
    init_image: InitImage | None = None
    checkpoint_every: float | None = None  # seconds between periodic checkpoints of the denoising loop; None: off
    loras: tuple[Lora, ...] = ()            # in the order they were given; fused into the weights while it renders
    controlnets: tuple[ControlNetConfig, ...] = ()  # manifest key `controlnet`: one table or a list of them

    @property
    def first_step(self) -> int:
        """The schedule's first step this job runs: 0, or later for img2img."""
        return 0 if self.init_image is None else first_step(self.steps, self.init_image.strength)

    def to_dict(self) -> dict:
        """Plain JSON-able dict (enums as their values)."""
        return _plain(dataclasses.asdict(self))

    def params_hash(self) -> str:
        """Hash of everything that changes the pixels: a store written under another hash is not resumed."""
        d = self.to_dict()
        # How the work is split does not change which image is asked for; the mode does.
        d["parallel"].pop("ranks_per_image", None)
        d.pop("checkpoint_every", None)  # how often the loop is saved does not change the image
        if d["init_image"] is not None:  # the image's content counts, not where it lies
            d["init_image"].pop("path")
        for lora in d["loras"]:  # the file's content and scale count, not where it lies or was written
            lora.pop("path")
            lora.pop("where")
        if d["gigapixel"] is not None and d["gigapixel"]["controlnet"] is None:
            d["gigapixel"].pop("controlnet")  # gigapixel jobs without one keep their hash
        if d["controlnets"]:
            for control in d["controlnets"]:
                control.pop("image")  # its sha256 stays
        else:
            d.pop("controlnets")  # a job without one keeps the hash it had before the key existed
        # Jobs written before these keys existed keep their hash, so their stores and checkpoints stay theirs.
        if not d["loras"]:
            d.pop("loras")
        if d["timestep_spacing"] is None:
            d.pop("timestep_spacing")
        if not d["parallel"]["pipeline_patches"]:
            d["parallel"].pop("pipeline_patches")
        if d["scheduler"] == SchedulerName.DPMPP_2M.value:
            d["scheduler"] = DPMPP_ALIAS
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class SweepOutput(str, enum.Enum):
    SHARDS = "shards"    # WebDataset-style tar shards, OUT/NAME/shard-NNNNNN.tar, S samples each
    FOLDERS = "folders"  # every sample a job of its own: OUT/SAMPLE/ with store, image, preview and meta.json


@dataclass(frozen=True)
class PromptSource:
    """Where a sweep's prompts come from, as scanned once when the manifest is read: the rows are read again from the
    file shard by shard (prompts.read_rows), never all held at once. offsets: byte offset of rows 0, stride,
    2 stride, ... (CSV: after its header), so that a shard's rows are found without reading the rows before them."""

    format: str                  # txt | csv | jsonl | inline
    shown: str                   # the file as problems name it (inline: the manifest's line of `prompts`)
    path: str | None = None      # absolute; None for inline prompts
    sha256: str = ""             # of the file's bytes (inline: of the prompts): a changed file is another sweep
    rows: int = 0
    columns: tuple[str, ...] = ("prompt",)
    offsets: tuple[int, ...] = ()
    stride: int = 1024
    inline: tuple[str, ...] = ()  # the prompts of `prompts = [...]`


@dataclass(frozen=True)
class Sweep:
    """Many samples from one table: every prompt row with each of its seeds. A sample is the template job with the
    row's prompt (and negative prompt, seed, name, guidance scale where the row gives them); sample i is row
    i // per_prompt, seed number i % per_prompt, so that any sample or shard is found by arithmetic (sweeps.py)."""

    name: str
    template: Job                         # every key of the table and [defaults]; prompt and name are the sample's
    source: PromptSource
    seeds: tuple[int, ...] | range | None = None  # each row with each seed (a row's own seed replaces them)
    images_per_prompt: int = 1            # without seeds: samples per row, seeds from the row's, the table's or names
    seed_given: bool = False              # the table (or [defaults]) sets `seed`: samples count on from it
    batch: int = 1                        # samples per denoiser call
    shard_size: int = 1000
    output: SweepOutput = SweepOutput.SHARDS

    @property
    def per_prompt(self) -> int:
        return len(self.seeds) if self.seeds is not None else self.images_per_prompt

    @property
    def samples(self) -> int:
        return self.source.rows * self.per_prompt


@dataclass(frozen=True)
class Manifest:
    path: Path
    jobs: tuple[Job, ...]
    sweeps: tuple[Sweep, ...] = ()


def _plain(obj):
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
