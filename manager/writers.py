"""Writing models: the two single-file layouts no library writes, and CheckpointSave's LoRAs and models.

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
from collections.abc import Mapping
from typing import Any

from .errors import InvalidInputError, ModelSourceError, get_logger
from .paths import atomic_dir, atomic_file, check_writable, safe_name, unique_path

logger = get_logger(__name__)

#: Metadata entry (JSON) that carries the exact component configs of files written here.
METADATA_CONFIG_KEY = "turbobooth.config"

SD1_UNET_PREFIX = "model.diffusion_model."
SD1_VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."


#: transformers config entries that describe the saved copy, not the model
_NOT_CONFIG = ("transformers_version", "torch_dtype", "dtype", "architectures")


def _config(component) -> dict:
    """A component's config as its library serialises it (diffusers or transformers), without private entries."""
    cfg = component.config
    text = cfg.to_json_string(use_diff=False) if hasattr(cfg, "to_json_string") else component.to_json_string()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_") and k not in _NOT_CONFIG}


def save_tensors(
    tensors: Mapping[str, Any], path: str, configs: dict | None = None, metadata: dict | None = None
) -> str:
    """Write a safetensors file atomically, with ``metadata`` and the component ``configs`` in its header."""
    from safetensors.torch import save_file

    metadata = {"format": "pt", **(metadata or {})}
    if configs:
        metadata[METADATA_CONFIG_KEY] = json.dumps(configs, sort_keys=True)
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_file(path, lambda tmp: save_file(clean, tmp, metadata=metadata))
    logger.info("wrote %s (%d tensors)", path, len(clean))
    return path


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

_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(state_dict: Mapping[str, Any]) -> dict:
    """diffusers AutoencoderKL keys -> original LDM keys (attention projections as 1x1 convs)."""
    ups = [int(m[1]) for k in state_dict if (m := re.match(r"^decoder\.up_blocks\.(\d+)\.", k))]
    last_up = max(ups, default=0)  # LDM numbers the decoder's levels the other way round
    renames = (
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"decoder.up.{last_up - int(m[1])}.block.{m[2]}."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{last_up - int(m[1])}.upsample."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.", lambda m: f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}."),
        (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
    )
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[key] = value
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
_SLOT = {"resnets": 0, "attentions": 1}  # an LDM block holds a resnet (0) and then its transformer (1)
_LDM_UNET_ROOTS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "out.")


