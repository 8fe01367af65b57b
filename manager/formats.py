"""Single-file weight formats: ComfyUI's split Z-Image files and original SD1.x checkpoints.

Two layouts are read and written here, with no network access:

* **Z-Image split files**, the way ComfyUI keeps them::

      diffusion_models/<name>.safetensors   transformer, ComfyUI's native key names
                                             (fused ``attention.qkv``, ``attention.out``, ``x_embedder``...)
      text_encoders/<name>_qwen3.safetensors Qwen3 text encoder (``model.layers.N...``)
      vae/<name>_ae.safetensors              Flux VAE, original LDM key names (``encoder.down.0.block.0...``)
      text_encoders/<name>_tokenizer/        tokenizer folder (``save_pretrained``)

* **SD1.x single files** in the original LDM layout (like ``v1-5-pruned-emaonly.safetensors``):
  ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE) and
  ``cond_stage_model.transformer.text_model.*`` (CLIP), plus ``<name>_tokenizer/``.

The loaders start from the real model configs shipped in ``manager/configs/`` and
replace every shape-dependent field with what the weights say, so the same code
loads the multi-gigabyte originals and the tiny test models. Fields that cannot be
read from shapes (attention head counts of CLIP, rope lengths...) come from the
``turbobooth.config`` metadata entry that the writers here add, when present.

Only safetensors are read. Pickle files are refused before anything is opened
with a deserializer.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .errors import ModelSourceError, UnsafeFileError, WrongFamilyError

logger = logging.getLogger(__name__)

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

#: Suffixes of pickle-based checkpoint files that are never opened.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")

#: Metadata entry (JSON) that carries the exact component configs of files written here.
METADATA_CONFIG_KEY = "turbobooth.config"

# Prefixes under which a bare diffusion model may be stored in a single file.
_DIFFUSION_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

_SD1_UNET_PREFIX = "model.diffusion_model."
_SD1_VAE_PREFIX = "first_stage_model."
_SD1_CLIP_PREFIX = "cond_stage_model.transformer."

# Largest header we accept (safetensors itself caps headers at 100 MB).
_MAX_HEADER_BYTES = 100 * 1024 * 1024

_FAMILY_LABELS = {"zimage": "Z-Image", "sd1": "Stable Diffusion 1.x"}

# What a file holds, for error messages: kind -> (description, family or None).
_KIND_LABELS = {
    "zimage_transformer": ("a Z-Image diffusion model", "zimage"),
    "sd1_checkpoint": ("a Stable Diffusion 1.x checkpoint", "sd1"),
    "sd2_checkpoint": ("a Stable Diffusion 2.x checkpoint", None),
    "sdxl_checkpoint": ("an SDXL checkpoint", None),
    "flux_transformer": ("a Flux diffusion model", None),
    "ldm_unet": ("a bare Stable Diffusion UNet", None),
    "diffusers_unet": ("a UNet in diffusers' layout", None),
    "qwen3_text_encoder": ("a Qwen3 text encoder", None),
    "llm_text_encoder": ("a language-model text encoder (not Qwen3)", None),
    "clip_text_encoder": ("a CLIP text encoder", None),
    "t5_text_encoder": ("a T5 text encoder", None),
    "vae": ("a VAE", None),
    "lora": ("a LoRA", None),
}


# ---------------------------------------------------------------------------
# Safe file access
# ---------------------------------------------------------------------------


def _looks_like_pickle(path: str) -> bool:
    """True for a zip archive (torch.save) or a raw pickle stream, whatever the suffix."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    if head.startswith(b"PK\x03\x04"):
        return True
    # Pickle protocol 2+ starts with PROTO (0x80) followed by the protocol number.
    return len(head) >= 2 and head[0] == 0x80 and 1 <= head[1] <= 5


def _refuse_pickle(path: str) -> None:
    suffix = os.path.splitext(path)[1].lower()
    if suffix in PICKLE_SUFFIXES or _looks_like_pickle(path):
        raise UnsafeFileError(
            f"{path!r} is a pickle-based checkpoint ({suffix or 'no suffix'}); TurboBooth loads weights from "
            "safetensors files only, because pickle files can run arbitrary code when opened. "
            "Download the .safetensors version of this model instead."
        )


def _check_file(path: str, role: str) -> str:
    """Resolve ``path`` and make sure it is an existing, non-pickle file."""
    if not path or not isinstance(path, (str, os.PathLike)):
        raise ModelSourceError(f"no file given for the {role}; pass the path of a .safetensors file")
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise ModelSourceError(f"{path!r} is a folder, but the {role} must be a single .safetensors file")
    if not os.path.isfile(path):
        raise ModelSourceError(f"the {role} file {path!r} does not exist; check the path or the file name")
    _refuse_pickle(path)
    return path


def _corrupt(path: str, detail: str) -> ModelSourceError:
    return ModelSourceError(
        f"{path!r} is corrupt or truncated ({detail}); it is not a complete safetensors file. "
        "Delete it and re-download it."
    )


