"""Single-file weights: telling files apart, and loading ComfyUI's split Z-Image files and SD1.x single files.

Loading is diffusers' and transformers' own: ``ZImageTransformer2DModel`` / ``AutoencoderKL`` /
``StableDiffusionPipeline.from_single_file(config=<folder>)`` and ``Qwen3Model.from_pretrained(None, config=,
state_dict=)``. The config folder is the real models' configs shipped in ``manager/configs/``, or, for files
TurboBooth wrote (see :mod:`.writers`), the exact configs in the file's own metadata. Nothing is downloaded.
What is ours is the classification of a file by its key names, so a wrong file gets a message that says what it
is, and the tokenizer lookup beside the weights.

Every weights file first passes :func:`check_safetensors`: safetensors' own ``safe_open`` decides whether a file
is valid. Only a file it rejects is examined further, to tell the user *why*: a pickle or a zip archive
(``torch.save``) is recognised by its real signature, anything else is corrupt or truncated. A valid safetensors
file is therefore never refused, whatever its first bytes (its header length) happen to be.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable

from .errors import ModelSourceError, UnsafeFileError, WrongFamilyError, explained, get_logger
from .families import defaults_for
from .writers import METADATA_CONFIG_KEY, SD1_CLIP_PREFIX, SD1_UNET_PREFIX, SD1_VAE_PREFIX

logger = get_logger(__name__)

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
#: SD1.x pipelines load without the NSFW safety checker
NO_SAFETY_CHECKER = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)

# ---------------------------------------------------------------- the safetensors check

#: Suffixes of pickle-based checkpoint files; refused before they are opened.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
# After PROTO (0x80, protocol 2..5) a pickle stream continues with FRAME (protocol 4+) or an opcode that starts
# an object: EMPTY_DICT, EMPTY_LIST, EMPTY_TUPLE, MARK, GLOBAL, STACK_GLOBAL's SHORT_BINUNICODE, BINPUT, ...
_AFTER_PROTO = frozenset(b"\x95}])(c\x8cqX\x93NKJM\x8a")


def looks_like_pickle(path: str) -> bool:
    """True for a zip archive or a raw pickle stream (protocol 2-5), judged by the bytes, not the suffix."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    if head.startswith(b"PK\x03\x04"):  # zip, as torch.save writes
        return True
    return len(head) >= 3 and head[0] == 0x80 and 2 <= head[1] <= 5 and head[2] in _AFTER_PROTO


def _pickle_error(path: str, why: str) -> UnsafeFileError:
    return UnsafeFileError(
        f"{path!r} is {why}; TurboBooth loads only .safetensors weights, because "
        "pickle files can run arbitrary code when opened. Use the .safetensors version of this file."
    )


def check_safetensors(path: str, role: str = "weights") -> dict[str, str]:
    """Make sure ``path`` is a complete safetensors file; return its metadata.

    Raises UnsafeFileError for pickles and zip archives, ModelSourceError for a
    missing, empty, corrupt or truncated file. Reads the header only.
    """
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "does not exist"
        raise ModelSourceError(f"the {role} file {path!r} {what}; give the path of a .safetensors file")
    suffix = os.path.splitext(path)[1].lower()
    if suffix in PICKLE_SUFFIXES:
        raise _pickle_error(path, f"a pickle-based checkpoint ({suffix})")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        if looks_like_pickle(path):
            raise _pickle_error(path, "a pickle or zip archive despite its name") from e
        size = os.path.getsize(path)
        raise ModelSourceError(
            f"{path!r} is corrupt or truncated ({size} bytes; {e}); it is not a complete safetensors file. "
            "Delete it and re-download it."
        ) from e


def safetensors_keys(path: str) -> list[str]:
    """The tensor names of a checked safetensors file (header only)."""
    from safetensors import safe_open

    check_safetensors(path)
    with safe_open(path, framework="pt", device="cpu") as f:
        return list(f.keys())


# ---------------------------------------------------------------- what a file holds

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


