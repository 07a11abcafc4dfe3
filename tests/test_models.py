"""Builtin models are deterministic and runnable; real checkpoints load from folders and single files; bad
references fail with one ModelNotFound line."""

from __future__ import annotations

import json
import random
import string

import pytest
import torch
from safetensors.torch import save_file

from hpcrender.errors import BadInput, ModelNotFound
from hpcrender.models import (
    Family, SourceKind, builtin_names, family, load_pipeline, resolve, weights_checksum,
)
from hpcrender.models import builtin, checkpoints

TINY = ("tiny-sd", "tiny-sdxl")

# sha256 of each component's state dict (weights_checksum); a change here changes every builtin image.
PINNED = {
    "tiny-sd": {
        "text_encoder": "3e2d703d8e0596ed6517425503a7be142580a0ae64c19c7076c0ceab36ec5b27",
        "unet": "73c691c7a210aa948c9a9182a9a3091967ac69a470a2cbedb4bd858a1eeb2563",
        "vae": "4c10b85a2ac7bffd333c48690a68952e472dc4764222ef59889f04d4ecd3692e",
    },
    "tiny-sdxl": {
        "text_encoder": "f44876e6cfbc24e6daf93cdfd554b844ec4d3c9446751e9382802d19328ae17b",
        "text_encoder_2": "f83b648a7d5d8af926eeadb1d5e419359f87a29e4229ea74a8606d58245a8cca",
        "unet": "86fa9c02096d64db0a7cf9eec0313e904ab4705f921365c18a70e09464d274ef",
        "vae": "4945780149b3edd2a05f1e922f8eab95b1007909fe2a0528c598ff581daed071",
    },
    # the tiny diffusion transformers with four blocks each (Flux: two joint, two single-stream)
    "tiny-pixart": {
        "text_encoder": "b127b4d0bbbf4c34d308bf9cb34ee3d8093c2e75a08afec99ff80ee602e3d965",
        "transformer": "0a9c9d7a688a4726ba2a46ac989cc8c07ef2cf3cd9d52f407b8a05f837dfe4ac",
        "vae": "124c979295efe3ce575224bf680001f51e15a269fc0bc623d8aded4aa655b158",
    },
    "tiny-sd3": {
        "text_encoder": "f3521ac18cb2e589de5a261dab0d49a78e4e834017ac9e9e5af268b08ab1dcd8",
        "text_encoder_2": "2506f116b777fbbc4c877d0ba4092a1775b24dada7f45b567c0b48cffbbb27c8",
        "text_encoder_3": "a4681aed324beb1db0922b4021d6fc1f72e48a4b6da3ed13169ca4e7a9646744",
        "transformer": "1807d0a2a77488cb24a17e0d26100f4f260299f8938067abb15e610b06252159",
        "vae": "5fd7162a04c45bf03c76884319802025169e633c5494ecafcf11076d00daf2f3",
    },
    "tiny-flux": {
        "text_encoder": "f40909d62d32e8fa4e21c8514b43ccbc6183ebeb8c748a90c3493ea4a5dc37cf",
        "text_encoder_2": "103ccbdf853828c0f464e71e047563903e9eb0b88ad80b72f2f008a33c25f51c",
        "transformer": "ace83f6f4aaf9a1fc7fe65ee07a6de9b5c3daa4790470e1392df9402dfc9f95b",
        "vae": "8b1f631609d80323df3d33894efe021c2364a1372060bdac5cfff4521164497e",
    },
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def components(pipe) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}


def checksums(pipe) -> dict[str, str]:
    return {name: weights_checksum(m) for name, m in components(pipe).items()}


