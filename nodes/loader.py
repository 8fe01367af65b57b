"""TurboLoader: a model source -> TURBO_MODEL from the shared cache."""

from __future__ import annotations

import os

from . import comfy as host

SOURCES = ("diffusers folder", "hub repo", "split files", "single file")
DEVICES = ("auto", "cpu", "cuda", "cuda:0", "cuda:1")


def _choices(items: list[str], default: str | None = None) -> list[str]:
    out = list(items)
    if default and default not in out:
        out.append(default)
    return out or [host.NONE]


def _text_encoder_files() -> list[str]:
    """Text encoders ComfyUI knows: models/text_encoders, plus the older models/clip name."""
    return sorted(set(host.folder_list("text_encoders")) | set(host.folder_list("clip")))


def _beside_tokenizer(path: str | None, strip: tuple = ()) -> str | None:
    """A tokenizer folder next to a weights file: ``<stem>_tokenizer`` or ``tokenizer``."""
    if not path:
        return None
    stem = os.path.splitext(path)[0]
    stems = [stem] + [stem[: -len(s)] for s in strip if stem.endswith(s)]
    for cand in [s + "_tokenizer" for s in stems] + [os.path.join(os.path.dirname(path), "tokenizer")]:
        if os.path.isdir(cand):
            return cand
    return None


class TurboLoader:
    DESCRIPTION = (
        "Loads Z-Image-Turbo or Stable Diffusion 1.x once into TurboBooth's shared cache. "
        "Sources: a diffusers folder in models/diffusers, a Hugging Face repo id + revision, "
        "ComfyUI's split Z-Image files, or an SD1.x single-file checkpoint (.safetensors only)."
    )
    CATEGORY = "TurboBooth"
    RETURN_TYPES = ("TURBO_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        from ..manager.spec import DTYPES, OFFLOADS

        return {
            "required": {
                "source": (list(SOURCES), {"default": "diffusers folder", "tooltip": "Where the weights come from."}),
                "diffusers_model": (_choices(host.diffusers_folders()), {"tooltip": "A folder in models/diffusers with model_index.json."}),
                "repo_id": ("STRING", {"default": "Tongyi-MAI/Z-Image-Turbo", "tooltip": "Hugging Face repo id (hub repo mode). Set HF_TOKEN for gated repos; HF_HUB_OFFLINE=1 uses only the local cache."}),
                "revision": ("STRING", {"default": "main", "tooltip": "Branch, tag or commit (hub repo mode)."}),
                "diffusion_model": (_choices(host.folder_list("diffusion_models")), {"tooltip": "Split files: the Z-Image diffusion model, e.g. z_image_turbo_bf16.safetensors."}),
                "text_encoder": (_choices(_text_encoder_files()), {"tooltip": "Split files: the Qwen3 text encoder, e.g. qwen_3_4b.safetensors."}),
                "vae": (_choices(host.folder_list("vae")), {"tooltip": "Split files: the VAE, e.g. ae.safetensors."}),
                "checkpoint": (_choices(host.folder_list("checkpoints")), {"tooltip": "Single file: an SD1.x checkpoint (.safetensors)."}),
                "family": (["auto", "zimage", "sd1"], {"default": "auto"}),
                "dtype": (list(DTYPES), {"default": "auto", "tooltip": "auto = bf16/fp16 on GPU, fp32 on CPU. fp8 stores the denoiser weights in 8 bits (fits Z-Image-Turbo in 12 GB)."}),
                "device": (list(DEVICES), {"default": "auto", "tooltip": "auto = ComfyUI's device."}),
                "offload": (list(OFFLOADS), {"default": "none", "tooltip": "model = move whole components to the GPU only while used; sequential = lowest VRAM, slowest."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, source, diffusers_model, diffusion_model, text_encoder, vae, checkpoint):
        """Check only the dropdowns of the chosen source (the others may list nothing on this machine)."""
        checks = {
            "diffusers folder": [("diffusers_model", diffusers_model, host.diffusers_folders(), "models/diffusers")],
            "split files": [
                ("diffusion_model", diffusion_model, host.folder_list("diffusion_models"), "models/diffusion_models"),
                ("text_encoder", text_encoder, _text_encoder_files(), "models/text_encoders"),
                ("vae", vae, host.folder_list("vae"), "models/vae"),
            ],
            "single file": [("checkpoint", checkpoint, host.folder_list("checkpoints"), "models/checkpoints")],
        }
        if source not in SOURCES:
            return f"source {source!r} is not one of: {', '.join(SOURCES)}"
        for name, value, options, where in checks.get(source, []):
            if value not in options and not (name == "diffusers_model" and os.path.isdir(str(value))):
                return f"{name} {value!r} was not found in {where}; download it there or choose another source"
        return True

    def load(self, source, diffusers_model, repo_id, revision, diffusion_model, text_encoder, vae, checkpoint,
             family, dtype, device, offload):
        from ..manager.cache import get_model
        from ..manager.errors import ModelSourceError
        from ..manager.spec import ModelSpec

        device = host.torch_device() if device == "auto" else device
        if source == "diffusers folder":
            path = host.diffusers_folder_path(diffusers_model)
            if path is None:
                raise ModelSourceError(
                    f"diffusers model {diffusers_model!r} was not found in models/diffusers; "
                    "put a folder with model_index.json there (or choose another source)"
                )
            spec = ModelSpec(path, kind="diffusers", family=family, dtype=dtype, device=device, offload=offload)
        elif source == "hub repo":
            spec = ModelSpec(repo_id.strip(), kind="hub", revision=(revision or "main").strip(), family=family,
                             dtype=dtype, device=device, offload=offload)
        elif source == "split files":
            files = {}
            for kind, name, label in (("diffusion_models", diffusion_model, "diffusion_model"),
                                      ("text_encoders", text_encoder, "text_encoder"), ("vae", vae, "vae")):
                p = host.full_path(kind, name) or (host.full_path("clip", name) if kind == "text_encoders" else None)
                if p is None:
                    raise ModelSourceError(f"{label} file {name!r} was not found in models/{kind}")
                files[label] = p
            tok = _beside_tokenizer(files["text_encoder"], ("_qwen3",)) or host.comfy_bundled_tokenizer("zimage")
            spec = ModelSpec(files["diffusion_model"], kind="split", text_encoder=files["text_encoder"], vae=files["vae"],
                             tokenizer=tok, family=family, dtype=dtype, device=device, offload=offload)
        elif source == "single file":
            p = host.full_path("checkpoints", checkpoint)
            if p is None:
                raise ModelSourceError(f"checkpoint {checkpoint!r} was not found in models/checkpoints")
            tok = _beside_tokenizer(p) or host.comfy_bundled_tokenizer("sd1")
            spec = ModelSpec(p, kind="single_file", tokenizer=tok, family=family, dtype=dtype, device=device, offload=offload)
        else:
            raise ModelSourceError(f"source {source!r} is not one of: {', '.join(SOURCES)}")
        from ..manager.cache import CACHE

        if spec not in CACHE:
            host.make_room(device, host.estimate_bytes([spec.source, spec.text_encoder, spec.vae]))
        model = get_model(spec)
        host.share_memory(model)
        return (model,)
