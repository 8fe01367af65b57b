"""Tiny, randomly initialised Z-Image and SD1.x pipelines, built offline.

They have the real architectures (ZImageTransformer2DModel + Qwen3 + a
16-channel x8 AutoencoderKL; UNet2DConditionModel + CLIP + x8 AutoencoderKL)
with very small widths, and tokenizers made from a byte vocabulary plus a few
merges. Everything is deterministic from a seed and needs no network. Tests,
the demo and the benchmarks use them in place of the multi-gigabyte weights.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

# A handful of merges so that the tokenizers really merge (common English pairs).
_MERGE_WORDS = (
    "a", "the", "of", "photo", "dog", "cat", "sks", "in", "on", "with", "and", "portrait", "person",
    "red", "blue", "green", "beach", "snow", "city", "style", "high", "quality", "bad", "blurry",
)


def _merges_for(vocab: dict, words: Iterable[str], prefix: str = "", suffix: str = "") -> list[tuple[str, str]]:
    """Left-to-right merges that assemble each word (with an optional space or end marker), added to ``vocab``."""
    pairs = []
    for word in words:
        symbols = ([prefix] if prefix else []) + list(word)
        symbols[-1] += suffix
        pairs += [("".join(symbols[:i]), symbols[i]) for i in range(1, len(symbols))]
    merges = list(dict.fromkeys(pairs))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return merges


def build_qwen_tokenizer():
    """A Qwen2Tokenizer (byte-level BPE) with Qwen3's special tokens and chat template."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from .formats import shipped_chat_template

    vocab = {ch: i for i, ch in enumerate(sorted(bytes_to_unicode().values()))}
    merges = _merges_for(vocab, _MERGE_WORDS, prefix="Ġ") + _merges_for(vocab, _MERGE_WORDS)
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tok.add_special_tokens(
        {"additional_special_tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]}
    )
    tok.chat_template = shipped_chat_template()
    tok.model_max_length = 512
    return tok


def build_clip_tokenizer():
    """A CLIPTokenizer with a byte alphabet, end-of-word variants and a few merges."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = sorted(bytes_to_unicode().values())
    vocab = {ch: i for i, ch in enumerate(alphabet + [ch + "</w>" for ch in alphabet])}
    merges = _merges_for(vocab, [w for w in _MERGE_WORDS if len(w) > 1], suffix="</w>")
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


# Tiny widths with the real topologies; the VAEs share Z-Image's and SD1.x's x8, 4-level layout.
_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[32, 32, 32, 32], layers_per_block=1,
            norm_num_groups=32, sample_size=64)
_ZIMAGE_TRANSFORMER = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2,
                           n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=32,
                           rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 12, 12], axes_lens=[256, 64, 64])
_SD1_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32, 64, 64),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 layers_per_block=1, attention_head_dim=8, cross_attention_dim=32, norm_num_groups=32)


def _seeded(seed: int, *factories) -> list:
    """Build each part with the global RNG seeded ``seed + i`` (the same weights on every machine)."""
    import torch

    parts = []
    for i, make in enumerate(factories):
        torch.manual_seed(seed + i)
        parts.append(make())
        parts[-1].eval()
    return parts


def build_tiny_zimage(seed: int = 0):
    """A ZImagePipeline with the real component classes and tiny widths."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = build_qwen_tokenizer()

    def transformer():
        model = ZImageTransformer2DModel(**_ZIMAGE_TRANSFORMER)
        with torch.no_grad():  # these two are created with torch.empty; give them defined values
            model.x_pad_token.normal_(0.0, 0.02)
            model.cap_pad_token.normal_(0.0, 0.02)
        return model

    text_encoder, dit, vae = _seeded(
        seed,
        lambda: Qwen3Model(Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=1, head_dim=16, vocab_size=len(tokenizer),
                                       max_position_embeddings=512, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                                       tie_word_embeddings=True)),
        transformer,
        lambda: AutoencoderKL(**_VAE, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                              use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=dit)


def build_tiny_sd1(seed: int = 0):
    """A StableDiffusionPipeline with SD1.x's topology (4 levels, x8 VAE) and tiny widths."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = build_clip_tokenizer()
    text_encoder, unet, vae = _seeded(
        seed,
        lambda: CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, max_position_embeddings=77, vocab_size=len(tok),
                                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                             pad_token_id=tok.pad_token_id, projection_dim=32, hidden_act="quick_gelu")),
        lambda: UNet2DConditionModel(**_SD1_UNET),
        lambda: AutoencoderKL(**_VAE, latent_channels=4, scaling_factor=0.18215),
    )
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", prediction_type="epsilon",
                                       timestep_spacing="leading", steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def save_diffusers(pipe, folder: str) -> str:
    """Save a pipeline in diffusers' folder layout (model_index.json + safetensors)."""
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def write_tiny_models(root: str, seed: int = 0, formats: Iterable[str] = ("diffusers", "split", "single_file")) -> dict:
    """Write the tiny models into ``root`` in every layout a user may have.

    Returns a dict of paths:
      zimage_diffusers, sd1_diffusers          diffusers folders
      zimage_split: {diffusion_model, text_encoder, vae, tokenizer}   ComfyUI split files
      sd1_single_file                          one SD1.x checkpoint (+ sd1_tokenizer folder)
    Existing complete outputs are reused (a marker file records the seed).
    """
    from . import writers
    from .paths import atomic_file

    formats = tuple(formats)
    root = os.path.abspath(root)
    marker = os.path.join(root, "tiny_models.json")
    with contextlib.suppress(OSError, ValueError), open(marker, encoding="utf-8") as f:  # no marker, or unreadable
        info = json.load(f)
        if info.get("seed") == seed and set(formats) <= set(info.get("formats", [])):
            return info["paths"]

    paths: dict = {}
    zimage = build_tiny_zimage(seed)
    sd1 = build_tiny_sd1(seed)
    if "diffusers" in formats:
        paths["zimage_diffusers"] = save_diffusers(zimage, os.path.join(root, "diffusers", "tiny-zimage-turbo"))
        paths["sd1_diffusers"] = save_diffusers(sd1, os.path.join(root, "diffusers", "tiny-sd15"))
    if "split" in formats:
        paths["zimage_split"] = writers.save_zimage_split(zimage, root, name="tiny_zimage")
    if "single_file" in formats:
        paths.update(writers.save_sd1_single_file(sd1, root, name="tiny_sd15"))
    text = json.dumps({"seed": seed, "formats": list(formats), "paths": paths}, indent=2)
    atomic_file(marker, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return paths