def unet_forward(pipe, prompt: str = "a harbor at dawn", side: int = 8) -> torch.Tensor:
    """One UNet call on seeded latents, conditioned through the pipeline's own tokenizers and text encoders."""
    latents = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    with torch.inference_mode():
        if family(pipe) is Family.SD:
            embeds, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
            return pipe.unet(latents, t, encoder_hidden_states=embeds).sample
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        time_ids = torch.tensor([[8.0 * side, 8.0 * side, 0.0, 0.0, 8.0 * side, 8.0 * side]])
        return pipe.unet(latents, t, encoder_hidden_states=embeds,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample


def assert_one_line(exc: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(exc.value)
    assert "\n" not in message and message
    for fragment in fragments:
        assert fragment in message


# ---------------------------------------------------------------------------------------------- builtins


def test_builtin_names_are_the_documented_models():
    assert builtin_names() == ("tiny-sd", "tiny-sdxl", "sdxl-mini", "sdxl", "tiny-pixart", "tiny-sd3", "tiny-flux",
                               "pixart-mini")


@pytest.mark.parametrize("name", TINY)
def test_tiny_builtin_runs_a_unet_forward_of_the_latent_shape(name):
    pipe = load_pipeline(f"builtin:{name}")
    expected = Family.SD if name == "tiny-sd" else Family.SDXL
    assert family(pipe) is expected
    assert pipe.vae_scale_factor == 8
    assert sum(p.numel() for m in components(pipe).values() for p in m.parameters()) < 2_000_000
    out = unet_forward(pipe, side=8)
    assert out.shape == (1, 4, 8, 8)
    # Activations stay O(1): a usable noise prediction, neither vanishing nor exploding.
    assert 0.05 < out.std().item() < 20.0
    assert all(not m.training for m in components(pipe).values())
    assert all(not p.requires_grad for m in components(pipe).values() for p in m.parameters())
    config = pipe.scheduler.config
    assert (config.num_train_timesteps, config.beta_schedule, config.beta_start, config.beta_end) == (
        1000, "scaled_linear", 0.00085, 0.012)


@pytest.mark.parametrize("name", TINY)
def test_tiny_builtin_renders_an_image_that_is_not_constant(name):
    pipe = load_pipeline(f"builtin:{name}")
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a harbor at dawn", num_inference_steps=2, height=64, width=64, guidance_scale=5.0,
                 generator=torch.Generator().manual_seed(7), output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    assert image.std() > 0.02


@pytest.mark.parametrize("name", TINY + ("tiny-pixart",))
def test_building_twice_gives_identical_weights(name):
    assert checksums(load_pipeline(f"builtin:{name}")) == checksums(load_pipeline(f"builtin:{name}"))


@pytest.mark.parametrize("name", tuple(PINNED))
def test_builtin_weights_match_the_pinned_checksums(name):
    assert checksums(load_pipeline(f"builtin:{name}")) == PINNED[name]


def test_prompts_change_the_noise_prediction():
    pipe = load_pipeline("builtin:tiny-sdxl")
    assert not torch.equal(unet_forward(pipe, "a harbor at dawn"), unet_forward(pipe, "a forest at night"))


def test_seeded_values_depend_on_model_and_parameter_names():
    shape = torch.Size([8, 8])
    a = builtin.seeded_values("tiny-sd", "unet", "conv_in.weight", shape, builtin.ParamRole.WEIGHT)
    assert torch.equal(a, builtin.seeded_values("tiny-sd", "unet", "conv_in.weight", shape, builtin.ParamRole.WEIGHT))
    for other in (("tiny-sdxl", "unet", "conv_in.weight"), ("tiny-sd", "vae", "conv_in.weight"),
                  ("tiny-sd", "unet", "conv_out.weight")):
        assert not torch.equal(a, builtin.seeded_values(*other, shape, builtin.ParamRole.WEIGHT))
    # torch's default for Linear/Conv: uniform on +-1/sqrt(fan_in), variance 1/(3 fan_in).
    big = builtin.seeded_values("m", "c", "p", torch.Size([256, 1024]), builtin.ParamRole.WEIGHT)
    assert abs(big.std().item() * 32 * 3 ** 0.5 - 1) < 0.02 and big.abs().max().item() <= 1 / 32
    assert big.abs().max().item() > 0.99 / 32
    assert torch.equal(builtin.seeded_values("m", "c", "n", torch.Size([4]), builtin.ParamRole.NORM_WEIGHT),
                       torch.ones(4))


def test_lower_precision_builds_hold_the_fp32_weights_rounded():
    full = load_pipeline("builtin:tiny-sd")
    half = load_pipeline("builtin:tiny-sd", dtype=torch.bfloat16)
    assert half.unet.dtype == torch.bfloat16 and half.text_encoder.dtype == torch.bfloat16
    assert torch.equal(half.unet.conv_in.weight, full.unet.conv_in.weight.to(torch.bfloat16))


def test_sdxl_mini_is_the_reference_unet_with_161m_parameters():
    arch = builtin.architecture("sdxl-mini")
    unet = arch.unet
    assert unet["block_out_channels"] == (80, 160, 320) and unet["layers_per_block"] == 2
    assert unet["transformer_layers_per_block"] == (1, 2, 10) and unet["attention_head_dim"] == (5, 10, 20)
    assert unet["norm_num_groups"] == 8 and unet["cross_attention_dim"] == 512
    assert unet["projection_class_embeddings_input_dim"] == 320 + 6 * 256
    pipe = load_pipeline("builtin:sdxl-mini")
    assert abs(sum(p.numel() for p in pipe.unet.parameters()) - 161_000_000) <= 1_000_000
    assert pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size == 512
    assert pipe.text_encoder_2.config.projection_dim == 320
    assert unet_forward(pipe, side=8).shape == (1, 4, 8, 8)


def test_sdxl_has_the_full_sdxl_base_architecture():
    # Counted on the meta device: no memory, no weights.
    parts = builtin.meta_components(builtin.architecture("sdxl"))
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()}
    assert counts["unet"] == 2_567_463_684
    assert counts["vae"] == 83_653_863
    assert counts["text_encoder"] == 123_060_480  # CLIP ViT-L/14 text tower
    assert counts["text_encoder_2"] == 694_659_840  # OpenCLIP ViT-bigG/14 text tower with projection
    assert parts["unet"].config.cross_attention_dim == 2048


def test_tokenizer_encodes_any_ascii_prompt_without_loss():
    tokenizer = builtin.build_tokenizer()
    rng = random.Random(0)
    prompts = ["", "a harbor at dawn", string.printable, "CAPS and 123 ~!@#$%^&*()"]
    prompts += ["".join(rng.choice(string.printable) for _ in range(rng.randrange(1, 40))) for _ in range(200)]
    for prompt in prompts:
        ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert len(ids) == 77 and ids[0] == tokenizer.bos_token_id
        assert all(0 <= i < builtin.LOCAL_VOCAB_SIZE for i in ids)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        assert "".join(text.split()) == "".join(prompt.lower().split())


# ---------------------------------------------------------------------------------------------- references


@pytest.mark.parametrize("ref, kind", [
    ("builtin:tiny-sd", SourceKind.BUILTIN),
    ("builtin:sdxl", SourceKind.BUILTIN),
    ("stabilityai/stable-diffusion-xl-base-1.0", SourceKind.HUB),
    ("owner/name.v2", SourceKind.HUB),
])
def test_resolve_classifies_references(ref, kind):
    assert resolve(ref).kind is kind


def test_resolve_finds_folders_and_safetensors_files(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert resolve(str(tmp_path)).kind is SourceKind.FOLDER
    spec = resolve(str(tmp_path / "model.safetensors"))
    assert spec.kind is SourceKind.SINGLE_FILE and spec.location == str((tmp_path / "model.safetensors").resolve())


@pytest.mark.parametrize("ref, fragment", [
    ("builtin:huge", "unknown builtin"),
    ("builtin:", "unknown builtin"),
    ("", "empty"),
    ("/no/such/model.safetensors", "no such folder or file"),
    ("./missing-folder", "no such folder or file"),
    ("a/b/c", "must be builtin:NAME, a diffusers folder, a .safetensors file or a hub id"),
    ("model.ckpt", "pickled"),
    ("weights/model.bin", "pickled"),
    ("owner/model.pt", "pickled"),
])
def test_bad_references_fail_with_one_line(ref, fragment, tmp_path):
    with pytest.raises(ModelNotFound) as exc:
        load_pipeline(ref)
    assert_one_line(exc, fragment)
    if ref:  # the manifest refuses it by the same rule, with the same words
        from hpcrender.errors import ManifestError
        from hpcrender.manifest import load_manifest

        (tmp_path / "m.toml").write_text(f'[[jobs]]\nname = "a"\nprompt = "p"\nmodel = "{ref}"\n')
        with pytest.raises(ManifestError) as problem:
            load_manifest(tmp_path / "m.toml")
        assert fragment in str(problem.value)


def test_manifest_resolves_a_relative_folder_from_its_own_folder(tmp_path, monkeypatch):
    from hpcrender.manifest import load_manifest

    (tmp_path / "models" / "mine").mkdir(parents=True)
    (tmp_path / "m.toml").write_text('[[jobs]]\nname = "a"\nprompt = "p"\nmodel = "models/mine"\n')
    monkeypatch.chdir("/")
    job = load_manifest(tmp_path / "m.toml").jobs[0]
    assert job.model == str((tmp_path / "models" / "mine").resolve())
    assert resolve(job.model).kind is SourceKind.FOLDER


def test_existing_pickled_checkpoint_is_refused_unread(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"\x80\x04not read")
    with pytest.raises(ModelNotFound) as exc:
        load_pipeline(str(path))
    assert_one_line(exc, "pickled", "model.ckpt")


def test_other_files_are_refused(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"")
    with pytest.raises(ModelNotFound) as exc:
        load_pipeline(str(path))
    assert_one_line(exc, ".safetensors")


def test_hub_id_missing_from_the_cache_fails_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFound) as exc:
        load_pipeline("hpcrender-tests/no-such-model")
    assert_one_line(exc, "hpcrender-tests/no-such-model", "local Hugging Face cache")


def test_folder_without_model_index_is_not_a_model(tmp_path):
    with pytest.raises(ModelNotFound) as exc:
        load_pipeline(str(tmp_path))
    assert_one_line(exc, "not a diffusers folder")


def test_folder_of_another_pipeline_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ModelNotFound) as exc:
        load_pipeline(str(tmp_path))
    assert_one_line(exc, "KandinskyPipeline", "SDXL", "Flux")


