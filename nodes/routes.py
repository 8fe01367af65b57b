"""The /turbobooth/ HTTP routes the web extension reads (registered only when ComfyUI's server runs).

GET /turbobooth/runs/{run_id}/log      the steps a DreamBoothTrain run logged (JSON), refills the live chart
GET /turbobooth/runs/{run_id}/preview  that run's latest validation image (PNG)
GET /turbobooth/active                 the runs in progress, by node id

A run id is a run folder's name; anything else (unknown, a path, "..") is 404, and nothing outside the
training root's run folders is read.
"""

from __future__ import annotations

import os

from . import comfy as host

NO_STORE = {"Cache-Control": "no-store"}  # the dashboard polls these while a run writes them


def training_root() -> str:
    return os.path.join(host.output_directory(), "turbobooth_training")


def register(routes) -> None:
    """Add the routes to aiohttp's route table ``routes`` (PromptServer.instance.routes)."""
    from aiohttp import web

    @routes.get("/turbobooth/runs/{run_id}/log")
    async def get_run_log(request):
        from ..trainer.runs import PREVIEW, read_step_log, run_path

        run_id = request.match_info["run_id"]
        steps = read_step_log(training_root(), run_id)
        if steps is None:
            return web.json_response({"error": "unknown run"}, status=404)
        preview = run_path(training_root(), run_id, PREVIEW) is not None
        return web.json_response({"run": run_id, "steps": steps, "preview": preview}, headers=NO_STORE)

    @routes.get("/turbobooth/runs/{run_id}/preview")
    async def get_run_preview(request):
        from ..trainer.runs import PREVIEW, run_path

        path = run_path(training_root(), request.match_info["run_id"], PREVIEW)
        if path is None:
            return web.json_response({"error": "no preview"}, status=404)
        return web.FileResponse(path, headers=NO_STORE)

    @routes.get("/turbobooth/active")
    async def get_active(request):
        return web.json_response({"runs": list(host.ACTIVE_RUNS.values())}, headers=NO_STORE)


def register_with_comfyui() -> bool:
    """Register on the running PromptServer; False outside ComfyUI."""
    srv = host.prompt_server()
    if srv is None:
        return False
    try:
        register(srv.routes)
    except Exception:  # a host without aiohttp routes: the dashboard then only shows live events
        host.logger.warning("could not register the /turbobooth/ routes", exc_info=True)
        return False
    return True
