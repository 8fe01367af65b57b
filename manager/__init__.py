"""The shared cached model manager. Importable and usable without ComfyUI.

Heavy libraries (torch, diffusers, transformers) are imported on first use.
"""

from .errors import (
    Interrupted,
    InvalidInputError,
    ModelSourceError,
    TurboBoothError,
    UnsafeFileError,
    WrongFamilyError,
)
from .families import FAMILIES, defaults_for
from .spec import ModelSpec

__all__ = [
    "FAMILIES",
    "Interrupted",
    "InvalidInputError",
    "ModelSourceError",
    "ModelSpec",
    "TurboBoothError",
    "UnsafeFileError",
    "WrongFamilyError",
    "defaults_for",
]
