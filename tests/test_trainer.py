"""The DreamBooth loop on tiny models: learning, prior preservation, pairing, resume, caching, bad inputs."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from PIL import Image
from turbobooth.manager import lora as L
from turbobooth.manager import sampling
from turbobooth.manager.errors import InvalidInputError, WrongFamilyError
from turbobooth.manager.spec import ModelSpec, TurboModel
from turbobooth.manager.tiny import build_tiny_sd1, build_tiny_zimage
from turbobooth.trainer import runs
from turbobooth.trainer.cache import _encode_latents, _encode_prompt
from turbobooth.trainer.config import TrainConfig
from turbobooth.trainer.objective import _Objective

RED = [(250, 20, 20), (235, 45, 15), (255, 0, 40)]
BLUE = [(20, 20, 250), (40, 60, 230), (10, 30, 200), (60, 60, 255)]


def _squares(colors, size=32):
    return [Image.new("RGB", (size, size), c) for c in colors]


def _model(family="zimage", identity=None):
    pipe = build_tiny_zimage(0) if family == "zimage" else build_tiny_sd1(0)
    pipe.set_progress_bar_config(disable=True)
    return TurboModel(ModelSpec("tiny"), family, pipe, identity or f"tiny-{family}")


def _cfg(tmp_path, name="run", **kw):
    args = dict(family="zimage", resolution=32, steps=4, lr=1e-3, rank=4, output_dir=str(tmp_path / name),
                log_tensorboard=False, instance_prompt="a photo of sks dog", class_prompt="a photo of dog", seed=7)
    args.update(kw)
    return TrainConfig(**args)


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same_state(before, module):
    after = module.state_dict()
    return set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)


def _same_lora(a, b):
    return set(a.tensors) == set(b.tensors) and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


@pytest.fixture(scope="module")
def zmodel():
    return _model("zimage")


def _eval_loss(model, images, prompt, positions=range(1000, 1024)):
    """The training objective on fixed noise/timesteps (positions), averaged."""
    latents = _encode_latents(model.pipe, model.family, images, "cpu")
    emb = _encode_prompt(model.pipe, model.family, prompt, "cpu")
    obj = _Objective(model.pipe, model.family, 0)
    pos = list(positions)
    lat = torch.stack([latents[i % len(latents)] for i in range(len(pos))])
    cond = [emb] * len(pos) if model.family == "zimage" else torch.stack([emb] * len(pos))
    with torch.no_grad():
        pred, target = obj.predict_and_target(model.denoiser, lat, cond, pos, "cpu", torch.float32)
    return float(((pred - target) ** 2).mean())


def test_training_lowers_instance_loss_and_leaves_base_untouched(zmodel, tmp_path):
    before = _state(zmodel.denoiser)
    grads = [p.requires_grad for p in zmodel.denoiser.parameters()]
    images = _squares(RED)
    base_loss = _eval_loss(zmodel, images, "a photo of sks dog")
    steps = []
    result = runs.train(zmodel, _cfg(tmp_path, steps=25, lr=1e-2), images,
                        on_step=lambda s, t, p: steps.append((s, t)))
    assert steps == [(i, 25) for i in range(1, 26)]
    assert result.lora is not None and result.model is None and not result.stopped
    assert len(result.losses) == 25 and result.loss_plot.size == (640, 360)
    assert os.path.isfile(os.path.join(result.lora and _cfg(tmp_path).output_dir, "loss.png"))
    assert _same_state(before, zmodel.denoiser)  # adapters removed, weights bit-identical
    assert [p.requires_grad for p in zmodel.denoiser.parameters()] == grads
    assert not zmodel.denoiser.training and "forward" not in zmodel.denoiser.__dict__
    with L.applied(zmodel, [(result.lora, 1.0)]):
        trained_loss = _eval_loss(zmodel, images, "a photo of sks dog")
    assert trained_loss < base_loss * 0.98, (base_loss, trained_loss)
    meta = result.lora.metadata
    assert meta["trigger"] == "a photo of sks dog" and meta["steps"] == "25" and meta["resolution"] == "32"
    assert meta["base_model"] == zmodel.base_name() and "base_identity" not in meta


def test_every_element_keeps_its_own_prompt(zmodel, tmp_path, monkeypatch):
    """Class images must be paired with the class prompt, instance images with their own prompt."""
    seen = []
    real = _Objective.predict_and_target

    def spy(self, denoiser, latents, cond, positions, device, dtype):
        seen.append((latents.clone(), [c.clone() for c in cond]))
        return real(self, denoiser, latents, cond, positions, device, dtype)

    monkeypatch.setattr(_Objective, "predict_and_target", spy)
    inst, cls = _squares(RED), _squares(BLUE)
    runs.train(zmodel, _cfg(tmp_path, steps=3, batch_size=2, with_prior_preservation=True, num_class_images=4),
               inst, class_images=cls)
    inst_lat = _encode_latents(zmodel.pipe, "zimage", inst, "cpu")
    cls_lat = _encode_latents(zmodel.pipe, "zimage", cls, "cpu")
    inst_emb = _encode_prompt(zmodel.pipe, "zimage", "a photo of sks dog", "cpu")
    cls_emb = _encode_prompt(zmodel.pipe, "zimage", "a photo of dog", "cpu")
    assert len(seen) == 3
    for latents, cond in seen:
        assert latents.shape[0] == len(cond) == 4
        for lat, emb in zip(latents, cond, strict=True):
            from_class = any(torch.equal(lat, c) for c in cls_lat)
            from_inst = any(torch.equal(lat, c) for c in inst_lat)
            assert from_class != from_inst
            expected = cls_emb if from_class else inst_emb
            assert emb.shape == expected.shape and torch.equal(emb, expected)
        # the cached list is never grown in place
        assert all(c.shape[0] < 100 for c in cond)


def _normalise_latents(model, images):
    """Set the tiny VAE's shift/scale so that ``images`` encode to latents of mean 0 and std 1.

    Real VAEs ship such constants; the random tiny one keeps Z-Image's, which leave its latents ~0.1 in size,
    so different colours would hardly differ next to the unit training noise.
    """
    vae = model.pipe.vae
    vae.register_to_config(scaling_factor=1.0, shift_factor=0.0)
    raw = _encode_latents(model.pipe, model.family, images, "cpu")
    vae.register_to_config(scaling_factor=float(1.0 / raw.std()), shift_factor=float(raw.mean()))


def _fit_base(model, images, prompt, steps, lr, batch=4):
    """Fine-tune the whole denoiser on ``images`` under ``prompt`` with the training objective.

    DreamBooth's premise is a base model that already renders the class; a random model does not, so here it
    is first taught what ``prompt`` looks like.
    """
    denoiser = model.denoiser
    latents = _encode_latents(model.pipe, model.family, images, "cpu")
    emb = _encode_prompt(model.pipe, model.family, prompt, "cpu")
    objective = _Objective(model.pipe, model.family, 1)
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=lr, weight_decay=0.0)
    denoiser.requires_grad_(True)
    denoiser.train()
    for i in range(steps):
        positions = list(range(i * batch, (i + 1) * batch))
        x0 = torch.stack([latents[p % len(latents)] for p in positions])
        pred, target = objective.predict_and_target(denoiser, x0, [emb] * batch, positions, "cpu", torch.float32)
        loss = ((pred - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    denoiser.requires_grad_(False)
    denoiser.eval()


@contextlib.contextmanager
def _one_thread():
    """Tiny tensors: a second thread only adds contention on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_prior_preservation_keeps_class_outputs_near_the_base(tmp_path):
    """Class-prompt outputs drift less from the base model with prior preservation than without it.

    The base is first fitted to blue class images under the class prompt (a base that renders its class, as
    DreamBooth assumes), then a LoRA learns red instance images under an instance prompt that shares most of
    its tokens with the class prompt, once without and once with the prior term on those class images. Drift
    is the mean absolute change of what the class prompt generates (latents and decoded images) at fixed
    seeds, against the fitted base.
    """
    class_prompt, instance_prompt = "a photo of a dog", "a photo of sks dog"
    model = _model("zimage")
    cls, inst = _squares(BLUE), _squares(RED)
    guidance = sampling.Guidance(negative_prompts=("",), scales=(0.0,))

    def outputs(prompt, loras=()):
        result = sampling.generate(model, [prompt] * 4, seed=100, steps=4, width=32, height=32, guidance=guidance,
                                   loras=loras)
        return result.latents, result.images

    def change(a, b):
        return [float((x - y).abs().mean()) for x, y in zip(a, b, strict=True)]

    with _one_thread():
        _normalise_latents(model, cls + inst)
        _fit_base(model, cls, class_prompt, steps=60, lr=5e-3)
        base_class, base_instance = outputs(class_prompt), outputs(instance_prompt)
        drift, learned = {}, {}
        for prior in (False, True):
            cfg = _cfg(tmp_path, f"prior{prior}", steps=150, lr=5e-3, instance_prompt=instance_prompt,
                       class_prompt=class_prompt, with_prior_preservation=prior, num_class_images=len(cls))
            lora = [(runs.train(model, cfg, inst, class_images=cls if prior else None).lora, 1.0)]
            drift[prior] = change(outputs(class_prompt, lora), base_class)
            learned[prior] = change(outputs(instance_prompt, lora), base_instance)

    (lat_without, img_without), (lat_with, img_with) = drift[False], drift[True]
    assert lat_without > 0.1, drift  # without the prior term the shared tokens carry the instance into the class
    assert lat_with < 0.8 * lat_without, drift
    assert img_with < img_without, drift
    # the prior term does not just stop training: the instance prompt still moves at least half as far
    assert learned[True][0] > 0.5 * learned[False][0], learned


