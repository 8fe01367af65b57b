"""LoRA adapters: the TURBO_LORA object, applying LoRAs to a cached pipeline, and LoRA files.

diffusers and peft do the work. Files are read with ``<Pipeline>.lora_state_dict``, whose converters know
ai-toolkit's ``diffusion_model.*``, kohya/musubi-tuner's ``lora_unet_*`` (``lora_down``/``lora_up`` + ``alpha``),
DiffSynth's peft ``*.lora_A.default.*`` and diffusers' own layouts. LoRAs are attached with
``load_lora_weights``, weighted with ``set_adapters`` and removed with ``unload_lora_weights``, which puts the
original modules back, so the cached base is never changed. Trained adapters come from peft's
``get_peft_model_state_dict``; SD1.x files are written with diffusers' ``convert_state_dict_to_kohya``.

A :class:`TurboLora` holds the tensors exactly as its file holds them:

* Z-Image: ``diffusion_model.<module>.lora_A.weight`` / ``lora_B.weight`` plus an explicit
  ``diffusion_model.<module>.alpha`` (ComfyUI's LoraLoader ignores alphas kept only in the header);
* SD1.x: kohya ``lora_unet_<module>.lora_down.weight`` / ``lora_up.weight`` / ``alpha``, and the
  ``lora_te_text_model_...`` naming ComfyUI expects for SD1.x text encoders.

Ours, because no library reads it: ComfyUI's own trainer output (``comfy_extras/nodes_train.py``) names
ComfyUI's Z-Image modules: a fused ``attention.qkv`` (its LoRA has one shared ``lora_down`` and a ``lora_up``
stacked q/k/v), ``x_embedder`` and ``final_layer``, plus full ``.diff``/``.diff_b`` deltas of norms and biases.
The fused LoRA is split onto ``to_q``/``to_k``/``to_v`` (same down matrix, one third of the up matrix each) and
the names are mapped to diffusers'. The deltas are not LoRA weights; they are dropped with a warning.
"""

from __future__ import annotations

import datetime
import math
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from .errors import InvalidInputError, WrongFamilyError, get_logger

logger = get_logger(__name__)

FORMAT_VERSION = "2"
ADAPTER_PREFIX = "turbobooth_"
_DOWN_KEYS = (".lora_A.weight", ".lora_down.weight", ".lora_A.default.weight")


