"""Exceptions with messages a user can act on.

Every error names the offending value and what is allowed instead.
"""

from __future__ import annotations

import contextlib
import logging
import re

# Hugging Face tokens and HTTP credentials, wherever a server or library echoes them back
_SECRETS = re.compile(
    r"(hf_[A-Za-z0-9]{8,})|((?:authorization|token)[\"']?\s*[:=]\s*[\"']?(?:bearer\s+)?)[^\s\"',}]+", re.IGNORECASE
)


def scrub(text: str) -> str:
    """``text`` with every token and Authorization value replaced by ``***``."""
    return _SECRETS.sub(lambda m: "hf_***" if m.group(1) else m.group(2) + "***", str(text))


def _scrub_record(record: logging.LogRecord) -> bool:
    """Removes tokens from every record our loggers emit, arguments included."""
    record.msg = scrub(record.getMessage())
    record.args = None
    return True


def get_logger(name: str) -> logging.Logger:
    """A logger whose records never carry a token (a filter on each logger: filters do not propagate)."""
    logger = logging.getLogger(name)
    logger.addFilter(_scrub_record)  # a filter already there is not added again
    return logger


class TurboBoothError(Exception):
    """Base class for every error TurboBooth raises on purpose; its message never carries a token."""

    def __init__(self, *args):
        super().__init__(*(scrub(a) if isinstance(a, str) else a for a in args))


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


def check_choices(**choices: tuple) -> None:
    """``name=(value, allowed)``: refuse the first value that is not one of its allowed names."""
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise InvalidInputError(f"{name}={value!r} is not supported; allowed: {', '.join(allowed)}")


@contextlib.contextmanager
def explained(what: str, mismatch: str = "a file of another model family or size?"):
    """Turn a library's failure to load ``what`` into a ModelSourceError that says what to do."""
    try:
        yield
    except Exception as e:  # diffusers and transformers raise many kinds for a mismatching or broken file
        text = str(e)
        if "size mismatch" in text or "shape" in text.lower():
            text = f"the weights do not match the model config ({mismatch}): {text[:300]}"
        elif "out of memory" in text.lower():
            text = f"out of memory: choose fp8/bf16, enable offload, or free models in ComfyUI. {text[:200]}"
        else:
            text = f"{type(e).__name__}: {text}"
        raise ModelSourceError(f"could not load {what}: {text[:500]}") from e