def test_resume_is_bit_exact(zmodel, tmp_path):
    inst, cls = _squares(RED), _squares(BLUE)
    kw = dict(steps=6, lr=3e-3, lr_scheduler="cosine", lr_warmup_steps=1, batch_size=2,
              gradient_accumulation_steps=2, with_prior_preservation=True, num_class_images=4)
    full = runs.train(zmodel, _cfg(tmp_path, "full", **kw), inst, class_images=cls)

    done = []
    cfg = _cfg(tmp_path, "split", checkpoint_every=2, keep_last=1, **kw)
    first = runs.train(zmodel, cfg, inst, class_images=cls, on_step=lambda s, t, p: done.append(s),
                       should_stop=lambda: len(done) >= 3)
    assert first.stopped and first.step == 3 and done == [1, 2, 3]
    assert first.checkpoint_dir.endswith("checkpoint-3")
    # keep_last=1: checkpoint-2 was pruned when checkpoint-3 was written
    assert sorted(n for n in os.listdir(cfg.output_dir) if n.startswith("checkpoint-")) == ["checkpoint-3"]
    second = runs.train(zmodel, cfg.replace(resume="latest"), inst, class_images=cls)
    assert not second.stopped and second.step == 6
    assert _same_lora(second.lora, full.lora)
    assert second.losses == full.losses


def test_a_single_process_puts_nothing_on_accelerates_default_device(zmodel, tmp_path, monkeypatch):
    """The loss and the stop flag are combined over processes only when there are several: accelerate's default
    device (cuda:0) need not be the one the model was loaded on."""
    import accelerate

    seen = []
    real = accelerate.Accelerator.reduce
    monkeypatch.setattr(accelerate.Accelerator, "reduce", lambda self, t, *a, **k: seen.append(t.device) or
                        real(self, t, *a, **k))
    result = runs.train(zmodel, _cfg(tmp_path, "one", steps=3), _squares(RED), should_stop=lambda: False)
    assert result.step == 3 and len(result.losses) == 3 and seen == []


def test_pre_existing_or_generated_class_images_train_the_same(zmodel, tmp_path):
    kw = dict(steps=3, with_prior_preservation=True, num_class_images=2, class_steps=2,
              class_data_dir=str(tmp_path / "priors"))
    generated = runs.train(zmodel, _cfg(tmp_path, "a", **kw), _squares(RED))
    cached = runs.train(zmodel, _cfg(tmp_path, "b", **kw), _squares(RED))
    assert _same_lora(generated.lora, cached.lora)
    # a third run that finds only one of the two images tops up and still matches
    folder = [os.path.join(r, d) for r, ds, _ in os.walk(kw["class_data_dir"]) for d in ds][0]
    os.remove(sorted(p for p in (os.path.join(folder, n) for n in os.listdir(folder)) if p.endswith(".png"))[-1])
    topped = runs.train(zmodel, _cfg(tmp_path, "c", **kw), _squares(RED))
    assert _same_lora(generated.lora, topped.lora)


