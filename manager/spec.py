"""The frozen description of a model to load; the cache key."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .errors import InvalidInputError, check_choices
from .families import VARIANTS

FAMILIES = ("auto", "zimage", "sd1")
DTYPES = ("auto", "fp32", "bf16", "fp16", "fp8_e4m3fn", "fp8_e5m2")
OFFLOADS = ("none", "model", "sequential")
KINDS = ("auto", "diffusers", "hub", "split", "single_file")
CHECKPOINT_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSpec:
    """Everything that identifies one loaded model.

    ``source`` is a diffusers folder, a Hugging Face repo id, a single-file
    checkpoint, or (for ``kind="split"``) the diffusion-model file of
    ComfyUI's split layout, with ``text_encoder`` and ``vae`` beside it.
    """

    source: str
    kind: str = "auto"
    revision: str | None = None
    family: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    offload: str = "none"
    text_encoder: str | None = None
    vae: str | None = None
    tokenizer: str | None = None
    variant: str = "auto"  # Z-Image: auto, turbo, base, deturbo (sets the sampling defaults)

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise InvalidInputError(f"model source must be a non-empty path or repo id, got {self.source!r}")
        check_choices(kind=(self.kind, KINDS), family=(self.family, FAMILIES), dtype=(self.dtype, DTYPES),
                      offload=(self.offload, OFFLOADS), variant=(self.variant, VARIANTS))
        if self.variant != "auto" and self.family == "sd1":
            raise InvalidInputError(f"variant={self.variant!r} is for Z-Image; Stable Diffusion 1.x has none (use 'auto')")
        if self.kind == "split" and (not self.text_encoder or not self.vae):
            raise InvalidInputError(
                "split-file mode needs three files: diffusion model, text encoder and VAE; "
                f"got text_encoder={self.text_encoder!r}, vae={self.vae!r}"
            )
        if self.revision is not None and not isinstance(self.revision, str):
            raise InvalidInputError(f"revision must be a string (branch, tag or commit), got {self.revision!r}")

    def resolved_kind(self) -> str:
        """Guess the source kind when ``kind="auto"``."""
        if self.kind != "auto":
            return self.kind
        if self.text_encoder or self.vae:
            return "split"
        if os.path.isdir(self.source):
            return "diffusers"
        if os.path.splitext(self.source)[1].lower() in CHECKPOINT_SUFFIXES:
            return "single_file"
        if REPO_ID.match(self.source) and not os.path.exists(self.source):
            return "hub"
        return "diffusers"
