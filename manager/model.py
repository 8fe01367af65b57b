"""The loaded-model object that flows between nodes as TURBO_MODEL."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .spec import ModelSpec


@dataclass(eq=False)
class TurboModel:
    """A loaded base pipeline plus what is needed to reuse it safely.

    ``pipe`` is the text-to-image pipeline (ZImagePipeline or
    StableDiffusionPipeline). img2img / inpaint pipelines are built from its
    components on demand, so nothing is loaded twice. The cached base is never
    modified in place: training attaches adapters and removes them again, and
    full fine-tunes work on a copy.
    """

    spec: ModelSpec
    family: str  # "zimage" | "sd1"
    pipe: Any
    identity: str  # stable id of the weights (source, revision, file sizes/mtimes) for on-disk cache keys
    device: str = "cpu"
    nbytes: int = 0
    loras: tuple = field(default=())  # applied TurboLora objects, for models returned by training
    extras: dict = field(default_factory=dict)

    @property
    def denoiser(self):
        return self.pipe.transformer if self.family == "zimage" else self.pipe.unet

    @property
    def dtype(self):
        return self.denoiser.dtype

    def __repr__(self) -> str:  # shown in ComfyUI debug output; keep it short
        return f"TurboModel({self.family}, {self.spec.source!r}, rev={self.spec.revision}, device={self.device})"