def test_bad_inputs(zmodel, tmp_path):
    with pytest.raises(InvalidInputError, match="no instance images"):
        runs.train(zmodel, _cfg(tmp_path), [])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InvalidInputError, match="not writable"):
        runs.train(zmodel, _cfg(tmp_path, output_dir=str(blocker / "sub")), _squares(RED))
    with pytest.raises(WrongFamilyError, match="model is 'sd1'"):
        runs.train(_model("sd1"), _cfg(tmp_path), _squares(RED))
    with pytest.raises(InvalidInputError, match="GB free"):
        runs.train(zmodel, _cfg(tmp_path, min_free_disk_gb=1e9), _squares(RED))
    with pytest.raises(InvalidInputError, match="not a complete TurboBooth checkpoint"):
        runs.train(zmodel, _cfg(tmp_path, resume=str(tmp_path / "nothing")), _squares(RED))


def test_checkpoint_from_another_model_or_config_is_refused(zmodel, tmp_path):
    cfg = _cfg(tmp_path, "ck", steps=2, checkpoint_every=2)
    runs.train(zmodel, cfg, _squares(RED))
    other = _model("zimage", identity="another-model@abc")
    with pytest.raises(InvalidInputError, match="another-model@abc|made for model"):
        runs.train(other, cfg.replace(resume="latest"), _squares(RED))
    with pytest.raises(InvalidInputError, match="settings differ.*lr"):
        runs.train(zmodel, cfg.replace(resume="latest", lr=0.5), _squares(RED))


def test_validation_preview_and_training_adapter(zmodel, tmp_path):
    # a "training adapter" LoRA: active while training, off for previews and not part of the result
    sd = {}
    for name, module in zmodel.denoiser.named_modules():
        if name.endswith(".to_q"):
            sd[f"{name}.lora_A.weight"] = torch.randn(2, module.in_features) * 0.01
            sd[f"{name}.lora_B.weight"] = torch.randn(module.out_features, 2) * 0.01
    adapter_lora = L.TurboLora.from_peft("zimage", sd, 2.0)
    adapter = L.save_lora_file(adapter_lora, str(tmp_path / "adapter.safetensors"))
    before = _state(zmodel.denoiser)
    previews = []
    result = runs.train(zmodel, _cfg(tmp_path, steps=2, validation_every=1, validation_prompt="a photo of sks dog",
                                     validation_steps=2, training_adapter=adapter),
                        _squares(RED), on_step=lambda s, t, p: previews.append(p))
    assert all(isinstance(p, Image.Image) and p.size == (32, 32) for p in previews) and len(previews) == 2
    assert "training_adapter" in result.lora.metadata and result.lora.metadata["training_adapter"] == "adapter.safetensors"
    assert len(result.lora.down_keys) > len(adapter_lora.down_keys)
    assert _same_state(before, zmodel.denoiser)


def test_validation_image_is_logged_to_tensorboard(zmodel, tmp_path):
    import io

    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    previews = []
    cfg = _cfg(tmp_path, "tb", steps=4, validation_every=2, validation_prompt="a photo of sks dog",
               validation_steps=1, log_tensorboard=True)
    runs.train(zmodel, cfg, _squares(RED), on_step=lambda s, t, p: previews.append(p))
    events = EventAccumulator(os.path.join(cfg.output_dir, "logs"), size_guidance={"images": 0}).Reload()
    assert "validation" in events.Tags()["images"] and "loss" in events.Tags()["scalars"]
    images = events.Images("validation")
    assert [(e.step, e.width, e.height) for e in images] == [(2, 32, 32), (4, 32, 32)]
    for event, preview in zip(images, [previews[1], previews[3]], strict=True):
        logged = Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB")
        assert np.array_equal(np.asarray(logged), np.asarray(preview))


def test_sd1_lora_with_text_encoder_and_full_finetune(tmp_path):
    model = _model("sd1")
    unet_before, te_before = _state(model.denoiser), _state(model.pipe.text_encoder)
    kw = dict(family="sd1", resolution=64, steps=2, lr=1e-3)
    lora = runs.train(model, _cfg(tmp_path, "l", train_text_encoder=True, **kw), _squares(RED, 64)).lora
    assert lora.touches_text_encoder and lora.family == "sd1"
    path = L.save_lora_file(lora, str(tmp_path / "sd1.safetensors"))
    assert _same_lora(L.load_lora_file(path), lora)
    full = runs.train(model, _cfg(tmp_path, "f", train_mode="full", train_text_encoder=True, **kw),
                      _squares(RED, 64))
    assert full.lora is None and full.model is not None and full.model.pipe is not model.pipe
    assert full.model.identity.startswith("tiny-sd1|finetune:")
    assert full.model.pipe.unet is not model.pipe.unet and full.model.pipe.vae is model.pipe.vae
    changed = any(not torch.equal(a, b) for a, b in zip(full.model.pipe.unet.state_dict().values(),
                                                         unet_before.values(), strict=True))
    assert changed
    assert _same_state(unet_before, model.denoiser) and _same_state(te_before, model.pipe.text_encoder)


# ---- defects: NaN, seeds, cancel, temp files, modes, lock, adapters, precision, logging -------------


def _finite_files(folder):
    """(files checked, all finite) over every safetensors file below ``folder``."""
    from safetensors.torch import load_file

    paths = [os.path.join(d, n) for d, _, names in os.walk(folder) for n in names if n.endswith(".safetensors")]
    return len(paths), all(bool(t.isfinite().all()) for p in paths for t in load_file(p).values()
                           if t.is_floating_point())


def test_diverging_loss_stops_with_a_clear_error_and_writes_nothing_non_finite(zmodel, tmp_path):
    before = _state(zmodel.denoiser)
    cfg = _cfg(tmp_path, "nan", steps=10, lr=1e6, checkpoint_every=1, keep_last=20)
    with pytest.raises(InvalidInputError, match=r"loss became NaN at step \d+; lower the learning rate"):
        runs.train(zmodel, cfg, _squares(RED))
    n, finite = _finite_files(cfg.output_dir)
    assert n >= 1 and finite
    assert _same_state(before, zmodel.denoiser)


