"""Exceptions with messages a user can act on.

Every error names the offending value and what is allowed instead.
"""

from __future__ import annotations


class TurboBoothError(Exception):
    """Base class for every error TurboBooth raises on purpose."""


class ModelSourceError(TurboBoothError):
    """A model path, repo id, revision or file cannot be used."""


class UnsafeFileError(ModelSourceError):
    """A pickle-based checkpoint was offered; only safetensors are loaded."""


class WrongFamilyError(ModelSourceError):
    """The files belong to another model family than the one requested."""


class InvalidInputError(TurboBoothError, ValueError):
    """A generation or training input is out of its allowed range."""


class Interrupted(TurboBoothError):
    """The user asked to stop; raised between steps."""
