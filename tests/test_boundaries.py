"""Hostile inputs at the node boundary: names confined to their folders, every seed, NaN/Inf, cancel, limits."""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch
import turbobooth
from turbobooth.manager.errors import Interrupted, InvalidInputError, ModelSourceError, UnsafeFileError
from turbobooth.manager.inputs import MAX_PROMPTS, MAX_SEED
from turbobooth.manager.sampling import Guidance, embed_cache, generate
from turbobooth.manager.tiny import write_tiny_models
from turbobooth.nodes import comfy as host


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny"))
    return {**write_tiny_models(root), "root": root}


@pytest.fixture
def folders(tiny, tmp_path, monkeypatch):
    """ComfyUI's model folders: diffusers, split files, checkpoints and an empty loras folder."""
    root = tiny["root"]
    loras = tmp_path / "loras"
    loras.mkdir()
    roots = {"diffusers": [os.path.join(root, "diffusers")], "diffusion_models": [os.path.join(root, "diffusion_models")],
             "text_encoders": [os.path.join(root, "text_encoders")], "vae": [os.path.join(root, "vae")],
             "checkpoints": [os.path.join(root, "checkpoints")], "loras": [str(loras)]}
    monkeypatch.setattr(host, "folder_roots", lambda kind: roots.get(kind, []))
    monkeypatch.setattr(host, "folder_list", lambda kind: sorted(
        n for r in roots.get(kind, []) for n in os.listdir(r) if n.endswith(".safetensors")))
    return types.SimpleNamespace(root=root, loras=loras, outside=tmp_path)


def _node(node_id):
    return turbobooth.NODE_CLASS_MAPPINGS[node_id]()


def _load(source="diffusers folder", **kw):
    args = dict(source=source, diffusers_model="tiny-zimage-turbo", repo_id="", revision="main",
                diffusion_model="(none)", text_encoder="(none)", vae="(none)", checkpoint="(none)",
                family="auto", dtype="auto", device="cpu", offload="none")
    args.update(kw)
    return _node("TurboBoothLoader").load(**args)[0]


def _sample(model, **kw):
    args = dict(model=model, prompt="a photo of a dog", seed=0, steps=2, width=32, height=32,
                images_per_prompt=1, sampler="euler", shift=0.0)
    args.update(kw)
    return _node("TurboBoothSample").sample(**args)


# ---------------------------------------------------------------- confinement


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "..\\..\\x.safetensors", "a/../../b",
                                  "C:\\Windows\\x.safetensors", ""])
def test_lora_file_names_outside_the_loras_folder_are_refused(folders, name):
    model = _load()
    with pytest.raises(InvalidInputError, match="inside models/loras"):
        _sample(model, lora_file=name or "x/../..")


def test_refusal_does_not_reveal_whether_an_outside_file_exists(folders):
    real = folders.outside / "real.safetensors"
    real.write_bytes(b"x")
    model = _load()
    messages = []
    for name in (f"../{real.name}", "../no_such_file.safetensors", str(real), str(folders.outside / "nope")):
        with pytest.raises(InvalidInputError) as err:
            _sample(model, lora_file=name)
        messages.append(str(err.value).replace(name, "<name>"))
    assert len(set(messages)) == 1, messages


def test_links_inside_a_folder_are_followed_and_missing_names_are_clear(folders):
    """Users link shared model drives into models/; ComfyUI follows such links, and so do we."""
    target = folders.outside / "elsewhere.safetensors"
    target.write_bytes(b"not a LoRA")
    os.symlink(target, folders.loras / "link.safetensors")
    with pytest.raises(ModelSourceError, match="corrupt or truncated"):
        _sample(_load(), lora_file="link.safetensors")
    with pytest.raises(ModelSourceError, match="not found in models/loras"):
        _sample(_load(), lora_file="missing.safetensors")


def test_loader_names_are_confined(folders, tiny):
    with pytest.raises(InvalidInputError, match="inside models/diffusers"):
        _load(diffusers_model=tiny["zimage_diffusers"])  # an absolute path, even to a real model
    with pytest.raises(InvalidInputError, match="inside models/diffusion_models"):
        _load("split files", diffusion_model="../checkpoints/tiny_sd15.safetensors", text_encoder="x", vae="y")
    with pytest.raises(InvalidInputError, match="not a path"):
        _load("hub repo", repo_id="org/model", revision="../../etc")
    with pytest.raises(InvalidInputError, match="owner/name"):
        _load("hub repo", repo_id="../../models", revision="main")
    assert _load("split files", diffusion_model="tiny_zimage.safetensors", text_encoder="tiny_zimage_qwen3.safetensors",
                 vae="tiny_zimage_ae.safetensors").family == "zimage"


