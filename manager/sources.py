"""TurboLoader's sources: which names a source needs, where they live, and the ModelSpec they make.

Names come from node widgets, so each resolves inside its own model folder (:func:`.paths.confined`) or is
refused; the folders themselves come from the caller (ComfyUI's folder_paths), so nothing here imports ComfyUI.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from .errors import InvalidInputError
from .formats import find_tokenizer
from .paths import confined
from .spec import ModelSpec

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
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_source(source: str) -> None:
    if source not in SOURCES:
        raise InvalidInputError(f"source {source!r} is not one of: {', '.join(SOURCES)}")


def missing_files(source: str, values: dict, available: Callable[[str], list[str]]) -> str | None:
    """One message naming every file the chosen source lacks, its folder and where to get it; None if complete."""
    check_source(source)
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
    if not _REPO.match(repo_id) or ".." in repo_id:
        raise InvalidInputError(f"repo_id {repo_id!r} must look like 'owner/name', e.g. 'Tongyi-MAI/Z-Image-Turbo'")
    if not _REVISION.match(revision) or ".." in revision:
        raise InvalidInputError(f"revision {revision!r} must be a branch, tag or commit (e.g. 'main'), not a path")
    return repo_id, revision


def spec_for(source: str, values: dict, roots: Callable[[str], list[str]],
             bundled_tokenizer: Callable[[str], str | None], **placement) -> ModelSpec:
    """The ModelSpec for TurboLoader's widgets: ``values`` maps widget names to their values, ``roots(kind)``
    gives ComfyUI's folders of that kind, ``placement`` is family/dtype/device/offload."""
    check_source(source)

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
