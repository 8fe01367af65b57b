"""The one generate function every front calls (our batcher, Ray Serve, Azure ML): a batch of rows in, PNGs out.

Bit-exactness. On CPU a row computed in a batch of 4 differs from the same row computed alone in the last bits
(measured on the tiny Z-Image model: max |diff| 1.7e-6 after 4 steps), because the matmul kernels block
differently per batch shape. At one fixed shape the row's bits depend neither on its position nor on the other
rows (measured: torch.equal). So every call here runs at exactly ``max_batch`` rows, padding with a filler prompt,
and a request gives the same PNG bytes alone or batched. Requests with different guidance scales never share a
call (a scale change splits the pipeline call inside ``generate`` and so changes the shape).
"""

from __future__ import annotations

import io
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

from ..manager.errors import get_logger

logger = get_logger(__name__)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PAD_PROMPT = "."  # filler rows: generate() drops empty prompt lines, so the filler must be non-empty


def valid_name(name: str) -> bool:
    """A LoRA name: letters, digits, '.', '_', '-'; no path, no '..'."""
    return isinstance(name, str) and bool(NAME.match(name)) and ".." not in name


@dataclass(frozen=True)
class BatchKey:
    """What requests must share to run in one call."""

    width: int
    height: int
    steps: int
    guidance: float
    loras: tuple = ()  # ((name, strength), ...), sorted


@dataclass(frozen=True)
class Row:
    """One image to make."""

    prompt: str
    negative: str
    seed: int


class LoraLRU:
    """Recently used LoRA weights in memory, keyed by name and file stamp; names resolve in one folder only."""

    def __init__(self, folder: str, size: int):
        self.folder, self.size = folder, size
        self.items: OrderedDict = OrderedDict()
        self.lock = threading.Lock()
        self.hits = self.misses = 0

    def path(self, name: str) -> str:
        from turbobooth.manager.errors import InvalidInputError
        from turbobooth.manager.paths import confined

        if not valid_name(name):
            raise InvalidInputError(f"LoRA name {name!r} is not a valid name (letters, digits, '.', '_', '-')")
        return confined(name + ".safetensors", [self.folder], "LoRA", "the service's LoRA folder")

    def get(self, name: str):
        from turbobooth.manager.lora import load_lora_file

        path = self.path(name)
        st = os.stat(path)
        key = (name, st.st_mtime_ns, st.st_size)
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                self.hits += 1
                return self.items[key]
        lora = load_lora_file(path)
        with self.lock:
            self.misses += 1
            self.items[key] = lora
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return lora

    def names(self) -> list[str]:
        if not os.path.isdir(self.folder):
            return []
        out = [f[: -len(".safetensors")] for f in os.listdir(self.folder) if f.endswith(".safetensors")]
        return sorted(n for n in out if valid_name(n))


def png_bytes(image) -> bytes:
    """One [H,W,C] 0..1 tensor as PNG bytes (deterministic: same tensor, same bytes)."""
    import numpy as np
    from PIL import Image

    arr = (image.detach().cpu().float().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def model_spec(source: str, device: str = "auto", dtype: str = "auto", tiny_root: str | None = None):
    """``folder | repo[@revision] | tiny`` -> ModelSpec; "tiny" writes the built-in tiny Z-Image model first."""
    from turbobooth.manager.spec import ModelSpec

    if source == "tiny":
        from turbobooth.manager.tiny import write_tiny_models

        paths = write_tiny_models(tiny_root or "tiny_models", formats=("diffusers",))
        return ModelSpec(paths["zimage_diffusers"], device=device, dtype=dtype)
    revision = None
    if "@" in source and not os.path.exists(source):
        source, revision = source.rsplit("@", 1)
    return ModelSpec(source, revision=revision or None, device=device, dtype=dtype)


class Engine:
    """A loaded model plus the LoRA LRU; ``run_rows`` is the shared generate call."""

    def __init__(self, spec, lora_dir: str, max_batch: int, lora_cache: int = 8, tiny: bool = False):
        self.spec, self.max_batch, self.tiny = spec, max_batch, tiny
        self.loras = LoraLRU(lora_dir, lora_cache)
        self.model = None
        self.error: str | None = None
        self.calls = 0

    def load(self) -> None:
        from turbobooth.manager.cache import get_model

        try:
            self.model = get_model(self.spec)
            self.model.pipe.set_progress_bar_config(disable=True)
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            logger.exception("the model could not be loaded")
            raise

    @property
    def ready(self) -> bool:
        return self.model is not None

    def defaults(self) -> tuple[int, int]:
        """(steps, size) of the loaded family; the tiny model gets 64 px."""

        d = self.model.defaults
        return d.steps, (64 if self.tiny else d.default_size)

    def run_rows(self, key: BatchKey, rows: list[Row], should_stop=None) -> list[bytes]:
        """PNG bytes for ``rows`` (at most max_batch), computed at exactly max_batch rows."""
        from turbobooth.manager.cache import ensure_loaded
        from turbobooth.manager.sampling import Guidance, generate

        if not 1 <= len(rows) <= self.max_batch:
            raise ValueError(f"{len(rows)} rows do not fit a batch of {self.max_batch}")
        padded = list(rows) + [Row(PAD_PROMPT, "", 0)] * (self.max_batch - len(rows))
        seeds = [r.seed for r in padded]
        loras = [(self.loras.get(name), strength) for name, strength in key.loras]
        guidance = Guidance(negative_prompts=tuple(r.negative for r in padded), scales=(key.guidance,))
        self.model = ensure_loaded(self.model)  # the shared cache may have released it (budget, changed files)
        result = generate(self.model, [r.prompt for r in padded], seed=seeds, steps=key.steps,
                          width=key.width, height=key.height, guidance=guidance, loras=loras,
                          should_stop=should_stop)
        self.calls += 1
        return [png_bytes(result.images[i]) for i in range(len(rows))]


def split_request(prompt: str, negative: str, seed: int, n: int) -> list[Row]:
    """A request's rows: image ``j`` uses ``seed + j``, as ``generate`` gives prompt ``j`` of a list."""
    return [Row(prompt, negative, (seed + j) % 2**64) for j in range(n)]
