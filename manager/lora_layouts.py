"""LoRA file layouts: which family a file is for, the one layout diffusers cannot read, and what we write.

diffusers' ``<Pipeline>.lora_state_dict`` converts ai-toolkit, kohya/musubi-tuner, DiffSynth and diffusers
files. Written by hand here, because no library does it:

* ComfyUI's own trainer output (``comfy_extras/nodes_train.py``) names ComfyUI's Z-Image modules: a fused
  ``attention.qkv`` (its LoRA has one shared ``lora_down`` and a ``lora_up`` stacked q/k/v), ``x_embedder`` and
  ``final_layer``, plus full ``.diff``/``.diff_b`` deltas of norms and biases. The fused LoRA is split onto
  ``to_q``/``to_k``/``to_v`` (same down matrix, one third of the up matrix each) and the names are mapped to
  diffusers'. The deltas are not LoRA weights; they are dropped with a warning.
* The Z-Image layout that ComfyUI's LoraLoader reads with the right strength (``diffusion_model.`` prefix and
  explicit ``.alpha`` tensors), and the kohya naming ComfyUI expects for SD1.x text encoders.
"""

from __future__ import annotations

import datetime
import re

from .errors import InvalidInputError, get_logger

logger = get_logger(__name__)

_COMFY_ZIMAGE_NAMES = (("x_embedder.", "all_x_embedder.2-1."), ("final_layer.", "all_final_layer.2-1."))
_FORMATS_HELP = (
    "Z-Image: ai-toolkit 'diffusion_model.*', musubi-tuner/kohya 'lora_unet_layers_*', DiffSynth 'layers.*', "
    "ComfyUI's trainer, diffusers 'transformer.*'; SD1.x: kohya 'lora_unet_*'/'lora_te_*' or diffusers 'unet.*'"
)


def family_of(keys: list[str], meta: dict) -> str | None:
    """"zimage", "sd1" or None, from our metadata or the key names."""
    if meta.get("turbobooth_family") in ("zimage", "sd1"):
        return meta["turbobooth_family"]
    joined = "\n".join(keys)
    if re.search(r"(^|[._])(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)[._]", joined):
        return "sd1"
    if re.search(r"^(lora_te\d?_|text_encoder\.|unet\.)", joined, re.M):
        return "sd1"
    if re.search(r"(^|[._])(layers|noise_refiner|context_refiner)[._]\d+[._]", joined):
        return "zimage"
    return None


def _split_comfy_qkv(tensors: dict) -> dict:
    """ComfyUI trainer -> a layout diffusers' Z-Image converter reads (see the module docstring)."""
    out, dropped = {}, 0
    for key, value in tensors.items():
        if key.endswith((".diff", ".diff_b")):
            dropped += 1
            continue
        m = re.match(r"^(diffusion_model\.)?(.*)\.attention\.qkv\.(lora_down\.weight|lora_up\.weight|alpha)$", key)
        if m is None:
            for old, new in _COMFY_ZIMAGE_NAMES:
                key = re.sub(rf"^(diffusion_model\.)?{re.escape(old)}", rf"\g<1>{new}", key)
            out[key] = value
            continue
        prefix, block, leaf = m.group(1) or "", m.group(2), m.group(3)
        parts = value.chunk(3, dim=0) if leaf == "lora_up.weight" else (value, value, value)
        for proj, part in zip("qkv", parts, strict=True):
            out[f"{prefix}{block}.attention.to_{proj}.{leaf}"] = part.contiguous()
    if dropped:
        logger.warning("ignoring %d full-weight deltas (.diff/.diff_b) of a ComfyUI-trained LoRA; only its LoRA "
                       "layers are applied", dropped)
    return out


def normalise(tensors: dict, meta: dict, label: str) -> tuple[str, dict]:
    """(family, tensors in a layout diffusers reads) for a LoRA file's tensors, or a clear error."""
    from diffusers import StableDiffusionPipeline, ZImagePipeline

    keys = list(tensors)
    family = family_of(keys, meta)
    if family is None:
        raise InvalidInputError(
            f"{label!r} is not a LoRA layout TurboBooth reads ({_FORMATS_HELP}); first key: {keys[0]!r}"
        )
    if family == "zimage" and any(".attention.qkv." in k or k.endswith((".diff", ".diff_b")) for k in keys):
        tensors = _split_comfy_qkv(tensors)
    try:
        if family == "zimage":
            converted = ZImagePipeline.lora_state_dict(dict(tensors))
        else:
            converted, _ = StableDiffusionPipeline.lora_state_dict(dict(tensors))
    except (ValueError, KeyError, RuntimeError) as e:
        raise InvalidInputError(f"{label!r} is not a readable {family} LoRA ({_FORMATS_HELP}): {e}") from e
    if not converted:
        raise InvalidInputError(f"{label!r} holds no LoRA weight pairs ({_FORMATS_HELP})")
    return family, tensors


def peft_to_file(family: str, state_dict: dict, alpha: float, te_state_dict: dict) -> dict:
    """peft state dicts (module names as in the diffusers model) -> the tensors our files hold."""
    import torch
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    alpha_t = torch.tensor(float(alpha), dtype=torch.float32)
    if family == "zimage":
        if te_state_dict:
            raise InvalidInputError("Z-Image LoRA files hold the transformer only; text-encoder LoRA is SD1.x-only")
        out = {f"diffusion_model.{k}": v for k, v in state_dict.items()}
        for k in state_dict:
            if k.endswith(".lora_A.weight"):
                out[f"diffusion_model.{k[: -len('.lora_A.weight')]}.alpha"] = alpha_t.clone()
        return out
    both = {**{f"unet.{k}": v for k, v in state_dict.items()}, **{f"text_encoder.{k}": v for k, v in te_state_dict.items()}}
    out = {}
    for key, value in convert_state_dict_to_kohya(both).items():
        if key.startswith("lora_te1_"):  # SD1.x kohya names CLIP "lora_te_text_model_..." (ComfyUI reads that)
            rest = key[len("lora_te1_"):]
            key = "lora_te_" + (rest if rest.startswith("text_model_") else "text_model_" + rest)
        out[key] = alpha_t.clone() if key.endswith(".alpha") else value
    return out


def standard_metadata(lora) -> dict[str, str]:
    """``modelspec.*`` (Stability's model spec) and kohya's ``ss_*`` keys that LoRA managers read."""
    meta = lora.metadata
    res = meta.get("resolution", "")
    base = meta.get("base_model", "")
    zimage = lora.family == "zimage"
    out = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "z-image/lora" if zimage else "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers" if zimage else "https://github.com/Stability-AI/generative-models",
        "modelspec.title": lora.name,
        "modelspec.date": meta.get("date") or datetime.date.today().isoformat(),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(lora.rank),
        "ss_network_alpha": repr(float(lora.alpha)),
        "ss_base_model_version": "zimage" if zimage else "sd_v1",
    }
    if res:
        out["modelspec.resolution"] = f"{res}x{res}"
        out["ss_resolution"] = f"({res}, {res})"
    if lora.trigger:
        out["modelspec.trigger_phrase"] = lora.trigger
    if base:
        out["ss_sd_model_name"] = base
    return out
