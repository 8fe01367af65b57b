"""The loaded-model object that flows between nodes as TURBO_MODEL."""

from __future__ import annotations

import os
import threading
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
    variant: str = ""  # Z-Image: turbo, base or deturbo
    #: held by whoever runs the pipeline or changes its adapters: sampling and training never overlap
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def denoiser(self):
        return self.pipe.transformer if self.family == "zimage" else self.pipe.unet

    def base_name(self) -> str:
        """The base model as LoRA metadata names it: repo id and revision, or file/folder name and a short
        content hash; never a local path."""
        spec = self.spec
        if spec.resolved_kind() == "hub":
            return f"{spec.source}@{spec.revision or 'main'}"
        import hashlib

        return f"{os.path.basename(os.path.normpath(spec.source))}#{hashlib.sha256(self.identity.encode()).hexdigest()[:10]}"

    @property
    def defaults(self):
        """Sampling defaults of this model: the family's, with the Z-Image variant's steps and guidance."""
        from .families import model_defaults

        return model_defaults(self.family, self.variant)

    @property
    def dtype(self):
        return self.denoiser.dtype

    def __repr__(self) -> str:  # shown in ComfyUI debug output; keep it short
        return f"TurboModel({self.family}, {self.spec.source!r}, rev={self.spec.revision}, device={self.device})"
