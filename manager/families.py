"""Per-family facts: defaults, size multiples, LoRA target modules."""

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


ZIMAGE = FamilyDefaults(
    name="zimage",
    label="Z-Image",
    steps=8,
    guidance=0.0,
    size_multiple=16,
    default_size=1024,
    lora_targets=("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"),
    max_sequence_length=512,
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
)

FAMILIES = {"zimage": ZIMAGE, "sd1": SD1}


def defaults_for(family: str) -> FamilyDefaults:
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; supported: {', '.join(FAMILIES)}") from None
