"""NegativePrompt/CFG: negative prompts and guidance settings -> TURBO_GUIDANCE."""

from __future__ import annotations


class TurboGuidance:
    DESCRIPTION = (
        "Negative prompt(s) and classifier-free guidance for TurboSample. One negative prompt per line matches "
        "the prompts line by line; one line applies to all. Without this node Z-Image-Turbo runs at guidance 0 "
        "(its distilled setting) and SD1.x at 7.5."
    )
    CATEGORY = "TurboBooth"
    RETURN_TYPES = ("TURBO_GUIDANCE",)
    RETURN_NAMES = ("guidance",)
    FUNCTION = "build"

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