def classify_keys(keys: Iterable[str]) -> str | None:
    """What a safetensors file holds, judged from its key names: a kind of ``_KIND_LABELS``, or None if unknown."""
    keys = list(keys)
    if any(".lora_A." in k or ".lora_down." in k or k.startswith("lora_unet_") for k in keys):
        return "lora"
    if any(k.startswith(SD1_UNET_PREFIX + "input_blocks.") for k in keys):  # original layout: told by its text model
        text = {"conditioner.embedders.": "sdxl_checkpoint", "cond_stage_model.model.": "sd2_checkpoint",
                SD1_CLIP_PREFIX: "sd1_checkpoint"}
        return next((kind for prefix, kind in text.items() if any(k.startswith(prefix) for k in keys)), "ldm_unet")
    bare = {re.sub(r"^(model\.)?diffusion_model\.", "", k) for k in keys}  # how bare diffusion models are stored
    if ("cap_embedder.1.weight" in bare and ("x_pad_token" in bare or "x_embedder.weight" in bare)) or (
        "all_x_embedder.2-1.weight" in bare
    ):
        return "zimage_transformer"
    if any(k.startswith(("double_blocks.", "transformer_blocks.0.attn.add_q_proj")) for k in bare):
        return "flux_transformer"
    if "input_blocks.0.0.weight" in bare:
        return "ldm_unet"
    if "conv_in.weight" in keys and any(k.startswith("down_blocks.") for k in keys):
        return "diffusers_unet"
    encoder = any(k.startswith(("encoder.down.", "encoder.down_blocks.")) for k in keys)
    if encoder and any(k.startswith("decoder.") for k in keys):
        return "vae"
    if any(k.startswith(SD1_VAE_PREFIX + "encoder.") for k in keys):
        return "vae"
    llm = [k for k in keys if re.match(r"^(model\.)?layers\.\d+\.self_attn\.", k)]
    if llm:
        return "qwen3_text_encoder" if any(k.endswith("self_attn.q_norm.weight") for k in llm) else "llm_text_encoder"
    if any("text_model.encoder.layers." in k or k.startswith("encoder.layers.0.self_attn.k_proj") for k in keys):
        return "clip_text_encoder"
    if any(k.startswith(("encoder.block.", "shared.")) for k in keys):
        return "t5_text_encoder"
    return None


def detect_family_from_keys(keys: Iterable[str]) -> str | None:
    """The model family a file belongs to: "zimage" (diffusion model), "sd1" (single-file checkpoint) or None.

    Component files that several families share (a VAE, a text encoder) give None.
    """
    return _KIND_LABELS.get(classify_keys(keys), (None, None))[1]


# ---------------------------------------------------------------- configs and tokenizers


def shipped_config(family: str, component: str) -> dict:
    """The real model config shipped with the package, e.g. ``shipped_config("zimage", "transformer")``."""
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    with open(os.path.join(CONFIG_DIR, family, component, name), encoding="utf-8") as f:
        return json.load(f)


def shipped_chat_template() -> str:
    with open(os.path.join(CONFIG_DIR, "zimage", "tokenizer", "chat_template.jinja"), encoding="utf-8") as f:
        return f.read()


def _file_configs(path: str) -> dict:
    raw = check_safetensors(path).get(METADATA_CONFIG_KEY)
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        logger.warning("ignoring unreadable %s metadata in %s", METADATA_CONFIG_KEY, path)
        value = {}
    return value if isinstance(value, dict) else {}