def read_safetensors_header(path: str) -> tuple[dict[str, dict], dict[str, str]]:
    """Read and check a safetensors header without loading any tensor.

    Returns ``(tensors, metadata)`` where ``tensors`` maps each key to its
    ``{"dtype", "shape", "data_offsets"}`` entry. Raises UnsafeFileError for
    pickle files and ModelSourceError for a missing, corrupt or truncated file.
    """
    path = _check_file(path, "model")
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise _corrupt(path, f"only {size} bytes")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len <= 0 or header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                raise _corrupt(path, "bad header length")
            raw = f.read(header_len)
    except OSError as e:
        raise ModelSourceError(f"cannot read {path!r}: {e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _corrupt(path, "header is not valid JSON") from e
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        metadata = {}
    data_size = size - 8 - header_len
    for key, info in header.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1]):
            raise _corrupt(path, f"bad entry for tensor {key!r}")
        if offsets[1] > data_size:
            raise _corrupt(path, f"tensor {key!r} ends past the end of the file")
    return header, metadata


def read_safetensors_keys(path: str) -> list[str]:
    """The tensor names in a safetensors file, read from its header only (cheap)."""
    header, _ = read_safetensors_header(path)
    return list(header)


def _read_metadata_configs(metadata: Mapping[str, str]) -> dict:
    raw = metadata.get(METADATA_CONFIG_KEY)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        logger.warning("ignoring unreadable %s metadata", METADATA_CONFIG_KEY)
        return {}
    return value if isinstance(value, dict) else {}


def _load_tensors(path: str, dtype=None, keep: Callable[[str], bool] | None = None) -> dict:
    """Read the tensors of ``path`` one at a time, casting floating ones to ``dtype`` as they arrive.

    Reading tensor by tensor keeps the peak memory near the size of the result,
    and ``keep`` skips tensors that are not needed (EMA copies, ``lm_head``).
    """
    from safetensors import SafetensorError, safe_open

    out = {}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                if keep is not None and not keep(key):
                    continue
                tensor = f.get_tensor(key)
                if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                    tensor = tensor.to(dtype)
                out[key] = tensor
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _corrupt(path, str(e)) from e
    return out


def _tmp_path(path: str) -> str:
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    return tmp