def unet_to_ldm(state_dict: Mapping[str, Any], config: Mapping[str, Any]) -> dict:
    """diffusers UNet2DConditionModel keys -> original ``input_blocks/middle_block/output_blocks`` keys.

    Top-level layers by diffusers' own table; LDM numbers the blocks along each side: per level
    ``layers_per_block`` resnets (each with its transformer), then the level's down/upsampler.
    """
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        raise ModelSourceError("only UNets with the same layers_per_block on every level can be written")
    per, levels = lpb + 1, len(config["block_out_channels"])
    up_slot = [2 if "CrossAttn" in t else 1 for t in config["up_block_types"]]  # after the resnet and transformer

    def n(level: str, j: str | int, blocks: int = per) -> int:  # the j-th block of a level, counted along its side
        if int(level) >= levels or int(j) >= blocks:
            raise IndexError  # a weight the config has no place for
        return int(level) * per + int(j)

    def mid(kind: str, j: str) -> str:  # resnet, transformer, resnet
        if int(j) > (1 if kind == "resnets" else 0):
            raise IndexError
        return f"middle_block.{2 * int(j) + _SLOT[kind]}."

    renames = (
        (rf"\.resnets\.(\d+)\.({'|'.join(_RESNET_TO_LDM)})\.", lambda m: f".resnets.{m[1]}.{_RESNET_TO_LDM[m[2]]}."),
        (
            r"^down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.",
            lambda m: f"input_blocks.{1 + n(m[1], m[3], lpb)}.{_SLOT[m[2]]}.",
        ),
        (r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.", lambda m: f"input_blocks.{1 + n(m[1], lpb)}.0.op."),
        (r"^mid_block\.(resnets|attentions)\.(\d+)\.", lambda m: mid(m[1], m[2])),
        (
            r"^up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.",
            lambda m: f"output_blocks.{n(m[1], m[3])}.{_SLOT[m[2]]}.",
        ),
        (r"^up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"output_blocks.{n(m[1], lpb)}.{up_slot[int(m[1])]}."),
    )
    top = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]  # time embedding, conv_in, conv_norm_out, conv_out
    out = {}
    for key, value in state_dict.items():
        new = top.get(key, key)
        try:
            for pattern, repl in renames:
                new = re.sub(pattern, repl, new)
        except IndexError:
            new = ""
        if not new.startswith(_LDM_UNET_ROOTS):
            raise ModelSourceError(f"unexpected diffusers UNet weight {key!r}; the UNet layout is not SD1.x's")
        out[new] = value
    return out


# ---------------------------------------------------------------------------
# Writing whole models and LoRAs
# ---------------------------------------------------------------------------


def save_zimage_split(pipe, root: str, name: str) -> dict:
    """Write a ZImagePipeline as ComfyUI split files under ``root`` (see the module docstring)."""
    root = os.path.abspath(root)
    paths = {
        "diffusion_model": os.path.join(root, "diffusion_models", f"{name}.safetensors"),
        "text_encoder": os.path.join(root, "text_encoders", f"{name}_qwen3.safetensors"),
        "vae": os.path.join(root, "vae", f"{name}_ae.safetensors"),
        "tokenizer": os.path.join(root, "text_encoders", f"{name}_tokenizer"),
    }
    configs = {"transformer": _config(pipe.transformer), "scheduler": _config(pipe.scheduler)}
    save_tensors(zimage_transformer_to_comfy(pipe.transformer.state_dict()), paths["diffusion_model"], configs)
    te = pipe.text_encoder
    save_tensors(qwen3_to_comfy(te.state_dict()), paths["text_encoder"], {"text_encoder": _config(te)})
    save_tensors(vae_to_ldm(pipe.vae.state_dict()), paths["vae"], {"vae": _config(pipe.vae)})
    atomic_dir(paths["tokenizer"], pipe.tokenizer.save_pretrained)
    return paths


def save_sd1_single_file(pipe, root: str, name: str) -> dict:
    """Write a StableDiffusionPipeline as an original-layout single file ``checkpoints/<name>.safetensors``."""
    path = write_sd1_checkpoint(pipe, os.path.join(os.path.abspath(root), "checkpoints", f"{name}.safetensors"))
    return {"sd1_single_file": path, "sd1_tokenizer": os.path.splitext(path)[0] + "_tokenizer"}


def write_sd1_checkpoint(pipe, path: str) -> str:
    """The single file at ``path``, and its tokenizer in ``<stem>_tokenizer/`` beside it."""
    import torch

    tensors = {SD1_UNET_PREFIX + k: v for k, v in unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config).items()}
    tensors.update({SD1_VAE_PREFIX + k: v for k, v in vae_to_ldm(pipe.vae.state_dict()).items()})
    te = pipe.text_encoder
    for k, v in te.state_dict().items():
        tensors[SD1_CLIP_PREFIX + (k if k.startswith("text_model.") else "text_model." + k)] = v
    # the original files carry CLIP's position ids, a buffer transformers does not save
    positions = torch.arange(te.config.max_position_embeddings, dtype=torch.int64)[None]
    tensors[SD1_CLIP_PREFIX + "text_model.embeddings.position_ids"] = positions
    configs = {c: _config(getattr(pipe, c)) for c in ("unet", "vae", "text_encoder", "scheduler")}
    save_tensors(tensors, path, configs)
    atomic_dir(os.path.splitext(path)[0] + "_tokenizer", pipe.tokenizer.save_pretrained)
    return path


def save_lora(lora, folder: str, name: str, overwrite: bool = False) -> str:
    """Write ``lora`` to ``folder/<name>.safetensors`` (auto-incremented unless ``overwrite``)."""
    from .lora import save_lora_file

    stem = safe_name(name.removesuffix(".safetensors"), "turbobooth_lora")
    path = unique_path(folder, stem, ".safetensors", overwrite=overwrite)
    save_lora_file(lora, path)
    return path


def save_model(model, folder: str, name: str, model_format: str = "diffusers folder", overwrite: bool = False) -> str:
    """A fine-tuned TurboModel as a diffusers folder, or (SD1.x) one single-file checkpoint."""
    check_writable(folder)
    stem = safe_name(name, "turbobooth_model")
    if model_format.startswith("single"):
        if model.family != "sd1":
            raise InvalidInputError(
                f"single-file export is for SD1.x; a {model.family} model is saved as a diffusers folder"
            )
        return write_sd1_checkpoint(model.pipe, unique_path(folder, stem, ".safetensors", overwrite=overwrite))
    if model_format != "diffusers folder":
        raise InvalidInputError(f"model_format {model_format!r} is not one of: diffusers folder, single file (SD1.x)")
    path = unique_path(folder, stem, "", overwrite=overwrite)
    atomic_dir(path, lambda tmp: model.pipe.save_pretrained(tmp, safe_serialization=True), overwrite=overwrite)
    return path