def test_family_refuses_other_objects():
    with pytest.raises(BadInput):
        family(object())


# ---------------------------------------------------------------------------------------------- real checkpoints


@pytest.mark.parametrize("name", TINY)
def test_save_pretrained_folder_round_trips_bit_exactly(name, tmp_path):
    pipe = load_pipeline(f"builtin:{name}")
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_pipeline(str(tmp_path))
    assert type(loaded) is type(pipe)
    assert checksums(loaded) == checksums(pipe)
    assert torch.equal(unet_forward(loaded), unet_forward(pipe))


def test_folder_with_only_pickled_weights_is_refused(tmp_path):
    pipe = load_pipeline("builtin:tiny-sd")
    pipe.save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(ModelNotFound) as exc:
        load_pipeline(str(tmp_path))
    assert_one_line(exc, "could not be loaded")


def ldm_state_dict(pipe) -> dict[str, torch.Tensor]:
    """The pipeline in the original (LDM / SGM) single-file layout: the inverse of diffusers' conversion."""
    out = {}
    layers = pipe.unet.config.layers_per_block
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    up_attention = {i for i, t in enumerate(pipe.unet.config.up_block_types) if "CrossAttn" in t}
    for key, value in pipe.unet.state_dict().items():
        parts = key.split(".")
        head = next((h for h in (".".join(parts[:2]), parts[0]) if h in fixed), None)
        if head is not None:
            new = fixed[head] + key[len(head):]
        elif parts[0] == "down_blocks":
            block, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":
                new = f"input_blocks.{(block + 1) * (layers + 1)}.0.op." + ".".join(parts[5:])
            else:
                index = 1 + block * (layers + 1) + int(parts[3])
                tail = ".".join(parts[4:])
                new = f"input_blocks.{index}.{0 if kind == 'resnets' else 1}." + (
                    resnet.get(parts[4], parts[4]) + tail[len(parts[4]):] if kind == "resnets" else tail)
        elif parts[0] == "mid_block":
            index = 1 if parts[1] == "attentions" else 2 * int(parts[2])
            tail = ".".join(parts[3:])
            if parts[1] == "resnets":
                tail = resnet.get(parts[3], parts[3]) + tail[len(parts[3]):]
            new = f"middle_block.{index}.{tail}"
        elif parts[0] == "up_blocks":
            block, kind = int(parts[1]), parts[2]
            if kind == "upsamplers":
                slot = 2 if block in up_attention else 1
                new = f"output_blocks.{block * (layers + 1) + layers}.{slot}.conv." + ".".join(parts[5:])
            else:
                index = block * (layers + 1) + int(parts[3])
                tail = ".".join(parts[4:])
                new = f"output_blocks.{index}.{0 if kind == 'resnets' else 1}." + (
                    resnet.get(parts[4], parts[4]) + tail[len(parts[4]):] if kind == "resnets" else tail)
        else:
            raise KeyError(key)
        out["model.diffusion_model." + new] = value
    blocks = len(pipe.vae.config.block_out_channels)
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for key, value in pipe.vae.state_dict().items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        for side, diffusers_name, ldm_name in (("encoder", "down_blocks", "down"), ("decoder", "up_blocks", "up")):
            prefix = f"{side}.{diffusers_name}."
            if new.startswith(prefix):
                parts = new[len(prefix):].split(".")
                block = int(parts[0]) if side == "encoder" else blocks - 1 - int(parts[0])
                kind = {"resnets": f"block.{parts[2]}", "downsamplers": "downsample",
                        "upsamplers": "upsample"}[parts[1]]
                new = f"{side}.{ldm_name}.{block}.{kind}." + ".".join(parts[3:])
        new = new.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        if "mid_block.attentions.0." in new:
            new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
            for diffusers_name, ldm_name in attention.items():
                new = new.replace(f"attn_1.{diffusers_name}.", f"attn_1.{ldm_name}.")
            if value.ndim == 2:
                value = value[:, :, None, None]  # the original layout uses 1x1 convolutions
        out["first_stage_model." + new] = value
    text_prefix = "cond_stage_model.transformer." if family(pipe) is Family.SD else (
        "conditioner.embedders.0.transformer.")
    for key, value in pipe.text_encoder.state_dict().items():
        out[text_prefix + "text_model." + key.removeprefix("text_model.")] = value
    if family(pipe) is Family.SDXL:
        state = pipe.text_encoder_2.state_dict()
        base = "conditioner.embedders.1.model."
        out[base + "positional_embedding"] = state["text_model.embeddings.position_embedding.weight"]
        out[base + "token_embedding.weight"] = state["text_model.embeddings.token_embedding.weight"]
        out[base + "ln_final.weight"] = state["text_model.final_layer_norm.weight"]
        out[base + "ln_final.bias"] = state["text_model.final_layer_norm.bias"]
        out[base + "text_projection"] = state["text_projection.weight"].T
        for i in range(pipe.text_encoder_2.config.num_hidden_layers):
            src, dst = f"text_model.encoder.layers.{i}.", f"{base}transformer.resblocks.{i}."
            for kind in ("weight", "bias"):
                out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                    [state[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"])
                for diffusers_name, ldm_name in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                                 ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                                                 ("mlp.fc2", "mlp.c_proj")):
                    out[f"{dst}{ldm_name}.{kind}"] = state[f"{src}{diffusers_name}.{kind}"]
    return {k: v.contiguous() for k, v in out.items()}


@pytest.mark.parametrize("name", TINY)
def test_single_safetensors_file_round_trips_bit_exactly(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = load_pipeline(f"builtin:{name}")
    path = tmp_path / f"{name}.safetensors"
    save_file(ldm_state_dict(pipe), str(path))
    assert checkpoints.match_layout(checkpoints.read_shapes(str(path))) == name
    loaded = load_pipeline(str(path))
    assert type(loaded) is type(pipe)
    assert checksums(loaded) == checksums(pipe)
    assert torch.equal(unet_forward(loaded), unet_forward(pipe))


def test_single_file_of_unknown_layout_fails_with_one_line(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(path))
    with pytest.raises(ModelNotFound) as exc:
        load_pipeline(str(path))
    assert_one_line(exc, "other.safetensors", "not a Stable Diffusion")


def test_unreadable_safetensors_file_fails_with_one_line(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"not a safetensors header")
    with pytest.raises(ModelNotFound) as exc:
        load_pipeline(str(path))
    assert_one_line(exc, "broken.safetensors", "not a readable safetensors file")


@pytest.mark.parametrize("name", ["tiny-sd", "sd15", "tiny-sdxl", "sdxl-mini", "sdxl-base"])
def test_each_single_file_layout_is_told_apart_by_its_shapes(name):
    signature = checkpoints.layout_signature(builtin.architecture(name))
    assert checkpoints.match_layout(signature) == name
    for key, shape in signature.items():
        changed = dict(signature, **{key: (shape[0] + 1, *shape[1:])})
        with pytest.raises(ModelNotFound):
            checkpoints.match_layout(changed)


def test_sd2_single_files_are_refused():
    with pytest.raises(ModelNotFound) as exc:
        checkpoints.match_layout({"cond_stage_model.model.token_embedding.weight": (49408, 1024)})
    assert_one_line(exc, "2.x")


def test_real_single_file_needs_the_clip_tokenizer_from_the_cache(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(checkpoints, "CLIP_TOKENIZER_SOURCES", (("hpcrender-tests/no-such-tokenizer", None),))
    with pytest.raises(ModelNotFound) as exc:
        checkpoints.upstream_tokenizer("sdxl.safetensors")
    assert_one_line(exc, "CLIP tokenizer", "local Hugging Face cache")


def test_real_sdxl_config_folder_pads_the_second_tokenizer_like_openclip(tmp_path):
    checkpoints.write_pipeline_config(builtin.architecture("sdxl-base"), tmp_path, builtin.build_tokenizer())
    from transformers import CLIPTokenizer

    assert CLIPTokenizer.from_pretrained(tmp_path / "tokenizer_2").pad_token == "!"
    assert CLIPTokenizer.from_pretrained(tmp_path / "tokenizer").pad_token == "<|endoftext|>"
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert json.loads((tmp_path / "text_encoder_2" / "config.json").read_text())["hidden_size"] == 1280


@pytest.mark.parametrize("name", ["euler", "ddim", "dpmpp"])
def test_builtin_schedulers_do_not_clip_the_predicted_sample_like_real_sdxl(name):
    # DDIM's own default clips x0 to [-1, 1]; real SD/SDXL configs turn it off, and so must the builtin one.
    from diffusers import EulerDiscreteScheduler

    from hpcrender.config import SchedulerName
    from hpcrender.render.samplers import make_scheduler

    base = EulerDiscreteScheduler.from_config(builtin.SCHEDULER_CONFIG)
    scheduler = make_scheduler(SchedulerName(name), base.config)
    assert scheduler.config.get("clip_sample", False) is False
    assert scheduler.config.get("thresholding", False) is False
    assert scheduler.config.steps_offset == 1 and scheduler.config.timestep_spacing == "leading"
    if name == "ddim":
        assert scheduler.config.set_alpha_to_one is False
