"""ComfyUI split files and SD1.x single files: layout, round trip, shipped configs, refusals."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from turbobooth.manager import formats as F
from turbobooth.manager import tiny
from turbobooth.manager import writers as W
from turbobooth.manager.errors import ModelSourceError, UnsafeFileError, WrongFamilyError

PROMPT = "a photo of sks dog on the beach"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def zimage():
    return tiny.build_tiny_zimage(seed=0)


@pytest.fixture(scope="module")
def sd1():
    return tiny.build_tiny_sd1(seed=0)


@pytest.fixture(scope="module")
def zimage_files(zimage, tmp_path_factory):
    return W.save_zimage_split(zimage, str(tmp_path_factory.mktemp("models")), name="tiny_zimage")


@pytest.fixture(scope="module")
def sd1_files(sd1, tmp_path_factory):
    return W.save_sd1_single_file(sd1, str(tmp_path_factory.mktemp("models")), name="tiny_sd15")


def _zimage_image(pipe):
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        return pipe(
            [PROMPT],
            height=64,
            width=64,
            num_inference_steps=3,
            guidance_scale=0.0,
            generator=generator,
            output_type="pt",
            max_sequence_length=64,
        ).images


def _sd1_image(pipe):
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        return pipe(
            [PROMPT],
            height=64,
            width=64,
            num_inference_steps=3,
            guidance_scale=7.5,
            generator=generator,
            output_type="pt",
        ).images


@pytest.fixture(scope="module")
def zimage_reference(zimage):
    return _zimage_image(zimage)


@pytest.fixture(scope="module")
def sd1_reference(sd1):
    return _sd1_image(sd1)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k].float(), sb[k].float()), k


def _file_shapes(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


def _strip_metadata(path: str, prefix: str = "") -> None:
    """Rewrite a file the way third-party tools write it: no config metadata, optional key prefix."""
    tensors = load_file(path)
    save_file({prefix + k: v for k, v in tensors.items()}, path)


# ---------------------------------------------------------------------------
# Z-Image split files
# ---------------------------------------------------------------------------


def test_zimage_split_paths(zimage_files):
    root = os.path.dirname(os.path.dirname(zimage_files["diffusion_model"]))
    assert zimage_files["diffusion_model"] == os.path.join(root, "diffusion_models", "tiny_zimage.safetensors")
    assert zimage_files["text_encoder"] == os.path.join(root, "text_encoders", "tiny_zimage_qwen3.safetensors")
    assert zimage_files["vae"] == os.path.join(root, "vae", "tiny_zimage_ae.safetensors")
    assert zimage_files["tokenizer"] == os.path.join(root, "text_encoders", "tiny_zimage_tokenizer")
    assert os.path.isfile(os.path.join(zimage_files["tokenizer"], "tokenizer_config.json"))
    for folder in ("diffusion_models", "text_encoders", "vae"):
        leftovers = [n for n in os.listdir(os.path.join(root, folder)) if n.startswith(".") or n.endswith(".tmp")]
        assert leftovers == []


def test_zimage_transformer_uses_comfyui_key_names(zimage_files, zimage):
    keys = set(F.safetensors_keys(zimage_files["diffusion_model"]))
    for key in (
        "x_embedder.weight",
        "x_embedder.bias",
        "final_layer.linear.weight",
        "final_layer.adaLN_modulation.1.weight",
        "cap_embedder.0.weight",
        "cap_embedder.1.weight",
        "t_embedder.mlp.0.weight",
        "x_pad_token",
        "cap_pad_token",
        "layers.0.attention.qkv.weight",
        "layers.0.attention.out.weight",
        "layers.0.attention.q_norm.weight",
        "layers.0.attention.k_norm.weight",
        "layers.0.feed_forward.w1.weight",
        "layers.0.adaLN_modulation.0.weight",
        "noise_refiner.0.attention.qkv.weight",
        "context_refiner.0.attention.qkv.weight",
    ):
        assert key in keys, key
    assert not any(".to_q." in k or ".to_out." in k or "all_x_embedder" in k or "norm_q" in k for k in keys)
    header = _file_shapes(zimage_files["diffusion_model"])
    dim = zimage.transformer.config.dim
    assert header["layers.0.attention.qkv.weight"] == [3 * dim, dim]


def test_zimage_text_encoder_and_vae_key_names(zimage_files):
    te = set(F.safetensors_keys(zimage_files["text_encoder"]))
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.q_norm.weight"} <= te
    assert all(k.startswith("model.") for k in te)
    header = _file_shapes(zimage_files["vae"])
    for key in (
        "encoder.down.0.block.0.norm1.weight",
        "encoder.down.0.downsample.conv.weight",
        "encoder.mid.block_1.conv1.weight",
        "encoder.mid.attn_1.q.weight",
        "encoder.mid.attn_1.proj_out.weight",
        "encoder.norm_out.weight",
        "decoder.up.0.block.0.conv1.weight",
        "decoder.up.3.upsample.conv.weight",
        "decoder.mid.attn_1.norm.weight",
    ):
        assert key in header, key
    assert len(header["encoder.mid.attn_1.q.weight"]) == 4
    assert header["encoder.mid.attn_1.q.weight"][2:] == [1, 1]
    assert "quant_conv.weight" not in header
    assert not any("down_blocks" in k or "mid_block" in k for k in header)


def test_zimage_split_round_trip_same_image(zimage_files, zimage, zimage_reference):
    loaded = F.load_zimage_split(**zimage_files)
    _assert_same_weights(zimage.transformer, loaded.transformer)
    _assert_same_weights(zimage.vae, loaded.vae)
    _assert_same_weights(zimage.text_encoder, loaded.text_encoder)
    image = _zimage_image(loaded)
    assert image.shape == (1, 3, 64, 64)
    assert (image - zimage_reference).abs().max().item() < 1e-5


def test_loaded_zimage_saves_in_diffusers_layout(zimage_files, tmp_path):
    """Loaded weights own their storage, so diffusers' save_pretrained (safetensors) accepts them."""
    loaded = F.load_zimage_split(**zimage_files)
    loaded.save_pretrained(str(tmp_path / "saved"))
    assert os.path.isfile(tmp_path / "saved" / "transformer" / "config.json")


