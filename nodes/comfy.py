"""The one adapter between TurboBooth and ComfyUI.

Everything that touches ``comfy``, ``folder_paths`` or ``server`` lives here: progress and cancel -> callbacks,
IMAGE <-> PIL, model folders, memory sharing with ComfyUI's model management, and the web extension's live events
and /turbobooth/ routes. Node classes also work (and are tested) without ComfyUI. ComfyUI's modules are looked
up in ``sys.modules`` (ComfyUI imports them before any node runs), not imported: the lookups run on every sampling
step, and a failed import outside ComfyUI would rescan sys.path each time.
"""

from __future__ import annotations

import base64
import functools
import io
import os
import sys
import time

from ..manager.errors import get_logger

logger = get_logger("turbobooth")

NONE = "(none)"


class Node:
    """A V1 node class: ``class X(Node, returns={"name": "TYPE", ...}, function="method")`` gives it
    RETURN_NAMES, RETURN_TYPES and FUNCTION, and the TurboBooth menu unless ``category`` names another.
    A subclass of a node inherits what it does not give (and keeps a CATEGORY of its own)."""

    CATEGORY = "TurboBooth"

    def __init_subclass__(cls, returns: dict | None = None, function: str | None = None, category: str | None = None,
                          **kwargs):
        super().__init_subclass__(**kwargs)
        if category is not None:
            cls.CATEGORY = category
        if function is not None:
            cls.FUNCTION = function
        if returns is not None:
            cls.RETURN_NAMES, cls.RETURN_TYPES = tuple(returns), tuple(returns.values())


def _ask(method: str, kind: str) -> list[str]:
    try:
        return list(getattr(sys.modules.get("folder_paths"), method)(kind))
    except Exception:  # outside ComfyUI, or a folder kind this ComfyUI does not know
        return []


def folder_list(kind: str) -> list[str]:
    """Filenames ComfyUI knows for a model folder kind ("loras", "vae", ...)."""
    return sorted(_ask("get_filename_list", kind))


def folder_roots(kind: str) -> list[str]:
    return _ask("get_folder_paths", kind)


def full_path(kind: str, name: str) -> str | None:
    """The file ``name`` picked from a widget, resolved inside ComfyUI's folders of ``kind`` or refused
    (absolute paths and ``..`` never reach the filesystem). None for an empty choice."""
    from ..manager.paths import confined

    if not name or name == NONE:
        return None
    return confined(name, folder_roots(kind), f"{kind} file", f"models/{kind}")


def output_directory() -> str:
    fp = sys.modules.get("folder_paths")
    return fp.get_output_directory() if fp is not None else os.path.abspath("output")


def comfy_bundled_tokenizer(family: str) -> str | None:
    """ComfyUI ships the Qwen and CLIP tokenizers; reuse them for split files and single files."""
    # comfy.__file__ is None on older ComfyUI (a namespace package); __path__ always names the folder
    paths = list(getattr(sys.modules.get("comfy"), "__path__", None) or [])
    if not paths:
        return None
    p = os.path.join(paths[0], "text_encoders/qwen25_tokenizer" if family == "zimage" else "sd1_tokenizer")
    return p if os.path.isdir(p) else None


def torch_device() -> str:
    from ..manager.loading import resolve_device

    mm = sys.modules.get("comfy.model_management")
    return str(mm.get_torch_device()) if mm is not None else resolve_device("auto")


# ---------------------------------------------------------------- progress / cancel