def test_missing_split_files_are_named_once_each(folders):
    msg = _node("TurboBoothLoader").VALIDATE_INPUTS(
        "split files", "(none)", "z_image_turbo_bf16.safetensors", "qwen_3_4b.safetensors", "ae.safetensors", "(none)")
    assert isinstance(msg, str)
    for name in ("z_image_turbo_bf16.safetensors", "qwen_3_4b.safetensors", "ae.safetensors"):
        assert msg.count(name) == 2, msg  # the name, and where to get it
    assert "3 file(s)" in msg and "Comfy-Org/z_image_turbo" in msg and "models/text_encoders" in msg
    assert _node("TurboBoothLoader").VALIDATE_INPUTS(
        "split files", "(none)", "tiny_zimage.safetensors", "tiny_zimage_qwen3.safetensors",
        "tiny_zimage_ae.safetensors", "(none)") is True


# ---------------------------------------------------------------- tokenizer on old ComfyUI


def test_bundled_tokenizer_when_comfy_file_is_none(folders, tiny, tmp_path, monkeypatch):
    """The pinned ComfyUI is a namespace package: comfy.__file__ is None, comfy.__path__ names the folder."""
    comfy_dir = tmp_path / "comfy"
    comfy_dir.mkdir()
    os.symlink(tiny["sd1_tokenizer"], comfy_dir / "sd1_tokenizer")
    fake = types.ModuleType("comfy")
    fake.__file__ = None
    fake.__path__ = [str(comfy_dir)]
    monkeypatch.setitem(sys.modules, "comfy", fake)
    assert host.comfy_bundled_tokenizer("sd1") == str(comfy_dir / "sd1_tokenizer")
    assert host.comfy_bundled_tokenizer("zimage") is None
    ckpt_dir = tmp_path / "ckpts"
    ckpt_dir.mkdir()
    os.symlink(tiny["sd1_single_file"], ckpt_dir / "no_tokenizer_beside.safetensors")
    monkeypatch.setattr(host, "folder_roots", lambda kind: [str(ckpt_dir)] if kind == "checkpoints" else [])
    assert _load("single file", checkpoint="no_tokenizer_beside.safetensors").family == "sd1"
    # a pickle under the same conditions gets its own message, not a crash in the tokenizer lookup
    torch.save({"w": torch.zeros(1)}, ckpt_dir / "pickled.safetensors")
    with pytest.raises(UnsafeFileError, match="pickle"):
        _load("single file", checkpoint="pickled.safetensors")


# ---------------------------------------------------------------- seeds, numbers, cancel, limits


@pytest.mark.parametrize("seed", [0, 1, 2**32, 2**63, MAX_SEED - 1, MAX_SEED])
def test_every_widget_seed_works_with_several_prompts(folders, seed):
    images, _ = _sample(_load(), prompt="a dog\na cat\nsnow", seed=seed)
    assert images.shape[0] == 3 and torch.isfinite(images).all()


def test_seeds_wrap_at_two_to_the_64(folders):
    model = _load()
    batch = generate(model, "a dog\na cat", seed=MAX_SEED, steps=2, width=32, height=32)
    assert batch.seeds == [MAX_SEED, 0]
    alone = generate(model, "a cat", seed=0, steps=2, width=32, height=32)
    assert torch.allclose(batch.images[1], alone.images[0], atol=1e-5)
    for bad in (-1, MAX_SEED + 1, 1.5, "7"):
        with pytest.raises(InvalidInputError, match="seed"):
            generate(model, "a dog", seed=bad, steps=2, width=32, height=32)


def test_one_seed_per_prompt(folders):
    model = _load()
    mixed = generate(model, "a dog\na cat", seed=[5, MAX_SEED], steps=2, width=32, height=32)
    assert mixed.seeds == [5, MAX_SEED]
    alone = generate(model, "a cat", seed=MAX_SEED, steps=2, width=32, height=32)
    assert torch.allclose(mixed.images[1], alone.images[0], atol=1e-5)
    with pytest.raises(InvalidInputError, match="2 seeds for 3 prompts"):
        generate(model, "a\nb\nc", seed=[1, 2], steps=2, width=32, height=32)
    with pytest.raises(InvalidInputError, match="seed"):
        generate(model, "a\nb", seed=[1, -2], steps=2, width=32, height=32)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_numbers_are_refused_by_name(folders, bad):
    model = _load()
    with pytest.raises(InvalidInputError, match="shift"):
        _sample(model, shift=bad)
    with pytest.raises(InvalidInputError, match="strength"):
        _sample(model, lora=_tiny_lora(model), lora_strength=bad)
    with pytest.raises(InvalidInputError, match="denoise"):
        _sample(model, init_image=torch.rand(1, 32, 32, 3), denoise=bad)
    for field in ("guidance_scale", "cfg_truncation", "cfg_normalization"):
        args = dict(negative_prompt="", guidance_scale=4.0, cfg_truncation=1.0, cfg_normalization=0.0)
        args[field] = bad
        with pytest.raises(InvalidInputError, match=field.replace("_scale", " scale")):
            _node("TurboBoothGuidance").build(**args)
    with pytest.raises(InvalidInputError, match="guidance scale"):
        Guidance(scales=(bad,))
    poisoned = torch.rand(1, 32, 32, 3)
    poisoned[0, 0, 0, 0] = bad
    with pytest.raises(InvalidInputError, match="init image"):
        _sample(model, init_image=poisoned, denoise=0.5)
    mask = torch.ones(1, 32, 32)
    mask[0, 1, 1] = bad
    with pytest.raises(InvalidInputError, match="mask"):
        _sample(model, init_image=torch.rand(1, 32, 32, 3), mask=mask, denoise=0.5)