def test_injected_nan_never_reaches_a_checkpoint(zmodel, tmp_path, monkeypatch):
    real, calls = _Objective.predict_and_target, []

    def poisoned(self, *args):
        pred, target = real(self, *args)
        calls.append(1)
        return (pred * float("nan"), target) if len(calls) == 3 else (pred, target)

    monkeypatch.setattr(_Objective, "predict_and_target", poisoned)
    cfg = _cfg(tmp_path, "inject", steps=5, checkpoint_every=1, keep_last=9)
    with pytest.raises(InvalidInputError, match="loss became NaN at step 3"):
        runs.train(zmodel, cfg, _squares(RED))
    names = sorted(n for n in os.listdir(cfg.output_dir) if not n.startswith("loss"))
    assert names == ["checkpoint-1", "checkpoint-2"] and _finite_files(cfg.output_dir)[1]


def test_largest_seed_trains_and_generates_class_images(zmodel, tmp_path):
    seed = 2**64 - 1
    result = runs.train(zmodel, _cfg(tmp_path, steps=1, seed=seed, with_prior_preservation=True, num_class_images=5,
                                     class_steps=1, validation_every=1, validation_prompt="a photo of sks dog",
                                     validation_seed=seed, validation_steps=1), _squares(RED))
    assert result.step == 1 and result.lora.metadata["seed"] == str(seed)


def test_cancel_while_caching_latents_or_prompts(zmodel, tmp_path, monkeypatch):
    from turbobooth.manager.errors import Interrupted

    encoded = []
    real = type(zmodel.pipe.vae).encode
    monkeypatch.setattr(type(zmodel.pipe.vae), "encode", lambda self, x: encoded.append(1) or real(self, x))
    for stop_at, match, n in ((2, "caching image latents", 2), (3, "encoding prompts", 3)):
        asked, encoded[:] = [], []
        with pytest.raises(Interrupted, match=match):
            runs.train(zmodel, _cfg(tmp_path, steps=2), _squares(RED),
                       should_stop=lambda asked=asked, stop_at=stop_at: asked.append(1) or len(asked) > stop_at)
        assert len(encoded) == n
    assert not os.path.exists(_cfg(tmp_path).output_dir)  # nothing was trained, so no run folder either


def test_failed_checkpoint_write_leaves_no_temp_folder(zmodel, tmp_path, monkeypatch):
    import errno

    import safetensors.torch
    from turbobooth.manager.paths import WriteError

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    before = _state(zmodel.denoiser)
    cfg = _cfg(tmp_path, "full-disk", steps=2, checkpoint_every=1)
    with pytest.raises(WriteError, match=r"checkpoint-1: the disk is full .* MiB more needed"):
        runs.train(zmodel, cfg, _squares(RED))
    assert os.listdir(cfg.output_dir) == []
    assert _same_state(before, zmodel.denoiser)


def test_saved_files_honour_the_umask(zmodel, tmp_path):

    old = os.umask(0o022)
    try:
        cfg = _cfg(tmp_path, steps=2, checkpoint_every=1, with_prior_preservation=True, num_class_images=1,
                   class_steps=1, class_data_dir=str(tmp_path / "priors"))
        result = runs.train_in_run_folder(zmodel, cfg, str(tmp_path / "runs"), "modes", _squares(RED))
        L.save_lora_file(result.lora, str(tmp_path / "out.safetensors"))
    finally:
        os.umask(old)
    files = [os.path.join(d, n) for root in ("runs", "priors") for d, _, ns in os.walk(tmp_path / root) for n in ns]
    files.append(str(tmp_path / "out.safetensors"))
    modes = {p: oct(os.stat(p).st_mode & 0o777) for p in files}
    assert any(p.endswith("final.safetensors") for p in files) and any(p.endswith(".png") for p in files)
    assert set(modes.values()) == {"0o644"}, modes
    dirs = [d for root in ("runs", "priors") for d, _, _ in os.walk(tmp_path / root)][1:]
    assert {oct(os.stat(d).st_mode & 0o777) for d in dirs} == {"0o755"}


def test_training_holds_the_model_lock(zmodel, tmp_path):
    import threading

    seen = []

    def probe(step, total, preview):
        t = threading.Thread(target=lambda: seen.append(zmodel.lock.acquire(blocking=False)))
        t.start()
        t.join()

    runs.train(zmodel, _cfg(tmp_path, steps=2), _squares(RED), on_step=probe)
    assert seen == [False, False]
    assert zmodel.lock.acquire(blocking=False)
    zmodel.lock.release()


def test_training_adapter_of_the_wrong_family_is_refused(zmodel, tmp_path):
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    sd1 = L.TurboLora.from_peft("sd1", {f"{key}.lora_A.weight": torch.randn(2, 32),
                                        f"{key}.lora_B.weight": torch.randn(32, 2)}, 2.0)
    path = L.save_lora_file(sd1, str(tmp_path / "sd1.safetensors"))
    before = _state(zmodel.denoiser)
    with pytest.raises(WrongFamilyError, match="is a sd1 LoRA"):
        runs.train(zmodel, _cfg(tmp_path, steps=1, training_adapter=path), _squares(RED))
    assert _same_state(before, zmodel.denoiser)


def test_accelerator_keeps_the_model_device_and_auto_precision(zmodel, tmp_path):
    from turbobooth.trainer import state

    acc = state.make_accelerator(_cfg(tmp_path, mixed_precision="auto"), torch.device("cpu"), str(tmp_path))
    assert acc.device_placement is False and acc.mixed_precision == "no"
    assert state.resolve_precision("auto", torch.device("cpu")) == "no"
    result = runs.train(zmodel, _cfg(tmp_path, steps=1, mixed_precision="auto"), _squares(RED))
    assert result.step == 1


def test_missing_tensorboard_warns_once(zmodel, tmp_path, monkeypatch, caplog):
    from accelerate import utils
    from turbobooth.trainer import state

    monkeypatch.setattr(utils, "is_tensorboard_available", lambda: False)
    monkeypatch.setattr(state, "_warned_tensorboard", False)
    with caplog.at_level("WARNING"):
        for name in ("tb1", "tb2"):
            runs.train(zmodel, _cfg(tmp_path, name, steps=1, log_tensorboard=True), _squares(RED))
    assert caplog.text.count("tensorboard is not installed") == 1


