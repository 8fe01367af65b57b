"""One generation request answered synchronously, without our batcher: for Azure ML's ``run()`` and for Ray Serve,
which batch on their own. Same schema, same limits, same ``Engine.run_rows``, so the PNGs are the same bytes."""

from __future__ import annotations

import base64
import time
from types import SimpleNamespace

from .engine import split_request
from .schemas import GenerationRequest


def parse(engine, config, body) -> tuple:
    """(request, batch key, rows) of a JSON body (dict or str); raises pydantic ValidationError / LimitError."""
    from .routes_images import batch_key

    req = GenerationRequest.model_validate_json(body) if isinstance(body, (str, bytes)) else \
        GenerationRequest.model_validate(body)
    key, seed = batch_key(SimpleNamespace(engine=engine, config=config), req)
    return req, key, split_request(req.prompt, req.negative_prompt, seed, req.n)


def answer(rows, pngs) -> dict:
    """The OpenAI-shaped answer (b64_json only: these fronts serve no files)."""
    data = [{"b64_json": base64.b64encode(png).decode("ascii"), "seed": row.seed}
            for row, png in zip(rows, pngs, strict=True)]
    return {"created": int(time.time()), "data": data}


def generate_once(engine, config, body) -> dict:
    _, key, rows = parse(engine, config, body)
    return answer(rows, engine.run_rows(key, rows))