@contextlib.contextmanager
def config_folder(family: str, files: Iterable[str], config: str | None = None):
    """A diffusers-layout config folder for ``files``: ``config`` if given, else one built from the files' own
    metadata over the shipped configs (only written when a file carries configs)."""
    if config is not None:
        if not os.path.isfile(os.path.join(config, "model_index.json")):
            raise ModelSourceError(f"config folder {config!r} has no model_index.json; give a diffusers model folder")
        yield config
        return
    found: dict = {}
    for path in files:
        found.update(_file_configs(path))
    if not found:
        yield os.path.join(CONFIG_DIR, family)
        return
    with tempfile.TemporaryDirectory(prefix="turbobooth-config-") as tmp:
        shutil.copytree(os.path.join(CONFIG_DIR, family), tmp, dirs_exist_ok=True)
        for component, cfg in found.items():
            name = "scheduler_config.json" if component == "scheduler" else "config.json"
            if os.path.isdir(os.path.join(tmp, component)) and isinstance(cfg, dict):
                with open(os.path.join(tmp, component, name), "w", encoding="utf-8") as f:
                    json.dump({**shipped_config(family, component), **cfg}, f)
        yield tmp


def _tokenizer_places(model_path: str, strip_suffixes: tuple[str, ...]) -> list[str]:
    folder, stem = os.path.split(os.path.splitext(model_path)[0])
    stems = [stem] + [stem[: -len(s)] for s in strip_suffixes if stem.endswith(s) and len(stem) > len(s)]
    return [os.path.join(folder, s + "_tokenizer") for s in stems] + [os.path.join(folder, "tokenizer")]


def find_tokenizer(model_path: str | None, strip_suffixes: tuple[str, ...] = ()) -> str | None:
    """A tokenizer folder beside a weights file: ``<stem>_tokenizer`` (also with a suffix such as ``_qwen3``
    stripped from the stem), or ``tokenizer``."""
    places = _tokenizer_places(model_path, strip_suffixes) if model_path else []
    return next((p for p in places if os.path.isdir(p)), None)


def load_tokenizer(folder: str | None, model_path: str, family: str, strip_suffixes: tuple[str, ...] = ()):
    from transformers import AutoTokenizer

    folder = folder or find_tokenizer(model_path, strip_suffixes)
    if folder is None:
        expected = _tokenizer_places(model_path, strip_suffixes)[-2]
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


# ---------------------------------------------------------------- loading


def check_kind(path: str, want: str, family: str, what: str, hint: str = "") -> None:
    """Refuse a file that does not hold ``want`` (a kind of :func:`classify_keys`), from its header alone."""
    keys = safetensors_keys(path)
    if "scaled_fp8" in keys or any(k.endswith((".scale_weight", ".weight_scale")) for k in keys):
        raise ModelSourceError(
            f"{path!r} stores scaled fp8 weights, which TurboBooth cannot load; use the bf16 or fp16 version of it"
        )
    kind = classify_keys(keys)
    if kind != want:
        found, found_family = _KIND_LABELS.get(kind, ("a file of an unrecognised kind", None))
        found += f" (family {found_family!r})" if found_family else ""
        raise WrongFamilyError(
            f"{path!r} holds {found}, but {what} of the {defaults_for(family).label} family (family {family!r}) was "
            f"expected. {hint}".rstrip()
        )


_MISMATCH = "another model size or variant? pass a config folder of a matching diffusers model"