def test_full_finetune_resume_is_bit_exact(tmp_path):
    """accelerate's save_state/load_state carry a full fine-tune (one thread: multi-threaded CPU conv
    gradients are not reproducible run to run)."""
    model = _model("sd1")
    kw = dict(family="sd1", resolution=64, steps=4, lr=1e-3, train_mode="full", train_text_encoder=True)
    done = []
    cfg = _cfg(tmp_path, "split", checkpoint_every=2, **kw)
    with _one_thread():
        full = runs.train(model, _cfg(tmp_path, "whole", **kw), _squares(RED, 64))
        first = runs.train(model, cfg, _squares(RED, 64), on_step=lambda s, t, p: done.append(s),
                           should_stop=lambda: len(done) >= 2)
        second = runs.train(model, cfg.replace(resume="latest"), _squares(RED, 64))
    assert first.stopped and first.step == 2
    assert {"model.safetensors", "model_1.safetensors"} <= set(os.listdir(first.checkpoint_dir))
    for a, b in ((full.model.pipe.unet, second.model.pipe.unet),
                 (full.model.pipe.text_encoder, second.model.pipe.text_encoder)):
        assert _same_state(_state(a), b)
    assert second.losses == full.losses


def test_requeue_resumes_or_reuses_the_run_folder(tmp_path):

    model, root, seen = _model("zimage"), str(tmp_path / "runs"), []

    def run(m, cfg, images=RED):
        return runs.train_in_run_folder(m, cfg, root, "subject", _squares(images),
                                        on_step=lambda s, t, p: seen.append(s))

    cfg = _cfg(tmp_path, steps=2, checkpoint_every=1, validation_prompt="a dog")
    first = run(model, cfg)
    assert seen == [1, 2]
    seen.clear()  # only bookkeeping changed: same folder, the finished LoRA comes back without training
    again = run(model, cfg.replace(validation_prompt="another", checkpoint_every=2))
    assert seen == [] and _same_lora(again.lora, first.lora) and again.losses == first.losses
    fresh = _model("zimage")  # the cache was freed and the model loaded again: still no training
    assert _same_lora(run(fresh, cfg).lora, first.lora) and seen == []
    more = run(model, cfg.replace(steps=4))  # more steps: resumes at checkpoint-2
    assert seen == [3, 4]
    assert _same_lora(more.lora, runs.train(model, _cfg(tmp_path, "straight", steps=4), _squares(RED)).lora)
    assert len(os.listdir(root)) == 1
    run(model, cfg.replace(lr=2e-3, steps=1))  # a trajectory setting: another folder
    run(model, cfg.replace(steps=1), BLUE)  # other images: another folder
    assert len(os.listdir(root)) == 3


def test_dreambooth_node_reuses_a_finished_run(tmp_path, monkeypatch):
    import turbobooth
    from turbobooth.nodes import comfy as host

    monkeypatch.setattr(host, "output_directory", lambda: str(tmp_path))
    model, calls = _model("zimage"), []
    real = runs.train
    monkeypatch.setattr(runs, "train", lambda *a, **k: calls.append(1) or real(*a, **k))
    node = turbobooth.NODE_CLASS_MAPPINGS["TurboBoothDreamBoothTrain"]()
    images = torch.rand(3, 32, 32, 3)
    args = dict(instance_prompt="a photo of sks dog", class_prompt="a photo of dog", steps=2, learning_rate=1e-3,
                rank=4, resolution=32, train_mode="lora", prior_loss_weight=1.0, seed=2**64 - 1, run_name="sks")
    lora, _, plot, ema = node.train(model, images, **args, checkpoint_every=1)
    again, _, _, _ = node.train(model, images, **args, checkpoint_every=5, validation_prompt="a dog on a beach")
    assert calls == [1] and _same_lora(lora, again) and tuple(plot.shape) == (1, 360, 640, 3) and ema is None
    assert not os.path.isabs(again.metadata["base_model"]) and str(tmp_path) not in str(again.metadata)
    # the real-world options through the node: EMA (its own output, reused from disk too), DOP, caption dropout
    extra = dict(ema_decay=0.9, dop_weight=0.5, dop_class="dog", caption_dropout=0.2, memory="auto")
    lora, _, _, ema = node.train(model, images, **args, **extra)
    assert ema is not None and not _same_lora(lora, ema) and len(calls) == 2
    _, _, _, ema_again = node.train(model, images, **args, **extra)
    assert len(calls) == 2 and _same_lora(ema, ema_again)
    with pytest.raises(InvalidInputError, match="dop_class"):
        node.train(model, images, **args, dop_weight=0.5)
    with pytest.raises(InvalidInputError, match="caption_dropout"):
        node.train(model, images, **args, caption_dropout=float("nan"))


# ---------------------------------------------------------------------------
# differential output preservation and timestep sampling
# ---------------------------------------------------------------------------


