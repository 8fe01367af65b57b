"""TurboSample: prompts (one per line) -> IMAGE + LATENT; NegativePrompt/CFG: its TURBO_GUIDANCE."""

from __future__ import annotations

from ..manager.inputs import MAX_SEED
from . import comfy as host


class TurboGuidance(host.Node, returns={"guidance": "TURBO_GUIDANCE"}, function="build"):
    DESCRIPTION = (
        "Negative prompt(s) and classifier-free guidance for TurboSample. One negative prompt per line matches "
        "the prompts line by line; one line applies to all. Without this node Z-Image-Turbo runs at guidance 0 "
        "(its distilled setting) and SD1.x at 7.5."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "negative_prompt": ("STRING", {"multiline": True, "default": "blurry, low quality, watermark"}),
                "guidance_scale": ("FLOAT", {"default": 4.0, "min": 0.0, "max": 30.0, "step": 0.1,
                                             "tooltip": "Z-Image: CFG is on whenever this is above 0. SD1.x: above 1."}),
                "cfg_truncation": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                             "tooltip": "Z-Image: stop guidance once this fraction of the schedule has passed (1 = never)."}),
                "cfg_normalization": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0, "step": 0.05,
                                                "tooltip": "Z-Image: cap the guided prediction's norm at this multiple of the conditional one (0 = off)."}),
            },
            "optional": {
                "per_prompt_scales": ("STRING", {"default": "", "tooltip": "Optional comma-separated guidance scales, one per prompt line; overrides guidance_scale."}),
            },
        }

    def build(self, negative_prompt, guidance_scale, cfg_truncation, cfg_normalization, per_prompt_scales=""):
        from ..manager.errors import InvalidInputError
        from ..manager.sampling import Guidance

        negs = tuple(line.strip() for line in (negative_prompt or "").splitlines() if line.strip()) or ("",)
        scales: tuple[float, ...] = (float(guidance_scale),)
        if per_prompt_scales and per_prompt_scales.strip():
            try:
                scales = tuple(float(x) for x in per_prompt_scales.replace(";", ",").split(",") if x.strip())
            except ValueError as e:
                raise InvalidInputError(
                    f"per_prompt_scales {per_prompt_scales!r} must be comma-separated numbers such as '0, 3.5, 5'"
                ) from e
        return (Guidance(negative_prompts=negs, scales=scales, cfg_truncation=float(cfg_truncation),
                         cfg_normalization=float(cfg_normalization)),)


SAMPLERS = ("euler", "dpmpp_2m", "unipc", "euler_a", "ddim")

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


class TurboSample(host.Node, returns={"images": "IMAGE", "latent": "LATENT"}, function="sample"):
    DESCRIPTION = (
        "Generates one image per prompt line (times images_per_prompt). Prompt i uses seed + i, so a prompt "
        "gives the same image alone or in a batch. steps 0 = the family default (Z-Image-Turbo 8, SD1.x 25). "
        "Connect an init image for img2img (the output then takes its size), plus a mask for inpainting."
    )

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
        from ..manager.loading import fingerprint

        try:
            path = host.full_path("loras", lora_file)
        except Exception:  # reported by the run itself
            return ""
        return fingerprint([path], exact_time=True) if path else ""

    def sample(self, model, prompt, seed, steps, width, height, images_per_prompt, sampler, shift,
               guidance=None, lora=None, lora_strength=1.0, lora_file=host.NONE, lora_file_strength=1.0,
               init_image=None, mask=None, denoise=1.0, lora_2=None, lora_2_strength=1.0):
        from ..manager.cache import ensure_loaded
        from ..manager.lora import load_lora_file
        from ..manager.sampling import generate

        model = ensure_loaded(model)
        path = host.full_path("loras", lora_file)  # unconnected LoRAs (None) are skipped by generate
        loras = [(lora, lora_strength), (lora_2, lora_2_strength),
                 (load_lora_file(path) if path else None, lora_file_strength)]
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