def load_zimage_split(diffusion_model: str, text_encoder: str, vae: str, tokenizer: str | None = None, dtype=None,
                      config: str | None = None):
    """A ZImagePipeline from ComfyUI's split files (diffusion model, Qwen3 text encoder, Flux VAE).

    ``tokenizer`` is a tokenizer folder; without one, ``<text encoder stem>_tokenizer/`` or ``tokenizer/`` beside
    the text encoder is used. ``config`` is a diffusers Z-Image folder whose configs to use instead.
    """
    import torch
    from diffusers import AutoencoderKL, ZImagePipeline, ZImageTransformer2DModel
    from safetensors.torch import load_file
    from transformers import Qwen3Config, Qwen3Model

    dtype = dtype or torch.float32
    for path, want, role, hint in (
        (diffusion_model, "zimage_transformer", "diffusion model", "Put z_image_turbo_bf16.safetensors here."),
        (text_encoder, "qwen3_text_encoder", "Qwen3 text encoder", "Z-Image uses qwen_3_4b.safetensors."),
        (vae, "vae", "VAE", "Z-Image uses the 16-channel Flux VAE, ae.safetensors."),
    ):
        check_kind(path, want, "zimage", f"the {role}", hint)
    check_latent_channels(vae, "zimage")
    tok = load_tokenizer(tokenizer, text_encoder, "zimage", strip_suffixes=("_qwen3",))
    with config_folder("zimage", (diffusion_model, text_encoder, vae), config) as folder:
        common = dict(config=folder, local_files_only=True, torch_dtype=dtype)
        with explained(f"the Z-Image diffusion model from {diffusion_model!r}", _MISMATCH):
            transformer = ZImageTransformer2DModel.from_single_file(diffusion_model, subfolder="transformer", **common)
        with explained(f"the VAE from {vae!r}", _MISMATCH):
            ae = AutoencoderKL.from_single_file(vae, subfolder="vae", **common)
        state = {k: v for k, v in load_file(text_encoder).items() if not k.startswith("lm_head.")}
        with explained(f"the Qwen3 text encoder from {text_encoder!r}", _MISMATCH):
            te_config = Qwen3Config.from_pretrained(os.path.join(folder, "text_encoder"))
            te = Qwen3Model.from_pretrained(None, config=te_config, state_dict=state, dtype=dtype)
        scheduler = _scheduler(folder)
    logger.info("loaded Z-Image from split files %s", diffusion_model)
    return ZImagePipeline(scheduler=scheduler, vae=ae, text_encoder=te, tokenizer=tok, transformer=transformer)


def _scheduler(folder: str):
    import diffusers

    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    name = str(cfg.get("_class_name"))
    if not name.endswith("Scheduler") or not hasattr(diffusers, name):
        raise ModelSourceError(f"unknown scheduler {name!r} in {path}")
    return getattr(diffusers, name).from_config(cfg)


def check_latent_channels(path: str, family: str, prefix: str = "") -> None:
    """Refuse a VAE of another family from its header: the encoder's last conv gives 2 x latent channels."""
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        key = prefix + "encoder.conv_out.weight"
        found = f.get_slice(key).get_shape()[0] // 2 if key in f.keys() else None
    expected = shipped_config(family, "vae")["latent_channels"]
    if found is not None and found != expected:
        raise WrongFamilyError(
            f"{path!r} is a VAE with {found} latent channels, but the {defaults_for(family).label} family "
            f"(family {family!r}) needs {expected}. "
            + ("Use the Flux VAE ae.safetensors." if family == "zimage" else "Use an SD1.x VAE.")
        )


def load_sd1_single_file(path: str, tokenizer: str | None = None, dtype=None, config: str | None = None):
    """A StableDiffusionPipeline from an original-layout SD1.x ``.safetensors`` checkpoint.

    ``tokenizer`` is a CLIP tokenizer folder; without one, ``<checkpoint stem>_tokenizer/`` or ``tokenizer/``
    beside the checkpoint is used. ``config`` is a diffusers SD1.x folder whose configs to use instead.
    """
    import torch
    from diffusers import StableDiffusionPipeline

    dtype = dtype or torch.float32
    keys = safetensors_keys(path)
    split = classify_keys(keys) == "zimage_transformer"
    hint = "Z-Image files load as split files (diffusion model, text encoder, VAE)." if split else ""
    check_kind(path, "sd1_checkpoint", "sd1", "a single-file checkpoint", hint)
    if not any(k.startswith(SD1_VAE_PREFIX) for k in keys):
        raise ModelSourceError(f"{path!r} has no VAE (first_stage_model.*) weights; it is not a full checkpoint")
    check_latent_channels(path, "sd1", prefix=SD1_VAE_PREFIX)
    tok = load_tokenizer(tokenizer, path, "sd1")
    with config_folder("sd1", [path], config) as folder:
        with explained(f"the SD1.x checkpoint from {path!r}", _MISMATCH):
            pipe = StableDiffusionPipeline.from_single_file(
                path, config=folder, local_files_only=True, torch_dtype=dtype, tokenizer=tok, **NO_SAFETY_CHECKER
            )
    logger.info("loaded SD1.x single file %s", path)
    return pipe