def _tiny_lora(model):
    import copy

    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from turbobooth.manager.lora import TurboLora

    probe = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"], init_lora_weights=False),
                                    copy.deepcopy(model.denoiser), "p")
    return TurboLora.from_peft("zimage", get_peft_model_state_dict(probe, adapter_name="p"), alpha=2.0)


def test_zimage_offers_only_its_samplers(folders):
    model = _load()
    for sampler in ("euler_a", "ddim", "model_default"):
        with pytest.raises(InvalidInputError, match="euler, dpmpp_2m, unipc"):
            _sample(model, sampler=sampler)


def test_cancel_while_encoding_a_long_prompt_box(folders):
    model = _load()
    embed_cache(model).clear()
    prompts = "\n".join(f"prompt number {i}" for i in range(MAX_PROMPTS))
    calls = []
    handle = model.pipe.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(Interrupted, match="encoding"):
            generate(model, prompts, steps=1, width=32, height=32, should_stop=lambda: len(calls) >= 2)
    finally:
        handle.remove()
    assert len(calls) == 2, "cancel must stop between text-encoder batches, not after all of them"
    with pytest.raises(InvalidInputError, match=f"more than the {MAX_PROMPTS}"):
        generate(model, prompts + "\none more", steps=1, width=32, height=32)


# ---------------------------------------------------------------- tokens, changed files, log noise


def test_hub_errors_never_carry_a_token(monkeypatch, caplog):
    import huggingface_hub
    from turbobooth.manager.loading import hub_snapshot

    token = "hf_" + "Ab3" * 12
    monkeypatch.setenv("HF_TOKEN", token)

    def echo(**kwargs):
        raise OSError(f"401 Client Error for url ... request headers: {{'authorization': 'Bearer {token}'}} {token}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", echo)
    with caplog.at_level("DEBUG"), pytest.raises(ModelSourceError) as err:
        hub_snapshot("org/private-model", "main")
    import traceback

    text = "".join(traceback.format_exception(err.value)) + caplog.text  # what ComfyUI shows and logs
    assert token not in text and "Bearer" not in text.replace("Bearer ***", "")
    assert "org/private-model@main" in str(err.value)
    from turbobooth.manager.errors import get_logger

    with caplog.at_level("INFO"):
        get_logger("turbobooth.test").info("using %s", token)
    assert token not in caplog.text and "hf_***" in caplog.text


def test_a_model_file_replaced_at_the_same_path_is_reloaded(tiny, tmp_path):
    import shutil

    from turbobooth.manager.cache import ModelCache
    from turbobooth.manager.spec import ModelSpec

    path = tmp_path / "model.safetensors"
    shutil.copy(tiny["sd1_single_file"], path)
    shutil.copytree(tiny["sd1_tokenizer"], tmp_path / "model_tokenizer")
    cache = ModelCache(budget_bytes=1 << 40)
    spec = ModelSpec(str(path))
    first = cache.get(spec)
    assert cache.get(spec) is first and cache.loads == 1
    stamp = _node("TurboBoothSample").IS_CHANGED(lora_file="(none)")
    os.utime(path, ns=(1, 1))  # "replaced": another modification time
    second = cache.get(spec)
    assert second is not first and cache.loads == 2
    assert stamp == ""


def test_loader_and_sampler_report_file_changes_to_comfyui(folders, tiny):
    import shutil

    shutil.copy(tiny["zimage_split"]["vae"], folders.loras / "x.safetensors")
    sample_stamp = _node("TurboBoothSample").IS_CHANGED(lora_file="x.safetensors")
    loader = _node("TurboBoothLoader")
    values = dict(source="split files", diffusion_model="tiny_zimage.safetensors",
                  text_encoder="tiny_zimage_qwen3.safetensors", vae="tiny_zimage_ae.safetensors")
    load_stamp = loader.IS_CHANGED(**values)
    os.utime(folders.loras / "x.safetensors", ns=(5, 5))
    assert _node("TurboBoothSample").IS_CHANGED(lora_file="x.safetensors") != sample_stamp
    assert load_stamp and loader.IS_CHANGED(**values) == load_stamp


def test_img2img_logs_no_empty_float32_warning(folders, caplog):
    model = _load()
    with caplog.at_level("WARNING"):
        _sample(model, init_image=torch.rand(1, 32, 32, 3), denoise=0.5)
    assert "kept in float32: []" not in caplog.text


def test_importing_peft_with_bitsandbytes_logs_no_missing_kernel_warning():
    """peft imports bitsandbytes, which warns on every start about an optional CPU 4-bit kernel package."""
    import subprocess
    import sys

    pytest.importorskip("bitsandbytes")
    code = (
        "import logging; logging.basicConfig(level=logging.WARNING)\n"
        "import turbobooth.manager.loading, peft, bitsandbytes\n"
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('a real warning still shows')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "kernels-community" not in out.stderr and "a real warning still shows" in out.stderr