def _atomic_save_tensors(tensors: Mapping[str, Any], path: str, configs: dict | None = None) -> str:
    """Write a safetensors file through a temporary file in the same folder, then rename it."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    metadata = {"format": "pt"}
    if configs:
        metadata[METADATA_CONFIG_KEY] = json.dumps(configs, sort_keys=True)
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    tmp = _tmp_path(path)
    try:
        save_file(clean, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    logger.info("wrote %s (%d tensors)", path, len(clean))
    return path


def _atomic_save_dir(writer: Callable[[str], Any], folder: str) -> str:
    """Fill a temporary sibling folder with ``writer`` and move it into place."""
    parent = os.path.dirname(folder) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(folder) + ".", dir=parent)
    old = None
    try:
        writer(tmp)
        if os.path.exists(folder):
            old = tempfile.mkdtemp(prefix="." + os.path.basename(folder) + ".old.", dir=parent)
            os.rmdir(old)
            os.replace(folder, old)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old and os.path.exists(old) and not os.path.exists(folder):
            os.replace(old, folder)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return folder


# ---------------------------------------------------------------------------
# Telling files apart
# ---------------------------------------------------------------------------


def _strip_diffusion_prefix(keys: Iterable[str]) -> list[str]:
    out = []
    for k in keys:
        for p in _DIFFUSION_PREFIXES:
            if k.startswith(p):
                k = k[len(p) :]
                break
        out.append(k)
    return out


def classify_keys(keys: Iterable[str]) -> str | None:
    """What a safetensors file holds, judged from its key names.

    Returns one of the kinds in ``_KIND_LABELS`` ("zimage_transformer",
    "sd1_checkpoint", "qwen3_text_encoder", "vae", ...) or None when unknown.
    """
    keys = list(keys)
    key_set = set(keys)
    if any(".lora_A." in k or ".lora_down." in k or k.startswith("lora_unet_") for k in keys):
        return "lora"
    has_unet = any(k.startswith(_SD1_UNET_PREFIX + "input_blocks.") for k in keys)
    if has_unet:
        if any(k.startswith("conditioner.embedders.") for k in keys):
            return "sdxl_checkpoint"
        if any(k.startswith("cond_stage_model.model.") for k in keys):
            return "sd2_checkpoint"
        if any(k.startswith(_SD1_CLIP_PREFIX) for k in keys):
            return "sd1_checkpoint"
        return "ldm_unet"
    bare = set(_strip_diffusion_prefix(keys))
    if ("cap_embedder.1.weight" in bare and ("x_pad_token" in bare or "x_embedder.weight" in bare)) or (
        "all_x_embedder.2-1.weight" in bare
    ):
        return "zimage_transformer"
    if any(k.startswith("double_blocks.") or k.startswith("transformer_blocks.0.attn.add_q_proj") for k in bare):
        return "flux_transformer"
    if "input_blocks.0.0.weight" in bare:
        return "ldm_unet"
    if "conv_in.weight" in key_set and any(k.startswith("down_blocks.") for k in keys):
        return "diffusers_unet"
    if any(k.startswith("encoder.down.") or k.startswith("encoder.down_blocks.") for k in keys) and any(
        k.startswith("decoder.") for k in keys
    ):
        return "vae"
    if any(k.startswith("first_stage_model.encoder.") for k in keys):
        return "vae"
    llm = [k for k in keys if re.match(r"^(model\.)?layers\.\d+\.self_attn\.", k)]
    if llm:
        if any(k.endswith("self_attn.q_norm.weight") for k in llm):
            return "qwen3_text_encoder"
        return "llm_text_encoder"
    if any("text_model.encoder.layers." in k or k.startswith("encoder.layers.0.self_attn.k_proj") for k in keys):
        return "clip_text_encoder"
    if any(k.startswith("encoder.block.") or k.startswith("shared.") for k in keys):
        return "t5_text_encoder"
    return None


def detect_family_from_keys(keys: Iterable[str]) -> str | None:
    """The model family a file belongs to: "zimage" (diffusion model), "sd1" (single-file checkpoint) or None.

    Component files that several families share (a VAE, a text encoder) give None.
    """
    kind = classify_keys(keys)
    if kind is None:
        return None
    return _KIND_LABELS[kind][1]


def _describe(kind: str | None) -> str:
    if kind is None:
        return "a file of an unrecognised kind"
    return _KIND_LABELS[kind][0]


def _wrong(path: str, kind: str | None, expected_family: str, expected_what: str, hint: str = "") -> WrongFamilyError:
    found_family = _KIND_LABELS[kind][1] if kind else None
    found = _describe(kind)
    if found_family:
        found += f" (family {found_family!r})"
    msg = (
        f"{path!r} holds {found}, but {expected_what} of the {_FAMILY_LABELS[expected_family]} family "
        f"(family {expected_family!r}) was expected."
    )
    if hint:
        msg += " " + hint
    return WrongFamilyError(msg)


# ---------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------


def shipped_config(family: str, component: str) -> dict:
    """The real model config shipped with the package, e.g. ``shipped_config("zimage", "transformer")``."""
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    path = os.path.join(CONFIG_DIR, family, component, name)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def shipped_chat_template() -> str:
    with open(os.path.join(CONFIG_DIR, "zimage", "tokenizer", "chat_template.jinja"), encoding="utf-8") as f:
        return f.read()


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


def _merged(base: dict, *overlays: Mapping[str, Any] | None) -> dict:
    out = dict(base)
    for o in overlays:
        if o:
            out.update({k: v for k, v in o.items() if k != "_class_name"})
    return out


def _count_indices(keys: Iterable[str], pattern: str) -> int:
    """One more than the largest N in keys matching ``pattern`` (a regex with one ``(\\d+)`` group); 0 if none."""
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return (max(found) + 1) if found else 0


def _shape(tensors: Mapping[str, Any], key: str, path: str) -> list[int]:
    if key not in tensors:
        raise ModelSourceError(f"{path!r} has no tensor {key!r}; the file is incomplete or not the expected model.")
    t = tensors[key]
    return list(t.shape) if hasattr(t, "shape") else list(t["shape"])


# ---------------------------------------------------------------------------
# Building modules from converted state dicts
# ---------------------------------------------------------------------------


def _instantiate(factory: Callable[[], Any], state_dict: Mapping[str, Any], what: str, path: str, dtype, adapt=None):
    """Build a module without allocating its weights, then adopt the tensors of ``state_dict``.

    ``adapt(own_keys, state_dict)`` may rename the incoming keys to the module's own.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        module = factory()
    own = module.state_dict()
    if adapt is not None:
        state_dict = adapt(list(own), state_dict)
    tensors = {}
    for k, v in state_dict.items():
        if k not in own:
            continue
        if v.is_floating_point() and own[k].is_floating_point():
            v = v.to(dtype)
        tensors[k] = v
    missing = [k for k in own if k not in tensors]
    if missing:
        raise ModelSourceError(
            f"{path!r} lacks {len(missing)} weight(s) of the {what} (for example {', '.join(missing[:3])}); "
            "the file is incomplete or belongs to another model version."
        )
    unused = [k for k in state_dict if k not in own]
    if unused:
        logger.debug("%s: %d tensor(s) not used by the %s, e.g. %s", path, len(unused), what, unused[:3])
    try:
        module.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as e:
        raise ModelSourceError(
            f"the weights in {path!r} do not fit the {what} built from their own shapes ({e}); "
            "the file is damaged or of an unsupported variant."
        ) from e
    leftovers = [n for n, p in module.named_parameters() if p.is_meta]
    leftovers += [n for n, b in module.named_buffers() if b.is_meta]
    if leftovers:
        raise ModelSourceError(f"{path!r} did not provide {', '.join(leftovers[:3])} for the {what}")
    module.eval()
    module.requires_grad_(False)
    return module


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


