"""A denoising loop stopped between steps: the whole latent, the step reached and the sampler's state.

A long image stopped by a signal (Slurm's time-limit warning, a preemption) keeps the steps it finished: the
group's first rank writes `OUT/JOB/checkpoint.h5` and the next run carries on from that step. Restored exactly,
the sampler continues as if never stopped, so `none` and `sync` renders resume bit for bit (the tensors' memory
layouts too: an img2img latent is channels-last from the VAE encoder, and a convolution over a contiguous copy of it
rounds differently); `displaced` re-runs
its warm-up steps after a resume (the stale activations of the stopped run are gone), like a fresh start does.

The file is written beside its final name and renamed onto it, so a kill while writing leaves the previous
checkpoint (or none), never a torn one. Periodic checkpoints (a job's `checkpoint_every`) are the same file, written
by CheckpointWriter while the loop goes on, so that a SIGKILL or a lost node costs at most the steps since the last.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from hpcrender.output.files import write_atomic

FILE_NAME = "checkpoint.h5"
FORMAT_VERSION = 1
# The state of diffusers' euler, ddim and dpmpp (multistep) samplers that changes from step to step; everything
# else follows from set_timesteps. A multistep sampler's history is a list of the last model outputs.
SCHEDULER_SCALARS = ("_step_index", "_begin_index", "lower_order_nums")
SCHEDULER_HISTORY = "model_outputs"


@dataclass(frozen=True)
class Checkpoint:
    """After `step` of `steps` denoising steps: the whole latent (1, C, h, w) and the sampler's history, float32.

    history holds one entry per slot of the sampler's list of past model outputs (None for an empty slot), or is
    empty for samplers without one. Latent-shaped arrays are whole images, not bands: a resume may use another
    number of ranks. channels_last tells, for the latent and then each history slot, whether the live tensor was
    channels-last (empty: all contiguous).
    """

    step: int
    steps: int
    latent: np.ndarray
    scalars: dict
    history: tuple
    channels_last: tuple = ()

    def __post_init__(self):
        if not 0 < self.step < self.steps:
            raise ValueError(f"a checkpoint lies strictly between the first and the last step, got {self.step}"
                             f" of {self.steps}")
        if self.channels_last and len(self.channels_last) != 1 + len(self.history):
            raise ValueError(f"{len(self.channels_last)} memory layouts for {1 + len(self.history)} arrays")

    def is_channels_last(self, index: int) -> bool:
        """Whether array `index` (0 the latent, then the history slots) was channels-last when it was saved."""
        return bool(self.channels_last[index]) if self.channels_last else False


def is_channels_last(tensor) -> bool:
    """A 4-d torch tensor laid out channels-last (NHWC strides) rather than contiguous."""
    import torch

    return (tensor is not None and tensor.dim() == 4 and not tensor.is_contiguous()
            and tensor.is_contiguous(memory_format=torch.channels_last))


def with_layout(tensor, channels_last: bool):
    """`tensor` in the memory layout it had when saved."""
    import torch

    return tensor.contiguous(memory_format=torch.channels_last) if channels_last else tensor


def scheduler_state(scheduler) -> tuple[dict, tuple]:
    """(scalars, history) of a diffusers sampler: what must be put back for it to continue exactly."""
    scalars = {name: getattr(scheduler, name) for name in SCHEDULER_SCALARS if hasattr(scheduler, name)}
    history = tuple(getattr(scheduler, SCHEDULER_HISTORY, None) or ())
    return scalars, history


def restore_scheduler(scheduler, scalars: dict, history: tuple) -> None:
    """Put a state from scheduler_state back into a sampler on which set_timesteps was called."""
    for name, value in scalars.items():
        if not hasattr(scheduler, name):
            raise ValueError(f"{type(scheduler).__name__} has no {name}: the checkpoint is of another sampler")
        setattr(scheduler, name, value)
    if history:
        current = getattr(scheduler, SCHEDULER_HISTORY, None)
        if current is None or len(current) != len(history):
            raise ValueError(f"{type(scheduler).__name__} keeps {0 if current is None else len(current)} past "
                             f"outputs, the checkpoint {len(history)}")
        setattr(scheduler, SCHEDULER_HISTORY, list(history))


def checkpoint_path(job_dir: str | os.PathLike) -> Path:
    return Path(job_dir) / FILE_NAME


def write_checkpoint(path: str | os.PathLike, checkpoint: Checkpoint, params_hash: str) -> None:
    """Write atomically (files.write_atomic): a kill while writing leaves the previous checkpoint or none."""
    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["params_hash"] = params_hash
            f.attrs["step"] = checkpoint.step
            f.attrs["steps"] = checkpoint.steps
            for name, value in checkpoint.scalars.items():
                if value is not None:  # an absent attribute reads back as None
                    f.attrs[f"scalar.{name}"] = int(value)
                else:
                    f.attrs[f"none.{name}"] = 1
            f.create_dataset("latent", data=np.asarray(checkpoint.latent, dtype=np.float32))
            f.attrs["history_length"] = len(checkpoint.history)
            if checkpoint.channels_last:
                f.attrs["channels_last"] = np.asarray(checkpoint.channels_last, dtype=np.uint8)
            for i, entry in enumerate(checkpoint.history):
                if entry is not None:
                    f.create_dataset(f"history/{i}", data=np.asarray(entry, dtype=np.float32))

    write_atomic(path, write)


def read_checkpoint(path: str | os.PathLike, params_hash: str) -> Checkpoint | None:
    """The checkpoint at `path` when it belongs to a job with these parameters; None when there is none, it is of
    other parameters (the job was changed since) or it cannot be read."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format_version") != FORMAT_VERSION or f.attrs.get("params_hash") != params_hash:
                return None
            scalars = {}
            for key, value in f.attrs.items():
                if key.startswith("scalar."):
                    scalars[key.removeprefix("scalar.")] = int(value)
                elif key.startswith("none."):
                    scalars[key.removeprefix("none.")] = None
            history = tuple(f[f"history/{i}"][...] if f"history/{i}" in f else None
                            for i in range(int(f.attrs["history_length"])))
            layouts = tuple(bool(v) for v in f.attrs.get("channels_last", ()))
            return Checkpoint(step=int(f.attrs["step"]), steps=int(f.attrs["steps"]), latent=f["latent"][...],
                              scalars=scalars, history=history, channels_last=layouts)
    except (OSError, KeyError, ValueError):
        return None