@dataclass(eq=False)
class TurboLora:
    """A LoRA for one model family: its file tensors, metadata strings and a display name."""

    family: str
    tensors: dict
    metadata: dict = field(default_factory=dict)
    name: str = "lora"

    def __post_init__(self) -> None:
        if self.family not in ("zimage", "sd1"):
            raise InvalidInputError(f"LoRA family must be 'zimage' or 'sd1', got {self.family!r}")
        if not any(k.endswith(_DOWN_KEYS) for k in self.tensors):
            raise InvalidInputError("a LoRA needs at least one lora_A/lora_B (or lora_down/lora_up) pair; got none")
        self.metadata = {str(k): str(v) for k, v in (self.metadata or {}).items()}

    @classmethod
    def from_peft(cls, family: str, state_dict: dict, alpha: float, text_encoder_state_dict: dict | None = None,
                  metadata: dict | None = None, name: str = "lora") -> TurboLora:
        """A LoRA in our file layout from peft state dicts (``get_peft_model_state_dict`` of the denoiser / text
        encoder, module names as in the diffusers model)."""
        import torch
        from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

        alpha_t = torch.tensor(float(alpha), dtype=torch.float32)
        te = text_encoder_state_dict or {}
        if family == "zimage":
            if te:
                raise InvalidInputError("Z-Image LoRA files hold the transformer only; text-encoder LoRA is SD1.x-only")
            out = {f"diffusion_model.{k}": v for k, v in state_dict.items()}
            for k in state_dict:
                if k.endswith(".lora_A.weight"):
                    out[f"diffusion_model.{k.removesuffix('.lora_A.weight')}.alpha"] = alpha_t.clone()
            return cls(family, out, metadata, name)
        both = {**{f"unet.{k}": v for k, v in state_dict.items()}, **{f"text_encoder.{k}": v for k, v in te.items()}}
        out = {}
        for key, value in convert_state_dict_to_kohya(both).items():
            if key.startswith("lora_te1_"):  # SD1.x kohya names CLIP "lora_te_text_model_..." (ComfyUI reads that)
                rest = key.removeprefix("lora_te1_")
                key = "lora_te_" + (rest if rest.startswith("text_model_") else "text_model_" + rest)
            out[key] = alpha_t.clone() if key.endswith(".alpha") else value
        return cls(family, out, metadata, name)

    @property
    def down_keys(self) -> list[str]:
        return [k for k in self.tensors if k.endswith(_DOWN_KEYS)]

    @property
    def rank(self) -> int:
        ranks = [int(self.tensors[k].shape[0]) for k in self.down_keys]
        return max(set(ranks), key=ranks.count)

    @property
    def alpha(self) -> float:
        found = [float(v.float().item()) for k, v in self.tensors.items() if k.endswith(".alpha")]
        return max(set(found), key=found.count) if found else float(self.rank)

    @property
    def touches_text_encoder(self) -> bool:
        return any(k.startswith(("lora_te", "text_encoder.")) for k in self.tensors)

    @property
    def trigger(self) -> str:
        return self.metadata.get("trigger", "")

    def check_finite(self) -> None:
        """Refuse NaN/Inf weights: they would turn every image black."""
        bad = [k for k, v in self.tensors.items() if v.is_floating_point() and not bool(v.isfinite().all())]
        if bad:
            raise InvalidInputError(
                f"this LoRA has NaN or Inf values in {len(bad)} tensors (e.g. {bad[0]!r}); it is not saved or "
                "applied. Train again with a lower learning rate"
            )

    def __repr__(self) -> str:
        parts = [self.family, f"rank={self.rank}", f"alpha={self.alpha:g}", f"modules={len(self.down_keys)}"]
        if self.trigger:
            parts.append(f"trigger={self.trigger!r}")
        return f"TurboLora({', '.join(parts)})"


# ---------------------------------------------------------------------------
# applying
# ---------------------------------------------------------------------------


def attach(model, lora: TurboLora, adapter_name: str) -> None:
    """Load ``lora`` into ``model``'s pipeline as the adapter ``adapter_name`` (diffusers' ``load_lora_weights``).

    Raises WrongFamilyError when the LoRA is for the other family, or when its modules or shapes do not fit.
    """
    import torch

    if lora.family != model.family:
        raise WrongFamilyError(
            f"this LoRA is for {lora.family!r} models but the loaded model is {model.family!r}; "
            "load a LoRA trained for this model family"
        )
    try:
        model.pipe.load_lora_weights(dict(lora.tensors), adapter_name=adapter_name)
    except (RuntimeError, ValueError, KeyError) as e:
        raise WrongFamilyError(
            f"this LoRA does not fit the loaded model ({str(e)[:300]}); it was probably trained for another model "
            "size or family"
        ) from e
    roots = (model.denoiser, getattr(model.pipe, "text_encoder", None))
    modules = (m for root in roots if root is not None for _, m in root.named_modules())
    layers = [m for m in modules if adapter_name in (getattr(m, "lora_A", None) or {})]  # peft's lora_A containers
    # LoRA layers are created in their base layer's dtype; over a narrow-stored base (fp8, or 16 bits on a CPU) they
    # would hold weights that are slow or impossible to multiply there, so they get the compute dtype
    compute = torch.bfloat16 if str(model.device).startswith("cuda") else torch.float32
    for part in (p for m in layers for p in (m.lora_A[adapter_name], m.lora_B[adapter_name])):
        if part.weight.dtype.itemsize < compute.itemsize:
            part.to(compute)
    expected = len(lora.down_keys)
    if len(layers) < expected:
        raise WrongFamilyError(
            f"this LoRA does not fit the loaded model: only {len(layers)} of its {expected} modules exist in it. "
            "It was probably trained for another model or family."
        )