def zimage_transformer_from_comfy(state_dict: Mapping[str, Any]) -> dict:
    """Rename ComfyUI's Z-Image key names (optionally prefixed) to diffusers', splitting ``qkv``."""
    bare = dict(zip(_strip_diffusion_prefix(state_dict), state_dict.values(), strict=True))
    if "all_x_embedder.2-1.weight" in bare:  # already in diffusers' layout
        return bare
    dim = bare["x_embedder.weight"].shape[0] if "x_embedder.weight" in bare else None
    out: dict = {}
    for key, value in bare.items():
        if key == "norm_final.weight":  # present in some originals, unused by the model
            continue
        if ".attention.qkv." in key:
            base, _, leaf = key.partition(".attention.qkv.")
            rows = value.shape[0]
            q_rows = dim if dim is not None else rows // 3
            kv_rows = (rows - q_rows) // 2
            # Copies, not views: tensors sharing one storage cannot be saved to safetensors later.
            q, k, v = (t.clone() for t in value.split([q_rows, kv_rows, kv_rows], dim=0))
            out[f"{base}.attention.to_q.{leaf}"] = q
            out[f"{base}.attention.to_k.{leaf}"] = k
            out[f"{base}.attention.to_v.{leaf}"] = v
            continue
        new = key
        if new.startswith("x_embedder."):
            new = "all_x_embedder.2-1." + new[len("x_embedder.") :]
        elif new.startswith("final_layer."):
            new = "all_final_layer.2-1." + new[len("final_layer.") :]
        new = new.replace(".attention.out.", ".attention.to_out.0.")
        new = new.replace(".attention.q_norm.", ".attention.norm_q.").replace(
            ".attention.k_norm.", ".attention.norm_k."
        )
        out[new] = value
    return out


def _zimage_transformer_config(shapes: Mapping[str, Any], path: str, meta: Mapping | None) -> dict:
    """Z-Image-Turbo's config with every shape-dependent field read from the (diffusers-named) weights."""
    cfg = _merged(shipped_config("zimage", "transformer"), meta)
    keys = list(shapes)
    dim, patch_in = _shape(shapes, "all_x_embedder.2-1.weight", path)
    p = cfg["all_patch_size"][0]
    f = cfg["all_f_patch_size"][0]
    head_dim = _shape(shapes, "layers.0.attention.norm_q.weight", path)[0]
    kv_rows = _shape(shapes, "layers.0.attention.to_k.weight", path)[0]
    cfg.update(
        dim=dim,
        in_channels=patch_in // (p * p * f),
        n_layers=_count_indices(keys, r"^layers\.(\d+)\."),
        n_refiner_layers=_count_indices(keys, r"^noise_refiner\.(\d+)\."),
        n_heads=dim // head_dim,
        n_kv_heads=kv_rows // head_dim,
        qk_norm=True,
        cap_feat_dim=_shape(shapes, "cap_embedder.0.weight", path)[0],
    )
    if sum(cfg["axes_dims"]) != head_dim:
        base = shipped_config("zimage", "transformer")["axes_dims"]
        scaled = [max(2, round(d * head_dim / sum(base) / 2) * 2) for d in base]
        scaled[0] += head_dim - sum(scaled)
        logger.info("%s: rope axes %s inferred for head size %d", path, scaled, head_dim)
        cfg["axes_dims"] = scaled
    return cfg


# ---------------------------------------------------------------------------
# Qwen3 text encoder
# ---------------------------------------------------------------------------


def qwen3_to_comfy(state_dict: Mapping[str, Any]) -> dict:
    """Qwen3Model keys -> the ``model.``-prefixed layout of ComfyUI's qwen_3_4b.safetensors."""
    return {(k if k.startswith("model.") else "model." + k): v for k, v in state_dict.items()}


def qwen3_from_comfy(state_dict: Mapping[str, Any]) -> dict:
    out = {}
    for k, v in state_dict.items():
        if k.startswith("lm_head."):
            continue
        out[k[len("model.") :] if k.startswith("model.") else k] = v
    return out


def _qwen3_config(shapes: Mapping[str, Any], path: str, meta: Mapping | None) -> dict:
    cfg = _merged(shipped_config("zimage", "text_encoder"), meta)
    if meta and "rope_parameters" in meta:  # newer transformers write rope settings as one entry
        cfg.pop("rope_theta", None)
        cfg.pop("rope_scaling", None)
    vocab, hidden = _shape(shapes, "embed_tokens.weight", path)
    head_dim = _shape(shapes, "layers.0.self_attn.q_norm.weight", path)[0]
    n_layers = _count_indices(shapes, r"^layers\.(\d+)\.")
    cfg.update(
        hidden_size=hidden,
        vocab_size=vocab,
        head_dim=head_dim,
        intermediate_size=_shape(shapes, "layers.0.mlp.gate_proj.weight", path)[0],
        num_hidden_layers=n_layers,
        num_attention_heads=_shape(shapes, "layers.0.self_attn.q_proj.weight", path)[0] // head_dim,
        num_key_value_heads=_shape(shapes, "layers.0.self_attn.k_proj.weight", path)[0] // head_dim,
        attention_bias="layers.0.self_attn.q_proj.bias" in shapes,
    )
    if cfg.get("max_window_layers", 0) > n_layers:
        cfg["max_window_layers"] = n_layers
    return cfg


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


