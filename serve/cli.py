"""``python -m turbobooth serve``: the service under uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys

from ..manager.errors import get_logger
from .config import ConfigError, Limits, ServeConfig, api_token, check_bind

logger = get_logger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="diffusers folder, repo id[@revision], or 'tiny' (built-in)")
    p.add_argument("--host", default="127.0.0.1", help="without TURBOBOOTH_API_TOKEN only 127.0.0.1/localhost")
    p.add_argument("--port", type=int, default=8190)
    p.add_argument("--data-dir", default="turbobooth_service", help="job store, LoRAs, job files, served images")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-batch", type=int, default=4, help="rows per batched call (every call runs at this size)")
    p.add_argument("--max-wait-ms", type=float, default=25.0)
    p.add_argument("--default-steps", type=int, default=None)
    p.add_argument("--default-size", type=int, default=None)
    p.add_argument("--lora-cache", type=int, default=8)
    p.add_argument("--preview-every", type=int, default=5)
    for f, default in Limits.__dataclass_fields__.items():
        kind = float if isinstance(default.default, float) else int
        p.add_argument("--" + f.replace("_", "-"), type=kind, default=default.default, dest="limit_" + f)


def config_from(args) -> ServeConfig:
    limits = Limits(**{k[len("limit_"):]: v for k, v in vars(args).items() if k.startswith("limit_")})
    return ServeConfig(model=args.model, data_dir=args.data_dir, host=args.host, port=args.port, device=args.device,
                       dtype=args.dtype, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                       default_steps=args.default_steps, default_size=args.default_size, lora_cache=args.lora_cache,
                       preview_every=args.preview_every, limits=limits)


def run(args) -> int:
    try:
        config = config_from(args)
        check_bind(config.host, api_token())
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        import uvicorn

        from .app import create_app
    except ImportError as e:
        print(f"error: the service needs its extra: pip install 'turbobooth[serve]' ({e})", file=sys.stderr)
        return 2
    logging.getLogger("turbobooth").setLevel(logging.INFO)
    app = create_app(config)
    # the access log prints request lines only (never headers), so the token never reaches a log
    uvicorn.run(app, host=config.host, port=config.port, log_level="info", timeout_graceful_shutdown=10)
    return 0