def test_zimage_files_without_metadata_and_with_prefix(zimage, zimage_files, zimage_reference, tmp_path):
    """Files as ComfyUI users have them: no config metadata, model.diffusion_model. prefix.

    Such files load with the shipped real configs; these tiny ones need the matching config folder, and
    without it the error says so."""
    copies = {}
    for role in ("diffusion_model", "text_encoder", "vae"):
        dst = tmp_path / role / os.path.basename(zimage_files[role])
        dst.parent.mkdir()
        shutil.copy(zimage_files[role], dst)
        copies[role] = str(dst)
    _strip_metadata(copies["diffusion_model"], prefix="model.diffusion_model.")
    _strip_metadata(copies["text_encoder"])
    _strip_metadata(copies["vae"])
    assert F.detect_family_from_keys(F.safetensors_keys(copies["diffusion_model"])) == "zimage"
    with pytest.raises(ModelSourceError, match="do not match the model config"):
        F.load_zimage_split(tokenizer=zimage_files["tokenizer"], **copies)
    config = str(tmp_path / "config")
    zimage.save_pretrained(config)
    loaded = F.load_zimage_split(tokenizer=zimage_files["tokenizer"], config=config, **copies)
    assert loaded.transformer.config.axes_dims == [8, 12, 12]
    assert (_zimage_image(loaded) - zimage_reference).abs().max().item() < 1e-5


def test_zimage_load_in_bfloat16(zimage_files):
    loaded = F.load_zimage_split(**zimage_files, dtype=torch.bfloat16)
    assert loaded.transformer.dtype == torch.bfloat16
    assert loaded.vae.dtype == torch.bfloat16
    assert next(loaded.text_encoder.parameters()).dtype == torch.bfloat16


def test_zimage_tokenizer_found_next_to_text_encoder(zimage_files):
    pipe = F.load_zimage_split(zimage_files["diffusion_model"], zimage_files["text_encoder"], zimage_files["vae"])
    assert pipe.tokenizer.chat_template


def test_zimage_tokenizer_missing(zimage_files, tmp_path):
    te = tmp_path / "qwen_3_4b.safetensors"
    shutil.copy(zimage_files["text_encoder"], te)
    with pytest.raises(ModelSourceError, match="tokenizer") as err:
        F.load_zimage_split(zimage_files["diffusion_model"], str(te), zimage_files["vae"])
    assert str(tmp_path / "qwen_3_4b_tokenizer") in str(err.value)


