"""The ComfyUI adapter against a stand-in ``comfy`` package: memory requests, unloading, progress, cancel."""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch
import turbobooth
from turbobooth.manager import cache as cache_mod
from turbobooth.manager.tiny import write_tiny_models
from turbobooth.nodes import comfy as host


class OldPatcher:
    """Early-2024 ModelPatcher: ComfyUI unloads through unpatch_model()."""

    def __init__(self, model, load_device, offload_device, size=0, **kw):
        self.model, self.load_device, self.offload_device, self.size = model, load_device, offload_device, size

    def unpatch_model(self, *a, **k):
        return None

    def unload(self):
        self.unpatch_model(self.offload_device)


class ModernPatcher(OldPatcher):
    """Current ModelPatcher: loading itself calls unpatch_model(); unloading goes through detach()."""

    def partially_load(self, device, extra_memory=0):
        self.unpatch_model(self.offload_device)  # as current ComfyUI does while loading
        return 0

    def detach(self, unpatch_all=True):
        if unpatch_all:
            self.unpatch_model(self.offload_device)
        return self.model

    def partially_unload(self, device, memory_to_free=0):
        return 0

    def unload(self):
        self.detach(True)


@pytest.fixture(params=["comfyui-2024", "comfyui-current"])
def fake_comfy(monkeypatch, request):
    events = []
    loaded = []
    mm = types.ModuleType("comfy.model_management")
    mm.free_memory = lambda nbytes, device, keep_loaded=(): events.append(("free_memory", int(nbytes), str(device)))
    def load_models_gpu(models, *a, **k):
        for m in models:
            if hasattr(m, "partially_load"):
                m.partially_load(m.load_device)
            if m not in loaded:
                loaded.append(m)

    mm.load_models_gpu = load_models_gpu
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.unet_offload_device = lambda: torch.device("cpu")
    interrupted = {"flag": False}

    class InterruptProcessingException(Exception):
        pass

    def throw():
        if interrupted["flag"]:
            interrupted["flag"] = False
            raise InterruptProcessingException()

    mm.throw_exception_if_processing_interrupted = throw
    mm.processing_interrupted = lambda: interrupted["flag"]
    mm.InterruptProcessingException = InterruptProcessingException

    def unload_all_models():
        while loaded:
            loaded.pop().unload()

    mm.unload_all_models = unload_all_models
    mp = types.ModuleType("comfy.model_patcher")
    mp.ModelPatcher = OldPatcher if request.param == "comfyui-2024" else ModernPatcher
    bars = []

    class ProgressBar:
        def __init__(self, total):
            self.total, self.updates = total, []
            bars.append(self)

        def update_absolute(self, value, total=None, preview=None):
            self.updates.append(value)

    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    comfy = types.ModuleType("comfy")
    comfy.__file__ = "/nonexistent/comfy/__init__.py"
    comfy.model_management, comfy.model_patcher, comfy.utils = mm, mp, utils
    for name, mod in (("comfy", comfy), ("comfy.model_management", mm), ("comfy.model_patcher", mp), ("comfy.utils", utils)):
        monkeypatch.setitem(sys.modules, name, mod)
    host._patchers.clear()
    return types.SimpleNamespace(events=events, loaded=loaded, bars=bars, interrupted=interrupted, mm=mm)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_models(str(tmp_path_factory.mktemp("tiny")), formats=("diffusers",))


@pytest.fixture(autouse=True)
def model_folders(tiny, monkeypatch):
    """ComfyUI's models/diffusers is where the tiny models are (widget names resolve only inside it)."""
    root = os.path.dirname(tiny["zimage_diffusers"])
    monkeypatch.setattr(host, "folder_roots", lambda kind: [root] if kind == "diffusers" else [])


def _load(tiny):
    return turbobooth.NODE_CLASS_MAPPINGS["TurboBoothLoader"]().load(
        "diffusers folder", os.path.basename(tiny["zimage_diffusers"]), "", "main", "(none)", "(none)", "(none)", "(none)",
        "auto", "fp32", "cpu", "none")[0]


def test_make_room_asks_comfyui_to_free_gpu_memory(fake_comfy):
    host.make_room("cuda:0", 1000)
    assert fake_comfy.events and fake_comfy.events[0][0] == "free_memory" and fake_comfy.events[0][2] == "cuda:0"
    assert fake_comfy.events[0][1] >= 1000
    fake_comfy.events.clear()
    host.make_room("cpu", 1000)
    assert fake_comfy.events == [], "nothing to free for CPU weights"


def test_unload_all_models_releases_our_cached_model(fake_comfy, tiny):
    cache_mod.CACHE.clear()
    model = _load(tiny)
    assert model.spec in cache_mod.CACHE and not cache_mod.is_released(model), "loading must not release the model"
    assert len(fake_comfy.loaded) == 1 and fake_comfy.loaded[0].size == model.nbytes
    fake_comfy.mm.unload_all_models()
    assert model.spec not in cache_mod.CACHE and cache_mod.is_released(model)
    # the next TurboSample run reloads transparently
    images, _ = turbobooth.NODE_CLASS_MAPPINGS["TurboBoothSample"]().sample(
        model, "a dog", 0, 2, 64, 64, 1, "euler", 0.0)
    assert images.shape == (1, 64, 64, 3)


def test_progress_bar_moves_every_step_and_cancel_raises_comfy_exception(fake_comfy, tiny):
    model = _load(tiny)
    sample = turbobooth.NODE_CLASS_MAPPINGS["TurboBoothSample"]()
    sample.sample(model, "a dog\na cat", 0, 5, 64, 64, 1, "euler", 0.0)
    assert fake_comfy.bars[-1].updates == [1, 2, 3, 4, 5]
    fake_comfy.interrupted["flag"] = True
    calls = []
    live = cache_mod.ensure_loaded(model)
    handle = live.pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(fake_comfy.mm.InterruptProcessingException):
            sample.sample(model, "a dog", 0, 5, 64, 64, 1, "euler", 0.0)
    finally:
        handle.remove()
    assert len(calls) == 1, "cancel must stop at the first step boundary, not run the remaining steps"
