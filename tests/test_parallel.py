"""Patch parallelism: GroupNorm statistics, plans, parallelize/remove on one process, and on 2 and 3 MPI ranks the
sync/displaced/naive modes against one process, the warm-up, the byte count and the band-parallel VAE decode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from diffusers.models.downsampling import Downsample2D
from torch import nn

from hpcrender.config import GroupNormMode, Mode
from hpcrender.errors import BadInput, DoesNotFit
from hpcrender.parallel.bands import Band, LayerKind, latent_bands
from hpcrender.parallel.groupnorm import band_moments, corrected_moments, mean_var, normalize, pooled_mean_var
from hpcrender.parallel.parallelize import parallelize
from hpcrender.parallel.plan import PatchPlan, unet_layers

SCRIPTS = Path(__file__).parent / "mpi_scripts"
sys.path.insert(0, str(SCRIPTS))
from parallel_models import conditioning, noise, sd_unet, sdxl_unet  # noqa: E402

MPIEXEC = Path(sys.executable).parent / "mpiexec"


def _pooled_groupnorm(x: torch.Tensor, norm: nn.GroupNorm, cuts: list[int]) -> torch.Tensor:
    """GroupNorm of `x` computed band by band (cut along dim 2) from pooled per-band moments."""
    parts = torch.tensor_split(x, cuts, dim=2)
    moments = [band_moments(p, norm.num_groups) for p in parts]
    full = sum(moments)
    out = []
    for p, m in zip(parts, moments):
        mean, var = pooled_mean_var(full, m)
        out.append(normalize(p, norm.num_groups, mean, var, norm.eps, norm.weight, norm.bias))
    return torch.cat(out, dim=2)


@pytest.mark.parametrize("shape, cuts", [((2, 16, 11, 7), [3, 5]), ((2, 16, 23), [10]), ((1, 8, 9, 4), [8])])
def test_pooled_band_statistics_equal_nn_groupnorm(shape, cuts):
    torch.manual_seed(0)
    norm = nn.GroupNorm(4, shape[1])
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = torch.randn(shape) * 3 + 5  # an offset mean: a naive E[x^2] - E[x]^2 in float32 would lose digits
    with torch.no_grad():
        expected = norm(x)
        got = _pooled_groupnorm(x, norm, cuts)
    assert (got - expected).norm() / expected.norm() < 2e-6
    assert (got - expected).abs().max() < 1e-5


def _moments(count: float, mean: float, var: float) -> torch.Tensor:
    return torch.tensor([[[count, count * mean, count * (var + mean * mean)]]], dtype=torch.float64)


def test_corrected_variance_that_comes_out_negative_falls_back_to_the_local_band():
    # Another band of a nearly constant map whose E[x^2] rounding left a hair below E[x]^2 ...
    other = _moments(8, 40.0, -1e-3)
    stale_local = _moments(8, 39.0, 2.0)
    fresh = _moments(8, 40.0, 1e-4)  # ... and this band, now nearly constant one level up
    corrected = corrected_moments(other + stale_local, stale_local, fresh)
    _, raw_var = mean_var(corrected)
    assert raw_var.item() < 0, "the case under test: the corrected variance is negative"
    mean, var = pooled_mean_var(corrected, fresh)
    assert var.item() == pytest.approx(1e-4)  # the local band's variance
    assert mean.item() == pytest.approx(40.5)  # the whole image's mean 39.5, moved as this band's
    x = torch.full((1, 4, 2, 2), 40.0) + torch.tensor([0.01, -0.01]).repeat(8).view(1, 4, 2, 2)
    y = normalize(x, 1, mean.float(), var.float(), 0.0, None, None)
    assert torch.isfinite(y).all()
    # with the raw corrected variance the same normalization would produce NaN
    assert torch.isnan(normalize(x, 1, mean.float(), raw_var.float(), 0.0, None, None)).all()


def test_plan_rejects_what_cannot_be_run():
    bands = (Band(0, 8), Band(8, 16))
    with pytest.raises(BadInput):
        PatchPlan(Mode.NONE, GroupNormMode.CORRECTED, 1, bands, 0)
    with pytest.raises(BadInput):
        PatchPlan(Mode.SYNC, GroupNormMode.CORRECTED, -1, bands, 0)
    with pytest.raises(BadInput):
        PatchPlan(Mode.SYNC, GroupNormMode.CORRECTED, 1, (Band(0, 8), Band(9, 16)), 0)
    with pytest.raises(BadInput):
        PatchPlan(Mode.SYNC, GroupNormMode.CORRECTED, 1, bands, 2)
    with pytest.raises(DoesNotFit):
        parallelize(nn.Conv2d(1, 1, 3, padding=1), PatchPlan(Mode.SYNC, GroupNormMode.SYNC, 1, bands, 0), None)


def test_warmup_and_first_step_are_synchronous_and_separate_groupnorm_then_sends_nothing():
    bands = (Band(0, 8), Band(8, 16))
    displaced = PatchPlan(Mode.DISPLACED, GroupNormMode.SEPARATE, 2, bands, 0)
    assert [displaced.sync_step(i) for i in range(4)] == [True, True, False, False]
    assert [displaced.groupnorm_exchanged(i) for i in range(4)] == [True, True, False, False]
    no_warmup = PatchPlan(Mode.DISPLACED, GroupNormMode.CORRECTED, 0, bands, 0)
    assert [no_warmup.sync_step(i) for i in range(3)] == [True, False, False]
    assert all(PatchPlan(Mode.SYNC, GroupNormMode.CORRECTED, 0, bands, 0).sync_step(i) for i in range(5))
    assert not PatchPlan(Mode.NAIVE, GroupNormMode.CORRECTED, 0, bands, 0).groupnorm_exchanged(0)


def _snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [(n, type(m)) for n, m in model.named_modules()],
            dict(model.attn_processors))


@pytest.mark.parametrize("build", [sd_unet, sdxl_unet])
def test_one_band_runs_the_unet_unchanged_and_remove_restores_it(build):
    unet = build()
    cond = conditioning(unet, 2)
    x = noise(2, 16, 12)
    state, types, processors = _snapshot(unet)
    with torch.no_grad():
        expected = unet(x, 500.0, **cond, return_dict=False)[0]
        handle = parallelize(unet, PatchPlan(Mode.DISPLACED, GroupNormMode.CORRECTED, 1, (Band(0, 16),), 0), None)
        assert any(type(m).__name__ == "BandConv2d" for m in unet.modules())
        # the stand-ins share the original parameters: the state dict is the same while parallel
        assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())
        for step in range(2):
            handle.begin_step(step)
            got = unet(x, 500.0, **cond, return_dict=False)[0]
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert handle.stats()["bytes_total"] == 0
        handle.remove()
        after = unet(x, 500.0, **cond, return_dict=False)[0]
    new_state, new_types, new_processors = _snapshot(unet)
    assert new_state.keys() == state.keys() and all(torch.equal(new_state[k], state[k]) for k in state)
    assert new_types == types
    assert new_processors.keys() == processors.keys()
    assert all(new_processors[k] is processors[k] for k in processors)
    assert torch.equal(after, expected)


def test_each_forward_is_the_next_step_and_begin_step_still_chooses_one():
    unet = sd_unet()
    cond = conditioning(unet, 2)
    x = noise(2, 16, 12)
    hooks = dict(unet._forward_pre_hooks)
    handle = parallelize(unet, PatchPlan(Mode.DISPLACED, GroupNormMode.CORRECTED, 1, (Band(0, 16),), 0), None)
    assert len(unet._forward_pre_hooks) == len(hooks) + 1
    seen = []
    with torch.no_grad():
        def forward():
            unet(x, 500.0, **cond, return_dict=False)
            seen.append(handle.step)

        for _ in range(3):  # a loop that knows nothing of the plan, as diffusers' own
            forward()
        handle.begin_image()
        forward()
        handle.begin_step(5)
        forward()
        forward()  # counts on from an explicit step
        handle.begin_step(6)  # a step repeated explicitly (the fidelity checks do)
        forward()
        handle.begin_image()
        handle.begin_step(0)  # explicit and counted agree
        forward()
        forward()
    assert seen == [0, 1, 2, 0, 5, 6, 6, 0, 1]
    handle.remove()
    assert dict(unet._forward_pre_hooks) == hooks
    with torch.no_grad():
        unet(x, 500.0, **cond, return_dict=False)
    assert handle.step == 1  # the removed plan counts no more


def test_heuns_two_forwards_are_one_step_and_displaced_keeps_a_set_of_stale_buffers_per_call():
    """Heun's sampler calls the UNet twice a step (diffusers lists both timesteps): forwards 2i and 2i + 1 are step
    i's calls 0 and 1, so warm-up counts steps; in displaced mode each call exchanges through its own buffers (its
    stale activations are the same call's of the step before), in sync mode one set serves both."""
    unet = sd_unet()
    cond = conditioning(unet, 2)
    x = noise(2, 16, 12)
    for mode, sets in ((Mode.DISPLACED, 2), (Mode.SYNC, 1)):
        handle = parallelize(unet, PatchPlan(mode, GroupNormMode.CORRECTED, 1, (Band(0, 16),), 0,
                                             calls_per_step=2), None)
        seen = []
        with torch.no_grad():
            for _ in range(5):
                unet(x, 500.0, **cond, return_dict=False)
                seen.append((handle.step, handle.ctx.call, handle.ctx.exchanges.index(handle.ctx.exchange)))
            handle.begin_step(7, call=1)
            unet(x, 500.0, **cond, return_dict=False)
            seen.append((handle.step, handle.ctx.call))
        assert len(handle.ctx.exchanges) == sets and handle.plan.buffer_sets == sets
        assert seen[:5] == [(0, 0, 0), (0, 1, sets - 1), (1, 0, 0), (1, 1, sets - 1), (2, 0, 0)]
        assert seen[5] == (7, 1)
        with pytest.raises(BadInput, match="call 2 of a step of 2"):
            handle.begin_step(0, call=2)
        handle.remove()
    handle = parallelize(unet, PatchPlan(Mode.DISPLACED, GroupNormMode.CORRECTED, 1, (Band(0, 16),), 0,
                                         calls_per_step=2), None)
    tags = [exchange.tag_base for exchange in handle.ctx.exchanges]
    handle.remove()
    assert tags[0] == 0 and tags[1] > 1000  # the two calls' buckets never share a p2p tag