def test_zimage_tokenizer_without_template_gets_shipped_one(zimage_files, tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(zimage_files["tokenizer"], folder)
    for name in os.listdir(folder):
        if name.endswith(".jinja"):
            os.unlink(folder / name)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    pipe = F.load_zimage_split(
        zimage_files["diffusion_model"], zimage_files["text_encoder"], zimage_files["vae"], tokenizer=str(folder)
    )
    assert pipe.tokenizer.chat_template == F.shipped_chat_template()
    text = pipe.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_diffusers_reads_our_zimage_files_the_same(zimage, zimage_files, tmp_path):
    """diffusers' own ComfyUI converters agree with our writer (given a local config)."""
    from diffusers import AutoencoderKL, ZImageTransformer2DModel

    config_dir = str(tmp_path / "config")
    zimage.save_pretrained(config_dir)
    transformer = ZImageTransformer2DModel.from_single_file(
        zimage_files["diffusion_model"], config=config_dir, subfolder="transformer", local_files_only=True
    )
    _assert_same_weights(zimage.transformer, transformer)
    vae = AutoencoderKL.from_single_file(zimage_files["vae"], config=config_dir, subfolder="vae", local_files_only=True)
    _assert_same_weights(zimage.vae, vae)


# ---------------------------------------------------------------------------
# SD1.x single file
# ---------------------------------------------------------------------------


def test_sd1_single_file_uses_ldm_key_names(sd1_files):
    assert os.path.basename(os.path.dirname(sd1_files["sd1_single_file"])) == "checkpoints"
    assert os.path.isdir(sd1_files["sd1_tokenizer"])
    keys = set(F.safetensors_keys(sd1_files["sd1_single_file"]))
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.time_embed.0.weight",
        "model.diffusion_model.input_blocks.1.0.in_layers.0.weight",
        "model.diffusion_model.input_blocks.1.0.emb_layers.1.weight",
        "model.diffusion_model.input_blocks.1.1.proj_in.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.2.0.op.weight",
        "model.diffusion_model.input_blocks.5.0.skip_connection.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.middle_block.2.out_layers.3.weight",
        "model.diffusion_model.output_blocks.1.1.conv.weight",
        "model.diffusion_model.output_blocks.2.1.proj_in.weight",
        "model.diffusion_model.output_blocks.3.2.conv.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.down.0.block.0.norm1.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "first_stage_model.decoder.up.3.block.0.conv1.weight",
        "first_stage_model.quant_conv.weight",
        "first_stage_model.post_quant_conv.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ):
        assert key in keys, key
    assert not any("down_blocks" in k or "resnets" in k or "up_blocks" in k for k in keys)
    assert F.detect_family_from_keys(keys) == "sd1"


def test_sd1_single_file_round_trip_same_image(sd1, sd1_files, sd1_reference):
    loaded = F.load_sd1_single_file(sd1_files["sd1_single_file"])
    _assert_same_weights(sd1.unet, loaded.unet)
    _assert_same_weights(sd1.vae, loaded.vae)
    _assert_same_weights(sd1.text_encoder, loaded.text_encoder)
    assert type(loaded.scheduler) is type(sd1.scheduler)
    image = _sd1_image(loaded)
    assert image.shape == (1, 3, 64, 64)
    assert (image - sd1_reference).abs().max().item() < 1e-5


def test_sd1_file_as_found_in_the_wild(sd1, sd1_files, sd1_reference, tmp_path):
    """No config metadata, extra schedule buffers and EMA copies, fp16 weights: still the same model."""
    config = str(tmp_path / "config")
    sd1.save_pretrained(config)
    tensors = load_file(sd1_files["sd1_single_file"])
    extra = {
        "alphas_cumprod": torch.linspace(1.0, 0.01, 1000),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(0),
    }
    ckpt = tmp_path / "wild.safetensors"
    save_file({**tensors, **extra}, ckpt)
    with pytest.raises(ModelSourceError, match="do not match the model config"):
        F.load_sd1_single_file(str(ckpt), tokenizer=sd1_files["sd1_tokenizer"])
    loaded = F.load_sd1_single_file(str(ckpt), tokenizer=sd1_files["sd1_tokenizer"], config=config)
    assert (_sd1_image(loaded) - sd1_reference).abs().max().item() < 1e-5

    half = tmp_path / "half.safetensors"
    save_file({k: (v.half() if v.is_floating_point() else v) for k, v in tensors.items()}, half)
    loaded = F.load_sd1_single_file(str(half), tokenizer=sd1_files["sd1_tokenizer"], config=config)
    assert loaded.unet.dtype == torch.float32
    assert (_sd1_image(loaded) - sd1_reference).abs().max().item() < 0.05


def test_sd1_explicit_tokenizer_and_missing_tokenizer(sd1_files, tmp_path):
    ckpt = tmp_path / "v1-5-pruned-emaonly.safetensors"
    shutil.copy(sd1_files["sd1_single_file"], ckpt)
    with pytest.raises(ModelSourceError, match="tokenizer") as err:
        F.load_sd1_single_file(str(ckpt))
    assert "v1-5-pruned-emaonly_tokenizer" in str(err.value)
    pipe = F.load_sd1_single_file(str(ckpt), tokenizer=sd1_files["sd1_tokenizer"])
    assert pipe.tokenizer.model_max_length == 77


def test_diffusers_reads_our_sd1_file_the_same(sd1, sd1_files, sd1_reference, tmp_path):
    """diffusers' from_single_file, offline with a local config folder, reads the same model."""
    from diffusers import StableDiffusionPipeline

    config_dir = str(tmp_path / "config")
    sd1.save_pretrained(config_dir)
    pipe = StableDiffusionPipeline.from_single_file(
        sd1_files["sd1_single_file"], config=config_dir, local_files_only=True, safety_checker=None
    )
    _assert_same_weights(sd1.unet, pipe.unet)
    _assert_same_weights(sd1.vae, pipe.vae)
    pipe.scheduler = type(sd1.scheduler).from_config(sd1.scheduler.config)
    assert (_sd1_image(pipe) - sd1_reference).abs().max().item() < 1e-5


# ---------------------------------------------------------------------------
# Real-size layouts (meta tensors: no memory, no download)
# ---------------------------------------------------------------------------


def _meta_state(factory):
    from accelerate import init_empty_weights

    with init_empty_weights():
        return factory().state_dict()


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


def test_real_zimage_transformer_layout_matches_diffusers_converter():
    from diffusers import ZImageTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    cfg = F.shipped_config("zimage", "transformer")
    sd = _meta_state(lambda: ZImageTransformer2DModel.from_config(cfg))
    comfy = W.zimage_transformer_to_comfy(sd)
    assert comfy["layers.29.attention.qkv.weight"].shape == (3 * 3840, 3840)
    prefixed = {"model.diffusion_model." + k: v for k, v in comfy.items()}
    assert F.detect_family_from_keys(prefixed) == "zimage"
    theirs = convert_z_image_transformer_checkpoint_to_diffusers(dict(prefixed))
    assert _shapes(theirs) == _shapes(sd)


def test_real_qwen3_layout_is_what_transformers_loads():
    from transformers import Qwen3Config, Qwen3Model

    cfg = F.shipped_config("zimage", "text_encoder")
    sd = _meta_state(lambda: Qwen3Model(Qwen3Config(**cfg)))
    comfy = W.qwen3_to_comfy(sd)
    assert "model.layers.35.self_attn.k_norm.weight" in comfy
    assert F.classify_keys(comfy) == "qwen3_text_encoder"
    # transformers strips the base-model prefix itself when it loads the file's state dict
    assert _shapes({k.removeprefix("model."): v for k, v in comfy.items()}) == _shapes(sd)


@pytest.mark.parametrize("family", ["zimage", "sd1"])
def test_real_vae_layout_matches_diffusers_converter(family):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg = F.shipped_config(family, "vae")
    sd = _meta_state(lambda: AutoencoderKL.from_config(cfg))
    ldm = W.vae_to_ldm(sd)
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert ("quant_conv.weight" in ldm) == (family == "sd1")
    theirs = convert_ldm_vae_checkpoint(dict(ldm), dict(cfg))
    assert _shapes(theirs) == _shapes(sd)


def test_real_sd15_unet_layout_matches_diffusers_converter():
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    cfg = F.shipped_config("sd1", "unet")
    sd = _meta_state(lambda: UNet2DConditionModel.from_config(cfg))
    ldm = W.unet_to_ldm(sd, cfg)
    assert ldm["output_blocks.2.1.conv.weight"].shape == (1280, 1280, 3, 3)
    assert ldm["output_blocks.5.2.conv.weight"].shape == (1280, 1280, 3, 3)
    assert ldm["input_blocks.3.0.op.weight"].shape == (320, 320, 3, 3)
    theirs = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in ldm.items()}, dict(cfg))
    assert _shapes(theirs) == _shapes(sd)
    # a weight the config has no place for is refused, never renamed into another block's slot
    for extra in ("down_blocks.0.resnets.2.conv1.weight", "down_blocks.4.resnets.0.conv1.weight",
                  "up_blocks.0.resnets.3.conv1.weight", "mid_block.attentions.1.proj_in.weight",
                  "mid_block.resnets.2.conv1.weight", "add_embedding.linear_1.weight"):
        with pytest.raises(ModelSourceError, match="layout is not SD1.x's"):
            W.unet_to_ldm({**sd, extra: sd["conv_in.weight"]}, cfg)


