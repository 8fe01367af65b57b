"""Request and response schemas. Field names follow OpenAI's images API where they overlap.

Every float refuses NaN and Inf (``allow_inf_nan=False``), so FastAPI answers 422 with the field's location.
Limits that depend on the service's settings are checked in ``check_limits`` (413/422 naming the limit).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


class LimitError(Exception):
    """A request passes the schema but breaks a configured limit."""

    def __init__(self, limit: str, message: str, status: int = 422):
        super().__init__(message)
        self.limit, self.status = limit, status


class LoraRef(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(description="a LoRA from GET /v1/loras (a name, never a path)", max_length=64)
    strength: float = Field(1.0, ge=-10.0, le=10.0)


class GenerationRequest(BaseModel):
    """POST /v1/images/generations."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str = Field(description="the prompt", min_length=1)
    n: int = Field(1, ge=1, description="images for this prompt; image j uses seed + j")
    size: str | None = Field(None, description='"WxH", e.g. "1024x1024"; default: the model\'s size')
    response_format: Literal["b64_json", "url"] = "b64_json"
    model: str | None = Field(None, description="accepted for OpenAI clients; the service serves one model")
    seed: int | None = Field(None, ge=0, le=2**64 - 1, description="default: a random seed, returned in the answer")
    steps: int | None = Field(None, ge=1, description="default: the model family's (Z-Image-Turbo: 8)")
    guidance: float | None = Field(None, ge=0.0, le=100.0, description="default: the family's (Turbo: 0)")
    negative_prompt: str = ""
    loras: list[LoraRef] = Field(default_factory=list, max_length=8)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt is blank; write at least one word")
        return v

    @field_validator("size")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        if v is not None and not SIZE.match(v):
            raise ValueError(f'size {v!r} must be "WxH" with whole numbers, e.g. "1024x1024"')
        return v

    def dims(self, default: int) -> tuple[int, int]:
        if self.size is None:
            return default, default
        w, h = SIZE.match(self.size).groups()
        return int(w), int(h)


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    seed: int
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]


class JobRequest(BaseModel):
    """POST /v1/jobs with a JSON body: an async generation job."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: Literal["generation"] = "generation"
    generation: GenerationRequest


class TrainSettings(BaseModel):
    """The form fields of a personalization job (multipart POST /v1/jobs with type=personalization)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    instance_prompt: str = Field(min_length=1, description="with the subject's unique token, e.g. 'a photo of sks dog'")
    class_prompt: str = Field(min_length=1, description="the subject's class, e.g. 'a photo of dog'")
    lora_name: str = Field(min_length=1, max_length=64, description="the name later requests use")
    steps: int = Field(400, ge=1)
    lr: float = Field(1e-4, gt=0.0, le=1.0)
    rank: int = Field(16, ge=1, le=256)
    resolution: int = Field(512, ge=16, le=4096)
    seed: int = Field(0, ge=0, le=2**64 - 1)
    with_prior_preservation: bool = True
    num_class_images: int = Field(50, ge=1, le=1000)
    class_steps: int | None = Field(None, ge=1, le=200)
    checkpoint_every: int = Field(50, ge=1)


class JobView(BaseModel):
    id: str
    kind: str
    state: str
    created: float
    updated: float
    progress: dict | None = None
    result: dict | None = None
    error: str | None = None


def check_limits(req: GenerationRequest, limits, width: int, height: int, steps: int) -> None:
    if req.n > limits.max_images:
        raise LimitError("max_images", f"n={req.n} is above max_images={limits.max_images}")
    if width * height > limits.max_pixels:
        raise LimitError("max_pixels", f"size {width}x{height} is {width * height} pixels, above max_pixels="
                                       f"{limits.max_pixels}")
    if steps > limits.max_steps:
        raise LimitError("max_steps", f"steps={steps} is above max_steps={limits.max_steps}")
    for name in ("prompt", "negative_prompt"):
        if len(getattr(req, name)) > limits.max_prompt_chars:
            raise LimitError("max_prompt_chars", f"{name} has {len(getattr(req, name))} characters, above "
                                                 f"max_prompt_chars={limits.max_prompt_chars}")
