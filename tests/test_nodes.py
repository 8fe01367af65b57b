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


def test_a_node_subclass_inherits_what_it_does_not_set():
    """Other packs extend nodes by subclassing them, as V1 nodes allow."""
    base = turbobooth.NODE_CLASS_MAPPINGS["TurboBoothSample"]

    class MySample(base):
        CATEGORY = "mine"

    assert MySample.CATEGORY == "mine" and base.CATEGORY == "TurboBooth"
    assert (MySample.RETURN_TYPES, MySample.RETURN_NAMES, MySample.FUNCTION) == (
        base.RETURN_TYPES, base.RETURN_NAMES, base.FUNCTION)
    assert MySample.INPUT_TYPES() == base.INPUT_TYPES()


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
    from turbobooth.trainer.runs import train

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


# --------------------------------------------------------------------------- web extension support


def test_image_batch_joins_any_inputs_in_order_at_the_first_size():
    batch = node("TurboBoothImageBatch")
    a = torch.full((1, 8, 8, 3), 0.25)
    b = torch.full((2, 8, 8, 3), 0.5)
    c = torch.full((1, 16, 4, 4), 0.75)  # another size, RGBA
    [out] = batch.batch(a, image2=b, image5=c)
    assert out.shape == (4, 8, 8, 3)
    assert [round(float(x), 2) for x in out.mean(dim=(1, 2, 3))] == [0.25, 0.5, 0.5, 0.75]
    assert batch.batch(a)[0].shape == (1, 8, 8, 3)
    spec = type(batch).INPUT_TYPES()
    assert list(spec["required"]) == ["image1"] and len(spec["optional"]) == 7
    with pytest.raises(InvalidInputError, match="input 2"):
        batch.batch(a, image2=torch.zeros(8, 8, 3))


def test_step_log_is_appended_per_step_and_read_only_by_run_id(tmp_path):
    from turbobooth.trainer.runs import StepLog, read_step_log

    root = tmp_path / "turbobooth_training"
    run = root / "sks-0123456789"
    run.mkdir(parents=True)
    (tmp_path / "secret.jsonl").write_text('{"step": 1}\n')
    calls = []

    def on_step(step, total, preview, info=None):
        calls.append((step, total, info["loss"]))

    log = StepLog(str(run), on_step, keep_until=0)
    for s in (1, 2, 3):
        log(s, 3, None, info={"loss": 1.0 / s, "lr": 1e-4})
    with open(run / "steps.jsonl", "a") as f:
        f.write('{"step": 4, "loss"')  # a line still being written
    rows = read_step_log(str(root), "sks-0123456789")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["loss"] == 1.0 and calls[-1] == (3, 3, 1 / 3)
    StepLog(str(run), None, keep_until=2)(3, 3, None, info={"loss": 0.5})  # a resume from step 2 repeats step 3
    assert [(r["step"], r["loss"]) for r in read_step_log(str(root), "sks-0123456789")] == [(1, 1.0), (2, 0.5), (3, 0.5)]
    StepLog(str(run), lambda step, total, preview: calls.append(step), keep_until=3)(4, 4, None)  # old signature
    assert calls[-1] == 4
    for bad in ("unknown-0123456789", "../secret", "..", "sks-0123456789/../..", "/etc/passwd", "", None,
                "sks-0123456789/steps.jsonl", "%2e%2e"):
        assert read_step_log(str(root), bad) is None, bad


