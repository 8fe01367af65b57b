"""Async jobs: generation through the batcher, personalization (class images -> DreamBooth -> a named LoRA) in one
worker thread. Progress goes to an in-memory event log per job (read by the SSE route) and to the job store."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ..manager.errors import get_logger
from .store import TERMINAL, JobStore

logger = get_logger(__name__)

MAX_EVENTS = 2000


class JobError(Exception):
    """A job request cannot be honoured now (HTTP status, limit or reason)."""

    def __init__(self, status: int, message: str, limit: str | None = None):
        super().__init__(message)
        self.status, self.limit = status, limit


class EventLog:
    """Events of one job, in order; readers poll from an index."""

    def __init__(self):
        self.items: list[dict] = []
        self.lock = threading.Lock()

    def add(self, event: dict) -> None:
        with self.lock:
            self.items.append(event)
            if len(self.items) > MAX_EVENTS:  # keep the first event and the most recent ones
                del self.items[1 : len(self.items) - MAX_EVENTS + 1]

    def since(self, index: int) -> list[dict]:
        with self.lock:
            return list(self.items[index:])


def data_url(pil_image) -> str:
    buf = io.BytesIO()
    pil_image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class JobRunner:
    def __init__(self, store: JobStore, engine, config, metrics=None):
        self.store, self.engine, self.config, self.metrics = store, engine, config, metrics
        self.events: dict[str, EventLog] = {}
        self.stops: dict[str, threading.Event] = {}
        self.tasks: dict[str, asyncio.Future] = {}
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="turbobooth-train")
        self.loop: asyncio.AbstractEventLoop | None = None

    def close(self) -> None:
        for stop in self.stops.values():
            stop.set()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def log(self, job_id: str) -> EventLog:
        return self.events.setdefault(job_id, EventLog())

    def emit(self, job_id: str, event: dict) -> None:
        self.log(job_id).add(event)

    def set_state(self, job_id: str, state: str, **fields) -> None:
        self.store.update(job_id, state=state, **fields)
        self.emit(job_id, {"type": "state", "state": state, **({"error": fields["error"]} if "error" in fields else {})})

    def _queued_jobs(self) -> int:
        return sum(1 for f in self.tasks.values() if not f.done())

    # -- personalization ---------------------------------------------------------------------------------------

    def job_dir(self, job_id: str) -> str:
        return os.path.join(self.config.jobs_dir, job_id)

    def submit_personalization(self, job_id: str) -> None:
        if self._queued_jobs() >= self.config.limits.max_jobs_queued:
            raise JobError(429, f"{self._queued_jobs()} jobs are waiting (limit max_jobs_queued="
                                f"{self.config.limits.max_jobs_queued})", "max_jobs_queued")
        self.stops[job_id] = threading.Event()
        self.store.update(job_id, state="queued", error=None)
        self.emit(job_id, {"type": "state", "state": "queued"})
        self.tasks[job_id] = self.executor.submit(self._train_safely, job_id)

    def _train_safely(self, job_id: str) -> None:
        try:
            self._train(job_id)
        except Exception as e:  # the job fails with the message; the worker keeps serving
            logger.warning("personalization job %s failed: %s", job_id, e)
            self.set_state(job_id, "failed", error=f"{type(e).__name__}: {e}")

    def _train(self, job_id: str) -> None:
        from PIL import Image
        from turbobooth.manager.lora import save_lora_file
        from turbobooth.trainer.runs import train

        from .personalize import train_config

        job = self.store.get(job_id)
        stop = self.stops[job_id]
        if stop.is_set():
            self.set_state(job_id, "cancelled")
            return
        self.set_state(job_id, "running")
        folder = self.job_dir(job_id)
        inst_dir = os.path.join(folder, "instance")
        images = [Image.open(os.path.join(inst_dir, f)).convert("RGB") for f in sorted(os.listdir(inst_dir))]
        cfg = train_config(job["params"], os.path.join(folder, "run"), self.config.preview_every)
        last = [0.0]

        def on_step(step, total, preview, info=None):
            event = {"type": "step", "step": step, "total": total, **({"loss": info["loss"]} if info else {})}
            if info:
                self.emit(job_id, {"type": "loss", "step": step, "loss": info["loss"]})
            if preview is not None:
                event["preview"] = data_url(preview)
            self.emit(job_id, event)
            now = time.monotonic()
            if now - last[0] > 0.5 or step == total:
                last[0] = now
                self.store.update(job_id, progress={"step": step, "total": total})

        result = train(self.engine.model, cfg, images, on_step=on_step, should_stop=stop.is_set)
        progress = {"step": result.step, "total": cfg.steps, "losses": list(result.losses)}
        if result.stopped:
            self.set_state(job_id, "cancelled", progress=progress,
                           error="cancelled; the checkpoint is kept: POST .../resume continues it")
            return
        name = job["params"]["lora_name"]
        path = save_lora_file(result.lora, os.path.join(self.engine.loras.folder, name + ".safetensors"))
        self.set_state(job_id, "succeeded", progress=progress,
                       result={"lora": name, "file": os.path.basename(path), "steps": result.step})

    # -- generation --------------------------------------------------------------------------------------------

    def submit_generation(self, job_id: str, coro_factory) -> None:
        """Run ``await coro_factory()`` (the generation route's own code) as the job."""
        self.store.update(job_id, state="running", error=None)
        self.emit(job_id, {"type": "state", "state": "running"})

        async def run():
            try:
                result = await coro_factory()
            except asyncio.CancelledError:
                self.set_state(job_id, "cancelled")
                raise
            except Exception as e:
                self.set_state(job_id, "failed", error=f"{type(e).__name__}: {e}")
                return
            self.set_state(job_id, "succeeded", result=result)

        self.tasks[job_id] = asyncio.get_running_loop().create_task(run())

    # -- both --------------------------------------------------------------------------------------------------

    def cancel(self, job_id: str) -> dict:
        job = self.store.get(job_id)
        if job["state"] in TERMINAL:
            return job
        stop = self.stops.get(job_id)
        if stop is not None:
            stop.set()
        task = self.tasks.get(job_id)
        if job["kind"] == "generation" and task is not None:
            task.cancel()
        elif job["state"] == "queued" and task is not None and task.cancel():
            self.set_state(job_id, "cancelled")
        return self.store.get(job_id)