def check_interrupt() -> None:
    mm = sys.modules.get("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


def interrupted() -> bool:
    mm = sys.modules.get("comfy.model_management")
    return mm is not None and bool(mm.processing_interrupted())


#: ComfyUI's latent format of each family's latents (current ComfyUI previews Z-Image with Flux's)
LATENT_FORMATS = {"sd1": "SD15", "zimage": "Flux"}


def latent_previewer(model):
    """``preview`` for ``generate``: ComfyUI's own latent preview (``--preview-method``) of the first image,
    as the ``(format, image, size)`` its progress bar takes. None, so sampling does no latent work, when
    previews are off (ComfyUI's default) or this ComfyUI has no latent format for the family."""
    try:
        import comfy.latent_formats
        import latent_preview
    except Exception:  # not inside ComfyUI
        return None
    fmt = getattr(comfy.latent_formats, LATENT_FORMATS.get(model.family, ""), lambda: None)()
    try:
        previewer = None if fmt is None else latent_preview.get_previewer(model.device, fmt)
    except Exception:
        logger.warning("ComfyUI's latent previewer could not be set up; sampling without previews", exc_info=True)
        return None
    if previewer is None:
        return None
    from ..manager.previews import GuardedPreview

    decode = functools.partial(previewer.decode_latent_to_preview_image, "JPEG")
    return GuardedPreview(decode, model.pipe.vae.config, fmt.scale_factor, getattr(fmt, "shift_factor", 0.0))


class Progress:
    """ComfyUI's progress bar as ``on_step(step, total, preview)``: a PIL image or ``(format, image, size)``."""

    def __init__(self, total: int, raise_on_interrupt: bool = True):
        self.total = max(int(total), 1)
        self.raise_on_interrupt = raise_on_interrupt
        utils = sys.modules.get("comfy.utils")
        self.bar = utils.ProgressBar(self.total) if utils is not None else None

    def __call__(self, step: int, total: int, preview=None) -> None:
        if self.raise_on_interrupt:
            check_interrupt()
        if self.bar is None:
            return
        self.total = total  # the bar takes the new total from update_absolute()
        if preview is not None and not isinstance(preview, tuple):
            preview = ("PNG", preview.convert("RGB") if hasattr(preview, "convert") else preview, 512)
        try:
            self.bar.update_absolute(step, total, preview)  # it clamps step to total
        except Exception as e:
            # ComfyUI's progress hook raises (and clears) a pending interrupt. Training must save its state
            # first: put the flag back so should_stop() sees it at the end of this step.
            if self.raise_on_interrupt or type(e).__name__ != "InterruptProcessingException":
                raise
            sys.modules.get("comfy.model_management").interrupt_current_processing(True)


#: node id -> {"node", "run", "step", "total"} of the DreamBoothTrain runs in progress (GET /turbobooth/active)
ACTIVE_RUNS: dict[str, dict] = {}


def prompt_server():
    """ComfyUI's running PromptServer, or None outside ComfyUI."""
    return getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)


def send_event(event: str, data: dict) -> None:
    """A custom websocket event to the client that queued the prompt (no-op outside ComfyUI)."""
    srv = prompt_server()
    if srv is None:
        return
    try:
        srv.send_sync(event, data, getattr(srv, "client_id", None))
    except Exception:
        logger.warning("could not send the %s event", event, exc_info=True)


def _data_url(image, size: int = 256) -> str:
    im = image.convert("RGB")
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class TrainProgress(Progress):
    """The progress bar plus one ``turbobooth.train`` event per optimizer step, for the web extension's live
    dashboard on node ``node_id``: step, total, loss, lr, it/s, ETA and the latest validation image."""

    def __init__(self, total: int, node_id) -> None:
        super().__init__(total, raise_on_interrupt=False)
        self.node_id = None if node_id is None else str(node_id)
        self.run_id: str | None = None
        self._t0 = self._s0 = None

    def run_started(self, folder: str) -> None:
        self.run_id = os.path.basename(folder)
        if self.node_id is not None:
            ACTIVE_RUNS[self.node_id] = {"node": self.node_id, "run": self.run_id, "step": 0, "total": self.total}
        self._send({"phase": "start", "step": 0, "total": self.total})

    def __call__(self, step: int, total: int, preview=None, info: dict | None = None) -> None:
        super().__call__(step, total, preview)
        now, info = time.monotonic(), info or {}
        if self._s0 is None:
            self._t0, self._s0 = now, step - 1  # time from the first step on (data caching excluded)
        rate = (step - self._s0) / (now - self._t0) if now > self._t0 else 0.0
        data = {"phase": "step", "step": int(step), "total": int(total), "loss": info.get("loss"),
                "lr": info.get("lr"), "time": info.get("time"), "it_s": round(rate, 4),
                "eta_s": round((total - step) / rate, 1) if rate > 0 else None}
        if preview is not None:
            data["preview"] = _data_url(preview)
        if self.node_id in ACTIVE_RUNS:
            ACTIVE_RUNS[self.node_id].update(step=int(step), total=int(total))
        self._send(data)

    def finished(self, step: int, stopped: bool) -> None:
        ACTIVE_RUNS.pop(self.node_id, None)
        self._send({"phase": "stopped" if stopped else "done", "step": int(step), "total": self.total})

    def _send(self, data: dict) -> None:
        if self.node_id is not None and self.run_id is not None:
            send_event("turbobooth.train", {"node": self.node_id, "run": self.run_id, **data})


# ---------------------------------------------------------------- the web extension's routes

NO_STORE = {"Cache-Control": "no-store"}  # the dashboard polls these while a run writes them


def training_root() -> str:
    return os.path.join(output_directory(), "turbobooth_training")