# ---------------------------------------------------------------------------
# Shipped configs
# ---------------------------------------------------------------------------


def test_shipped_configs_are_valid():
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel, ZImageTransformer2DModel
    from transformers import CLIPTextConfig, Qwen3Config

    zdir = os.path.join(F.CONFIG_DIR, "zimage")
    sdir = os.path.join(F.CONFIG_DIR, "sd1")
    t = ZImageTransformer2DModel.load_config(os.path.join(zdir, "transformer"))
    assert t["dim"] == 3840 and t["n_layers"] == 30 and t["axes_dims"] == [32, 48, 48]
    assert t["axes_lens"] == [1536, 512, 512] and t["cap_feat_dim"] == 2560
    assert sum(t["axes_dims"]) == t["dim"] // t["n_heads"]
    v = AutoencoderKL.load_config(os.path.join(zdir, "vae"))
    assert v["latent_channels"] == 16 and v["scaling_factor"] == 0.3611 and v["shift_factor"] == 0.1159
    assert v["use_quant_conv"] is False and v["use_post_quant_conv"] is False
    q = Qwen3Config.from_pretrained(os.path.join(zdir, "text_encoder"))
    assert (q.hidden_size, q.num_hidden_layers, q.num_key_value_heads, q.head_dim) == (2560, 36, 8, 128)
    assert q.tie_word_embeddings is True and q.vocab_size == 151936
    for family in ("zimage", "sd1"):
        sched_cfg = F.shipped_config(family, "scheduler")
        sched = getattr(diffusers, sched_cfg["_class_name"]).from_config(sched_cfg)
        assert sched.config.num_train_timesteps == 1000
    assert F.shipped_config("zimage", "scheduler")["shift"] == 3.0
    u = UNet2DConditionModel.load_config(os.path.join(sdir, "unet"))
    assert u["block_out_channels"] == [320, 640, 1280, 1280] and u["cross_attention_dim"] == 768
    assert u["attention_head_dim"] == 8
    sv = AutoencoderKL.load_config(os.path.join(sdir, "vae"))
    assert sv["latent_channels"] == 4 and sv["scaling_factor"] == 0.18215
    c = CLIPTextConfig.from_pretrained(os.path.join(sdir, "text_encoder"))
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.vocab_size) == (768, 12, 12, 49408)
    for family in ("zimage", "sd1"):
        with open(os.path.join(F.CONFIG_DIR, family, "model_index.json"), encoding="utf-8") as f:
            assert json.load(f)["_class_name"].endswith("Pipeline")


