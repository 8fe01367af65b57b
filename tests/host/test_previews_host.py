"""Live latent previews of TurboSample through the host's own ``latent_preview``, as KSampler sends them.

ComfyUI previews only when started with ``--preview-method`` (default: none). SD1.x latents use ComfyUI's
SD15 format everywhere; Z-Image's use Flux's, which the pinned early-2024 host does not have yet, so
Z-Image samples there without previews and a current ComfyUI (COMFYUI_PATH) previews both.
"""

from __future__ import annotations

import os

import pytest
from comfy_harness import Graph, run_inprocess

pytestmark = pytest.mark.host

STEPS = 3


def _prompts(comfy_host, host_tiny_models) -> tuple[list[dict], dict]:
    """One TurboSample prompt per family; returns the prompts and {family: the sample node's id}."""
    prompts, nodes = [], {}
    for family in ("sd1", "zimage"):
        name = os.path.basename(host_tiny_models[f"{family}_diffusers"].rstrip(os.sep))
        g = Graph(comfy_host.object_info())
        loader = g.node("TurboBoothLoader", source="diffusers folder", diffusers_model=name, device="cpu")
        sample = g.node(
            "TurboBoothSample",
            model=loader.out("TURBO_MODEL"),
            prompt=f"a {family} fox in snow",
            seed=3,
            steps=STEPS,
            width=64,
            height=48,
            images_per_prompt=1,
        )
        g.node("PreviewImage", images=sample.out("IMAGE"))
        prompts.append(g.prompt)
        nodes[family] = str(sample.id)
    return prompts, nodes


def _progress(comfy_host, host_tiny_models, **kwargs) -> tuple[dict, bool]:
    """{family: [(value, max, carries a preview)] of its sample node}, and whether the host is a current ComfyUI."""
    prompts, nodes = _prompts(comfy_host, host_tiny_models)
    res = run_inprocess(comfy_host, prompts, **kwargs)
    out = {}
    for (family, node), result in zip(nodes.items(), res.results, strict=True):
        result.check()
        out[family] = [
            (e["value"], e["max"], e["preview"]) for e in result.events("progress") if str(e.get("node")) == node
        ]
    current = (res.raw.get("comfyui") or {}).get("version") is not None  # comfyui_version exists since late 2024
    return out, current


def _steps(preview: bool) -> list:
    return [(i, STEPS, preview) for i in range(1, STEPS + 1)]


def test_previews_follow_the_host_preview_method(comfy_host, host_tiny_models):
    shown, current = _progress(comfy_host, host_tiny_models, comfy_flags=["--preview-method", "latent2rgb"])
    assert shown["sd1"] == _steps(True), "every SD1.x step carries ComfyUI's SD15 latent2rgb preview"
    if current:
        assert shown["zimage"] == _steps(True), "current ComfyUI previews Z-Image latents in its Flux format"
    else:
        assert shown["zimage"] == _steps(False), "the pinned host has no Flux latent format: progress only"


def test_no_previews_unless_the_host_asks(comfy_host, host_tiny_models):
    shown, current = _progress(comfy_host, host_tiny_models)
    assert shown == {"sd1": _steps(False), "zimage": _steps(False)}
    if current:  # the current frontend sets the method per prompt, over the command line's
        shown, _ = _progress(comfy_host, host_tiny_models, extra_data={"preview_method": "latent2rgb"})
        assert shown == {"sd1": _steps(True), "zimage": _steps(True)}