def vae_from_ldm(state_dict: Mapping[str, Any]) -> dict:
    """Original LDM VAE keys -> diffusers AutoencoderKL keys (1x1 conv attention -> linear)."""
    if any(k.startswith("encoder.down_blocks.") for k in state_dict):  # already diffusers
        return dict(state_dict)
    n_up = _count_indices(state_dict, r"^decoder\.up\.(\d+)\.")
    out = {}
    for key, value in state_dict.items():
        m = re.match(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)$", key)
        if m:
            side, name, leaf = m.groups()
            if leaf == "weight" and value.ndim == 4:
                value = value[:, :, 0, 0]
            out[f"{side}.mid_block.attentions.0.{_VAE_ATTN_FROM_LDM[name]}.{leaf}"] = value
            continue
        new = re.sub(r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2.", key)
        new = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", new)
        new = re.sub(
            r"^decoder\.up\.(\d+)\.block\.(\d+)\.",
            lambda mm: f"decoder.up_blocks.{n_up - 1 - int(mm.group(1))}.resnets.{mm.group(2)}.",
            new,
        )
        new = re.sub(
            r"^decoder\.up\.(\d+)\.upsample\.",
            lambda mm: f"decoder.up_blocks.{n_up - 1 - int(mm.group(1))}.upsamplers.0.",
            new,
        )
        new = re.sub(
            r"^(encoder|decoder)\.mid\.block_(\d+)\.",
            lambda mm: f"{mm.group(1)}.mid_block.resnets.{int(mm.group(2)) - 1}.",
            new,
        )
        new = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", new)
        new = new.replace(".nin_shortcut.", ".conv_shortcut.")
        out[new] = value
    return out


def _vae_config(shapes: Mapping[str, Any], path: str, family: str, meta: Mapping | None) -> dict:
    """AutoencoderKL config with channels, depth and latent size read from (diffusers-named) weights."""
    cfg = _merged(shipped_config(family, "vae"), meta)
    levels = _count_indices(shapes, r"^encoder\.down_blocks\.(\d+)\.")
    if levels == 0:
        raise ModelSourceError(f"{path!r} has no VAE encoder weights; it is not a VAE")
    block_out = [_shape(shapes, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", path)[0] for i in range(levels)]
    cfg.update(
        block_out_channels=block_out,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        layers_per_block=_count_indices(shapes, r"^encoder\.down_blocks\.0\.resnets\.(\d+)\."),
        in_channels=_shape(shapes, "encoder.conv_in.weight", path)[1],
        out_channels=_shape(shapes, "decoder.conv_out.weight", path)[0],
        latent_channels=_shape(shapes, "decoder.conv_in.weight", path)[1],
        use_quant_conv="quant_conv.weight" in shapes,
        use_post_quant_conv="post_quant_conv.weight" in shapes,
        mid_block_add_attention="encoder.mid_block.attentions.0.to_q.weight" in shapes,
    )
    return cfg


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


def _ldm_unet_layout(keys: Iterable[str]) -> tuple[int, int, list[bool], list[bool]]:
    """(levels, layers_per_block, attention per down level, attention per up level) from LDM UNet keys."""
    keys = set(keys)
    downs = sorted({int(m.group(1)) for k in keys if (m := re.match(r"^input_blocks\.(\d+)\.0\.op\.", k))})
    n_in = _count_indices(keys, r"^input_blocks\.(\d+)\.")
    if downs:
        lpb = downs[0] - 1
        levels = len(downs) + 1
    else:
        lpb, levels = n_in - 1, 1
    if lpb < 1 or n_in != 1 + levels * lpb + (levels - 1):
        raise ModelSourceError("the UNet's input blocks do not follow SD1.x's layout")
    attn_down = [f"input_blocks.{1 + i * (lpb + 1)}.1.proj_in.weight" in keys for i in range(levels)]
    attn_up = [f"output_blocks.{i * (lpb + 1)}.1.proj_in.weight" in keys for i in range(levels)]
    return levels, lpb, attn_down, attn_up


def unet_from_ldm(state_dict: Mapping[str, Any]) -> dict:
    """Original LDM UNet keys (no prefix) -> diffusers UNet2DConditionModel keys."""
    levels, lpb, attn_down, attn_up = _ldm_unet_layout(state_dict)
    table = {ldm: (d, r) for d, ldm, r in _unet_prefix_pairs(levels, lpb, attn_down, attn_up)}
    return _rename_by_prefix(state_dict, table, _RESNET_FROM_LDM, "SD1.x UNet")


def _unet_config(ldm_shapes: Mapping[str, Any], path: str, meta: Mapping | None) -> dict:
    cfg = _merged(shipped_config("sd1", "unet"), meta)
    levels, lpb, attn_down, attn_up = _ldm_unet_layout(ldm_shapes)
    block_out = [
        _shape(ldm_shapes, f"input_blocks.{1 + i * (lpb + 1)}.0.out_layers.3.weight", path)[0] for i in range(levels)
    ]
    attn_key = next((k for k in ldm_shapes if k.endswith("transformer_blocks.0.attn2.to_k.weight")), None)
    if attn_key is None:
        raise ModelSourceError(f"{path!r} has no cross-attention weights; it is not an SD1.x UNet")
    proj_in = next(k for k in ldm_shapes if k.endswith(".proj_in.weight"))
    depth = _count_indices(
        [k for k in ldm_shapes if k.startswith("middle_block.1.")], r"^middle_block\.1\.transformer_blocks\.(\d+)\."
    )
    cfg.update(
        block_out_channels=block_out,
        layers_per_block=lpb,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn_down],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attn_up],
        cross_attention_dim=_shape(ldm_shapes, attn_key, path)[1],
        in_channels=_shape(ldm_shapes, "input_blocks.0.0.weight", path)[1],
        out_channels=_shape(ldm_shapes, "out.2.weight", path)[0],
        use_linear_projection=len(_shape(ldm_shapes, proj_in, path)) == 2,
        transformer_layers_per_block=max(depth, 1),
    )
    heads = cfg.get("attention_head_dim")
    if isinstance(heads, int) and any(c % heads for c in block_out):
        raise ModelSourceError(f"{path!r}: UNet widths {block_out} do not split into {heads} attention heads")
    return cfg


# ---------------------------------------------------------------------------
# CLIP text encoder
# ---------------------------------------------------------------------------


def _clip_key_from_model(key: str) -> str:
    return key if key.startswith("text_model.") else "text_model." + key


def _clip_config(shapes: Mapping[str, Any], path: str, meta: Mapping | None) -> dict:
    """CLIP ViT-L/14 text config with widths read from ``text_model.*``-named weights."""
    base = shipped_config("sd1", "text_encoder")
    cfg = _merged(base, meta)
    vocab, hidden = _shape(shapes, "text_model.embeddings.token_embedding.weight", path)
    cfg.update(
        hidden_size=hidden,
        vocab_size=vocab,
        max_position_embeddings=_shape(shapes, "text_model.embeddings.position_embedding.weight", path)[0],
        num_hidden_layers=_count_indices(shapes, r"^text_model\.encoder\.layers\.(\d+)\."),
        intermediate_size=_shape(shapes, "text_model.encoder.layers.0.mlp.fc1.weight", path)[0],
    )
    if hidden % cfg["num_attention_heads"]:
        # Head counts are not visible in the weights; 64-wide heads are CLIP's convention.
        cfg["num_attention_heads"] = hidden // 64 if hidden % 64 == 0 else max(1, hidden // 16)
        logger.warning("%s: CLIP attention heads guessed as %d", path, cfg["num_attention_heads"])
    return cfg


# ---------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------


def _find_tokenizer_folder(model_path: str, strip_suffixes: tuple[str, ...] = ()) -> str | None:
    folder = os.path.dirname(model_path)
    stem = os.path.splitext(os.path.basename(model_path))[0]
    stems = [stem] + [stem[: -len(s)] for s in strip_suffixes if stem.endswith(s) and len(stem) > len(s)]
    candidates = [os.path.join(folder, s + "_tokenizer") for s in stems] + [os.path.join(folder, "tokenizer")]
    for c in candidates:
        if os.path.isdir(c):
            return c
    return None


def _load_tokenizer(folder: str | None, model_path: str, family: str, strip_suffixes: tuple[str, ...] = ()):
    from transformers import AutoTokenizer

    if folder is None:
        folder = _find_tokenizer_folder(model_path, strip_suffixes)
    if folder is None:
        stem = os.path.splitext(os.path.basename(model_path))[0]
        for s in strip_suffixes:
            if stem.endswith(s):
                stem = stem[: -len(s)]
        expected = os.path.join(os.path.dirname(model_path), stem + "_tokenizer")
        raise ModelSourceError(
            f"no tokenizer for {model_path!r}: pass a tokenizer folder (tokenizer_config.json with vocab/merges or "
            f"tokenizer.json), or put one at {expected!r}"
        )
    if not os.path.isdir(folder):
        raise ModelSourceError(f"the tokenizer folder {folder!r} does not exist")
    nested = os.path.join(folder, "tokenizer")
    if not os.path.isfile(os.path.join(folder, "tokenizer_config.json")) and os.path.isdir(nested):
        folder = nested  # a model snapshot whose tokenizer sits in tokenizer/
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers raises many kinds here
        raise ModelSourceError(f"cannot load a tokenizer from {folder!r}: {e}") from e
    if family == "zimage" and not getattr(tok, "chat_template", None):
        tok.chat_template = shipped_chat_template()
    return tok


def _save_tokenizer(tokenizer, folder: str) -> str:
    return _atomic_save_dir(lambda tmp: tokenizer.save_pretrained(tmp), folder)


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
    _atomic_save_tensors(
        zimage_transformer_to_comfy(transformer.state_dict()),
        dm_path,
        {
            "transformer": _public_config(transformer.config),
            "scheduler": _public_config(pipe.scheduler.config),
        },
    )
    text_encoder = pipe.text_encoder
    _atomic_save_tensors(
        qwen3_to_comfy(text_encoder.state_dict()),
        te_path,
        {"text_encoder": _transformers_config_dict(text_encoder.config)},
    )
    _atomic_save_tensors(vae_to_ldm(pipe.vae.state_dict()), vae_path, {"vae": _public_config(pipe.vae.config)})
    _save_tokenizer(pipe.tokenizer, tok_dir)
    return {"diffusion_model": dm_path, "text_encoder": te_path, "vae": vae_path, "tokenizer": tok_dir}


def _header_kind(path: str) -> tuple[dict, dict, str | None]:
    header, metadata = read_safetensors_header(path)
    if "scaled_fp8" in header or any(k.endswith((".scale_weight", ".weight_scale")) for k in header):
        raise ModelSourceError(
            f"{path!r} stores scaled fp8 weights, which TurboBooth cannot load; use the bf16 or fp16 "
            "version of this file"
        )
    return header, metadata, classify_keys(header)


def load_zimage_transformer(path: str, dtype=None):
    """A ZImageTransformer2DModel from a ComfyUI (or diffusers-named) single file."""
    import torch
    from diffusers import ZImageTransformer2DModel

    dtype = dtype or torch.float32
    path = _check_file(path, "Z-Image diffusion model")
    header, metadata, kind = _header_kind(path)
    if kind != "zimage_transformer":
        raise _wrong(path, kind, "zimage", "a diffusion model", "Put z_image_turbo_bf16.safetensors (or similar) here.")
    meta = _read_metadata_configs(metadata)
    state = zimage_transformer_from_comfy(_load_tensors(path, dtype))
    cfg = _zimage_transformer_config(state, path, meta.get("transformer"))
    cfg.pop("_class_name", None)
    return _instantiate(lambda: ZImageTransformer2DModel.from_config(cfg), state, "Z-Image transformer", path, dtype)


def load_qwen3_text_encoder(path: str, dtype=None):
    """A transformers Qwen3Model from ComfyUI's qwen_3_4b.safetensors layout (``lm_head`` ignored)."""
    import torch
    from transformers import Qwen3Config, Qwen3Model

    dtype = dtype or torch.float32
    path = _check_file(path, "Qwen3 text encoder")
    header, metadata, kind = _header_kind(path)
    if kind != "qwen3_text_encoder":
        raise _wrong(path, kind, "zimage", "the Qwen3 text encoder", "Z-Image uses qwen_3_4b.safetensors.")
    meta = _read_metadata_configs(metadata)
    state = qwen3_from_comfy(_load_tensors(path, dtype, keep=lambda k: not k.startswith("lm_head.")))
    cfg = _qwen3_config(state, path, meta.get("text_encoder"))
    cfg.pop("model_type", None)
    config = Qwen3Config(**cfg)
    return _instantiate(lambda: Qwen3Model(config), state, "Qwen3 text encoder", path, dtype)


def load_vae(path: str, family: str = "zimage", dtype=None, *, state_dict: Mapping | None = None, meta=None):
    """An AutoencoderKL from an original-layout (LDM/Flux) or diffusers-named VAE file."""
    import torch
    from diffusers import AutoencoderKL

    dtype = dtype or torch.float32
    if state_dict is None:
        path = _check_file(path, "VAE")
        header, metadata, kind = _header_kind(path)
        if kind != "vae":
            raise _wrong(path, kind, family, "a VAE", "Z-Image uses the 16-channel Flux VAE, ae.safetensors.")
        meta = _read_metadata_configs(metadata).get("vae")
        state_dict = _load_tensors(path, dtype)
        for prefix in ("first_stage_model.", "vae."):  # a VAE cut out of a full checkpoint
            if all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    state = vae_from_ldm(state_dict)
    cfg = _vae_config(state, path, family, meta)
    expected = shipped_config(family, "vae")["latent_channels"]
    if cfg["latent_channels"] != expected:
        raise WrongFamilyError(
            f"{path!r} is a VAE with {cfg['latent_channels']} latent channels, but the "
            f"{_FAMILY_LABELS[family]} family (family {family!r}) needs {expected}. "
            + ("Use the Flux VAE ae.safetensors." if family == "zimage" else "Use an SD1.x VAE.")
        )
    cfg.pop("_class_name", None)
    return _instantiate(lambda: AutoencoderKL.from_config(cfg), state, "VAE", path, dtype)


def _scheduler_from(family: str, meta: Mapping | None):
    import diffusers

    cfg = dict(meta or shipped_config(family, "scheduler"))
    name = cfg.get("_class_name") or shipped_config(family, "scheduler")["_class_name"]
    cls = getattr(diffusers, name, None) if isinstance(name, str) and name.endswith("Scheduler") else None
    if cls is None:
        logger.warning("unknown scheduler %r in file metadata; using the shipped one", name)
        cfg = shipped_config(family, "scheduler")
        cls = getattr(diffusers, cfg["_class_name"])
    return cls.from_config(cfg)


def load_zimage_split(diffusion_model: str, text_encoder: str, vae: str, tokenizer: str | None = None, dtype=None):
    """A ZImagePipeline from ComfyUI's split files (diffusion model, Qwen3 text encoder, Flux VAE).

    ``tokenizer`` is a tokenizer folder (ComfyUI's bundled Qwen tokenizer, a hub
    snapshot's ``tokenizer/``...). Without one, ``<text encoder stem>_tokenizer/``
    or ``tokenizer/`` next to the text encoder is used when present.
    """
    import torch
    from diffusers import ZImagePipeline

    dtype = dtype or torch.float32
    dm_path = _check_file(diffusion_model, "Z-Image diffusion model")
    te_path = _check_file(text_encoder, "Qwen3 text encoder")
    vae_path = _check_file(vae, "VAE")
    # Cheap header checks first, so a wrong file fails before gigabytes are read.
    for p, want, what in (
        (dm_path, "zimage_transformer", "a diffusion model"),
        (te_path, "qwen3_text_encoder", "the Qwen3 text encoder"),
        (vae_path, "vae", "a VAE"),
    ):
        kind = _header_kind(p)[2]
        if kind != want:
            raise _wrong(p, kind, "zimage", what)
    tok = _load_tokenizer(tokenizer, te_path, "zimage", strip_suffixes=("_qwen3",))
    meta = _read_metadata_configs(read_safetensors_header(dm_path)[1])
    transformer = load_zimage_transformer(dm_path, dtype)
    te = load_qwen3_text_encoder(te_path, dtype)
    ae = load_vae(vae_path, "zimage", dtype)
    scheduler = _scheduler_from("zimage", meta.get("scheduler"))
    logger.info("loaded Z-Image from split files %s", dm_path)
    return ZImagePipeline(scheduler=scheduler, vae=ae, text_encoder=te, tokenizer=tok, transformer=transformer)


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
        tensors[_SD1_UNET_PREFIX + k] = v
    for k, v in vae_to_ldm(pipe.vae.state_dict()).items():
        tensors[_SD1_VAE_PREFIX + k] = v
    te = pipe.text_encoder
    for k, v in te.state_dict().items():
        tensors[_SD1_CLIP_PREFIX + _clip_key_from_model(k)] = v
    pos_key = _SD1_CLIP_PREFIX + "text_model.embeddings.position_ids"
    if pos_key not in tensors:
        n_pos = te.config.max_position_embeddings
        tensors[pos_key] = torch.arange(n_pos, dtype=torch.int64)[None]
    configs = {
        "unet": _public_config(pipe.unet.config),
        "vae": _public_config(pipe.vae.config),
        "text_encoder": _transformers_config_dict(te.config),
        "scheduler": _public_config(pipe.scheduler.config),
    }
    _atomic_save_tensors(tensors, path, configs)
    _save_tokenizer(pipe.tokenizer, tok_dir)
    return {"sd1_single_file": path, "sd1_tokenizer": tok_dir}


def _split_sd1(tensors: Mapping[str, Any]) -> tuple[dict, dict, dict]:
    unet, vae, clip = {}, {}, {}
    for k, v in tensors.items():
        if k.startswith(_SD1_UNET_PREFIX):
            unet[k[len(_SD1_UNET_PREFIX) :]] = v
        elif k.startswith(_SD1_VAE_PREFIX):
            vae[k[len(_SD1_VAE_PREFIX) :]] = v
        elif k.startswith(_SD1_CLIP_PREFIX):
            rest = k[len(_SD1_CLIP_PREFIX) :]
            clip[rest if rest.startswith("text_model.") else "text_model." + rest] = v
    return unet, vae, clip


def load_sd1_single_file(path: str, tokenizer: str | None = None, dtype=None):
    """A StableDiffusionPipeline from an original-layout SD1.x ``.safetensors`` checkpoint.

    ``tokenizer`` is a CLIP tokenizer folder (ComfyUI's ``comfy/sd1_tokenizer``, a hub
    snapshot's ``tokenizer/``...). Without one, ``<checkpoint stem>_tokenizer/`` or
    ``tokenizer/`` next to the checkpoint is used when present.
    """
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    dtype = dtype or torch.float32
    path = _check_file(path, "SD1.x checkpoint")
    header, metadata, kind = _header_kind(path)
    if kind != "sd1_checkpoint":
        raise _wrong(
            path,
            kind,
            "sd1",
            "a single-file checkpoint",
            "Z-Image files load as split files (diffusion model, text encoder, VAE)."
            if kind == "zimage_transformer"
            else "",
        )
    meta = _read_metadata_configs(metadata)
    tok = _load_tokenizer(tokenizer, path, "sd1")

    # Only the three model parts are read; EMA copies (model_ema.*) and schedule buffers are skipped.
    unet_sd, vae_sd, clip_sd = _split_sd1(
        _load_tensors(path, dtype, keep=lambda k: k.startswith((_SD1_UNET_PREFIX, _SD1_VAE_PREFIX, _SD1_CLIP_PREFIX)))
    )
    if not vae_sd:
        raise ModelSourceError(f"{path!r} has no VAE (first_stage_model.*) weights; it is not a full checkpoint")
    unet_cfg = _unet_config(unet_sd, path, meta.get("unet"))
    unet_cfg.pop("_class_name", None)
    unet_state = unet_from_ldm(unet_sd)
    unet = _instantiate(lambda: UNet2DConditionModel.from_config(unet_cfg), unet_state, "UNet", path, dtype)
    vae = load_vae(path, "sd1", dtype, state_dict=vae_sd, meta=meta.get("vae"))

    clip_cfg = _clip_config(clip_sd, path, meta.get("text_encoder"))
    clip_cfg.pop("model_type", None)
    config = CLIPTextConfig(**clip_cfg)
    text_encoder = _instantiate(
        lambda: CLIPTextModel(config), clip_sd, "CLIP text encoder", path, dtype, adapt=_adapt_clip_keys
    )

    scheduler = _scheduler_from("sd1", meta.get("scheduler"))
    logger.info("loaded SD1.x single file %s", path)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _adapt_clip_keys(own_keys: list[str], state_dict: Mapping[str, Any]) -> dict:
    """``text_model.*`` keys -> the module's own naming (some transformers versions drop the prefix)."""
    if any(k.startswith("text_model.") for k in own_keys):
        return dict(state_dict)
    return {k[len("text_model.") :] if k.startswith("text_model.") else k: v for k, v in state_dict.items()}
