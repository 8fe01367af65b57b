"""Writers for the two single-file layouts no library writes: ComfyUI's split Z-Image files and SD1.x single files.

diffusers reads both layouts (``from_single_file``) but writes neither, so the
renames from diffusers' key names back to the original ones are ours:

* **Z-Image split files**, the way ComfyUI keeps them::

      diffusion_models/<name>.safetensors    transformer, ComfyUI's key names (fused ``attention.qkv``, ...)
      text_encoders/<name>_qwen3.safetensors Qwen3 text encoder (``model.layers.N...``)
      vae/<name>_ae.safetensors              Flux VAE, original LDM key names (``encoder.down.0.block.0...``)
      text_encoders/<name>_tokenizer/        tokenizer folder (``save_pretrained``)

  The tiny-model builder uses them to lay out test models exactly as users have the real ones.
* **SD1.x single files** in the original LDM layout (like ``v1-5-pruned-emaonly.safetensors``):
  ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE) and
  ``cond_stage_model.transformer.text_model.*`` (CLIP), plus ``<name>_tokenizer/``; CheckpointSave exports these.

Each file carries the exact component configs in its ``turbobooth.config`` metadata entry, so a file of any
size (a tiny test model, a fine-tune) loads back with its own configs; files from elsewhere use the shipped ones.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import ModelSourceError, get_logger
from .paths import atomic_dir, atomic_file

logger = get_logger(__name__)

#: Metadata entry (JSON) that carries the exact component configs of files written here.
METADATA_CONFIG_KEY = "turbobooth.config"

SD1_UNET_PREFIX = "model.diffusion_model."
SD1_VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."


def _public_config(config: Mapping[str, Any]) -> dict:
    """A JSON-safe copy of a diffusers/transformers config without private entries."""
    out = {}
    for k, v in dict(config).items():
        if k.startswith("_") and k != "_class_name":
            continue
        if isinstance(v, tuple):
            v = list(v)
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[k] = v
    return out


def _transformers_config_dict(config) -> dict:
    d = config.to_dict()
    for k in ("transformers_version", "torch_dtype", "dtype", "_name_or_path", "architectures"):
        d.pop(k, None)
    return _public_config(d)


def _count_indices(keys: Iterable[str], pattern: str) -> int:
    """One more than the largest N in keys matching ``pattern`` (a regex with one ``(\\d+)`` group); 0 if none."""
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return (max(found) + 1) if found else 0


def save_tensors(tensors: Mapping[str, Any], path: str, configs: dict | None = None) -> str:
    """Write a safetensors file atomically, with the component ``configs`` in its metadata."""
    from safetensors.torch import save_file

    metadata = {"format": "pt"}
    if configs:
        metadata[METADATA_CONFIG_KEY] = json.dumps(configs, sort_keys=True)
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_file(path, lambda tmp: save_file(clean, tmp, metadata=metadata))
    logger.info("wrote %s (%d tensors)", path, len(clean))
    return path


def save_tokenizer(tokenizer, folder: str) -> str:
    os.makedirs(os.path.dirname(folder) or ".", exist_ok=True)
    return atomic_dir(folder, lambda tmp: tokenizer.save_pretrained(tmp))


# ---------------------------------------------------------------------------
# Z-Image transformer: diffusers <-> ComfyUI key names
# ---------------------------------------------------------------------------

_ZIMAGE_TO_COMFY = (
    ("all_x_embedder.2-1.", "x_embedder."),
    ("all_final_layer.2-1.", "final_layer."),
    (".attention.to_out.0.", ".attention.out."),
    (".attention.norm_q.", ".attention.q_norm."),
    (".attention.norm_k.", ".attention.k_norm."),
)


def zimage_transformer_to_comfy(state_dict: Mapping[str, Any]) -> dict:
    """Rename a diffusers ZImageTransformer2DModel state dict to ComfyUI's key names (fusing q/k/v)."""
    import torch

    out: dict = {}
    for key, value in state_dict.items():
        if key.startswith(("all_x_embedder.", "all_final_layer.")) and ".2-1." not in key:
            raise ModelSourceError(
                f"the Z-Image transformer has an extra patch size ({key}); only patch size 2 / frame patch 1 "
                "can be written in ComfyUI's layout"
            )
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            base, _, leaf = key.partition(".attention.to_q.")
            parts = [state_dict[f"{base}.attention.to_{n}.{leaf}"] for n in ("q", "k", "v")]
            out[f"{base}.attention.qkv.{leaf}"] = torch.cat(parts, dim=0)
            continue
        new = key
        for a, b in _ZIMAGE_TO_COMFY:
            new = new.replace(a, b)
        out[new] = value
    return out


