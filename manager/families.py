"""The one family table: defaults, size multiples, pipelines, components, samplers and LoRA targets."""

from __future__ import annotations

from dataclasses import dataclass


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
#: diffusers pipeline class name -> family
PIPELINE_FAMILIES = {cls: f.name for f in FAMILIES.values() for cls in f.pipelines}


def defaults_for(family: str) -> FamilyDefaults:
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; supported: {', '.join(FAMILIES)}") from None
