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


def runs_synchronous_throughout(parallel: ParallelConfig, steps_run: int) -> bool:
    """A displaced render whose warm-up covers every step it runs: no step uses stale activations."""
    return parallel.mode is Mode.DISPLACED and max(parallel.warmup_steps, 1) >= steps_run


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
        if d["scheduler"] == SchedulerName.DPMPP_2M.value:
            d["scheduler"] = DPMPP_ALIAS
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class Manifest:
    path: Path
    jobs: tuple[Job, ...]


def _plain(obj):
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