def register(routes) -> None:
    """Add the /turbobooth/ routes to aiohttp's route table ``routes`` (PromptServer.instance.routes).

    GET /turbobooth/runs/{run_id}/log      the steps a DreamBoothTrain run logged (JSON), refills the live chart
    GET /turbobooth/runs/{run_id}/preview  that run's latest validation image (PNG)
    GET /turbobooth/active                 the runs in progress, by node id

    A run id is a run folder's name; anything else (unknown, a path, "..") is 404, and nothing outside the
    training root's run folders is read.
    """
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
        return web.json_response({"runs": list(ACTIVE_RUNS.values())}, headers=NO_STORE)


def register_with_comfyui() -> None:
    """Register the routes on the running PromptServer (nothing outside ComfyUI)."""
    srv = prompt_server()
    if srv is None:
        return
    try:
        register(srv.routes)
    except Exception:  # a host without aiohttp routes: the dashboard then only shows live events
        logger.warning("could not register the /turbobooth/ routes", exc_info=True)


# ---------------------------------------------------------------- images


def image_to_pils(image) -> list:
    """ComfyUI IMAGE [B,H,W,C] 0..1 -> list of PIL RGB images."""
    from diffusers.image_processor import VaeImageProcessor

    return [p.convert("RGB") for p in VaeImageProcessor.numpy_to_pil(image.detach().cpu().float().clamp(0, 1).numpy())]


def pils_to_image(pils):
    """List of PIL images (same size) -> ComfyUI IMAGE [B,H,W,3]."""
    import torch
    from diffusers.image_processor import VaeImageProcessor

    return torch.from_numpy(VaeImageProcessor.pil_to_numpy([p.convert("RGB") for p in pils]))


# ---------------------------------------------------------------- memory sharing


_patchers: dict = {}


def make_room(device: str, nbytes: int) -> None:
    """Ask ComfyUI to free ``nbytes`` (plus headroom) on ``device`` before our weights go there."""
    mm = sys.modules.get("comfy.model_management")
    if mm is None or not str(device).startswith("cuda"):
        return
    import torch

    try:
        mm.free_memory(int(nbytes * 1.2) + 512 * 2**20, torch.device(device))
    except Exception:
        logger.warning("ComfyUI could not free memory before loading", exc_info=True)


def _patcher_class():
    """A ModelPatcher that stands for a TurboModel in ComfyUI's loaded-model list; unloading it releases the
    model from our cache. Built once, on the ModelPatcher of the running ComfyUI."""
    import comfy.model_patcher

    from ..manager import cache

    if "class" in _patchers:
        return _patchers["class"]
    base = comfy.model_patcher.ModelPatcher

    class TurboBoothPatcher(base):
        def _release(self):
            target = getattr(self, "turbo_model", None)
            if target is not None and cache.CACHE.peek(target.spec) is target:
                cache.CACHE.release(target.spec)
            # keep the patcher referenced: freeing it inside ComfyUI's unload would fire ComfyUI's
            # model finalizer in the middle of free_memory()
            self.turbo_model = None

        if hasattr(base, "detach"):  # ComfyUI >= mid-2024 unloads through detach()/partially_unload()

            def load(self, *args, **kwargs):
                """The stand-in module holds no weights to move; ComfyUI would log a meaningless
                "95367431640625005117571072.00 MB usable" line for it."""
                return None

            def detach(self, unpatch_all=True):
                if unpatch_all:
                    self._release()
                return super().detach(unpatch_all)

            def partially_unload(self, *args, **kwargs):
                size = self.turbo_model.nbytes if getattr(self, "turbo_model", None) is not None else 0
                self._release()
                return size

        else:

            def unpatch_model(self, *args, **kwargs):
                self._release()
                return super().unpatch_model(*args, **kwargs)

    _patchers["class"] = TurboBoothPatcher
    return TurboBoothPatcher


def share_memory(model) -> None:
    """Tell ComfyUI about our weights: it frees room for them, and unloading releases them.

    The stand-in patcher is registered with ``comfy.model_management.load_models_gpu``: ComfyUI first frees
    memory on the device for it, and when ComfyUI unloads it (the "Free model and node cache" button,
    ``unload_all_models()``, or memory pressure from another model) the TurboModel is released from our cache.
    """
    mm = sys.modules.get("comfy.model_management")
    if mm is None:
        return
    import torch

    patcher = _patchers.get(id(model))
    if patcher is None or getattr(patcher, "turbo_model", None) is not model:  # new, or released earlier
        patcher = _patcher_class()(torch.nn.Module(), load_device=torch.device(model.device),
                                   offload_device=mm.unet_offload_device(), size=model.nbytes)
        patcher.turbo_model = model
        _patchers[id(model)] = patcher
    try:
        mm.load_models_gpu([patcher])
    except Exception:
        logger.warning("could not register the model with ComfyUI's memory manager", exc_info=True)
