"""The one family table: defaults, size multiples, pipelines, components, samplers and LoRA targets."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class FamilyDefaults:
    name: str
    label: str
    steps: int
    guidance: float
    size_multiple: int
    default_size: int
    lora_targets: tuple[str, ...]
    max_sequence_length: int
    denoiser: str  # the pipeline component that is trained and LoRA-patched
    pipelines: tuple[str, str, str]  # diffusers classes: text-to-image, img2img, inpaint
    samplers: tuple[str, ...]

    @property
    def components(self) -> tuple[str, ...]:
        """What a diffusers folder of this family must hold."""
        return (self.denoiser, "text_encoder", "tokenizer", "vae", "scheduler")

    def pipeline_class(self, task: str = "text2img"):
        import diffusers

        return getattr(diffusers, self.pipelines[("text2img", "img2img", "inpaint").index(task)])


# name, label, steps, guidance, size multiple, default size, LoRA targets, max sequence length, denoiser,
# pipelines (text-to-image, img2img, inpaint), samplers
ZIMAGE = FamilyDefaults("zimage", "Z-Image", 8, 0.0, 16, 1024, ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"),
                        512, "transformer", ("ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageInpaintPipeline"),
                        ("euler", "dpmpp_2m", "unipc"))
SD1 = FamilyDefaults("sd1", "Stable Diffusion 1.x", 25, 7.5, 8, 512, ("to_q", "to_k", "to_v", "to_out.0"), 77, "unet",
                     ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
                     ("euler", "euler_a", "dpmpp_2m", "unipc", "ddim", "model_default"))

FAMILIES = {"zimage": ZIMAGE, "sd1": SD1}


#: the sampling defaults of each Z-Image variant, and where the numbers come from
ZIMAGE_VARIANTS = {
    # Turbo's model card: its "9 steps" are 8 denoising steps in diffusers 0.42; guidance 0: the CFG is distilled in.
    "turbo": dict(label="Z-Image-Turbo", steps=8, guidance=0.0),
    # ZImagePipeline's own call defaults are Base's; its card gives 28-50 steps with CFG about 3-5.
    "base": dict(label="Z-Image (Base)", steps=50, guidance=5.0),
    # De-distilled Turbo checkpoints sample like Base again: with CFG and Base's step count.
    "deturbo": dict(label="Z-Image De-Turbo", steps=50, guidance=5.0),
}
VARIANTS = ("auto", *ZIMAGE_VARIANTS)
TURBO_SHIFT = 3.0  # Turbo's scheduler_config.json; Base's differs


def detect_variant(names, scheduler_shift: float | None) -> str:
    """Turbo, Base or De-Turbo, from the model's names (folder, repo id, ``_name_or_path``) and its scheduler."""
    text = " ".join(str(n) for n in names if n).lower().replace("_", "-")
    if any(k in text for k in ("de-turbo", "deturbo", "dedistill", "de-distill")):
        return "deturbo"
    if "turbo" in text:
        return "turbo"
    return "turbo" if scheduler_shift is not None and float(scheduler_shift) == TURBO_SHIFT else "base"


def model_defaults(family: str, variant: str = "") -> FamilyDefaults:
    """The family's defaults with the variant's steps and guidance (Z-Image); SD1.x has no variants."""
    base = defaults_for(family)
    v = ZIMAGE_VARIANTS.get(variant) if family == "zimage" else None
    return base if v is None else replace(base, **v)


#: diffusers pipeline class name -> family
PIPELINE_FAMILIES = {cls: f.name for f in FAMILIES.values() for cls in f.pipelines}


def defaults_for(family: str) -> FamilyDefaults:
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; supported: {', '.join(FAMILIES)}") from None
