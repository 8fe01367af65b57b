"""TurboLoader: a model source -> TURBO_MODEL from the shared cache."""

from __future__ import annotations

import os

from ..manager.spec import FOLDERS, SOURCES
from . import comfy as host

DEVICES = ("auto", "cpu", "cuda", "cuda:0", "cuda:1")


def _listing(widget: str) -> list[str]:
    """What ComfyUI lists for a TurboLoader widget: the folders under models/diffusers that hold a
    model_index.json, or the files of the widget's folders (text encoders also in the older models/clip)."""
    if widget != "diffusers_model":
        return sorted({name for kind in FOLDERS[widget][0] for name in host.folder_list(kind)})
    found = set()
    for root in host.folder_roots("diffusers"):
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            if "model_index.json" in filenames:
                found.add(os.path.relpath(dirpath, root))
                dirnames[:] = []
    return sorted(found)


class TurboLoader(host.Node, returns={"model": "TURBO_MODEL"}, function="load"):
    DESCRIPTION = (
        "Loads Z-Image-Turbo or Stable Diffusion 1.x once into TurboBooth's shared cache. "
        "Sources: a diffusers folder in models/diffusers, a Hugging Face repo id + revision, "
        "ComfyUI's split Z-Image files, or an SD1.x single-file checkpoint (.safetensors only)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        from ..manager.families import VARIANTS
        from ..manager.spec import DTYPES, OFFLOADS

        files = {widget: _listing(widget) or [host.NONE] for widget in FOLDERS}  # "(none)" for an empty folder
        return {
            "required": {
                "source": (list(SOURCES), {"default": "diffusers folder", "tooltip": "Where the weights come from."}),
                "diffusers_model": (files["diffusers_model"], {"tooltip": "A folder in models/diffusers with model_index.json."}),
                "repo_id": ("STRING", {"default": "Tongyi-MAI/Z-Image-Turbo", "tooltip": "Hugging Face repo id (hub repo mode). Set HF_TOKEN for gated repos; HF_HUB_OFFLINE=1 uses only the local cache."}),
                "revision": ("STRING", {"default": "main", "tooltip": "Branch, tag or commit (hub repo mode)."}),
                "diffusion_model": (files["diffusion_model"], {"tooltip": "Split files: the Z-Image diffusion model, e.g. z_image_turbo_bf16.safetensors."}),
                "text_encoder": (files["text_encoder"], {"tooltip": "Split files: the Qwen3 text encoder, e.g. qwen_3_4b.safetensors."}),
                "vae": (files["vae"], {"tooltip": "Split files: the VAE, e.g. ae.safetensors."}),
                "checkpoint": (files["checkpoint"], {"tooltip": "Single file: an SD1.x checkpoint (.safetensors)."}),
                "family": (["auto", "zimage", "sd1"], {"default": "auto"}),
                "dtype": (list(DTYPES), {"default": "auto", "tooltip": "auto = bf16/fp16 on GPU, fp32 on CPU. fp8 stores the denoiser weights in 8 bits (fits Z-Image-Turbo in 12 GB)."}),
                "device": (list(DEVICES), {"default": "auto", "tooltip": "auto = ComfyUI's device."}),
                "offload": (list(OFFLOADS), {"default": "none", "tooltip": "model = move whole components to the GPU only while used; sequential = lowest VRAM, slowest."}),
            },
            "optional": {
                "variant": (list(VARIANTS), {"default": "auto", "tooltip": "Z-Image: Turbo (8 steps, guidance 0), Base or De-Turbo (50 steps, guidance 5). auto reads the model's name and scheduler."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, source, diffusers_model, diffusion_model, text_encoder, vae, checkpoint):
        """Check only the files of the chosen source, all at once: one message names every missing one."""
        values = dict(locals())  # the file widgets by name
        from ..manager.errors import InvalidInputError
        from ..manager.spec import missing_files

        try:
            return missing_files(source, values, _listing) or True
        except InvalidInputError as e:
            return str(e)

    @classmethod
    def IS_CHANGED(cls, source="", **values):
        """A weights file replaced at the same path makes ComfyUI run the node again (and the cache reload it)."""
        from ..manager.loading import file_stamp
        from ..manager.spec import spec_for

        try:
            return file_stamp(spec_for(source, values, host.folder_roots, lambda family: None))
        except Exception:  # a bad choice is reported by VALIDATE_INPUTS and the load itself
            return ""

    def load(self, source, diffusers_model, repo_id, revision, diffusion_model, text_encoder, vae, checkpoint,
             family, dtype, device, offload, variant="auto"):
        values = dict(locals())  # the widgets by name; spec_for reads those of the source
        from ..manager.cache import CACHE, get_model
        from ..manager.loading import estimate_bytes
        from ..manager.spec import spec_for

        device = host.torch_device() if device == "auto" else device
        spec = spec_for(source, values, host.folder_roots, host.comfy_bundled_tokenizer, family=family, dtype=dtype,
                        device=device, offload=offload, variant=variant if family != "sd1" else "auto")
        if spec not in CACHE:
            host.make_room(device, estimate_bytes(spec))
        model = get_model(spec)
        host.share_memory(model)
        return (model,)