# ---------------------------------------------------------------------------
# Refusals and errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_suffix_refused(tmp_path, suffix, zimage_files):
    path = tmp_path / f"model{suffix}"
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(UnsafeFileError, match="safetensors") as err:
        F.load_sd1_single_file(str(path))
    assert str(path) in str(err.value)
    with pytest.raises(UnsafeFileError):
        F.load_zimage_split(str(path), zimage_files["text_encoder"], zimage_files["vae"])


def test_pickle_content_refused_whatever_the_suffix(tmp_path, zimage_files):
    zipped = tmp_path / "disguised.safetensors"
    torch.save({"w": torch.zeros(1)}, zipped)
    with pytest.raises(UnsafeFileError, match="safetensors"):
        F.safetensors_keys(str(zipped))
    legacy = tmp_path / "legacy.safetensors"
    torch.save({"w": torch.zeros(1)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeFileError):
        F.load_zimage_split(zimage_files["diffusion_model"], str(legacy), zimage_files["vae"])


def test_truncated_and_garbage_files(tmp_path, sd1_files, zimage_files):
    data = open(sd1_files["sd1_single_file"], "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelSourceError, match="corrupt or truncated") as err:
        F.load_sd1_single_file(str(cut), tokenizer=sd1_files["sd1_tokenizer"])
    assert "re-download" in str(err.value) and str(cut) in str(err.value)
    assert not isinstance(err.value, UnsafeFileError)

    header_only = tmp_path / "header.safetensors"
    header_only.write_bytes(data[:100])
    with pytest.raises(ModelSourceError, match="corrupt or truncated"):
        F.safetensors_keys(str(header_only))

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 12) + b"not json!!!!" + b"\0" * 32)
    with pytest.raises(ModelSourceError, match="corrupt or truncated"):
        F.load_zimage_split(str(garbage), zimage_files["text_encoder"], zimage_files["vae"])

    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ModelSourceError, match="corrupt or truncated"):
        F.safetensors_keys(str(empty))


