"""Live previews while sampling: the latents handed out each step, their x0 estimate, and no work without them."""

from __future__ import annotations

import logging
import types

import pytest
import torch
from turbobooth.manager import cache as cache_mod
from turbobooth.manager import previews, sampling
from turbobooth.manager.sampling import Guidance, generate
from turbobooth.manager.spec import ModelSpec
from turbobooth.nodes import comfy as host

NO_CFG = Guidance(negative_prompts=("",), scales=(0.0,))


@pytest.fixture(scope="module")
def zmodel(tiny_models):
    return cache_mod.get_model(ModelSpec(tiny_models["zimage_diffusers"]))


@pytest.fixture(scope="module")
def sdmodel(tiny_models):
    return cache_mod.get_model(ModelSpec(tiny_models["sd1_diffusers"]))


def _model_space(model, raw):
    """SampleResult.latents (raw VAE latents) -> the pipeline's latent space, where previews live."""
    cfg = model.pipe.vae.config
    return (raw - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor


def _run(model, steps=3, prompts="a dog\na cat", **kw):
    seen, steps_seen = [], []
    kw.setdefault("width", 64)
    kw.setdefault("height", 48)
    result = generate(
        model,
        prompts,
        seed=4,
        steps=steps,
        preview=lambda x0: seen.append(x0) or len(seen),
        on_step=lambda s, t, shown: steps_seen.append((s, t, shown)),
        **kw,
    )
    return result, seen, steps_seen


@pytest.mark.parametrize("family, channels", [("zimage", 16), ("sd1", 4)])
def test_a_latent_arrives_every_step_for_the_first_image(zmodel, sdmodel, family, channels):
    model = zmodel if family == "zimage" else sdmodel
    result, seen, steps_seen = _run(model, steps=3)
    assert len(seen) == 3
    for x0 in seen:
        assert x0.shape == (1, channels, 6, 8) and x0.dtype == torch.float32 and torch.isfinite(x0).all()
    # on_step gets what preview returned, step by step
    assert steps_seen == [(1, 3, 1), (2, 3, 2), (3, 3, 3)]
    # the last estimate (sigma 0 after the last Euler step) is the first image's output latent
    torch.testing.assert_close(seen[-1], _model_space(model, result.latents[:1]), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(seen[0], seen[-1]), "the previews must follow the sampling, not repeat one latent"


def _transformer_calls(model):
    """Records (input latents, velocity) of every transformer call of a Z-Image pipeline (no CFG)."""
    calls = []

    def hook(_module, args, output):
        x = torch.stack([t.float() for t in args[0]]).squeeze(2)
        v = -torch.stack([t.float() for t in output[0]]).squeeze(2)  # the pipeline negates the model output
        calls.append((x[:1].clone(), v[:1].clone()))

    return calls, model.pipe.transformer.register_forward_hook(hook)


def test_zimage_euler_previews_the_x0_estimate_of_every_step(zmodel):
    calls, handle = _transformer_calls(zmodel)
    try:
        result, seen, _ = _run(zmodel, steps=4, guidance=NO_CFG)
    finally:
        handle.remove()
    sigmas = zmodel.pipe.scheduler.sigmas  # the model's own Euler scheduler ran, as loaded
    assert len(calls) == len(seen) == 4
    for k, ((x, v), x0) in enumerate(zip(calls, seen, strict=True)):
        expected = x - float(sigmas[k]) * v  # flow matching: x_t = (1 - sigma) x0 + sigma noise, v = noise - x0
        torch.testing.assert_close(x0, expected, rtol=1e-4, atol=1e-4, msg=f"step {k + 1}")
        assert not torch.allclose(x0, x), "an x0 estimate, not the noisy latent"
    torch.testing.assert_close(seen[-1], _model_space(zmodel, result.latents[:1]), rtol=1e-4, atol=1e-4)


def test_multistep_samplers_preview_the_noisy_latent(zmodel):
    calls, handle = _transformer_calls(zmodel)
    try:
        result, seen, _ = _run(zmodel, steps=3, sampler="dpmpp_2m", guidance=NO_CFG)
    finally:
        handle.remove()
    assert len(seen) == 3
    for k in range(2):  # the latent after step k is what the transformer sees at step k + 1
        torch.testing.assert_close(seen[k], calls[k + 1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen[-1], _model_space(zmodel, result.latents[:1]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["zimage", "sd1"])
def test_img2img_previews_every_denoising_step(zmodel, sdmodel, family):
    model = zmodel if family == "zimage" else sdmodel
    init = generate(model, "a dog", seed=1, steps=2, width=64, height=48).images
    result, seen, _ = _run(model, steps=4, prompts="a dog", init_image=init, denoise=0.5, width=None, height=None)
    assert len(seen) == 2 and seen[0].shape[0] == 1
    torch.testing.assert_close(seen[-1], _model_space(model, result.latents[:1]), rtol=1e-4, atol=1e-4)


def test_no_listener_means_no_callback_and_progress_alone_means_no_latent_work(zmodel, monkeypatch):
    callbacks, built = [], []
    run_pipeline = sampling._run_pipeline

    def spy(*args):
        callbacks.append(args[-1])  # the callback_on_step_end handed to diffusers
        return run_pipeline(*args)

    class Counting(previews.StepLatents):
        def __init__(self, preview):
            built.append(preview)
            super().__init__(preview)

    monkeypatch.setattr(sampling, "_run_pipeline", spy)
    monkeypatch.setattr(previews, "StepLatents", Counting)
    generate(zmodel, "a dog", steps=2, width=64, height=48)
    assert callbacks == [None] and built == [], "nobody listens: diffusers gets no callback at all"
    shown = []
    generate(zmodel, "a dog", steps=2, width=64, height=48, on_step=lambda s, t, p: shown.append(p))
    assert callable(callbacks[-1]) and built == [] and shown == [None, None], "progress only: no latent work"
    generate(zmodel, "a dog", steps=2, width=64, height=48, preview=lambda x0: None)
    assert len(built) == 1


def test_a_failing_preview_logs_once_and_never_fails_sampling(zmodel, caplog):
    calls = []

    def broken(x0):
        calls.append(x0)
        raise RuntimeError("decoder exploded")

    guarded = previews.GuardedPreview(broken, zmodel.pipe.vae.config, 0.3611, 0.1159)
    with caplog.at_level(logging.WARNING):
        result = generate(zmodel, "a dog", steps=3, width=64, height=48, preview=guarded)
    assert result.images.shape == (1, 48, 64, 3)
    assert len(calls) == 1, "after the first failure the decoder is not called again"
    assert sum("live preview failed" in r.getMessage() for r in caplog.records) == 1


def test_guarded_preview_converts_to_the_host_latent_format():
    got = []
    vae = types.SimpleNamespace(scaling_factor=0.5, shift_factor=0.25)
    same = previews.GuardedPreview(got.append, vae, 0.5, 0.25)
    x = torch.randn(1, 4, 2, 2)
    same(x)
    assert got[-1] is x, "same scaling as the host's format: passed through untouched"
    other = previews.GuardedPreview(got.append, vae, 0.18215)
    other(x)
    torch.testing.assert_close(got[-1], (x / 0.5 + 0.25) * 0.18215)


def test_outside_comfyui_there_is_no_previewer(zmodel):
    assert host.latent_previewer(zmodel) is None
