"""Checkpoints of a stopped denoising loop: the sampler continues exactly; the file is atomic and tied to the job."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from hpcrender.render.checkpoint import (
    Checkpoint, CheckpointWriter, read_checkpoint, remove_checkpoint, restore_scheduler, scheduler_state,
    write_checkpoint,
)

SAMPLERS = {
    "euler": lambda: EulerDiscreteScheduler(),
    "ddim": lambda: DDIMScheduler(),
    "dpmpp": lambda: DPMSolverMultistepScheduler(algorithm_type="dpmsolver++"),
    "dpmpp-3": lambda: DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=3),
}
STEPS = 9


def fake_model(x: torch.Tensor, t) -> torch.Tensor:
    """A deterministic stand-in for a UNet: depends on the sample and the timestep."""
    return 0.3 * torch.tanh(x) + 0.1 * math.sin(float(t) / 50.0)


def run(scheduler, x: torch.Tensor, first: int, last: int) -> torch.Tensor:
    for t in scheduler.timesteps[first:last]:
        x = scheduler.step(fake_model(scheduler.scale_model_input(x, t), t), t, x, return_dict=False)[0]
    return x


def fresh(name: str):
    scheduler = SAMPLERS[name]()
    scheduler.set_timesteps(STEPS)
    return scheduler


def start_latent() -> torch.Tensor:
    return torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("stop", range(1, STEPS))
def test_a_sampler_restored_from_a_checkpoint_file_continues_bit_for_bit(name, stop, tmp_path):
    whole = run(fresh(name), start_latent(), 0, STEPS)

    first = fresh(name)
    x = run(first, start_latent(), 0, stop)
    scalars, history = scheduler_state(first)
    saved = Checkpoint(step=stop, steps=STEPS, latent=x.numpy(), scalars=scalars,
                       history=tuple(None if h is None else h.numpy() for h in history))
    write_checkpoint(tmp_path / "checkpoint.h5", saved, "hash")
    back = read_checkpoint(tmp_path / "checkpoint.h5", "hash")

    second = fresh(name)
    restore_scheduler(second, back.scalars, tuple(None if h is None else torch.from_numpy(h) for h in back.history))
    resumed = run(second, torch.from_numpy(back.latent), stop, STEPS)
    assert torch.equal(resumed, whole)


def test_the_multistep_history_is_what_makes_the_resume_exact():
    whole = run(fresh("dpmpp"), start_latent(), 0, STEPS)
    first = fresh("dpmpp")
    x = run(first, start_latent(), 0, 4)
    scalars, _ = scheduler_state(first)
    second = fresh("dpmpp")
    # The step index alone: the sampler restarts its history with a first-order step.
    restore_scheduler(second, {"_step_index": scalars["_step_index"]}, ())
    assert not torch.allclose(run(second, x, 4, STEPS), whole, atol=1e-3)


def test_a_checkpoint_of_another_sampler_is_refused():
    first = fresh("dpmpp")
    run(first, start_latent(), 0, 3)
    scalars, history = scheduler_state(first)
    with pytest.raises(ValueError, match="lower_order_nums"):
        restore_scheduler(fresh("euler"), scalars, ())
    with pytest.raises(ValueError, match="past outputs"):
        restore_scheduler(fresh("dpmpp-3"), {}, history)


def test_a_checkpoint_puts_back_each_tensors_memory_layout(tmp_path):
    """A convolution over a channels-last tensor and over its contiguous copy may round differently: the resume
    must hand the loop the layout the stopped run had (an img2img latent is channels-last)."""
    from hpcrender.render.checkpoint import is_channels_last, with_layout

    plain = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(1))
    nhwc = plain.contiguous(memory_format=torch.channels_last)
    assert is_channels_last(nhwc) and not is_channels_last(plain) and not is_channels_last(None)
    assert not is_channels_last(torch.zeros(1, 1, 6, 5).contiguous(memory_format=torch.channels_last))  # both
    assert not is_channels_last(torch.zeros(2, 3, 4))
    saved = Checkpoint(step=2, steps=8, latent=nhwc.numpy(), scalars={}, history=(None, plain.numpy()),
                       channels_last=(True, False, False))
    write_checkpoint(tmp_path / "checkpoint.h5", saved, "hash")
    back = read_checkpoint(tmp_path / "checkpoint.h5", "hash")
    assert back.channels_last == (True, False, False)
    assert back.is_channels_last(0) and not back.is_channels_last(2)
    latent = with_layout(torch.from_numpy(back.latent), back.is_channels_last(0))
    assert torch.equal(latent, nhwc) and latent.stride() == nhwc.stride()
    history = with_layout(torch.from_numpy(back.history[1]), back.is_channels_last(2))
    assert history.stride() == plain.stride()
    # Written without layouts (an older file): every array contiguous.
    write_checkpoint(tmp_path / "old.h5", checkpoint(3), "hash")
    assert read_checkpoint(tmp_path / "old.h5", "hash").channels_last == ()
    assert not read_checkpoint(tmp_path / "old.h5", "hash").is_channels_last(0)
    with pytest.raises(ValueError, match="2 memory layouts for 3 arrays"):
        Checkpoint(step=2, steps=8, latent=nhwc.numpy(), scalars={}, history=(None, plain.numpy()),
                   channels_last=(True, False))


def checkpoint(step: int = 3) -> Checkpoint:
    latent = np.arange(2 * 4 * 3, dtype=np.float32).reshape(1, 2, 4, 3)
    return Checkpoint(step=step, steps=8, latent=latent, scalars={"_step_index": step, "_begin_index": None},
                      history=(None, latent * 2))


def test_checkpoint_files_round_trip_and_belong_to_one_job(tmp_path):
    path = tmp_path / "job" / "checkpoint.h5"
    assert read_checkpoint(path, "abc") is None
    write_checkpoint(path, checkpoint(3), "abc")
    back = read_checkpoint(path, "abc")
    assert (back.step, back.steps, back.scalars) == (3, 8, {"_step_index": 3, "_begin_index": None})
    assert np.array_equal(back.latent, checkpoint().latent) and back.history[0] is None
    assert np.array_equal(back.history[1], checkpoint().latent * 2)
    assert read_checkpoint(path, "another job") is None
    write_checkpoint(path, checkpoint(5), "abc")  # replaces the older one; no temporary file stays behind
    assert read_checkpoint(path, "abc").step == 5
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.h5"]
    remove_checkpoint(path)
    remove_checkpoint(path)
    assert not path.exists()


def test_an_unreadable_checkpoint_is_no_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"torn" * 100)
    assert read_checkpoint(path, "abc") is None


@pytest.mark.parametrize("step", [0, 8, 9, -1])
def test_a_checkpoint_lies_between_the_first_and_the_last_step(step):
    with pytest.raises(ValueError, match="strictly between"):
        checkpoint(step)


def test_periodic_checkpoints_are_written_beside_the_loop_one_at_a_time_latest_last(tmp_path):
    path = tmp_path / "job" / "checkpoint.h5"
    path.parent.mkdir()
    writer = CheckpointWriter(path, "hash")
    for step in (3, 7):
        latent = np.full((1, 4, 8, 8), float(step), np.float32)
        writer.submit(Checkpoint(step=step, steps=10, latent=latent, scalars={"_step_index": step}, history=()))
    writer.wait()
    assert not writer.busy and (writer.written, writer.step, writer.error) == (2, 7, None)
    back = read_checkpoint(path, "hash")
    assert back.step == 7 and np.all(back.latent == 7.0) and back.scalars == {"_step_index": 7}


def test_a_periodic_checkpoint_that_cannot_be_written_is_reported_not_raised(tmp_path):
    (tmp_path / "not-a-folder").write_text("")
    writer = CheckpointWriter(tmp_path / "not-a-folder" / "checkpoint.h5", "hash")
    writer.submit(Checkpoint(step=1, steps=4, latent=np.zeros((1, 4, 8, 8), np.float32), scalars={}, history=()))
    writer.wait()
    assert writer.written == 0 and writer.step is None
    assert "cannot write the checkpoint" in writer.error
