"""Routes: generation (OpenAI-shaped), served image files, LoRAs, health, readiness and metrics."""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
import time
import uuid

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import FileResponse, JSONResponse

from .engine import BatchKey, split_request, valid_name
from .schemas import GenerationRequest, ImagesResponse, LimitError, check_limits

router = APIRouter()
IMAGE_FILE = re.compile(r"^[0-9a-f]{32}\.png$")
DISCONNECT_POLL_S = 0.1


def _state(request: Request):
    return request.app.state.tb


def not_ready(st) -> None:
    if not st.engine.ready:
        detail = st.engine.error or "the model is still loading"
        raise HTTPException(503, detail, headers={"Retry-After": "5"})


def batch_key(st, req: GenerationRequest) -> tuple[BatchKey, int]:
    """The request's batch key and its seed, after every limit is checked."""
    steps_default, size_default = st.engine.defaults()
    width, height = req.dims(st.config.default_size or size_default)
    steps = req.steps or st.config.default_steps or steps_default
    check_limits(req, st.config.limits, width, height, steps)
    for ref in req.loras:
        if not valid_name(ref.name):
            raise LimitError("loras", f"LoRA name {ref.name!r} is not a valid name (letters, digits, '.', '_', '-')")
        st.engine.loras.path(ref.name)  # 404 now, not inside the batch

    guidance = st.engine.model.defaults.guidance if req.guidance is None else req.guidance
    loras = tuple(sorted((r.name, float(r.strength)) for r in req.loras))
    seed = secrets.randbelow(2**63) if req.seed is None else req.seed
    return BatchKey(width, height, steps, float(guidance), loras), seed


async def _await_or_disconnect(request: Request | None, fut: asyncio.Future, timeout: float):
    """The future's result; cancels it when the client goes away or the timeout passes."""
    deadline = time.monotonic() + timeout
    while True:
        done, _ = await asyncio.wait({fut}, timeout=DISCONNECT_POLL_S)
        if done:
            return fut.result()
        if request is not None and await request.is_disconnected():
            fut.cancel()
            raise asyncio.CancelledError("the client disconnected")
        if time.monotonic() > deadline:
            fut.cancel()
            raise LimitError("request_timeout_s", f"no answer within request_timeout_s={timeout}", status=504)


async def run_generation(st, req: GenerationRequest, request: Request | None, base_url: str = "") -> dict:
    """The shared body of the sync route and of generation jobs: OpenAI-shaped answer."""
    not_ready(st)
    key, seed = batch_key(st, req)
    rows = split_request(req.prompt, req.negative_prompt, seed, req.n)
    fut = st.batcher.submit(key, rows)
    pngs = await _await_or_disconnect(request, fut, st.config.limits.request_timeout_s)
    data = []
    for row, png in zip(rows, pngs, strict=True):
        item = {"seed": row.seed}
        if req.response_format == "url":
            name = f"{uuid.uuid4().hex}.png"
            path = f"{st.config.images_dir}/{name}"
            await asyncio.to_thread(_write, path, png)
            item["url"] = f"{base_url}/v1/images/files/{name}"
        else:
            item["b64_json"] = base64.b64encode(png).decode("ascii")
        data.append(item)
    return {"created": int(time.time()), "data": data}


def _write(path: str, data: bytes) -> None:
    from turbobooth.manager.paths import atomic_file

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_file(path, write)


@router.post("/v1/images/generations", response_model=ImagesResponse, response_model_exclude_none=True, tags=["images"])
async def generations(req: GenerationRequest, request: Request):
    """Generate ``n`` images. Concurrent requests with the same size, steps, guidance and LoRAs share a batch."""
    st = _state(request)
    started = time.monotonic()
    try:
        return await run_generation(st, req, request, str(request.base_url).rstrip("/"))
    finally:
        st.metrics.latency.labels(route="generations").observe(time.monotonic() - started)


@router.get("/v1/images/files/{name}", tags=["images"], response_class=FileResponse)
async def image_file(name: str, request: Request):
    """An image made with ``response_format=url``."""
    if not IMAGE_FILE.match(name):
        raise HTTPException(404, "no such image")
    import os

    path = os.path.join(_state(request).config.images_dir, name)
    if not os.path.isfile(path):
        raise HTTPException(404, "no such image")
    return FileResponse(path, media_type="image/png")


@router.get("/v1/loras", tags=["loras"])
async def loras(request: Request):
    """The LoRAs in the service's LoRA folder, by name."""
    return {"data": [{"name": n} for n in _state(request).engine.loras.names()]}


@router.get("/healthz", tags=["health"])
async def healthz():
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", tags=["health"])
async def readyz(request: Request):
    """Readiness: 200 only once the model is loaded."""
    engine = _state(request).engine
    if engine.ready:
        return {"status": "ready"}
    body = {"status": "failed" if engine.error else "loading", "error": engine.error}
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})


@router.get("/metrics", tags=["health"])
async def metrics(request: Request):
    """Prometheus text: queue depth, batch sizes, latencies, jobs by state."""
    st = _state(request)
    body, ctype = st.metrics.render(await asyncio.to_thread(st.store.counts))
    return Response(body, media_type=ctype)