def remove_checkpoint(path: str | os.PathLike) -> None:
    Path(path).unlink(missing_ok=True)


class CheckpointWriter:
    """Periodic checkpoints of one job, written in a thread of their own so that the denoising goes on meanwhile.

    One write at a time (`busy` says whether one is in flight: no new checkpoint is taken then); the file on disk is
    always the latest complete one. An error (a full disk) is kept in `error` and the render goes on: the image
    matters more than its insurance."""

    def __init__(self, path: str | os.PathLike, params_hash: str):
        self.path = Path(path)
        self.params_hash = params_hash
        self.written = 0          # checkpoints written by this run
        self.seconds = 0.0        # time spent writing them (in the thread)
        self.step: int | None = None  # the step of the latest complete one
        self.error: str | None = None
        self._thread: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, checkpoint: Checkpoint) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._write, args=(checkpoint,), name="checkpoint-writer", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Until the write in flight is on disk (before the job's checkpoint is replaced or removed)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _write(self, checkpoint: Checkpoint) -> None:
        t0 = time.perf_counter()
        try:
            write_checkpoint(self.path, checkpoint, self.params_hash)
        except OSError as error:
            self.error = f"{self.path}: cannot write the checkpoint: {error.strerror or error}"
            return
        self.seconds += time.perf_counter() - t0
        self.written += 1
        self.step = checkpoint.step
