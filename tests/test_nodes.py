"""The node classes called directly (no ComfyUI): inputs in, one manager call, ComfyUI types out."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import turbobooth
from turbobooth.manager.errors import InvalidInputError, ModelSourceError
from turbobooth.manager.tiny import write_tiny_models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_models(str(tmp_path_factory.mktemp("tiny")), formats=("diffusers",))


@pytest.fixture(autouse=True)
def model_folders(tiny, monkeypatch):
    """ComfyUI's models/diffusers is where the tiny models are (widget names resolve only inside it)."""
    from turbobooth.nodes import comfy as host

    root = os.path.dirname(tiny["zimage_diffusers"])
    monkeypatch.setattr(host, "folder_roots", lambda kind: [root] if kind == "diffusers" else [])


def node(node_id):
    return turbobooth.NODE_CLASS_MAPPINGS[node_id]()


def load(tiny, which="zimage_diffusers", **kw):
    args = dict(source="diffusers folder", diffusers_model=os.path.basename(tiny[which]), repo_id="", revision="main",
                diffusion_model="(none)", text_encoder="(none)", vae="(none)", checkpoint="(none)",
                family="auto", dtype="auto", device="auto", offload="none")
    args.update(kw)
    return node("TurboBoothLoader").load(**args)[0]


def sample(model, **kw):
    args = dict(model=model, prompt="a photo of a dog", seed=0, steps=0, width=64, height=64,
                images_per_prompt=1, sampler="euler", shift=0.0)
    args.update(kw)
    return node("TurboBoothSample").sample(**args)


def test_every_node_id_is_prefixed_and_named():
    assert turbobooth.NODE_CLASS_MAPPINGS, "no nodes registered"
    for node_id, cls in turbobooth.NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("TurboBooth"), node_id
        assert node_id in turbobooth.NODE_DISPLAY_NAME_MAPPINGS
        assert cls.CATEGORY.startswith("TurboBooth")
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"}
        assert isinstance(cls.RETURN_TYPES, tuple) and hasattr(cls, cls.FUNCTION)
    names = set(turbobooth.NODE_DISPLAY_NAME_MAPPINGS.values())
    assert {"TurboLoader", "TurboSample", "NegativePrompt/CFG"} <= names


def test_loader_sample_gives_comfy_image_and_latent(tiny):
    model = load(tiny)
    images, latent = sample(model, prompt="a dog\na cat", images_per_prompt=2)
    assert images.shape == (4, 64, 64, 3) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    assert latent["samples"].shape == (4, 16, 8, 8)
    assert load(tiny) is model, "the loader must hand out the cached model"


def test_guidance_node_feeds_sampler(tiny):
    model = load(tiny)
    (g,) = node("TurboBoothGuidance").build("blurry\ndark", 3.0, 1.0, 0.0, per_prompt_scales="2.5, 0")
    assert g.negative_prompts == ("blurry", "dark") and g.scales == (2.5, 0.0)
    plain, _ = sample(model, prompt="a dog\na cat")
    guided, _ = sample(model, prompt="a dog\na cat", guidance=g)
    assert torch.allclose(plain[1], guided[1], atol=1e-5) and not torch.allclose(plain[0], guided[0], atol=1e-3)
    with pytest.raises(InvalidInputError, match="comma-separated"):
        node("TurboBoothGuidance").build("", 3.0, 1.0, 0.0, per_prompt_scales="high, low")


def test_sd1_defaults_and_img2img_through_the_node(tiny):
    model = load(tiny, "sd1_diffusers")
    images, _ = sample(model, steps=3)
    again, _ = sample(model, steps=3, init_image=images, denoise=0.7)
    assert again.shape == images.shape
    mask = torch.zeros(1, 64, 64)
    mask[:, :32] = 1
    inpainted, _ = sample(model, steps=3, init_image=images, mask=mask, denoise=1.0)
    assert inpainted.shape == images.shape


def test_node_errors_are_clear(tiny):
    with pytest.raises(ModelSourceError, match="not found in models/diffusers"):
        load(tiny, diffusers_model="no-such-model")
    model = load(tiny)
    with pytest.raises(InvalidInputError, match="width=72"):
        sample(model, width=72)
    with pytest.raises(InvalidInputError, match="no prompt"):
        sample(model, prompt="\n\n")


def test_cancel_stops_between_steps(tiny, monkeypatch):
    host = importlib.import_module("turbobooth.nodes.comfy")
    from turbobooth.manager.errors import Interrupted

    calls = {"n": 0}

    def stop_after_two():
        calls["n"] += 1
        return calls["n"] > 2

    monkeypatch.setattr(host, "interrupted", stop_after_two)
    sample_mod = importlib.import_module("turbobooth.nodes.sample")
    monkeypatch.setattr(sample_mod.host, "interrupted", stop_after_two)
    with pytest.raises(Interrupted):
        sample(load(tiny))
    assert calls["n"] == 3, "must stop at the first step after the request"


def test_two_loras_stack_and_leave_the_base_untouched(tiny, tmp_path):
    from PIL import Image
    from turbobooth.trainer.config import TrainConfig
    from turbobooth.trainer.loop import train

    model = load(tiny)
    before = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    loras = []
    for i, color in enumerate(((250, 20, 20), (20, 250, 20))):
        cfg = TrainConfig(family="zimage", resolution=32, steps=3, lr=5e-3, rank=4, seed=i, log_tensorboard=False,
                          output_dir=str(tmp_path / f"run{i}"), instance_prompt="a photo of sks dog")
        loras.append(train(model, cfg, [Image.new("RGB", (32, 32), color)] * 3).lora)
    base, _ = sample(model, steps=3)
    one, _ = sample(model, steps=3, lora=loras[0])
    one_as_second, _ = sample(model, steps=3, lora_2=loras[0])
    both, _ = sample(model, steps=3, lora=loras[0], lora_2=loras[1])
    assert torch.equal(one, one_as_second)
    assert not torch.allclose(one, base, atol=1e-4) and not torch.allclose(both, one, atol=1e-4)
    again, _ = sample(model, steps=3)
    assert torch.equal(again, base), "LoRAs must come off the cached base after sampling"
    assert all(torch.equal(v, model.denoiser.state_dict()[k]) for k, v in before.items())
