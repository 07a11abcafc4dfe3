"""Checkpoints of a stopped denoising loop: the sampler continues exactly; the file is atomic and tied to the job."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler, HeunDiscreteScheduler, LCMScheduler, UniPCMultistepScheduler,
)

from hpcrender.render.checkpoint import (
    Checkpoint, CheckpointWriter, SamplerTensor, keep_carried, read_checkpoint, remove_checkpoint, restore_carried,
    restore_scheduler, scheduler_state, write_checkpoint,
)

SAMPLERS = {
    "euler": lambda: EulerDiscreteScheduler(),
    "ddim": lambda: DDIMScheduler(),
    "dpmpp": lambda: DPMSolverMultistepScheduler(algorithm_type="dpmsolver++"),
    "dpmpp-3": lambda: DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=3),
    # what the newer names add: a second call per step (stopped between the two as well), UniPC's corrector state,
    # and per-step noise from the generator
    "heun": lambda: HeunDiscreteScheduler(),
    "flow-heun": lambda: FlowMatchHeunDiscreteScheduler(shift=3.0),
    "unipc": lambda: UniPCMultistepScheduler(),
    "euler_a": lambda: EulerAncestralDiscreteScheduler(),
    "dpmpp_2m_sde": lambda: DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"),
    "lcm": lambda: LCMScheduler(),
}
STEPS = 9


def fake_model(x: torch.Tensor, t) -> torch.Tensor:
    """A deterministic stand-in for a UNet: depends on the sample and the timestep."""
    return 0.3 * torch.tanh(x) + 0.1 * math.sin(float(t) / 50.0)


def run(scheduler, x: torch.Tensor, first: int, last: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Timesteps first..last (entries of the list: Heun's two a step) with the fake model; the generator is passed
    where the step takes one, as diffusers' pipelines pass it."""
    takes = generator is not None and "generator" in inspect.signature(scheduler.step).parameters
    for t in scheduler.timesteps[first:last]:
        model_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        x = scheduler.step(fake_model(model_in, t), t, x, return_dict=False,
                           **({"generator": generator} if takes else {}))[0]
    return x


def fresh(name: str):
    scheduler = SAMPLERS[name]()
    scheduler.set_timesteps(STEPS)
    return scheduler


def start_latent() -> torch.Tensor:
    return torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(0))


def is_latent(tensor: torch.Tensor) -> bool:
    return tensor.dim() == 4


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("stop", range(1, STEPS))
def test_a_sampler_restored_from_a_checkpoint_file_continues_bit_for_bit(name, stop, tmp_path):
    entries = len(fresh(name).timesteps)
    whole = run(fresh(name), start_latent(), 0, entries, torch.Generator().manual_seed(3))

    first, generator = fresh(name), torch.Generator().manual_seed(3)
    x = run(first, start_latent(), 0, stop, generator)
    scalars, history = scheduler_state(first)
    saved = Checkpoint(step=stop, steps=STEPS, latent=x.numpy(), scalars=scalars,
                       history=tuple(None if h is None else h.numpy() for h in history),
                       state=keep_carried(first, is_latent), generator=generator.get_state().numpy())
    write_checkpoint(tmp_path / "checkpoint.h5", saved, "hash")
    back = read_checkpoint(tmp_path / "checkpoint.h5", "hash")

    second, generator = fresh(name), torch.Generator()
    restore_scheduler(second, back.scalars, tuple(None if h is None else torch.from_numpy(h) for h in back.history))
    restore_carried(second, back.state)
    generator.set_state(torch.from_numpy(back.generator))
    resumed = run(second, torch.from_numpy(back.latent), stop, entries, generator)
    assert torch.equal(resumed, whole)


def test_heun_between_its_two_calls_and_unipc_carry_tensors_a_checkpoint_keeps(tmp_path):
    """What the step index and the history alone would lose: Heun's first-order half of a step (its derivative, dt
    and sample) and UniPC's last sample and timesteps; without them the resume is off."""
    for name, stop, carried in (("heun", 3, ("prev_derivative", "dt", "sample")),
                                ("unipc", 4, ("last_sample", "timestep_list"))):
        entries = len(fresh(name).timesteps)
        whole = run(fresh(name), start_latent(), 0, entries)
        first = fresh(name)
        x = run(first, start_latent(), 0, stop)
        state = keep_carried(first, is_latent)
        assert all(state[key] is not None for key in carried), state
        assert state[carried[0]].latent  # a latent-shaped tensor: whole in the file, a band in a band group's loop
        scalars, history = scheduler_state(first)
        second = fresh(name)
        restore_scheduler(second, scalars, history)
        assert not torch.equal(run(second, x, stop, entries), whole)
        second = fresh(name)
        restore_scheduler(second, scalars, history)
        write_checkpoint(tmp_path / f"{name}.h5", Checkpoint(step=stop % STEPS or 1, steps=STEPS, latent=x.numpy(),
                                                             scalars=scalars, history=(), state=state), "hash")
        restore_carried(second, read_checkpoint(tmp_path / f"{name}.h5", "hash").state)
        assert torch.equal(run(second, x, stop, entries), whole)


def test_carried_tensors_keep_their_dtype_and_layout_and_a_foreign_one_is_refused(tmp_path):
    half = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(2)).half()
    nhwc = half.contiguous(memory_format=torch.channels_last)
    scheduler = fresh("unipc")
    scheduler.last_sample = nhwc
    scheduler.timestep_list = [None, scheduler.timesteps[0]]
    state = keep_carried(scheduler, is_latent)
    assert state["last_sample"].array.dtype == np.float32
    assert (state["last_sample"].dtype, state["last_sample"].channels_last) == ("float16", True)
    write_checkpoint(tmp_path / "c.h5", Checkpoint(step=1, steps=2, latent=np.zeros((1, 4, 6, 5), np.float32),
                                                   scalars={}, history=(), state=state), "h")
    back = read_checkpoint(tmp_path / "c.h5", "h")
    assert back.generator is None and back.state["timestep_list"][0] is None
    again = fresh("unipc")
    restore_carried(again, back.state)
    assert again.last_sample.dtype == torch.float16 and torch.equal(again.last_sample, nhwc)
    assert again.last_sample.stride() == nhwc.stride()
    assert again.timestep_list[1] == scheduler.timesteps[0] and again.timestep_list[1].dtype == torch.int64
    with pytest.raises(ValueError, match="entries of timestep_list"):
        restore_carried(fresh("dpmpp"), back.state)
    with pytest.raises(ValueError, match="which no sampler here keeps"):
        restore_carried(again, {"noise_sampler": None})
    assert isinstance(back.state["last_sample"], SamplerTensor)


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
