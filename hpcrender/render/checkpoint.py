"""A denoising loop stopped between steps: the whole latent, the step reached, the sampler's state and the state of
the job's generator (a stochastic sampler's noise of the steps to come).

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from hpcrender.output.files import write_atomic

FILE_NAME = "checkpoint.h5"
FORMAT_VERSION = 1
# The state of diffusers' samplers (render.samplers) that changes from step to step; everything else follows from
# set_timesteps. A multistep sampler's history is a list of the last model outputs.
SCHEDULER_SCALARS = ("_step_index", "_begin_index", "lower_order_nums", "this_order")
SET_BY_A_STEP = ("this_order",)  # UniPC's: absent from a sampler that has not stepped yet
SCHEDULER_HISTORY = "model_outputs"
# Tensors (or None) a sampler carries into its next call: UniPC's last sample, which its corrector reads, and Heun's
# first-order half of a step (None again after the step's second call, where checkpoints are taken).
SCHEDULER_TENSORS = ("last_sample", "prev_derivative", "sample", "dt")
# Lists of them: UniPC's timesteps of its history.
SCHEDULER_TENSOR_LISTS = ("timestep_list",)


@dataclass(frozen=True)
class SamplerTensor:
    """One carried tensor of a sampler, as a checkpoint keeps it: latent-shaped ones whole (gathered from the bands,
    cut to a band again on resume), in float32 or their integer type, with the dtype and memory layout to put back."""

    array: np.ndarray
    dtype: str            # torch's name of it: "float32", "float16", "int64", ...
    latent: bool          # latent-shaped (1, C, h, w): whole in the file, a band in the loop
    channels_last: bool = False


@dataclass(frozen=True)
class Checkpoint:
    """After `step` of `steps` denoising steps: the whole latent (1, C, h, w) and the sampler's history, float32.

    history holds one entry per slot of the sampler's list of past model outputs (None for an empty slot), or is
    empty for samplers without one. Latent-shaped arrays are whole images, not bands: a resume may use another
    number of ranks. channels_last tells, for the latent and then each history slot, whether the live tensor was
    channels-last (empty: all contiguous). state holds the sampler's other carried tensors by attribute name
    (SCHEDULER_TENSORS: a SamplerTensor or None; SCHEDULER_TENSOR_LISTS: a tuple of them); generator the job
    generator's state (torch.Generator.get_state(), uint8), None when the file has none.
    """

    step: int
    steps: int
    latent: np.ndarray
    scalars: dict
    history: tuple
    channels_last: tuple = ()
    state: dict = field(default_factory=dict)
    generator: np.ndarray | None = None

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
        if not hasattr(scheduler, name) and name not in SET_BY_A_STEP:
            raise ValueError(f"{type(scheduler).__name__} has no {name}: the checkpoint is of another sampler")
        setattr(scheduler, name, value)
    if history:
        current = getattr(scheduler, SCHEDULER_HISTORY, None)
        if current is None or len(current) != len(history):
            raise ValueError(f"{type(scheduler).__name__} keeps {0 if current is None else len(current)} past "
                             f"outputs, the checkpoint {len(history)}")
        setattr(scheduler, SCHEDULER_HISTORY, list(history))


def keep_carried(scheduler, is_latent: Callable, whole: Callable | None = None) -> dict:
    """The sampler's carried tensors (SCHEDULER_TENSORS, SCHEDULER_TENSOR_LISTS) it has, as a checkpoint keeps
    them: name -> a SamplerTensor, None, or a tuple of them. is_latent(tensor) tells a latent-shaped one, which
    whole(tensor) gathers from the bands (None: it is whole already)."""
    import torch

    def kept(tensor) -> SamplerTensor | None:
        if tensor is None:
            return None
        if not isinstance(tensor, torch.Tensor):
            tensor = torch.tensor(tensor)
        latent = bool(is_latent(tensor))
        array = whole(tensor) if latent and whole is not None else tensor
        array = array.float() if array.is_floating_point() else array
        # A copy: a periodic checkpoint is written in a thread while the sampler goes on with its tensors.
        return SamplerTensor(np.array(array.cpu().numpy()), str(tensor.dtype).removeprefix("torch."), latent,
                             is_channels_last(tensor))

    state = {name: kept(getattr(scheduler, name)) for name in SCHEDULER_TENSORS if hasattr(scheduler, name)}
    state.update({name: tuple(map(kept, getattr(scheduler, name))) for name in SCHEDULER_TENSOR_LISTS
                  if getattr(scheduler, name, None) is not None})
    return state


def restore_carried(scheduler, state: dict, cut: Callable | None = None, device=None) -> None:
    """Put tensors kept by keep_carried back into a sampler on which set_timesteps was called: latent-shaped ones
    cut(whole) to this rank's band (None: whole), the others on `device`; each in its own dtype and layout."""
    import torch

    def live(tensor: SamplerTensor | None):
        if tensor is None:
            return None
        value = torch.from_numpy(tensor.array)
        value = cut(value) if tensor.latent and cut is not None else value.to(device or value.device)
        return with_layout(value.to(getattr(torch, tensor.dtype)), tensor.channels_last)

    for name, value in state.items():
        if name in SCHEDULER_TENSOR_LISTS:
            current = getattr(scheduler, name, None)
            if current is None or len(current) != len(value):
                raise ValueError(f"{type(scheduler).__name__} keeps {0 if current is None else len(current)} "
                                 f"entries of {name}, the checkpoint {len(value)}: it is of another sampler")
            setattr(scheduler, name, [live(v) for v in value])
        elif name in SCHEDULER_TENSORS:
            setattr(scheduler, name, live(value))
        else:
            raise ValueError(f"a checkpoint carries {name!r}, which no sampler here keeps")


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
            for name, value in checkpoint.state.items():
                if isinstance(value, tuple):
                    group = f.create_group(f"state/{name}")
                    group.attrs["length"] = len(value)
                    for i, item in enumerate(value):
                        if item is not None:
                            _write_tensor(group, str(i), item)
                elif value is None:
                    f.attrs[f"state_none.{name}"] = 1
                else:
                    _write_tensor(f.require_group("state"), name, value)
            if checkpoint.generator is not None:
                f.create_dataset("generator", data=np.asarray(checkpoint.generator, dtype=np.uint8))

    write_atomic(path, write)


def _write_tensor(group, name: str, tensor: SamplerTensor) -> None:
    data = group.create_dataset(name, data=tensor.array)
    data.attrs["dtype"] = tensor.dtype
    data.attrs["latent"] = int(tensor.latent)
    data.attrs["channels_last"] = int(tensor.channels_last)


def _read_tensor(data) -> SamplerTensor:
    return SamplerTensor(array=data[...], dtype=str(data.attrs["dtype"]), latent=bool(data.attrs["latent"]),
                         channels_last=bool(data.attrs["channels_last"]))


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
            state = {key.removeprefix("state_none."): None for key in f.attrs if key.startswith("state_none.")}
            for name, entry in f.get("state", {}).items():
                if isinstance(entry, h5py.Group):
                    state[name] = tuple(_read_tensor(entry[str(i)]) if str(i) in entry else None
                                        for i in range(int(entry.attrs["length"])))
                else:
                    state[name] = _read_tensor(entry)
            generator = f["generator"][...] if "generator" in f else None
            return Checkpoint(step=int(f.attrs["step"]), steps=int(f.attrs["steps"]), latent=f["latent"][...],
                              scalars=scalars, history=history, channels_last=layouts, state=state,
                              generator=generator)
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