def test_dop_gradient_reaches_only_the_lora(tmp_path):
    """The DOP penalty trains the LoRA alone: the reference pass runs without it and without gradients."""
    from peft import LoraConfig
    from turbobooth.trainer import adapters as A
    from turbobooth.trainer.objective import Batch

    model = _model("zimage")
    denoiser = model.denoiser
    denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False),
                         adapter_name=A.ADAPTER)
    try:
        emb = _encode_prompt(model.pipe, "zimage", "a photo of dog", "cpu")
        lat = _encode_latents(model.pipe, "zimage", _squares(RED[:2]), "cpu")
        batch = Batch([lat[0], lat[1]], [0, 0], [False, False], [3, 4])
        objective = _Objective(model.pipe, "zimage", 0)
        passes = []

        @contextlib.contextmanager
        def off():
            passes.append(torch.is_grad_enabled())
            with A.lora_off(denoiser, False):
                yield

        penalty = objective.dop_loss(denoiser, batch, lambda idx: [emb] * len(idx), "cpu", torch.float32, {0: 0}, off)
        assert penalty.item() > 0 and passes == [False]
        penalty.backward()
        with_grad = {n for n, p in denoiser.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert with_grad and all(A.ADAPTER in n for n in with_grad), sorted(with_grad)[:3]
        assert {n for n, p in denoiser.named_parameters() if p.requires_grad} <= {
            n for n, _ in denoiser.named_parameters() if A.ADAPTER in n}
    finally:
        model.pipe.unload_lora_weights()


def test_dop_keeps_class_outputs_nearer_the_base_over_several_seeds(tmp_path, capsys):
    """With DOP the class prompt's output drifts less from the base than without it, at the same steps,
    for every seed tried (figures printed with -s)."""
    class_prompt, instance_prompt = "a photo of dog", "a photo of sks dog"
    guidance = sampling.Guidance(negative_prompts=("",), scales=(0.0,))
    figures = {}
    with _one_thread():
        for seed in (0, 1, 2):
            model = _model("zimage")
            _normalise_latents(model, _squares(BLUE) + _squares(RED))
            _fit_base(model, _squares(BLUE), class_prompt, steps=40, lr=5e-3)

            def outputs(loras=(), model=model):
                return sampling.generate(model, [class_prompt] * 2, seed=100, steps=3, width=32, height=32,
                                         guidance=guidance, loras=loras).latents

            base = outputs()
            drift = {}
            for dop in (0.0, 1.0):
                cfg = _cfg(tmp_path, f"dop{seed}-{dop}", steps=60, lr=5e-3, seed=seed, instance_prompt=instance_prompt,
                           class_prompt=class_prompt, dop_weight=dop, dop_class="dog")
                lora = runs.train(model, cfg, _squares(RED)).lora
                drift[dop] = float((outputs([(lora, 1.0)]) - base).abs().mean())
            figures[seed] = drift
    print("DOP drift of the class prompt (without, with):", {s: (round(d[0.0], 4), round(d[1.0], 4))
                                                             for s, d in figures.items()})
    for seed, d in figures.items():
        assert d[0.0] > 0.01, figures  # training without DOP really moves the class prompt
        assert d[1.0] < d[0.0], (seed, figures)
    assert sum(d[1.0] for d in figures.values()) < 0.8 * sum(d[0.0] for d in figures.values()), figures


def test_dop_and_timestep_settings_are_checked(tmp_path):
    with pytest.raises(InvalidInputError, match="dop_class"):
        _cfg(tmp_path, dop_weight=0.5)
    with pytest.raises(InvalidInputError, match="timestep_sampling"):
        _cfg(tmp_path, timestep_sampling="cosine")
    with pytest.raises(InvalidInputError, match="flow matching"):
        _cfg(tmp_path, family="sd1", timestep_sampling="logit_normal")
    with pytest.raises(InvalidInputError, match="dop_weight"):
        _cfg(tmp_path, dop_weight=-1.0, dop_class="dog")
    with pytest.raises(InvalidInputError, match="trigger word"):
        runs.train(_model("zimage"), _cfg(tmp_path, instance_prompt="a photo of a dog", class_prompt="a photo of a cat",
                                          dop_weight=1.0, dop_class="dog", trigger="sks"), _squares(RED))


@pytest.mark.parametrize("how", ["uniform", "logit_normal", "shifted"])
def test_timestep_sampling(how, zmodel):
    objective = _Objective(zmodel.pipe, "zimage", 0, how, 3.0)
    noise, idx, sigma = objective.draw(list(range(2000)), (16, 2, 2))
    s = objective.sigmas[idx] if sigma is None else sigma
    assert noise.shape == (2000, 16, 2, 2) and 0.0 <= float(s.min()) and float(s.max()) <= 1.0
    again = objective.draw(list(range(2000)), (16, 2, 2))
    assert torch.equal(noise, again[0]) and torch.equal(s, objective.sigmas[again[1]] if again[2] is None else again[2])
    if how != "shifted":  # a place in the model's own schedule
        middle = float(((idx > 300) & (idx < 700)).float().mean())
        assert (middle > 0.5) == (how == "logit_normal"), middle  # logit-normal favours the middle (about 0.6)
    if how == "shifted":
        assert float(s.median()) > 0.65  # shift 3 moves mass to high noise


# ---------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------


def test_ema_follows_diffusers_decay_schedule_on_the_cpu():
    from turbobooth.trainer import ema as E

    p = torch.nn.Parameter(torch.zeros(3))
    ema = E.make([p], 0.9)
    expected, seen = torch.zeros(3), []
    for n in range(1, 8):
        with torch.no_grad():
            p.add_(1.0)
        E.update(ema, [p])
        decay = 0.0 if n == 1 else min(0.9, n / (9 + n))  # diffusers: min(decay, (1 + k) / (10 + k)), k = n - 1
        expected = decay * expected + (1 - decay) * p.detach()
        seen.append(float(ema.shadow_params[0][0]))
        assert torch.allclose(ema.shadow_params[0], expected, atol=1e-6), (n, seen)
    assert ema.shadow_params[0].device.type == "cpu"
    with E.swapped_in(ema, [p]):
        assert torch.allclose(p.detach(), expected)
    assert torch.equal(p.detach(), torch.full((3,), 7.0))


def test_ema_lora_resumes_exactly_and_differs_from_the_trained_one(zmodel, tmp_path):
    kw = dict(steps=6, lr=3e-3, ema_decay=0.8)
    full = runs.train(zmodel, _cfg(tmp_path, "full", **kw), _squares(RED))
    assert full.lora_ema is not None and not _same_lora(full.lora, full.lora_ema)
    assert full.lora_ema.metadata["ema_decay"] == "0.8"
    done = []
    cfg = _cfg(tmp_path, "split", checkpoint_every=2, **kw)
    runs.train(zmodel, cfg, _squares(RED), on_step=lambda s, t, p: done.append(s), should_stop=lambda: len(done) >= 3)
    assert {"ema.safetensors", "ema.json"} <= set(os.listdir(os.path.join(cfg.output_dir, "checkpoint-3")))
    second = runs.train(zmodel, cfg.replace(resume="latest"), _squares(RED))
    assert _same_lora(second.lora, full.lora) and _same_lora(second.lora_ema, full.lora_ema)
    assert runs.train(zmodel, _cfg(tmp_path, "off", steps=2), _squares(RED)).lora_ema is None
    for bad in (1.0, -0.5, 1.5, float("nan")):
        with pytest.raises(InvalidInputError, match="ema_decay"):
            _cfg(tmp_path, ema_decay=bad)


def test_ema_with_the_text_encoder_trained_resumes_exactly_and_removes_its_hooks(tmp_path):
    """SD1.x LoRA on the UNet and the text encoder with EMA on: both stay trained, a split run equals a straight one,
    and every accelerate hook (EMA and LoRA state) is removed when the run closes."""
    model = _model("sd1")
    kw = dict(family="sd1", resolution=64, steps=4, lr=1e-3, train_text_encoder=True, ema_decay=0.8)
    done = []
    cfg = _cfg(tmp_path, "split", checkpoint_every=2, **kw)
    with _one_thread():  # multi-threaded CPU conv gradients are not reproducible run to run
        full = runs.train(model, _cfg(tmp_path, "full", **kw), _squares(RED, 64))
        runs.train(model, cfg, _squares(RED, 64), on_step=lambda s, t, p: done.append(s),
                   should_stop=lambda: len(done) >= 2)
        second = runs.train(model, cfg.replace(resume="latest"), _squares(RED, 64))
    assert full.lora.touches_text_encoder and full.lora_ema is not None
    assert any("lora_te" in k or "text_encoder" in k for k in full.lora_ema.tensors)
    assert _same_lora(second.lora, full.lora) and _same_lora(second.lora_ema, full.lora_ema)
    from accelerate import Accelerator

    fresh = Accelerator(cpu=True)
    assert not fresh._save_model_state_pre_hook and not fresh._load_model_state_pre_hook


def test_lora_on_an_8_bit_base_lowers_the_loss_and_loads_in_diffusers(tmp_path):
    """The frozen base stored in fp8 (cast to the compute dtype per layer as it runs) trains a full-precision
    LoRA through backward; the base's 8-bit weights stay as they were."""
    from turbobooth.manager.loading import load_model
    from turbobooth.manager.tiny import write_tiny_models

    folder = write_tiny_models(str(tmp_path / "tiny"), formats=("diffusers",))["zimage_diffusers"]
    model = load_model(ModelSpec(folder, dtype="fp8_e4m3fn"))
    block = model.denoiser.get_submodule("layers.0.attention.to_q")
    assert block.weight.dtype == torch.float8_e4m3fn
    before = _state(model.denoiser)
    images = _squares(RED)
    base_loss = _eval_loss(model, images, "a photo of sks dog")
    result = runs.train(model, _cfg(tmp_path, steps=25, lr=1e-2), images)
    assert all(v.dtype == torch.float32 for k, v in result.lora.tensors.items() if "lora" in k)
    assert _same_state(before, model.denoiser) and block.weight.dtype == torch.float8_e4m3fn
    with L.applied(model, [(result.lora, 1.0)]):
        trained_loss = _eval_loss(model, images, "a photo of sks dog")
    assert trained_loss < base_loss * 0.98, (base_loss, trained_loss)
    path = L.save_lora_file(result.lora, str(tmp_path / "fp8_lora.safetensors"))
    fresh = load_model(ModelSpec(folder))
    fresh.pipe.load_lora_weights(path, adapter_name="check")  # diffusers' own loader reads the file
    assert any("check" in n for n, _ in fresh.denoiser.named_parameters())


# ---- block offload ---------------------------------------------------------------------


def _hooks(module):
    return {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in module.named_modules()}


def _block_params(denoiser):
    blocks = [b for c in denoiser.children() if isinstance(c, torch.nn.ModuleList) for b in c]
    return [p for b in blocks for p in b.parameters()]


def _training_adapter(model, path):
    gen = torch.Generator().manual_seed(3)
    sd = {}
    for name, module in model.denoiser.named_modules():
        if name.endswith(".to_q"):
            sd[f"{name}.lora_A.weight"] = torch.randn(2, module.in_features, generator=gen) * 0.01
            sd[f"{name}.lora_B.weight"] = torch.randn(module.out_features, 2, generator=gen) * 0.01
    return L.save_lora_file(L.TurboLora.from_peft("zimage", sd, 2.0), str(path))


@pytest.fixture
def poisoned_parking(monkeypatch):
    """Offloaded (parked) frozen weights read as NaN: any forward or backward that used one would give NaN, and a
    result equal to an ordinary run's shows that every use got the weight brought back to the device."""
    from turbobooth.trainer import offload

    monkeypatch.setattr(offload, "_park", lambda p, host: setattr(p, "data", torch.full_like(host, float("nan"))))


@pytest.mark.parametrize("checkpointing, per_group", [(False, 1), (True, 1), (False, 3), (True, 2)])
def test_block_offload_trains_the_same_lora_and_leaves_the_model_as_it_was(zmodel, tmp_path, poisoned_parking,
                                                                           checkpointing, per_group):
    denoiser = zmodel.denoiser
    before, hooks = _state(denoiser), _hooks(denoiser)
    grads = [p.requires_grad for p in denoiser.parameters()]
    kw = dict(steps=3, gradient_checkpointing=checkpointing, gradient_accumulation_steps=2, batch_size=2,
              with_prior_preservation=True, num_class_images=2, dop_weight=0.5, dop_class="dog",
              validation_every=2, validation_prompt="a photo of sks dog", validation_steps=1,
              training_adapter=_training_adapter(zmodel, tmp_path / "adapter.safetensors"))  # frozen, offloaded too
    plain = runs.train(zmodel, _cfg(tmp_path, "plain", **kw), _squares(RED), class_images=_squares(BLUE))
    between = []

    def on_step(step, total, preview):  # between steps: every frozen block weight parked, the LoRA where it was
        frozen = [p for p in _block_params(denoiser) if not p.requires_grad]
        lora = [p for p in _block_params(denoiser) if p.requires_grad]
        between.append((all(bool(p.isnan().all()) for p in frozen), all(bool(p.isfinite().all()) for p in lora)))

    offloaded = runs.train(zmodel, _cfg(tmp_path, "offloaded", offload_blocks=per_group, **kw), _squares(RED),
                           class_images=_squares(BLUE), on_step=on_step)
    assert between == [(True, True)] * 3
    assert _same_lora(offloaded.lora, plain.lora) and offloaded.losses == plain.losses
    assert [p.tobytes() for p in offloaded.previews] == [p.tobytes() for p in plain.previews] != []
    assert _same_state(before, denoiser) and _hooks(denoiser) == hooks
    assert [p.requires_grad for p in denoiser.parameters()] == grads
    assert {p.device.type for p in denoiser.parameters()} == {"cpu"}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_block_offload_on_an_8_bit_base(tmp_path, poisoned_parking, checkpointing):
    from turbobooth.manager.loading import load_model
    from turbobooth.manager.tiny import write_tiny_models

    folder = write_tiny_models(str(tmp_path / "tiny"), formats=("diffusers",))["zimage_diffusers"]
    model = load_model(ModelSpec(folder, dtype="fp8_e4m3fn"))
    before, hooks = _state(model.denoiser), _hooks(model.denoiser)
    cfg = _cfg(tmp_path, "plain", steps=3, gradient_checkpointing=checkpointing)
    plain = runs.train(model, cfg, _squares(RED))
    offloaded = runs.train(model, _cfg(tmp_path, "offloaded", steps=3, gradient_checkpointing=checkpointing,
                                       offload_blocks=1), _squares(RED))
    assert _same_lora(offloaded.lora, plain.lora)
    assert _same_state(before, model.denoiser) and _hooks(model.denoiser) == hooks
    assert model.denoiser.get_submodule("layers.0.attention.to_q").weight.dtype == torch.float8_e4m3fn


def test_block_offload_resumes_bit_exactly(zmodel, tmp_path):
    import shutil

    kw = dict(steps=5, lr=3e-3, lr_scheduler="cosine", gradient_checkpointing=True)
    full = runs.train(zmodel, _cfg(tmp_path, "full", **kw), _squares(RED))
    done = []
    cfg = _cfg(tmp_path, "split", checkpoint_every=2, offload_blocks=1, **kw)
    first = runs.train(zmodel, cfg, _squares(RED), on_step=lambda s, t, p: done.append(s),
                       should_stop=lambda: len(done) >= 3)
    assert first.stopped and first.step == 3
    shutil.copytree(first.checkpoint_dir, tmp_path / "copy" / "checkpoint-3")
    second = runs.train(zmodel, cfg.replace(resume="latest"), _squares(RED))
    assert second.step == 5 and _same_lora(second.lora, full.lora) and second.losses == full.losses
    # and a run without offloading resumes the offloaded run's checkpoint
    third = runs.train(zmodel, cfg.replace(resume="latest", offload_blocks=0, output_dir=str(tmp_path / "copy")),
                       _squares(RED))
    assert third.step == 5 and _same_lora(third.lora, full.lora)


# the block runs once a step without checkpointing, twice with it (forward, then recomputed in backward)
@pytest.mark.parametrize("checkpointing, failing_call", [(False, 2), (True, 3), (True, 4)])
def test_block_offload_puts_the_model_back_after_an_error(zmodel, tmp_path, monkeypatch, poisoned_parking,
                                                          checkpointing, failing_call):
    denoiser = zmodel.denoiser
    before, hooks = _state(denoiser), _hooks(denoiser)
    block = denoiser.layers[1]
    real, calls = type(block).forward, []

    def failing(self, *args, **kwargs):
        if self is block:
            calls.append(1)
            if len(calls) == failing_call:  # in the second step's forward or backward pass
                raise RuntimeError("injected failure")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(block), "forward", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        runs.train(zmodel, _cfg(tmp_path, "failed", steps=3, offload_blocks=1, gradient_checkpointing=checkpointing),
                   _squares(RED))
    monkeypatch.setattr(type(block), "forward", real)
    assert _same_state(before, denoiser) and _hooks(denoiser) == hooks
    # nothing of the failed run is left behind (hooks, saved-tensor hooks): a new run trains as on a fresh model
    again = runs.train(zmodel, _cfg(tmp_path, "again", steps=2), _squares(RED))
    fresh = runs.train(_model(), _cfg(tmp_path, "fresh", steps=2), _squares(RED))
    assert _same_lora(again.lora, fresh.lora)


def test_block_offload_refuses_an_accelerate_offloaded_model(zmodel, tmp_path):
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    before = _state(zmodel.denoiser)
    add_hook_to_module(zmodel.denoiser.layers[0], ModelHook())
    try:
        with pytest.raises(InvalidInputError, match="offload_blocks cannot be combined with TurboLoader's offload"):
            runs.train(zmodel, _cfg(tmp_path, steps=1, offload_blocks=1), _squares(RED))
    finally:
        remove_hook_from_module(zmodel.denoiser.layers[0])
    assert _same_state(before, zmodel.denoiser)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_block_offload_on_cuda_keeps_the_lora_on_the_gpu_and_lowers_the_peak(tmp_path, checkpointing):
    """A Z-Image denoiser wide enough that its blocks' weights outweigh a 32² step's activations."""
    from diffusers import ZImagePipeline, ZImageTransformer2DModel
    from turbobooth.manager.tiny import _ZIMAGE_TRANSFORMER

    torch.manual_seed(0)
    wide = ZImageTransformer2DModel(**dict(_ZIMAGE_TRANSFORMER, dim=512, n_heads=16, n_kv_heads=16, n_layers=6))
    with torch.no_grad():
        wide.x_pad_token.normal_(0.0, 0.02)
        wide.cap_pad_token.normal_(0.0, 0.02)
    pipe = ZImagePipeline(**{**build_tiny_zimage(0).components, "transformer": wide}).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    model = TurboModel(ModelSpec("tiny"), "zimage", pipe, "tiny-wide", device="cuda")
    before, hooks = _state(model.denoiser), _hooks(model.denoiser)
    block_bytes = sum(p.numel() * p.element_size() for p in _block_params(model.denoiser))
    peaks, where = {}, []

    def watch(name):
        def on_step(step, total, preview):
            params = _block_params(model.denoiser)
            where.append((name, {p.device.type for p in params if not p.requires_grad},
                          {p.device.type for p in params if p.requires_grad}))
            if step == 1:  # the caching of latents and prompts is over: measure the steady steps
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            else:
                peaks[name] = torch.cuda.max_memory_allocated()
        return on_step

    results = {}
    for name, blocks in (("plain", 0), ("offloaded", 1)):
        cfg = _cfg(tmp_path, name, steps=3, gradient_checkpointing=checkpointing, offload_blocks=blocks, memory="none")
        results[name] = runs.train(model, cfg, _squares(RED), on_step=watch(name))
    assert [w for w in where if w[0] == "offloaded"] == [("offloaded", {"cpu"}, {"cuda"})] * 3
    assert [w for w in where if w[0] == "plain"] == [("plain", {"cuda"}, {"cuda"})] * 3
    # the card held every block's weights before; now about one block's (1 of 8) at a time
    assert peaks["offloaded"] < peaks["plain"] - 0.5 * block_bytes, (peaks, block_bytes)
    assert {p.device.type for p in model.denoiser.parameters()} == {"cuda"}
    assert _same_state(before, model.denoiser) and _hooks(model.denoiser) == hooks
    a, b = results["plain"].lora.tensors, results["offloaded"].lora.tensors
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