@contextmanager
def applied(model, loras: Iterable[tuple[TurboLora, float]]) -> Iterator[object]:
    """Attach ``loras`` (``(lora, strength)`` pairs) to ``model``'s pipeline for the ``with`` block.

    Strength 0 and ``None`` LoRAs are skipped. On exit every adapter is unloaded and the original modules are
    back, bit for bit. The caller holds ``model.lock``.
    """
    pairs = []
    for lora, strength in loras or ():
        if lora is None:
            continue
        if not math.isfinite(float(strength)):
            raise InvalidInputError(f"LoRA strength {strength!r} must be a finite number (e.g. 1.0)")
        if float(strength) != 0.0:
            lora.check_finite()
            pairs.append((lora, float(strength)))
    if not pairs:
        yield model
        return
    token = uuid.uuid4().hex[:8]
    names = [f"{ADAPTER_PREFIX}{token}_{i}" for i in range(len(pairs))]
    try:
        for name, (lora, _) in zip(names, pairs, strict=True):
            attach(model, lora, name)
        model.pipe.set_adapters(names, adapter_weights=[s for _, s in pairs])
        yield model
    finally:
        model.pipe.unload_lora_weights()


# ---------------------------------------------------------------------------
# files and their layouts
# ---------------------------------------------------------------------------

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
    blocks = re.search(r"(^|[._])(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)[._]", joined)
    if blocks or re.search(r"^(lora_te\d?_|text_encoder\.|unet\.)", joined, re.M):
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


def file_metadata(lora: TurboLora) -> dict[str, str]:
    """The LoRA's metadata, what LoRA managers read (``modelspec.*``, kohya's ``ss_*``), ours; never a local path."""
    meta = lora.metadata
    res = meta.get("resolution", "")
    base = meta.get("base_model", "")
    zimage = lora.family == "zimage"
    out = {
        **meta,
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
    out.update({"turbobooth_format": FORMAT_VERSION, "turbobooth_family": lora.family, "turbobooth_name": lora.name})
    return {str(k): str(v) for k, v in out.items()}


def save_lora_file(lora: TurboLora, path: str) -> str:
    """Write ``lora`` to ``path`` (``.safetensors``) atomically and return the absolute path."""
    from .writers import save_tensors

    lora.check_finite()
    path = os.path.abspath(os.fspath(path))
    if not path.lower().endswith((".safetensors", ".sft")):
        path += ".safetensors"
    save_tensors(lora.tensors, path, metadata=file_metadata(lora))
    return path


def load_lora_file(path: str) -> TurboLora:
    """Read a LoRA file in any layout the module docstring names; its family comes from its keys or metadata."""
    from diffusers import StableDiffusionPipeline, ZImagePipeline
    from safetensors.torch import load_file

    from .formats import check_safetensors

    path = os.fspath(path)
    label = os.path.basename(path)
    meta = check_safetensors(path, "LoRA")
    tensors = load_file(path)
    if not tensors:
        raise InvalidInputError(f"{label!r} holds no tensors; it is not a LoRA")
    keys = list(tensors)
    family = family_of(keys, meta)
    if family is None:
        raise InvalidInputError(
            f"{label!r} is not a LoRA layout TurboBooth reads ({_FORMATS_HELP}); first key: {keys[0]!r}"
        )
    if family == "zimage" and any(".attention.qkv." in k or k.endswith((".diff", ".diff_b")) for k in keys):
        tensors = _split_comfy_qkv(tensors)
    try:  # diffusers' converters validate the layout; the tensors stay as the file holds them
        if family == "zimage":
            converted = ZImagePipeline.lora_state_dict(dict(tensors))
        else:
            converted, _ = StableDiffusionPipeline.lora_state_dict(dict(tensors))
    except (ValueError, KeyError, RuntimeError) as e:
        raise InvalidInputError(f"{label!r} is not a readable {family} LoRA ({_FORMATS_HELP}): {e}") from e
    if not converted:
        raise InvalidInputError(f"{label!r} holds no LoRA weight pairs ({_FORMATS_HELP})")
    meta.pop("format", None)
    user = {k: v for k, v in meta.items() if not k.startswith("turbobooth_")}
    return TurboLora(family, tensors, user, meta.get("turbobooth_name", os.path.splitext(label)[0]))


__all__ = ["TurboLora", "applied", "attach", "file_metadata", "load_lora_file", "save_lora_file"]
