"""Saving trained results: LoRA files and fully fine-tuned models, atomically and without silent overwrites."""

from __future__ import annotations

import os
import shutil
import tempfile

from .errors import InvalidInputError, get_logger
from .paths import atomic_dir, check_writable, safe_name, unique_path

logger = get_logger(__name__)


def save_lora(lora, folder: str, name: str, overwrite: bool = False) -> str:
    """Write ``lora`` to ``folder/<name>.safetensors`` (auto-incremented unless ``overwrite``)."""
    from .lora import save_lora_file

    check_writable(folder)
    stem = safe_name(name[:-12] if name.endswith(".safetensors") else name, "turbobooth_lora")
    path = unique_path(folder, stem, ".safetensors", overwrite=overwrite)
    save_lora_file(lora, path)
    logger.info("saved LoRA to %s", path)
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
        from .writers import save_sd1_single_file

        path = unique_path(folder, stem, ".safetensors", overwrite=overwrite)
        tmp_root = tempfile.mkdtemp(prefix=".turbobooth-export-", dir=folder)
        try:
            written = save_sd1_single_file(model.pipe, tmp_root, name=stem)
            os.replace(written["sd1_single_file"], path)
            tok = written.get("sd1_tokenizer")
            if tok and os.path.isdir(tok):
                tok_final = os.path.splitext(path)[0] + "_tokenizer"
                if os.path.exists(tok_final):
                    shutil.rmtree(tok_final)
                os.replace(tok, tok_final)
        finally:
            shutil.rmtree(tmp_root, ignore_errors=True)
        return path
    if model_format != "diffusers folder":
        raise InvalidInputError(f"model_format {model_format!r} is not one of: diffusers folder, single file (SD1.x)")
    path = unique_path(folder, stem, "", overwrite=overwrite)
    atomic_dir(path, lambda tmp: model.pipe.save_pretrained(tmp, safe_serialization=True), overwrite=overwrite)
    return path
