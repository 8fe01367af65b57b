"""Saving trained results: LoRA files and fully fine-tuned models, atomically and without silent overwrites."""

from __future__ import annotations

from .errors import InvalidInputError
from .paths import atomic_dir, check_writable, safe_name, unique_path


def save_lora(lora, folder: str, name: str, overwrite: bool = False) -> str:
    """Write ``lora`` to ``folder/<name>.safetensors`` (auto-incremented unless ``overwrite``)."""
    from .lora import save_lora_file

    check_writable(folder)
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
        from .writers import write_sd1_checkpoint

        return write_sd1_checkpoint(model.pipe, unique_path(folder, stem, ".safetensors", overwrite=overwrite))
    if model_format != "diffusers folder":
        raise InvalidInputError(f"model_format {model_format!r} is not one of: diffusers folder, single file (SD1.x)")
    path = unique_path(folder, stem, "", overwrite=overwrite)
    atomic_dir(path, lambda tmp: model.pipe.save_pretrained(tmp, safe_serialization=True), overwrite=overwrite)
    return path
