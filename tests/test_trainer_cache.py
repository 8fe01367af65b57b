"""cache_to_disk: latents and prompt embeddings in the run folder; a resume skips the encoders, bit-exactly."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image
from turbobooth.manager.spec import ModelSpec, TurboModel
from turbobooth.manager.tiny import build_tiny_sd1, build_tiny_zimage
from turbobooth.trainer import cache, runs
from turbobooth.trainer.config import TrainConfig

RED = [(250, 20, 20), (235, 45, 15), (255, 0, 40)]
BLUE = [(20, 20, 250), (40, 60, 230)]


def _model(family="zimage"):
    pipe = build_tiny_zimage(0) if family == "zimage" else build_tiny_sd1(0)
    pipe.set_progress_bar_config(disable=True)
    return TurboModel(ModelSpec("tiny"), family, pipe, f"tiny-{family}")


def _squares(colors, size=32):
    return [Image.new("RGB", (size, size), c) for c in colors]


def _cfg(tmp_path, name="run", **kw):
    args = dict(
        family="zimage",
        resolution=32,
        steps=4,
        lr=3e-3,
        rank=4,
        output_dir=str(tmp_path / name),
        log_tensorboard=False,
        instance_prompt="a photo of sks dog",
        class_prompt="a photo of dog",
        seed=5,
    )
    args.update(kw)
    return TrainConfig(**args)


def _same(a, b):
    return set(a.tensors) == set(b.tensors) and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


@pytest.fixture
def encoder_calls(monkeypatch):
    """Counts of VAE encodes and text-encoder forwards (any model built in the test)."""
    calls = {"vae": 0, "text_encoder": 0}

    def counting(cls, method, what):
        real = getattr(cls, method)

        def wrapper(self, *a, **k):
            calls[what] += 1
            return real(self, *a, **k)

        monkeypatch.setattr(cls, method, wrapper)

    def watch(model):
        counting(type(model.pipe.vae), "encode", "vae")
        counting(type(model.pipe.text_encoder), "forward", "text_encoder")
        return calls

    return watch


@pytest.mark.parametrize("family", ["zimage", "sd1"])
def test_resume_reads_the_cache_instead_of_the_encoders_and_stays_bit_exact(
    family, tmp_path, one_thread, encoder_calls
):
    model = _model(family)
    calls = encoder_calls(model)
    inst, cls = _squares(RED), _squares(BLUE)
    kw = dict(family=family, batch_size=2, with_prior_preservation=True, num_class_images=2, caption_dropout=0.3)
    memory = runs.train(model, _cfg(tmp_path, "memory", **kw), inst, class_images=cls)
    assert not os.path.exists(os.path.join(tmp_path, "memory", cache.CACHE_FILE))  # off by default

    cfg = _cfg(tmp_path, "disk", cache_to_disk=True, checkpoint_every=2, **kw)
    assert cfg.trajectory_fingerprint() == _cfg(tmp_path, "memory", **kw).trajectory_fingerprint()
    done = []
    calls.update(vae=0, text_encoder=0)
    first = runs.train(
        model, cfg, inst, class_images=cls, on_step=lambda s, t, p: done.append(s), should_stop=lambda: len(done) >= 2
    )
    assert first.stopped and first.step == 2
    assert calls["vae"] == len(inst) + len(cls) and calls["text_encoder"] == 3  # instance, class and empty prompt
    assert os.path.isfile(os.path.join(cfg.output_dir, cache.CACHE_FILE))

    calls.update(vae=0, text_encoder=0)
    second = runs.train(model, cfg.replace(resume="latest"), inst, class_images=cls)
    assert calls == {"vae": 0, "text_encoder": 0}
    assert second.step == 4 and second.losses == memory.losses
    assert _same(second.lora, memory.lora)


def test_a_damaged_or_foreign_cache_is_ignored_with_one_warning_and_rebuilt(tmp_path, caplog, encoder_calls):
    model = _model()
    calls = encoder_calls(model)
    cfg = _cfg(tmp_path, steps=2, cache_to_disk=True)
    path = os.path.join(cfg.output_dir, cache.CACHE_FILE)
    reference = runs.train(model, cfg, _squares(RED))
    good = open(path, "rb").read()
    damaged = good[:-1] + bytes([good[-1] ^ 0xFF])  # one byte of tensor data
    cases = (
        ("cannot be read", b"not a safetensors file", RED),
        ("cannot be read", good[: len(good) // 2], RED),
        ("contents are damaged", damaged, RED),
        ("other images", None, BLUE),
    )
    for what, content, images in cases:
        if content is not None:
            with open(path, "wb") as f:
                f.write(content)
        calls.update(vae=0, text_encoder=0)
        caplog.clear()
        with caplog.at_level("WARNING"):
            result = runs.train(model, cfg, _squares(images))
        warnings = [r for r in caplog.records if "ignoring the data cache" in r.getMessage()]
        assert len(warnings) == 1 and what in warnings[0].getMessage(), (what, caplog.text)
        assert calls["vae"] == len(images), what  # encoded again ...
        if images is RED:
            assert _same(result.lora, reference.lora), what  # ... to the same tensors
    # the rebuilt file is whole: the next run reads it without a warning and without the encoders
    calls.update(vae=0, text_encoder=0)
    caplog.clear()
    with caplog.at_level("WARNING"):
        runs.train(model, cfg, _squares(BLUE))
    assert calls == {"vae": 0, "text_encoder": 0} and "data cache" not in caplog.text
    assert not [n for n in os.listdir(cfg.output_dir) if n.endswith(".tmp")]


def test_requeued_node_run_resumes_from_the_cache(tmp_path, monkeypatch, encoder_calls):
    import turbobooth
    from turbobooth.nodes import comfy as host

    monkeypatch.setattr(host, "output_directory", lambda: str(tmp_path))
    model = _model()
    calls = encoder_calls(model)
    node = turbobooth.NODE_CLASS_MAPPINGS["TurboBoothDreamBoothTrain"]()
    assert node.INPUT_TYPES()["optional"]["cache_to_disk"][0] == "BOOLEAN"
    images = torch.rand(2, 32, 32, 3)
    args = dict(
        instance_prompt="a photo of sks dog",
        class_prompt="a photo of dog",
        learning_rate=1e-3,
        rank=4,
        resolution=32,
        train_mode="lora",
        prior_loss_weight=1.0,
        seed=1,
        run_name="cached",
        checkpoint_every=1,
        cache_to_disk=True,
    )
    node.train(model, images, steps=2, **args)
    (folder,) = os.listdir(tmp_path / "turbobooth_training")
    assert os.path.isfile(tmp_path / "turbobooth_training" / folder / cache.CACHE_FILE)
    calls.update(vae=0, text_encoder=0)
    more, _, _, _ = node.train(model, images, steps=3, **args)  # more steps: resumes at checkpoint-2
    assert calls == {"vae": 0, "text_encoder": 0} and more.metadata["steps"] == "3"
    assert os.listdir(tmp_path / "turbobooth_training") == [folder]  # cache_to_disk keeps the run folder
    straight, _, _, _ = node.train(model, images, steps=3, **dict(args, cache_to_disk=False, run_name="plain"))
    assert _same(more, straight)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offloaded_encoders_leave_the_gpu_whether_encoded_or_read_from_the_cache(tmp_path, encoder_calls):
    pipe = build_tiny_zimage(0).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    model = TurboModel(ModelSpec("tiny"), "zimage", pipe, "tiny-zimage", device="cuda")
    calls = encoder_calls(model)
    where = []

    def on_step(step, total, preview):
        where.append((pipe.vae.device.type, pipe.text_encoder.device.type))

    cfg = _cfg(tmp_path, steps=2, checkpoint_every=1, cache_to_disk=True, offload_encoders=True, memory="none")
    first = runs.train(model, cfg, _squares(RED), on_step=on_step, should_stop=lambda: len(where) >= 1)
    assert first.stopped and where == [("cpu", "cpu")] and calls["vae"] == len(RED)
    assert pipe.vae.device.type == "cuda"  # back where the loader put it
    calls.update(vae=0, text_encoder=0)
    second = runs.train(model, cfg.replace(resume="latest"), _squares(RED), on_step=on_step)
    assert second.step == 2 and calls == {"vae": 0, "text_encoder": 0}
    assert where == [("cpu", "cpu")] * 2 and pipe.text_encoder.device.type == "cuda"
