"""The FastAPI app: ``create_app(config)``. The model loads in the background; /readyz answers 200 once it has."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ..manager.errors import get_logger
from .config import ServeConfig
from .schemas import LimitError

logger = get_logger(__name__)


class State:
    """Everything one app holds; ``app.state.tb``."""

    def __init__(self, config: ServeConfig, engine=None):
        from .batcher import Batcher
        from .engine import Engine, model_spec
        from .jobs import JobRunner
        from .metrics import Metrics
        from .store import JobStore

        self.config = config
        for d in (config.data_dir, config.lora_dir, config.jobs_dir, config.images_dir):
            os.makedirs(d, exist_ok=True)
        if engine is None:
            tiny_root = os.path.join(os.path.abspath(config.data_dir), "tiny_models")
            spec = model_spec(config.model, config.device, config.dtype, tiny_root)
            engine = Engine(spec, config.lora_dir, config.max_batch, config.lora_cache, tiny=config.model == "tiny")
        self.engine = engine
        self.metrics = Metrics(config.max_batch)
        self.store = JobStore(config.db_path)
        interrupted = self.store.mark_interrupted()
        if interrupted:
            logger.warning("%d job(s) were queued or running when the service stopped; marked interrupted", interrupted)
        self.batcher = Batcher(engine.run_rows, config.max_batch, config.max_wait_ms, config.limits.max_queue,
                               self.metrics)
        self.jobs = JobRunner(self.store, engine, config, self.metrics)

    def load_in_background(self) -> threading.Thread:
        def load():
            with contextlib.suppress(Exception):  # Engine.load logs it; /readyz reports it
                if not self.engine.ready:
                    self.engine.load()
                self.metrics.ready.set(1 if self.engine.ready else 0)

        t = threading.Thread(target=load, name="turbobooth-load", daemon=True)
        t.start()
        return t


def _error(status: int, message: str, limit: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "limit": limit}}, status_code=status, headers=headers)


def _install_errors(app: FastAPI) -> None:
    from turbobooth.manager.errors import InvalidInputError, ModelSourceError, WrongFamilyError

    from .batcher import QueueFull
    from .jobs import JobError

    @app.exception_handler(RequestValidationError)
    async def _schema(request: Request, e: RequestValidationError):
        # loc/msg/type only: the input may be NaN (not JSON) or huge, and is never echoed back
        detail = [{"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
                  for err in e.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(LimitError)
    async def _limit(request: Request, e: LimitError):
        request.app.state.tb.metrics.rejected.labels(limit=e.limit).inc()
        return _error(e.status, str(e), e.limit)

    @app.exception_handler(QueueFull)
    async def _full(request: Request, e: QueueFull):
        request.app.state.tb.metrics.rejected.labels(limit="max_queue").inc()
        return _error(429, str(e), "max_queue", {"Retry-After": "1"})

    @app.exception_handler(JobError)
    async def _job(request: Request, e: JobError):
        headers = {"Retry-After": "5"} if e.status == 429 else None
        return _error(e.status, str(e), e.limit, headers)

    @app.exception_handler(WrongFamilyError)
    async def _family(request: Request, e: WrongFamilyError):
        return _error(422, str(e))

    @app.exception_handler(ModelSourceError)
    async def _missing(request: Request, e: ModelSourceError):
        return _error(404, str(e))

    @app.exception_handler(InvalidInputError)
    async def _invalid(request: Request, e: InvalidInputError):
        return _error(422, str(e))


def create_app(config: ServeConfig | None = None, engine=None, token: str | None = "env") -> FastAPI:
    """The service app. ``token="env"`` reads TURBOBOOTH_API_TOKEN; None turns auth off (loopback only)."""
    from . import routes_images, routes_jobs
    from .security import GuardMiddleware

    config = config or ServeConfig()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # built here, not at create_app: Ray Serve pickles the app, and a replica builds its own state
        st = app.state.tb = State(config, engine)
        st.batcher.start()
        st.jobs.loop = asyncio.get_running_loop()
        st.load_in_background()
        try:
            yield
        finally:
            await st.batcher.stop()
            st.jobs.close()
            st.store.close()

    app = FastAPI(title="TurboBooth", version="0.1.0", lifespan=lifespan,
                  description="Few-step image generation and DreamBooth personalization over HTTP.")
    app.add_middleware(GuardMiddleware, token=token, max_body_bytes=config.limits.max_body_bytes)
    _install_errors(app)
    app.include_router(routes_images.router)
    app.include_router(routes_jobs.router)
    return app