def test_a_parallelized_model_is_not_parallelized_twice():
    unet = sd_unet()
    plan = PatchPlan(Mode.SYNC, GroupNormMode.SYNC, 1, (Band(0, 16),), 0)
    handle = parallelize(unet, plan, None)
    with pytest.raises(BadInput):
        parallelize(unet, plan, None)
    handle.remove()
    parallelize(unet, plan, None).remove()


@pytest.mark.parametrize("layer", [
    nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"),
    nn.Conv2d(2, 2, 3, padding=0),
    nn.ConvTranspose2d(2, 2, 4, stride=2, padding=1),
])
def test_layers_that_cannot_be_split_into_bands_are_refused(layer):
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), layer)
    with pytest.raises(DoesNotFit):
        parallelize(model, PatchPlan(Mode.SYNC, GroupNormMode.SYNC, 1, (Band(0, 8),), 0), None)
    assert type(model[0]) is nn.Conv2d  # nothing left half-swapped


def test_a_vae_encoders_padded_downsampler_is_stood_in_for_whole_and_one_band_equals_it():
    # diffusers pads the whole image's bottom row before the stride-2 convolution: its conv alone cannot be split.
    torch.manual_seed(0)
    down = Downsample2D(4, use_conv=True, padding=0, name="op")
    model = nn.Sequential(down)
    x = torch.randn(2, 4, 8, 6)
    with torch.no_grad():
        expected = model(x)
        handle = parallelize(model, PatchPlan(Mode.SYNC, GroupNormMode.SYNC, 0, (Band(0, 8),), 0), None)
        assert type(model[0]).__name__ == "BandDownsample" and model[0].weight is down.conv.weight
        got = model(x)
        handle.remove()
    assert model[0] is down
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_unet_layers_cover_every_exchanging_layer_at_its_scale():
    unet = sd_unet()
    layers = unet_layers(unet, 20)
    kinds = [layer.kind for layer in layers]
    convs = [m for m in unet.modules() if type(m) is nn.Conv2d and m.kernel_size[0] > 1]
    assert kinds.count(LayerKind.HALO_CONV) == len(convs)
    assert kinds.count(LayerKind.GROUP_NORM) == sum(type(m) is nn.GroupNorm for m in unet.modules())
    assert kinds.count(LayerKind.SELF_ATTENTION) == len(unet.attn_processors) // 2  # attn1 of each block
    assert {layer.scale for layer in layers} == {Fraction(1, 2 ** i) for i in range(4)}
    assert {layer.width for layer in layers} == {20, 10, 5, 3}