def qwen3_to_comfy(state_dict: Mapping[str, Any]) -> dict:
    """Qwen3Model keys -> the ``model.``-prefixed layout of ComfyUI's qwen_3_4b.safetensors."""
    return {(k if k.startswith("model.") else "model." + k): v for k, v in state_dict.items()}


# ---------------------------------------------------------------------------
# VAE: diffusers <-> original LDM key names
# ---------------------------------------------------------------------------

_VAE_ATTN_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_ATTN_FROM_LDM = {v: k for k, v in _VAE_ATTN_TO_LDM.items()}


def vae_to_ldm(state_dict: Mapping[str, Any]) -> dict:
    """diffusers AutoencoderKL keys -> original LDM keys (attention projections as 1x1 convs)."""
    n_up = _count_indices(state_dict, r"^decoder\.up_blocks\.(\d+)\.")
    out = {}
    for key, value in state_dict.items():
        new = key
        m = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", key)
        if m:
            side, name, leaf = m.groups()
            new = f"{side}.mid.attn_1.{_VAE_ATTN_TO_LDM[name]}.{leaf}"
            if leaf == "weight" and value.ndim == 2:
                value = value[:, :, None, None]
            out[new] = value
            continue
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", new)
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
            lambda mm: f"decoder.up.{n_up - 1 - int(mm.group(1))}.block.{mm.group(2)}.",
            new,
        )
        new = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
            lambda mm: f"decoder.up.{n_up - 1 - int(mm.group(1))}.upsample.",
            new,
        )
        new = re.sub(
            r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.",
            lambda mm: f"{mm.group(1)}.mid.block_{int(mm.group(2)) + 1}.",
            new,
        )
        new = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", new)
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        out[new] = value
    return out


# ---------------------------------------------------------------------------
# SD1.x UNet: diffusers <-> original LDM key names
# ---------------------------------------------------------------------------

_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET_FROM_LDM = {v: k for k, v in _RESNET_TO_LDM.items()}


