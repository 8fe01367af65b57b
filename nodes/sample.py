"""TurboSample: prompts (one per line) -> IMAGE + LATENT."""

from __future__ import annotations

import os

from . import comfy as host

SAMPLERS = ("euler", "dpmpp_2m", "unipc", "euler_a", "ddim")
MAX_SEED = 2**64 - 1  # what the seed widget allows; every value works (seed + i wraps)

STRENGTH = ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05})
#: TurboSample's widgets; the optional inputs are built per call (the LoRA file list can change)
_REQUIRED = {
    "model": ("TURBO_MODEL",),
    "prompt": ("STRING", {"multiline": True, "default": "a photo of a red fox in fresh snow, golden hour, sharp focus"}),
    "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED}),
    "steps": ("INT", {"default": 0, "min": 0, "max": 200, "tooltip": "0 = family default (Z-Image-Turbo 8, SD1.x 25)."}),
    "width": ("INT", {"default": 1024, "min": 16, "max": 4096, "step": 8}),
    "height": ("INT", {"default": 1024, "min": 16, "max": 4096, "step": 8}),
    "images_per_prompt": ("INT", {"default": 1, "min": 1, "max": 64}),
    "sampler": (list(SAMPLERS), {"default": "euler", "tooltip": "Z-Image: euler (flow-matching), dpmpp_2m or unipc with flow sigmas."}),
    "shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 20.0, "step": 0.1, "tooltip": "Z-Image timestep shift; 0 = the model's (3.0 for Turbo)."}),
}


class TurboSample:
    DESCRIPTION = (
        "Generates one image per prompt line (times images_per_prompt). Prompt i uses seed + i, so a prompt "
        "gives the same image alone or in a batch. steps 0 = the family default (Z-Image-Turbo 8, SD1.x 25). "
        "Connect an init image for img2img (the output then takes its size), plus a mask for inpainting."
    )
    CATEGORY = "TurboBooth"
    RETURN_TYPES = ("IMAGE", "LATENT")
    RETURN_NAMES = ("images", "latent")
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": dict(_REQUIRED),
            "optional": {
                "guidance": ("TURBO_GUIDANCE",),
                "lora": ("TURBO_LORA",),
                "lora_strength": STRENGTH,
                "lora_file": ([host.NONE] + host.folder_list("loras"), {"default": host.NONE, "tooltip": "A LoRA file from models/loras."}),
                "lora_file_strength": STRENGTH,
                "init_image": ("IMAGE",),
                "mask": ("MASK",),
                "lora_2": ("TURBO_LORA", {"tooltip": "A second trained LoRA, applied together with the first."}),
                "lora_2_strength": STRENGTH,
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "With an init image: 1 repaints fully, lower keeps more of it. The output takes the init image's size."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, lora_file=host.NONE, **_):
        """A LoRA file replaced at the same path makes ComfyUI run the node again."""
        try:
            path = host.full_path("loras", lora_file)
            st = os.stat(path) if path else None
        except Exception:  # reported by the run itself
            return ""
        return f"{st.st_size}:{st.st_mtime_ns}" if st else ""

    def sample(self, model, prompt, seed, steps, width, height, images_per_prompt, sampler, shift,
               guidance=None, lora=None, lora_strength=1.0, lora_file=host.NONE, lora_file_strength=1.0,
               init_image=None, mask=None, denoise=1.0, lora_2=None, lora_2_strength=1.0):
        from ..manager.cache import ensure_loaded
        from ..manager.sampling import generate

        model = ensure_loaded(model)
        loras = _loras(((lora, lora_strength), (lora_2, lora_2_strength)), lora_file, lora_file_strength)
        host.share_memory(model)
        sized = init_image is None  # img2img takes the init image's size
        result = generate(
            model, prompt, seed=int(seed), steps=int(steps) or None, width=int(width) if sized else None,
            height=int(height) if sized else None, images_per_prompt=int(images_per_prompt), sampler=sampler,
            shift=shift or None, guidance=guidance, loras=loras, init_image=init_image, denoise=denoise, mask=mask,
            on_step=host.Progress(steps or model.defaults.steps), should_stop=host.interrupted,
            preview=host.latent_previewer(model),
        )
        return (result.images, {"samples": result.latents})


def _loras(connected, lora_file: str, lora_file_strength: float) -> list:
    """(TurboLora, strength) pairs: the connected ones, then the file picked from models/loras."""
    loras = [(adapter, strength) for adapter, strength in connected if adapter is not None]
    path = host.full_path("loras", lora_file)
    if path is not None:
        from ..manager.lora import load_lora_file

        loras.append((load_lora_file(path), lora_file_strength))
    return loras