def test_missing_file(tmp_path, zimage_files):
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(ModelSourceError, match="does not exist"):
        F.load_sd1_single_file(missing)
    with pytest.raises(ModelSourceError, match="does not exist"):
        F.load_zimage_split(zimage_files["diffusion_model"], zimage_files["text_encoder"], missing)
    with pytest.raises(ModelSourceError, match="folder"):
        F.load_sd1_single_file(str(tmp_path))


def test_wrong_family(sd1_files, zimage_files, tmp_path):
    with pytest.raises(WrongFamilyError) as err:
        F.load_zimage_split(sd1_files["sd1_single_file"], zimage_files["text_encoder"], zimage_files["vae"])
    msg = str(err.value)
    assert "'sd1'" in msg and "'zimage'" in msg and "Stable Diffusion 1.x" in msg

    with pytest.raises(WrongFamilyError) as err:
        F.load_sd1_single_file(zimage_files["diffusion_model"], tokenizer=sd1_files["sd1_tokenizer"])
    msg = str(err.value)
    assert "'zimage'" in msg and "'sd1'" in msg and "Z-Image" in msg

    # Components in the wrong slots.
    with pytest.raises(WrongFamilyError, match="VAE"):
        F.load_zimage_split(zimage_files["diffusion_model"], zimage_files["vae"], zimage_files["vae"])
    with pytest.raises(WrongFamilyError, match="Qwen3"):
        F.load_zimage_split(zimage_files["diffusion_model"], zimage_files["text_encoder"], zimage_files["text_encoder"])

    # An SD1.x VAE (4 latent channels) offered as Z-Image's VAE.
    tensors = load_file(sd1_files["sd1_single_file"])
    sd_vae = tmp_path / "sd_vae.safetensors"
    save_file(
        {k[len("first_stage_model.") :]: v for k, v in tensors.items() if k.startswith("first_stage_model.")}, sd_vae
    )
    with pytest.raises(WrongFamilyError, match="4 latent channels"):
        F.load_zimage_split(zimage_files["diffusion_model"], zimage_files["text_encoder"], str(sd_vae))


def test_detect_family_and_keys_helpers(zimage_files, sd1_files):
    assert F.detect_family_from_keys(F.safetensors_keys(zimage_files["diffusion_model"])) == "zimage"
    assert F.detect_family_from_keys(F.safetensors_keys(sd1_files["sd1_single_file"])) == "sd1"
    assert F.detect_family_from_keys(F.safetensors_keys(zimage_files["vae"])) is None
    assert F.detect_family_from_keys(F.safetensors_keys(zimage_files["text_encoder"])) is None
    assert F.detect_family_from_keys(["foo.weight"]) is None
    assert F.classify_keys(F.safetensors_keys(zimage_files["vae"])) == "vae"
    assert F.classify_keys(["model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.0.x"]) == (
        "sdxl_checkpoint"
    )
    assert (
        F.detect_family_from_keys(["conditioner.embedders.0.x", "model.diffusion_model.input_blocks.0.0.weight"])
        is None
    )


def test_saving_again_replaces_files(zimage, tmp_path):
    first = W.save_zimage_split(zimage, str(tmp_path), name="again")
    second = W.save_zimage_split(zimage, str(tmp_path), name="again")
    assert first == second
    assert sorted(os.listdir(tmp_path / "text_encoders")) == ["again_qwen3.safetensors", "again_tokenizer"]