def test_train_progress_sends_one_event_per_step_for_its_node(monkeypatch):
    from turbobooth.nodes import comfy as host

    sent = []
    monkeypatch.setattr(host, "send_event", lambda name, data: sent.append((name, data)))
    p = host.TrainProgress(3, "7")
    p(1, 3, None, info={"loss": 0.5, "lr": 1e-4})  # before the run folder is known: nothing to name
    assert not sent
    p.run_started("/x/turbobooth_training/sks-0123456789")
    assert host.ACTIVE_RUNS["7"]["run"] == "sks-0123456789"
    p(2, 3, None, info={"loss": 0.25, "lr": 1e-4})
    p.finished(3, stopped=False)
    assert "7" not in host.ACTIVE_RUNS
    phases = [(d["phase"], d["node"], d["run"]) for _, d in sent]
    assert phases == [("start", "7", "sks-0123456789"), ("step", "7", "sks-0123456789"),
                      ("done", "7", "sks-0123456789")]
    assert sent[1][1]["loss"] == 0.25 and sent[1][1]["total"] == 3 and {n for n, _ in sent} == {"turbobooth.train"}
    assert host.TrainProgress(3, None)._send({"phase": "x"}) is None  # no node id (API use): no events


def test_dreambooth_node_takes_its_unique_id_and_checkpoint_save_reports_the_path():
    spec = turbobooth.NODE_CLASS_MAPPINGS["TurboBoothDreamBoothTrain"].INPUT_TYPES()
    assert spec["hidden"] == {"unique_id": "UNIQUE_ID"}


def test_dreambooth_captions_input_is_one_caption_per_image_and_part_of_the_run(tiny, tmp_path, monkeypatch):
    from turbobooth.nodes import comfy as host
    from turbobooth.trainer import objective

    monkeypatch.setattr(host, "output_directory", lambda: str(tmp_path))
    planned = []
    real = objective.plan_prompts
    monkeypatch.setattr(objective, "plan_prompts", lambda *a, **k: planned.append(real(*a, **k)) or planned[-1])
    spec = turbobooth.NODE_CLASS_MAPPINGS["TurboBoothDreamBoothTrain"].INPUT_TYPES()["optional"]["captions"]
    assert spec[0] == "STRING" and spec[1]["multiline"]
    model, images = load(tiny), torch.rand(3, 32, 32, 3)
    args = dict(instance_prompt="a photo of sks dog", class_prompt="a photo of dog", steps=1, learning_rate=1e-3,
                rank=2, resolution=32, train_mode="lora", prior_loss_weight=1.0, seed=0, run_name="captioned")
    train = node("TurboBoothDreamBoothTrain").train
    train(model, images, **args, captions="[trigger] on a beach\n\nclose-up of [trigger]\n")
    data = planned[-1]
    assert [data.prompts[i] for i in data.inst_prompt] == ["sks on a beach", "a photo of sks dog", "close-up of sks"]
    runs = tmp_path / "turbobooth_training"
    assert len(os.listdir(runs)) == 1
    train(model, images, **args)  # no captions: another run folder
    assert len(os.listdir(runs)) == 2 and set(planned[-1].prompts) == {"a photo of sks dog"}
    for text, n in (("one\ntwo", 2), ("a\nb\nc\nd", 4), ("a\n\n\n\n", 4)):
        with pytest.raises(InvalidInputError, match=f"{n} captions were given for 3 instance images"):
            train(model, images, **args, captions=text)
    assert len(os.listdir(runs)) == 2


def test_web_extension_mirrors_the_loader_sources():
    """web/loader.js names the widgets of each source as manager/spec.py does, and __init__ serves web/."""
    import json
    import re

    from turbobooth.manager.spec import SOURCE_WIDGETS, SOURCES

    root = os.path.dirname(turbobooth.__file__)
    assert turbobooth.WEB_DIRECTORY == "./web"
    with open(os.path.join(root, "web", "loader.js"), encoding="utf-8") as f:
        text = f.read()
    block = re.search(r"SOURCE_WIDGETS = (\{.*?\});", text, re.S).group(1)
    js = json.loads(re.sub(r",\s*}", "}", block))
    assert list(js) == list(SOURCES)
    for source, widgets in SOURCE_WIDGETS.items():
        assert tuple(js[source]) == (("repo_id", "revision") if source == "hub repo" else widgets)
    loader_widgets = turbobooth.NODE_CLASS_MAPPINGS["TurboBoothLoader"].INPUT_TYPES()["required"]
    assert {w for ws in js.values() for w in ws} <= set(loader_widgets)
