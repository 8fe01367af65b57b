"""A model: the frozen ModelSpec that identifies it (the cache key), the TurboLoader sources that make one, and
the loaded TurboModel that flows between nodes.

TurboLoader's names come from node widgets, so each resolves inside its own model folder (:func:`.paths.confined`)
or is refused; the folders themselves come from the caller (ComfyUI's folder_paths), so nothing here imports ComfyUI.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidInputError, check_choices
from .families import VARIANTS, model_defaults
from .formats import find_tokenizer
from .paths import confined

FAMILIES = ("auto", "zimage", "sd1")
DTYPES = ("auto", "fp32", "bf16", "fp16", "fp8_e4m3fn", "fp8_e5m2")
OFFLOADS = ("none", "model", "sequential")
KINDS = ("auto", "diffusers", "hub", "split", "single_file")
CHECKPOINT_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
REPO_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*/[A-Za-z0-9_][A-Za-z0-9._-]*$")


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


# ---------------------------------------------------------------- TurboLoader's sources

SOURCES = ("diffusers folder", "hub repo", "split files", "single file")
#: widget -> (model folder kinds it is looked up in, the folder users know it by)
FOLDERS = {
    "diffusers_model": (("diffusers",), "models/diffusers"),
    "diffusion_model": (("diffusion_models", "unet"), "models/diffusion_models"),
    "text_encoder": (("text_encoders", "clip"), "models/text_encoders"),
    "vae": (("vae",), "models/vae"),
    "checkpoint": (("checkpoints",), "models/checkpoints"),
}
SOURCE_WIDGETS = {
    "diffusers folder": ("diffusers_model",),
    "hub repo": (),
    "split files": ("diffusion_model", "text_encoder", "vae"),
    "single file": ("checkpoint",),
}
#: where the files the shipped workflows name come from
WHERE_TO_GET = {
    "z_image_turbo_bf16.safetensors": "Comfy-Org/z_image_turbo, split_files/diffusion_models/z_image_turbo_bf16.safetensors",
    "qwen_3_4b.safetensors": "Comfy-Org/z_image_turbo, split_files/text_encoders/qwen_3_4b.safetensors",
    "ae.safetensors": "Comfy-Org/z_image_turbo, split_files/vae/ae.safetensors",
    "Z-Image-Turbo": "Tongyi-MAI/Z-Image-Turbo (download the whole repo into models/diffusers/Z-Image-Turbo)",
}
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")


def missing_files(source: str, values: dict, available: Callable[[str], list[str]]) -> str | None:
    """One message naming every file the chosen source lacks, its folder and where to get it; None if complete."""
    check_choices(source=(source, SOURCES))
    lines = []
    for widget in SOURCE_WIDGETS[source]:
        name = values.get(widget)
        if name in available(widget):
            continue
        where = FOLDERS[widget][1]
        hint = WHERE_TO_GET.get(str(name))
        lines.append(f"{widget} {name!r} is not in {where}" + (f" (get it from {hint})" if hint else ""))
    if not lines:
        return None
    return f"TurboLoader ({source}) is missing {len(lines)} file(s): " + "; ".join(lines) + \
        ". Put them in those folders, or choose another source."


def check_hub_names(repo_id: str, revision: str) -> tuple[str, str]:
    """A repo id ``owner/name`` and a branch, tag or commit; never a path."""
    repo_id, revision = (repo_id or "").strip(), (revision or "main").strip()
    if not REPO_ID.match(repo_id) or ".." in repo_id:
        raise InvalidInputError(f"repo_id {repo_id!r} must look like 'owner/name', e.g. 'Tongyi-MAI/Z-Image-Turbo'")
    if not _REVISION.match(revision) or ".." in revision:
        raise InvalidInputError(f"revision {revision!r} must be a branch, tag or commit (e.g. 'main'), not a path")
    return repo_id, revision


def spec_for(source: str, values: dict, roots: Callable[[str], list[str]],
             bundled_tokenizer: Callable[[str], str | None], **placement) -> ModelSpec:
    """The ModelSpec for TurboLoader's widgets: ``values`` maps widget names to their values, ``roots(kind)``
    gives ComfyUI's folders of that kind, ``placement`` is family/dtype/device/offload."""
    check_choices(source=(source, SOURCES))

    def path(widget: str) -> str:
        kinds, where = FOLDERS[widget]
        return confined(str(values.get(widget, "")), [r for k in kinds for r in roots(k)], widget, where)

    if source == "hub repo":
        repo, revision = check_hub_names(values.get("repo_id", ""), values.get("revision", "main"))
        return ModelSpec(repo, kind="hub", revision=revision, **placement)
    if source == "diffusers folder":
        return ModelSpec(path("diffusers_model"), kind="diffusers", **placement)
    if source == "split files":
        dm, te, vae = path("diffusion_model"), path("text_encoder"), path("vae")
        tok = find_tokenizer(te, ("_qwen3",)) or bundled_tokenizer("zimage")
        return ModelSpec(dm, kind="split", text_encoder=te, vae=vae, tokenizer=tok, **placement)
    ckpt = path("checkpoint")
    return ModelSpec(ckpt, kind="single_file", tokenizer=find_tokenizer(ckpt) or bundled_tokenizer("sd1"), **placement)


# ---------------------------------------------------------------- the loaded model


@dataclass(eq=False)
class TurboModel:
    """A loaded base pipeline plus what is needed to reuse it safely.

    ``pipe`` is the text-to-image pipeline (ZImagePipeline or
    StableDiffusionPipeline). img2img / inpaint pipelines are built from its
    components on demand, so nothing is loaded twice. The cached base is never
    modified in place: training attaches adapters and removes them again, and
    full fine-tunes work on a copy.
    """

    spec: ModelSpec
    family: str  # "zimage" | "sd1"
    pipe: Any
    identity: str  # stable id of the weights (source, revision, file sizes/mtimes) for on-disk cache keys
    device: str = "cpu"
    nbytes: int = 0
    extras: dict = field(default_factory=dict)
    variant: str = ""  # Z-Image: turbo, base or deturbo
    #: held by whoever runs the pipeline or changes its adapters: sampling and training never overlap
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def denoiser(self):
        return self.pipe.transformer if self.family == "zimage" else self.pipe.unet

    def base_name(self) -> str:
        """The base model as LoRA metadata names it: repo id and revision, or file/folder name and a short
        content hash; never a local path."""
        spec = self.spec
        if spec.resolved_kind() == "hub":
            return f"{spec.source}@{spec.revision or 'main'}"
        return f"{os.path.basename(os.path.normpath(spec.source))}#{hashlib.sha256(self.identity.encode()).hexdigest()[:10]}"

    @property
    def defaults(self):
        """Sampling defaults of this model: the family's, with the Z-Image variant's steps and guidance."""
        return model_defaults(self.family, self.variant)

    @property
    def dtype(self):
        return self.denoiser.dtype

    def __repr__(self) -> str:  # shown in ComfyUI debug output; keep it short
        return f"TurboModel({self.family}, {self.spec.source!r}, rev={self.spec.revision}, device={self.device})"
