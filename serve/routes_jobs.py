"""Routes: async jobs (generation and personalization), their progress as Server-Sent Events, cancel, resume."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from .jobs import JobError
from .routes_images import not_ready, run_generation
from .schemas import JobRequest, JobView, LimitError
from .store import TERMINAL, valid_job_id

router = APIRouter(tags=["jobs"])
SSE_POLL_S = 0.2

_JOB_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/JobRequest"}},
            "multipart/form-data": {"schema": {"$ref": "#/components/schemas/TrainSettings"},
                                    "encoding": {"images": {"contentType": "image/png, image/jpeg, image/webp"}}},
        },
    }
}


def _job_or_404(st, job_id: str) -> dict:
    job = st.store.get(job_id) if valid_job_id(job_id) else None
    if job is None:
        raise HTTPException(404, "no such job (job ids are 32 hex characters, as POST /v1/jobs returns them)")
    return job


def _view(job: dict) -> dict:
    return JobView(**{k: job[k] for k in JobView.model_fields}).model_dump()


async def _personalization(st, request: Request) -> dict:
    from .personalize import read_form, save_photos

    settings, photos = await read_form(request, st.config.limits)
    if settings.steps > st.config.limits.max_train_steps:
        raise LimitError("max_train_steps", f"steps={settings.steps} is above max_train_steps="
                                            f"{st.config.limits.max_train_steps}")
    not_ready(st)
    params = {**settings.model_dump(), "family": st.engine.model.family}
    from .personalize import train_config

    job_id = st.store.create("personalization", params)
    try:
        train_config(params, st.jobs.job_dir(job_id), st.config.preview_every)  # TrainConfig's own checks, now
        await asyncio.to_thread(save_photos, photos, st.jobs.job_dir(job_id) + "/instance")
        st.jobs.submit_personalization(job_id)
    except Exception as e:
        st.store.update(job_id, state="failed", error=f"{type(e).__name__}: {e}")
        raise
    return _view(st.store.get(job_id))


def _generation_job(st, job_id: str, body: JobRequest) -> None:
    req = body.generation.model_copy(update={"response_format": "url"})
    st.jobs.submit_generation(job_id, lambda: run_generation(st, req, None))


@router.post("/v1/jobs", status_code=202, openapi_extra=_JOB_BODY)
async def create_job(request: Request):
    """JSON ``{"type": "generation", "generation": {...}}``, or a multipart personalization job: 3-5 ``images``
    plus the TrainSettings fields. It runs class images -> DreamBooth -> a LoRA saved as ``lora_name``."""
    st = request.app.state.tb
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        try:
            return await _personalization(st, request)
        except ValidationError as e:
            raise LimitError("form", f"bad personalization settings: {e.errors(include_url=False)}") from e
    try:
        body = JobRequest.model_validate_json(await request.body())
    except ValidationError as e:
        raise LimitError("body", f"bad job request: {e.errors(include_url=False)}") from e
    not_ready(st)
    from .routes_images import batch_key

    batch_key(st, body.generation)  # every limit now, before the job exists
    job_id = st.store.create("generation", body.model_dump())
    _generation_job(st, job_id, body)
    return _view(st.store.get(job_id))


@router.get("/v1/jobs/{job_id}", response_model=JobView)
async def get_job(job_id: str, request: Request):
    return _view(_job_or_404(request.app.state.tb, job_id))


@router.delete("/v1/jobs/{job_id}", response_model=JobView)
async def cancel_job(job_id: str, request: Request):
    """Cancel. A personalization job saves its checkpoint and can be resumed."""
    st = request.app.state.tb
    _job_or_404(st, job_id)
    return _view(st.jobs.cancel(job_id))


@router.post("/v1/jobs/{job_id}/resume", status_code=202, response_model=JobView)
async def resume_job(job_id: str, request: Request):
    """Resume a cancelled, interrupted or failed job: personalization continues from its last checkpoint."""
    st = request.app.state.tb
    job = _job_or_404(st, job_id)
    if job["state"] not in ("cancelled", "interrupted", "failed"):
        raise JobError(409, f"job is {job['state']}; only cancelled, interrupted or failed jobs resume")
    not_ready(st)
    if job["kind"] == "personalization":
        st.jobs.submit_personalization(job_id)
    else:
        _generation_job(st, job_id, JobRequest.model_validate(job["params"]))
    return _view(st.store.get(job_id))


@router.get("/v1/jobs/{job_id}/events")
async def job_events(job_id: str, request: Request):
    """Server-Sent Events: ``state``, ``step`` (with a ``preview`` data URL every preview_every steps), ``loss``.
    The stream ends when the job reaches a final state."""
    st = request.app.state.tb
    _job_or_404(st, job_id)
    log = st.jobs.log(job_id)

    async def stream():
        at = 0
        job = st.store.get(job_id)
        yield _sse({"type": "state", "state": job["state"], "progress": job["progress"]})
        while True:
            events = log.since(at)
            at += len(events)
            for e in events:
                yield _sse(e)
            job = st.store.get(job_id)
            if job["state"] in TERMINAL and not log.since(at):
                yield _sse({"type": "end", "state": job["state"], "result": job["result"], "error": job["error"]})
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(SSE_POLL_S)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _sse(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
