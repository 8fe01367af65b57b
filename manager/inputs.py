"""Checked generation inputs: prompts, sizes, seeds, numbers and guidance (TURBO_GUIDANCE).

Every value is refused at the boundary with its name and what is allowed: NaN, Inf and out-of-range numbers
never reach a pipeline, where they would give black images that report success.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import InvalidInputError
from .families import defaults_for

MAX_SEED = 2**64 - 1
#: the most prompt lines and images one call takes; larger batches are refused (split them over several nodes)
MAX_PROMPTS = 256
MAX_IMAGES = 512


def number(name: str, value, lo: float, hi: float, *, lo_open: bool = False) -> float:
    """``value`` as a finite float within [lo, hi] (``lo_open``: (lo, hi]); otherwise a message naming it."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name}={value!r} must be a number") from None
    if not math.isfinite(v) or (v <= lo if lo_open else v < lo) or v > hi:
        raise InvalidInputError(f"{name}={value!r} is outside {'(' if lo_open else '['}{lo:g}, {hi:g}]; it must be a "
                                "finite number in that range")
    return v


def seed_list(seed, count: int) -> list[int]:
    """Per-prompt seeds: ``seed + i`` for one seed, wrapping at 2**64 so every seed the widget allows works, or
    a list of ``count`` seeds as given."""
    seeds = list(seed) if isinstance(seed, (list, tuple)) else None
    if seeds is not None and len(seeds) != count:
        raise InvalidInputError(f"got {len(seeds)} seeds for {count} prompts; give one seed, or one per prompt")
    for s in seeds if seeds is not None else [seed]:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED:
            raise InvalidInputError(f"seed={s!r} must be a whole number from 0 to {MAX_SEED}")
    return [int(s) for s in seeds] if seeds is not None else [(seed + i) % (MAX_SEED + 1) for i in range(count)]


def finite_tensor(name: str, tensor) -> None:
    import torch

    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise InvalidInputError(f"{name} contains NaN or Inf values; connect a valid image/mask")


@dataclass(frozen=True)
class Guidance:
    """Negative prompts and guidance, per prompt or shared (TURBO_GUIDANCE)."""

    negative_prompts: tuple[str, ...] = ("",)
    scales: tuple[float, ...] = (0.0,)
    cfg_truncation: float = 1.0
    cfg_normalization: float = 0.0

    def __post_init__(self) -> None:
        if not self.scales:
            raise InvalidInputError("guidance needs at least one guidance scale")
        for s in self.scales:
            number("guidance scale", s, 0.0, 100.0)
        number("cfg_truncation", self.cfg_truncation, 0.0, 1.0)
        number("cfg_normalization", self.cfg_normalization, 0.0, 100.0)

    def per_prompt(self, count: int) -> list[tuple[str, float]]:
        """(negative prompt, guidance scale) for each of ``count`` prompts."""
        neg = self.negative_prompts or ("",)
        for values, what, one in ((neg, "negative prompts", "one negative prompt"),
                                  (self.scales, "guidance scales", "one scale")):
            if len(values) not in (1, count):
                raise InvalidInputError(f"got {len(values)} {what} for {count} prompts; give {one}, or one per prompt")
        return [(neg[i if len(neg) > 1 else 0], float(self.scales[i if len(self.scales) > 1 else 0]))
                for i in range(count)]


def parse_prompts(text: str | Sequence[str]) -> list[str]:
    """One prompt per non-empty line, at most MAX_PROMPTS."""
    lines = text.splitlines() if isinstance(text, str) else list(text)
    prompts = [p.strip() for p in lines if isinstance(p, str) and p.strip()]
    if not prompts:
        raise InvalidInputError("no prompt given: write at least one non-empty line (one prompt per line = a batch)")
    if len(prompts) > MAX_PROMPTS:
        raise InvalidInputError(
            f"{len(prompts)} prompt lines is more than the {MAX_PROMPTS} one node renders at once; split them"
        )
    return prompts


def check_size(family: str, width: int, height: int) -> None:
    d = defaults_for(family)
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or v <= 0 or v % d.size_multiple:
            lo = (max(int(v), d.size_multiple) // d.size_multiple) * d.size_multiple if isinstance(v, int) else 0
            raise InvalidInputError(
                f"{name}={v} is not allowed for {d.label}: it must be a positive multiple of {d.size_multiple} "
                f"(nearest allowed: {lo} or {lo + d.size_multiple})"
            )


def check_sampler(family: str, sampler: str) -> None:
    d = defaults_for(family)
    if sampler not in d.samplers:
        raise InvalidInputError(f"sampler {sampler!r} is not available for {d.label}; choose one of "
                                f"{', '.join(d.samplers)}")
