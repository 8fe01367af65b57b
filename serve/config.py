"""The service's settings and limits: one frozen dataclass, checked in ``__post_init__``."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
TOKEN_ENV = "TURBOBOOTH_API_TOKEN"


class ConfigError(ValueError):
    """A setting is out of range; the message names it and what is allowed."""


@dataclass(frozen=True)
class Limits:
    """Every request limit. Each refusal is a 4xx whose message names the field here."""

    max_body_bytes: int = 32 * 2**20
    max_images: int = 4  # images per request (n); also the most rows one request may add to a batch
    max_pixels: int = 1024 * 1024  # width x height
    max_steps: int = 50
    max_prompt_chars: int = 2000
    min_uploads: int = 3
    max_uploads: int = 5
    max_upload_bytes: int = 8 * 2**20
    max_upload_pixels: int = 4096 * 4096
    max_queue: int = 64  # generation requests waiting; past it: 429 + Retry-After
    max_jobs_queued: int = 16  # jobs waiting for the job worker
    max_train_steps: int = 5000
    request_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"limit {f.name}={v!r} must be a finite positive number")
        if self.min_uploads > self.max_uploads:
            raise ConfigError(f"min_uploads={self.min_uploads} is above max_uploads={self.max_uploads}")


@dataclass(frozen=True)
class ServeConfig:
    """Where the service keeps its files, what it serves and how it batches."""

    model: str = "tiny"  # a diffusers folder, repo[@revision] or "tiny"
    data_dir: str = "turbobooth_service"
    host: str = "127.0.0.1"
    port: int = 8190
    device: str = "auto"
    dtype: str = "auto"
    max_batch: int = 4  # rows per batched call; every call runs at exactly this many rows (see engine.py)
    max_wait_ms: float = 25.0
    default_steps: int | None = None  # None: the family's (Turbo 8)
    default_size: int | None = None  # None: the family's; 64 for the tiny model
    lora_cache: int = 8  # LoRAs kept in memory (LRU)
    preview_every: int = 5  # SSE preview at most every N training steps
    limits: Limits = Limits()

    def __post_init__(self) -> None:
        for name, lo, hi in (("port", 0, 65535), ("max_batch", 1, 64), ("lora_cache", 1, 1024),
                             ("preview_every", 1, 100000)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ConfigError(f"{name}={v!r} must be a whole number from {lo} to {hi}")
        if not isinstance(self.max_wait_ms, (int, float)) or not math.isfinite(self.max_wait_ms) or not (
                0 <= self.max_wait_ms <= 10000):
            raise ConfigError(f"max_wait_ms={self.max_wait_ms!r} must be a finite number from 0 to 10000")
        if self.limits.max_images > self.max_batch:
            raise ConfigError(f"limit max_images={self.limits.max_images} is above max_batch={self.max_batch}: "
                              "one request must fit in one batch")
        for name in ("default_steps", "default_size"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name}={v!r} must be a positive whole number or unset")

    def replace(self, **changes) -> ServeConfig:
        return replace(self, **changes)

    @property
    def lora_dir(self) -> str:
        return os.path.join(os.path.abspath(self.data_dir), "loras")

    @property
    def jobs_dir(self) -> str:
        return os.path.join(os.path.abspath(self.data_dir), "jobs")

    @property
    def images_dir(self) -> str:
        return os.path.join(os.path.abspath(self.data_dir), "images")

    @property
    def db_path(self) -> str:
        return os.path.join(os.path.abspath(self.data_dir), "jobs.sqlite")


def api_token() -> str | None:
    """The bearer token from the environment, or None when unset/empty."""
    token = os.environ.get(TOKEN_ENV, "")
    return token or None


def check_bind(host: str, token: str | None) -> None:
    """Without a token the service may only listen on the loopback interface."""
    if token is None and host not in LOCAL_HOSTS:
        raise ConfigError(
            f"refusing to listen on {host!r} without a token: set {TOKEN_ENV} to a secret, or bind 127.0.0.1"
        )