# -- MPI: 2 and 3 ranks, gloo on the CPU ------------------------------------------------------------------------------

def _run_checks(n: int) -> dict:
    if not MPIEXEC.exists():
        pytest.skip(f"no mpiexec beside {sys.executable}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPTS)}
    args = [] if n == 2 else ["--groupnorm", "corrected"]  # the GroupNorm ablation once is enough
    result = subprocess.run([str(MPIEXEC), "-n", str(n), sys.executable, str(SCRIPTS / "parallel_checks.py"), *args],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, result.stdout[-3000:]
    return json.loads(lines[0])


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def checks(request):
    report = _run_checks(request.param)
    assert report["world_size"] == request.param
    return report


@pytest.mark.mpi
@pytest.mark.parametrize("shape", ["sd", "sdxl", "sd-lora"])
def test_sync_mode_equals_one_process(checks, shape):
    sync = checks["unet"][shape]["sync"]
    assert sync["first_output"] <= 1e-4
    assert sync["final_latent"] <= 1e-4
    assert sync["async_steps"] == 0


@pytest.mark.mpi
@pytest.mark.parametrize("shape", ["sd", "sdxl", "sd-lora"])
def test_displaced_is_much_closer_to_one_process_than_naive(checks, shape):
    unet = checks["unet"][shape]
    displaced, naive = unet["displaced_corrected"], unet["naive"]
    print(shape, checks["world_size"], "ranks: final latent error displaced", displaced["final_latent"],
          "naive", naive["final_latent"])
    assert displaced["final_latent"] * 4 < naive["final_latent"]
    assert displaced["first_output"] <= 1e-4  # its warm-up step is synchronous
    assert (displaced["sync_steps"], displaced["async_steps"]) == (1, 7)


@pytest.mark.mpi
@pytest.mark.parametrize("shape", ["sd", "sdxl", "sd-lora"])
def test_warmup_steps_equal_sync_steps_exactly(checks, shape):
    warmup = checks["unet"][shape]["warmup"]
    diffs = warmup["max_abs_diff_per_step"]
    assert diffs[:warmup["steps"]] == [0.0] * warmup["steps"]
    assert diffs[warmup["steps"]] > 0
    assert (warmup["sync_steps"], warmup["async_steps"]) == (warmup["steps"], len(diffs) - warmup["steps"])


@pytest.mark.mpi
@pytest.mark.parametrize("shape", ["sd", "sdxl", "sd-lora"])
def test_measured_bytes_per_step_equal_the_analytic_count(checks, shape):
    runs = {k: v for k, v in checks["unet"][shape].items() if isinstance(v, dict) and "bytes_match" in v}
    assert {"sync", "naive", "displaced_corrected"} <= runs.keys()
    assert all(run["bytes_match"] for run in runs.values()), {k: v["bytes_per_step"] for k, v in runs.items()}
    assert runs["naive"]["bytes_per_step"] == [0] * checks["world_size"]
    assert runs["sync"]["bytes_per_step"] == runs["displaced_corrected"]["bytes_per_step"]


@pytest.mark.mpi
@pytest.mark.parametrize("shape", ["sd", "sdxl", "sd-lora"])
def test_exchange_buffers_held_equal_the_analytic_estimate(checks, shape):
    # Every rank, every mode, both before (sync) and after (displaced) the slots are laid out in buckets.
    runs = {k: v for k, v in checks["unet"][shape].items() if isinstance(v, dict) and "buffers_match" in v}
    assert {"sync", "naive", "displaced_corrected"} <= runs.keys()
    assert all(run["buffers_match"] for run in runs.values()), {k: v["buffer_bytes"] for k, v in runs.items()}
    assert runs["naive"]["buffer_bytes"] == [0] * checks["world_size"]
    assert min(runs["sync"]["buffer_bytes"]) > 0


@pytest.mark.mpi
@pytest.mark.parametrize("shape", ["sd", "sdxl", "sd-lora"])
def test_remove_restores_the_unet_bit_for_bit(checks, shape):
    assert checks["unet"][shape]["removed"] == {"state_dict_equal": True, "module_types_equal": True,
                                                "processors_identical": True, "output_equal": True}


@pytest.mark.mpi
def test_band_parallel_vae_decode_equals_one_process(checks):
    vae = checks["vae"]
    assert vae["error"] <= 1e-4
    assert vae["vae_restored"]
    assert sum(vae["rows"]) == (5 * checks["world_size"] + 1) * vae["scale"]


@pytest.mark.mpi
def test_band_parallel_vae_encode_equals_one_process(checks):
    encode = checks["vae"]["encode"]
    assert encode["error"] <= 1e-4
    assert encode["vae_restored"]
    assert sum(encode["rows"]) == 5 * checks["world_size"] + 1 and encode["channels"] == 8  # mean and log-variance


def test_latent_bands_of_the_checked_sizes_are_uneven():
    # the MPI checks rely on these layouts: uneven bands, and for SD a last band past the coarse rows
    assert [b.size for b in latent_bands(28, 8, 2)] == [16, 12]
    assert [b.size for b in latent_bands(44, 8, 3)] == [16, 16, 12]
    assert [b.size for b in latent_bands(12, 4, 2)] == [8, 4]
    assert [b.size for b in latent_bands(20, 4, 3)] == [8, 8, 4]


@pytest.mark.parametrize("kernel, stride, dilation", [(3, 1, 1), (3, 2, 1), (5, 1, 1), (5, 2, 1), (3, 1, 2), (7, 1, 1)])
def test_band_convolution_with_halos_equals_the_whole_convolution(kernel, stride, dilation):
    """Every way of cutting 13 rows (multiples of the stride but the last) into bands, thin bands included: the
    strips-and-fix-up path and the extended-copy path must both give the whole image's output rows."""
    from hpcrender.parallel.conv import BandConv2d

    torch.manual_seed(kernel * 10 + stride)
    pad = dilation * (kernel - 1) // 2
    conv = nn.Conv2d(3, 4, kernel, stride=stride, padding=pad, dilation=dilation)
    band_conv = BandConv2d(conv, ctx=None)
    above, below = band_conv.halo
    rows = 13
    x = torch.randn(2, 3, rows, 6)
    with torch.no_grad():
        whole = conv(x)
        cuts_tried = 0
        for first_cut in range(stride, rows, stride):
            for second_cut in range(first_cut + stride, rows, stride):
                edges = [0, first_cut, second_cut, rows]
                for i in range(3):
                    lo, hi = edges[i], edges[i + 1]
                    if (i > 0 and lo < above) or (i < 2 and rows - hi < max(below, 0)):
                        continue  # a neighbour too thin for the halo: refused by _check
                    slot = {"from_prev": x[:, :, lo - above:lo].contiguous().view(-1) if i > 0 else None,
                            "from_next": x[:, :, hi:hi + max(below, 0)].contiguous().view(-1) if i < 2 else None}
                    got = band_conv._band_conv(x[:, :, lo:hi], slot, first=i == 0, last=i == 2)
                    expected = whole[:, :, lo // stride:-(-hi // stride)]
                    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
                    cuts_tried += 1
    assert cuts_tried > 10


class _LowRank(nn.Module):
    """A LoRA-style wrapper as PEFT installs it: the original projection plus a low-rank update."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.up.weight, std=0.5)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


def test_band_attention_uses_wrapped_projections_like_lora():
    unet = sd_unet()
    cond = conditioning(unet, 2)
    x = noise(2, 16, 12)
    with torch.no_grad():
        plain = unet(x, 500.0, **cond, return_dict=False)[0]
        for module in unet.modules():
            if type(module).__name__ == "Attention":
                for name in ("to_q", "to_k", "to_v"):
                    setattr(module, name, _LowRank(getattr(module, name)))
        expected = unet(x, 500.0, **cond, return_dict=False)[0]
        assert not torch.allclose(expected, plain, atol=1e-3)  # the update changes the output
        handle = parallelize(unet, PatchPlan(Mode.SYNC, GroupNormMode.SYNC, 1, (Band(0, 16),), 0), None)
        handle.begin_step(0)
        got = unet(x, 500.0, **cond, return_dict=False)[0]
        handle.remove()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_cross_attention_computes_the_text_keys_and_values_once_per_image():
    unet = sd_unet()
    cond = conditioning(unet, 2)
    x = noise(2, 16, 12)
    cross = [m for name, m in unet.named_modules() if name.endswith("attn2")]
    calls = {"k": 0, "v": 0}
    for attn in cross:
        attn.to_k.register_forward_hook(lambda *_: calls.__setitem__("k", calls["k"] + 1))
        attn.to_v.register_forward_hook(lambda *_: calls.__setitem__("v", calls["v"] + 1))
    with torch.no_grad():
        expected = [unet(x + s, 500.0 - 100 * s, **cond, return_dict=False)[0] for s in range(3)]
        assert calls == {"k": 3 * len(cross), "v": 3 * len(cross)}  # unmodified: every call projects the text
        calls.update(k=0, v=0)
        handle = parallelize(unet, PatchPlan(Mode.DISPLACED, GroupNormMode.CORRECTED, 1, (Band(0, 16),), 0), None)
        handle.begin_image()
        for s in range(3):
            handle.begin_step(s)
            torch.testing.assert_close(unet(x + s, 500.0 - 100 * s, **cond, return_dict=False)[0], expected[s],
                                       rtol=1e-5, atol=1e-6)
        assert calls == {"k": len(cross), "v": len(cross)}  # once per layer for the whole image
        cond["encoder_hidden_states"].mul_(2)  # other text in the same tensor: projected afresh
        handle.begin_step(3)
        unet(x, 500.0, **cond, return_dict=False)
        assert calls == {"k": 2 * len(cross), "v": 2 * len(cross)}
        handle.begin_image()  # a new image: nothing carried over
        handle.begin_step(0)
        unet(x, 500.0, **cond, return_dict=False)
        handle.remove()
    assert calls == {"k": 3 * len(cross), "v": 3 * len(cross)}


# -- multiply-accumulates per rank and step: the arithmetic against the products a forward performs -----------------

@pytest.mark.parametrize("shape, rows, width", [("sd", 28, 20), ("sdxl", 12, 12), ("sdxl", 13, 9)])
def test_step_macs_of_one_band_equal_the_products_a_plain_forward_performs(shape, rows, width):
    from mac_count import counted_macs

    from hpcrender.parallel.bands import Band, step_macs
    from hpcrender.parallel.plan import unet_compute
    from parallel_models import TEXT_TOKENS

    unet = {"sd": sd_unet, "sdxl": sdxl_unet}[shape]()
    convs = []
    hooks = [m.register_forward_hook(lambda m, i, o: convs.append(o.numel() * m.in_channels // m.groups
                                                                  * m.kernel_size[0] * m.kernel_size[1]))
             for m in unet.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad(), counted_macs(unet) as counted:
        unet(noise(2, rows, width), 500.0, **conditioning(unet, 2))
    for hook in hooks:
        hook.remove()
    specs = unet_compute(unet, width)
    assert counted[0] == step_macs(specs, (Band(0, rows),), 0, 2, TEXT_TOKENS, exchanging=False)
    # the F.conv2d count is the Conv2d modules' own, as forward hooks see them
    assert sum(convs) == sum(step_macs([s], (Band(0, rows),), 0, 2, TEXT_TOKENS, False) for s in specs
                             if s.kind.value == "conv")


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_step_macs_of_every_band_equal_the_products_its_rank_performs(ranks):
    if not MPIEXEC.exists():
        pytest.skip(f"no mpiexec beside {sys.executable}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPTS)}
    result = subprocess.run([str(MPIEXEC), "-n", str(ranks), sys.executable, str(SCRIPTS / "mac_checks.py")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][0])
    assert report["world_size"] == ranks
    for shape in ("sd", "sdxl"):
        for mode in ("sync", "displaced", "naive"):
            per_rank = report[shape][mode]
            assert len(per_rank) == ranks
            for steps in per_rank:
                assert [counted for counted, _ in steps] == [computed for _, computed in steps], (shape, mode)
                assert steps[1][0] < steps[0][0]  # the text's keys and values are kept after the first step
        # exchanging bands query the whole image's keys and recompute their edge rows: more than naive's
        assert all(s[0][0] > n[0][0] for s, n in zip(report[shape]["sync"], report[shape]["naive"]))


@pytest.mark.parametrize("kernel, stride, dilation", [(3, 1, 1), (3, 2, 1), (5, 1, 1), (5, 2, 1), (3, 1, 2), (7, 1, 1)])
def test_band_conv_rows_are_the_rows_a_band_convolution_computes(kernel, stride, dilation):
    """Every cut of 13 rows into 3 bands (thin ones included): the output rows F.conv2d computes for a band, strips
    or extended copy, are what band_conv_rows says."""
    from hpcrender.parallel.bands import band_conv_rows
    from hpcrender.parallel.conv import BandConv2d

    pad = dilation * (kernel - 1) // 2
    conv = nn.Conv2d(2, 3, kernel, stride=stride, padding=pad, dilation=dilation)
    band_conv = BandConv2d(conv, ctx=None)
    above, below = band_conv.halo
    rows = 13
    x = torch.randn(1, 2, rows, 5)
    computed = []
    original = torch.nn.functional.conv2d

    def counting(inp, *args, **kwargs):
        out = original(inp, *args, **kwargs)
        computed.append(out.shape[2])
        return out

    tried = 0
    with torch.no_grad():
        for first_cut in range(stride, rows, stride):
            for second_cut in range(first_cut + stride, rows, stride):
                edges = [0, first_cut, second_cut, rows]
                for i in range(3):
                    lo, hi = edges[i], edges[i + 1]
                    if (i > 0 and lo < above) or (i < 2 and rows - hi < max(below, 0)):
                        continue
                    slot = {"from_prev": x[:, :, lo - above:lo].contiguous().view(-1) if i > 0 else None,
                            "from_next": x[:, :, hi:hi + max(below, 0)].contiguous().view(-1) if i < 2 else None}
                    computed.clear()
                    torch.nn.functional.conv2d = counting
                    try:
                        band_conv._band_conv(x[:, :, lo:hi], slot, first=i == 0, last=i == 2)
                    finally:
                        torch.nn.functional.conv2d = original
                    assert sum(computed) == band_conv_rows(hi - lo, kernel, stride, pad, dilation, i == 0, i == 2)
                    tried += 1
    assert tried > 10


@pytest.mark.mpi
def test_diffusers_own_pipeline_loop_drives_a_parallelized_unet_on_2_ranks():
    if not MPIEXEC.exists():
        pytest.skip(f"no mpiexec beside {sys.executable}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPTS)}
    done = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, str(SCRIPTS / "driver_checks.py")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    assert report["world_size"] == 2 and report["bands"] == [[0, 8], [8, 18]]
    assert report["sync"]["error"] <= 1e-4 and (report["sync"]["sync_steps"], report["sync"]["async_steps"]) == (4, 0)
    # the pre-hook counted the pipeline's forwards: one warm-up step, then displaced ones
    assert (report["displaced"]["sync_steps"], report["displaced"]["async_steps"]) == (1, 3)
    assert report["displaced"]["error"] < 0.5
