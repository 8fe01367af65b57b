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
* SD1.x: kohya ``lora_unet_<module>.lora_down.weight`` / ``lora_up.weight`` / ``alpha`` and ``lora_te_...``.

Ours, because no library has it: reading ComfyUI's own trainer output (fused ``attention.qkv``), see
:mod:`.lora_layouts`.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from .errors import InvalidInputError, WrongFamilyError

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
        """A LoRA from peft state dicts (``get_peft_model_state_dict`` of the denoiser / text encoder)."""
        from .lora_layouts import peft_to_file

        return cls(family, peft_to_file(family, state_dict, float(alpha), text_encoder_state_dict or {}),
                   metadata or {}, name)

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


def _adapter_layers(model, name: str) -> list:
    """The layers of the denoiser and text encoder that carry the adapter ``name`` (peft's ``lora_A`` containers)."""
    roots = (model.denoiser, getattr(model.pipe, "text_encoder", None))
    modules = (m for root in roots if root is not None for _, m in root.named_modules())
    return [m for m in modules if name in (getattr(m, "lora_A", None) or {})]


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
    layers = _adapter_layers(model, adapter_name)
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
# files
# ---------------------------------------------------------------------------


def file_metadata(lora: TurboLora) -> dict[str, str]:
    """LoRA managers' conventions: ``modelspec.*`` and kohya's ``ss_*``, plus ours; never a local path."""
    from .lora_layouts import standard_metadata

    meta = dict(lora.metadata)
    meta.update(standard_metadata(lora))
    meta.update({"turbobooth_format": FORMAT_VERSION, "turbobooth_family": lora.family, "turbobooth_name": lora.name})
    return {str(k): str(v) for k, v in meta.items()}


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
    """Read a LoRA file of any layout :mod:`.lora_layouts` knows; the family comes from its keys or metadata."""
    from safetensors.torch import load_file

    from .lora_layouts import normalise
    from .safety import check_safetensors

    path = os.fspath(path)
    meta = check_safetensors(path, "LoRA")
    tensors = load_file(path)
    if not tensors:
        raise InvalidInputError(f"{os.path.basename(path)!r} holds no tensors; it is not a LoRA")
    family, tensors = normalise(tensors, meta, os.path.basename(path))
    meta.pop("format", None)
    user = {k: v for k, v in meta.items() if not k.startswith("turbobooth_")}
    return TurboLora(family, tensors, user, meta.get("turbobooth_name", os.path.splitext(os.path.basename(path))[0]))


__all__ = ["TurboLora", "applied", "attach", "file_metadata", "load_lora_file", "save_lora_file"]