def _unet_prefix_pairs(
    levels: int, lpb: int, attn_down: list[bool], attn_up: list[bool]
) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, LDM prefix, is_resnet) for every block of an SD-style UNet."""
    pairs = [
        ("time_embedding.linear_1.", "time_embed.0.", False),
        ("time_embedding.linear_2.", "time_embed.2.", False),
        ("conv_in.", "input_blocks.0.0.", False),
        ("conv_norm_out.", "out.0.", False),
        ("conv_out.", "out.2.", False),
        ("mid_block.resnets.0.", "middle_block.0.", True),
        ("mid_block.attentions.0.", "middle_block.1.", False),
        ("mid_block.resnets.1.", "middle_block.2.", True),
    ]
    n = 1
    for i in range(levels):
        for j in range(lpb):
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{n}.0.", True))
            if attn_down[i]:
                pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{n}.1.", False))
            n += 1
        if i < levels - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{n}.0.op.", False))
            n += 1
    n = 0
    for i in range(levels):
        for j in range(lpb + 1):
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{n}.0.", True))
            if attn_up[i]:
                pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{n}.1.", False))
            if j == lpb and i < levels - 1:
                pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{n}.{2 if attn_up[i] else 1}.", False))
            n += 1
    return pairs


def _rename_by_prefix(
    state_dict: Mapping[str, Any], table: dict[str, tuple[str, bool]], inner: dict, what: str
) -> dict:
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:cut]) + "."
            hit = table.get(prefix)
            if hit is None:
                continue
            target, is_resnet = hit
            rest = key[len(prefix) :]
            if is_resnet:
                name, _, leaf = rest.rpartition(".")
                rest = inner.get(name, name) + "." + leaf
            out[target + rest] = value
            break
        else:
            raise ModelSourceError(f"unexpected {what} weight {key!r}; the UNet layout is not SD1.x's")
    return out


def unet_to_ldm(state_dict: Mapping[str, Any], config: Mapping[str, Any]) -> dict:
    """diffusers UNet2DConditionModel keys -> original ``input_blocks/middle_block/output_blocks`` keys."""
    levels = len(config["block_out_channels"])
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        raise ModelSourceError("only UNets with the same layers_per_block on every level can be written")
    attn_down = ["CrossAttn" in t for t in config["down_block_types"]]
    attn_up = ["CrossAttn" in t for t in config["up_block_types"]]
    table = {d: (ldm, r) for d, ldm, r in _unet_prefix_pairs(levels, lpb, attn_down, attn_up)}
    return _rename_by_prefix(state_dict, table, _RESNET_TO_LDM, "diffusers UNet")


# ---------------------------------------------------------------------------
# Z-Image split files
# ---------------------------------------------------------------------------


def save_zimage_split(pipe, root: str, name: str) -> dict:
    """Write a ZImagePipeline as ComfyUI split files under ``root`` (see the module docstring)."""
    root = os.path.abspath(root)
    dm_path = os.path.join(root, "diffusion_models", f"{name}.safetensors")
    te_path = os.path.join(root, "text_encoders", f"{name}_qwen3.safetensors")
    vae_path = os.path.join(root, "vae", f"{name}_ae.safetensors")
    tok_dir = os.path.join(root, "text_encoders", f"{name}_tokenizer")

    transformer = pipe.transformer
    save_tensors(
        zimage_transformer_to_comfy(transformer.state_dict()),
        dm_path,
        {
            "transformer": _public_config(transformer.config),
            "scheduler": _public_config(pipe.scheduler.config),
        },
    )
    text_encoder = pipe.text_encoder
    save_tensors(
        qwen3_to_comfy(text_encoder.state_dict()),
        te_path,
        {"text_encoder": _transformers_config_dict(text_encoder.config)},
    )
    save_tensors(vae_to_ldm(pipe.vae.state_dict()), vae_path, {"vae": _public_config(pipe.vae.config)})
    save_tokenizer(pipe.tokenizer, tok_dir)
    return {"diffusion_model": dm_path, "text_encoder": te_path, "vae": vae_path, "tokenizer": tok_dir}


# ---------------------------------------------------------------------------
# SD1.x single file
# ---------------------------------------------------------------------------


def save_sd1_single_file(pipe, root: str, name: str) -> dict:
    """Write a StableDiffusionPipeline as an original-layout single file ``checkpoints/<name>.safetensors``."""
    import torch

    root = os.path.abspath(root)
    path = os.path.join(root, "checkpoints", f"{name}.safetensors")
    tok_dir = os.path.join(root, "checkpoints", f"{name}_tokenizer")
    tensors: dict = {}
    for k, v in unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config).items():
        tensors[SD1_UNET_PREFIX + k] = v
    for k, v in vae_to_ldm(pipe.vae.state_dict()).items():
        tensors[SD1_VAE_PREFIX + k] = v
    te = pipe.text_encoder
    for k, v in te.state_dict().items():
        tensors[SD1_CLIP_PREFIX + (k if k.startswith("text_model.") else "text_model." + k)] = v
    pos_key = SD1_CLIP_PREFIX + "text_model.embeddings.position_ids"
    if pos_key not in tensors:
        n_pos = te.config.max_position_embeddings
        tensors[pos_key] = torch.arange(n_pos, dtype=torch.int64)[None]
    configs = {
        "unet": _public_config(pipe.unet.config),
        "vae": _public_config(pipe.vae.config),
        "text_encoder": _transformers_config_dict(te.config),
        "scheduler": _public_config(pipe.scheduler.config),
    }
    save_tensors(tensors, path, configs)
    save_tokenizer(pipe.tokenizer, tok_dir)
    return {"sd1_single_file": path, "sd1_tokenizer": tok_dir}


