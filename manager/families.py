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


ZIMAGE = FamilyDefaults(
    name="zimage",
    label="Z-Image",
    steps=8,
    guidance=0.0,
    size_multiple=16,
    default_size=1024,
    lora_targets=("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"),
    max_sequence_length=512,
    denoiser="transformer",
    pipelines=("ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageInpaintPipeline"),
    samplers=("euler", "dpmpp_2m", "unipc"),
)

SD1 = FamilyDefaults(
    name="sd1",
    label="Stable Diffusion 1.x",
    steps=25,
    guidance=7.5,
    size_multiple=8,
    default_size=512,
    lora_targets=("to_q", "to_k", "to_v", "to_out.0"),
    max_sequence_length=77,
    denoiser="unet",
    pipelines=("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
    samplers=("euler", "euler_a", "dpmpp_2m", "unipc", "ddim", "model_default"),
)

FAMILIES = {"zimage": ZIMAGE, "sd1": SD1}
#: diffusers pipeline class name -> family
PIPELINE_FAMILIES = {cls: f.name for f in FAMILIES.values() for cls in f.pipelines}


def defaults_for(family: str) -> FamilyDefaults:
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; supported: {', '.join(FAMILIES)}") from None
