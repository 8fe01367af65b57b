"""The shared model manager on tiny models saved to disk: loading, cache, sampling, bad input."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import weakref

import pytest
import torch
from turbobooth.manager import cache as cache_mod
from turbobooth.manager.errors import InvalidInputError, ModelSourceError, UnsafeFileError, WrongFamilyError
from turbobooth.manager.loading import load_model
from turbobooth.manager.sampling import Guidance, embed_cache, generate
from turbobooth.manager.spec import ModelSpec
from turbobooth.manager.tiny import write_tiny_models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_models(str(tmp_path_factory.mktemp("tiny")), formats=("diffusers",))


@pytest.fixture(scope="module")
def zmodel(tiny):
    return cache_mod.get_model(ModelSpec(tiny["zimage_diffusers"]))


@pytest.fixture(scope="module")
def sdmodel(tiny):
    return cache_mod.get_model(ModelSpec(tiny["sd1_diffusers"]))


def small(model, prompts="a photo of a dog", **kw):
    kw.setdefault("width", 64)
    kw.setdefault("height", 64)
    if model.family == "sd1":
        kw.setdefault("steps", 4)
    return generate(model, prompts, **kw)


# ---------------------------------------------------------------- loading


def test_families_are_detected_from_model_index(zmodel, sdmodel):
    assert zmodel.family == "zimage" and type(zmodel.pipe).__name__ == "ZImagePipeline"
    assert sdmodel.family == "sd1" and type(sdmodel.pipe).__name__ == "StableDiffusionPipeline"
    assert zmodel.identity.startswith("diffusers:") and zmodel.nbytes > 0


def test_images_have_comfy_layout_and_are_reproducible(zmodel):
    a = small(zmodel, seed=3)
    b = small(zmodel, seed=3)
    assert a.images.shape == (1, 64, 64, 3) and a.images.dtype == torch.float32
    assert 0.0 <= a.images.min() and a.images.max() <= 1.0
    assert a.latents.shape == (1, 16, 8, 8)
    assert torch.equal(a.images, b.images), "identical inputs must give bit-identical images on CPU"
    c = small(zmodel, seed=4)
    assert not torch.equal(a.images, c.images)


def test_batch_uses_seed_plus_index_per_prompt(zmodel):
    batch = small(zmodel, "a dog\n\n  a cat  \nsnow", seed=10, images_per_prompt=2)
    assert batch.images.shape[0] == 6 and batch.prompts == ["a dog", "a cat", "snow"] and batch.seeds == [10, 11, 12]
    alone = small(zmodel, "a cat", seed=11, images_per_prompt=2)
    assert torch.allclose(batch.images[2:4], alone.images, atol=1e-5)
    assert not torch.allclose(batch.images[2], batch.images[3]), "copies of one prompt must differ"


def test_per_prompt_guidance_and_negative_prompts(zmodel):
    base = small(zmodel, "a dog\na cat", seed=1)
    g = Guidance(negative_prompts=("blurry", "dark"), scales=(3.0, 0.0))
    guided = small(zmodel, "a dog\na cat", seed=1, guidance=g)
    assert torch.allclose(guided.images[1], base.images[1], atol=1e-5), "scale 0 must equal the unguided image"
    assert not torch.allclose(guided.images[0], base.images[0], atol=1e-3)
    other_neg = small(zmodel, "a dog\na cat", seed=1, guidance=Guidance(negative_prompts=("red",), scales=(3.0, 0.0)))
    assert not torch.allclose(other_neg.images[0], guided.images[0], atol=1e-4)


def test_embedding_cache_skips_the_text_encoder(zmodel):
    cache = embed_cache(zmodel)
    cache.clear()
    calls = []
    handle = zmodel.pipe.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        first = small(zmodel, "an unusual prompt for caching", seed=0)
        n = len(calls)
        second = small(zmodel, "an unusual prompt for caching", seed=0)
    finally:
        handle.remove()
    assert n == 1 and len(calls) == 1, "the repeated prompt must not run the text encoder again"
    assert torch.equal(first.images, second.images)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "unipc"])
def test_zimage_samplers_with_shift(zmodel, sampler):
    out = small(zmodel, seed=0, steps=4, sampler=sampler, shift=3.0)
    assert out.images.shape == (1, 64, 64, 3) and torch.isfinite(out.images).all()


def test_sd1_generation_and_guidance(sdmodel):
    out = small(sdmodel, "a dog\na cat", seed=0)
    assert out.images.shape == (2, 64, 64, 3) and out.latents.shape == (2, 4, 8, 8)
    g = small(sdmodel, "a dog", seed=0, guidance=Guidance(negative_prompts=("ugly",), scales=(7.5,)))
    assert not torch.allclose(g.images[0], out.images[0], atol=1e-4)


def test_ancestral_sampler_depends_on_the_seed_only(sdmodel):
    """euler_a draws fresh noise every step: from the prompt's own seeded generator, never the global RNG."""
    from diffusers import EulerAncestralDiscreteScheduler

    torch.manual_seed(1)
    a = small(sdmodel, "a dog\na cat", seed=7, sampler="euler_a", images_per_prompt=2)
    torch.manual_seed(2)
    b = small(sdmodel, "a dog\na cat", seed=7, sampler="euler_a", images_per_prompt=2)
    assert torch.equal(a.images, b.images), "the same seed must give the same image whatever the global RNG holds"
    cat = small(sdmodel, "a cat", seed=8, sampler="euler_a", images_per_prompt=2)
    assert torch.allclose(a.images[2:], cat.images, atol=1e-3), "a prompt's images must not depend on the others"
    assert not torch.allclose(a.images[2], a.images[3], atol=1e-3)
    # the same as diffusers' own pipeline with a generator of that seed
    pipe = sdmodel.pipe
    base = pipe.scheduler
    try:
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(base.config)
        with torch.no_grad():
            bare = pipe("a cat", num_inference_steps=4, guidance_scale=1.0, height=64, width=64, output_type="pt",
                        generator=torch.Generator("cpu").manual_seed(8)).images
    finally:
        pipe.scheduler = base
    ours = small(sdmodel, "a cat", seed=8, sampler="euler_a", guidance=Guidance(scales=(1.0,)))
    assert torch.allclose(ours.images[0].permute(2, 0, 1), bare[0].float(), atol=1e-5)


@pytest.mark.parametrize("family", ["zimage", "sd1"])
def test_img2img_and_inpainting(zmodel, sdmodel, family):
    model = zmodel if family == "zimage" else sdmodel
    init = small(model, seed=5).images
    low = small(model, seed=5, init_image=init, denoise=0.5)
    assert low.images.shape == init.shape
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1.0
    inp = small(model, seed=5, init_image=init, denoise=1.0, mask=mask)
    assert inp.images.shape == init.shape
    # two prompts, one shared init image
    two = small(model, "a dog\na cat", seed=5, init_image=init, denoise=0.5)
    assert two.images.shape[0] == 2


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "unipc"])
def test_zimage_multistep_samplers_do_img2img_and_inpainting(zmodel, sampler):
    """They solve the same flow from the same noised init latents as euler: close to euler's image, far from another
    seed's."""
    init = small(zmodel, seed=5).images
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1.0
    for extra in ({"denoise": 0.5}, {"denoise": 1.0, "mask": mask}):
        euler = small(zmodel, seed=5, steps=8, init_image=init, **extra).images
        other_seed = small(zmodel, seed=6, steps=8, init_image=init, **extra).images
        ours = small(zmodel, seed=5, steps=8, init_image=init, sampler=sampler, **extra).images
        again = small(zmodel, seed=5, steps=8, init_image=init, sampler=sampler, **extra).images
        assert torch.equal(ours, again) and torch.isfinite(ours).all()
        assert (ours - euler).abs().mean() < 0.25 * (other_seed - euler).abs().mean(), extra


# ---------------------------------------------------------------- cache


def test_second_identical_load_is_the_same_object(tiny):
    spec = ModelSpec(tiny["zimage_diffusers"])
    first = cache_mod.get_model(spec)
    loads, total = cache_mod.CACHE.loads, cache_mod.CACHE.total_bytes
    again = cache_mod.get_model(ModelSpec(tiny["zimage_diffusers"]))
    assert again is first
    assert cache_mod.CACHE.loads == loads and cache_mod.CACHE.total_bytes == total


def test_other_dtype_or_revision_is_a_separate_entry(tiny):
    local = cache_mod.ModelCache(budget_bytes=1 << 40)
    a = local.get(ModelSpec(tiny["zimage_diffusers"], dtype="fp32"))
    b = local.get(ModelSpec(tiny["zimage_diffusers"], dtype="bf16"))
    assert a is not b and len(local) == 2
    # on a CPU, bf16 stores the weights in 16 bits and computes in fp32 (16-bit matmuls are slow there)
    assert b.nbytes < a.nbytes and b.dtype == torch.float32
    block_linears = [m.weight for n, m in b.denoiser.named_modules() if n.startswith("layers.") and
                     isinstance(m, torch.nn.Linear)]
    assert block_linears and all(w.dtype == torch.bfloat16 for w in block_linears)
    assert ModelSpec("org/model", revision="v1") != ModelSpec("org/model", revision="v2")
    local.clear()


def test_eviction_really_frees_the_weights(tiny):
    z = load_model(ModelSpec(tiny["zimage_diffusers"]))
    budget = z.nbytes + 1024  # room for one model only
    del z
    local = cache_mod.ModelCache(budget_bytes=budget)
    first = local.get(ModelSpec(tiny["zimage_diffusers"]))
    ref = weakref.ref(first.pipe.transformer)
    released = []
    local.on_release(released.append)
    second = local.get(ModelSpec(tiny["sd1_diffusers"]))
    assert released == [first] and cache_mod.is_released(first) and len(local) == 1
    gc.collect()
    assert ref() is None, "the evicted transformer must be garbage"
    assert local.total_bytes == second.nbytes
    local.clear()
    assert len(local) == 0 and cache_mod.is_released(second)


def test_released_model_is_reloaded_transparently(tiny):
    spec = ModelSpec(tiny["zimage_diffusers"], dtype="fp32", offload="none", device="cpu")
    model = cache_mod.get_model(spec)
    cache_mod.CACHE.release(spec)
    assert cache_mod.is_released(model)
    fresh = cache_mod.ensure_loaded(model)
    assert fresh is not model and not cache_mod.is_released(fresh)
    assert small(fresh, seed=0).images.shape == (1, 64, 64, 3)


def test_fp8_weight_storage(tiny):
    model = load_model(ModelSpec(tiny["zimage_diffusers"], dtype="fp8_e4m3fn"))
    assert model.pipe.transformer.layers[0].attention.to_q.weight.dtype == torch.float8_e4m3fn
    out = small(model, seed=0)
    assert torch.isfinite(out.images).all()


@pytest.mark.parametrize("family", ["zimage", "sd1"])
def test_16_bit_storage_on_a_cpu_computes_in_fp32_with_the_rounded_weights(tiny, family):
    """bf16 on a CPU: the weights stay 16-bit between calls and every layer computes in fp32, so the image is
    the fp32 model's with its weights rounded to bf16 (same ops, same noise). A layer that fails mid-call still
    gets its 16-bit weights back."""
    from turbobooth.manager import lora as L
    from turbobooth.manager.loading import CAST_LAYERS

    narrow = load_model(ModelSpec(tiny[f"{family}_diffusers"], dtype="bf16"))
    wide = load_model(ModelSpec(tiny[f"{family}_diffusers"], dtype="fp32"))
    cast = {}
    for part in ("denoiser", "text_encoder") if family == "zimage" else ("denoiser",):
        n_root = narrow.denoiser if part == "denoiser" else narrow.pipe.text_encoder
        w_root = wide.denoiser if part == "denoiser" else wide.pipe.text_encoder
        w_layers = dict(w_root.named_modules())
        for name, layer in n_root.named_modules():
            if type(layer).__name__ in CAST_LAYERS and layer.weight.dtype == torch.bfloat16:
                cast[(part, name)] = layer
                with torch.no_grad():
                    for p in w_layers[name].parameters(recurse=False):
                        p.copy_(p.to(torch.bfloat16).float())
    assert len(cast) > 10
    a, b = small(narrow, seed=3), small(wide, seed=3)
    assert torch.allclose(a.images, b.images, atol=1e-6), (a.images - b.images).abs().max()
    assert all(layer.weight.dtype == torch.bfloat16 for layer in cast.values())
    layer = next(iter(cast.values()))
    with pytest.raises(RuntimeError):
        layer(torch.zeros(1, 1, 1, 1, 3) if "Conv" in type(layer).__name__ else torch.zeros(3, 1, 5, 7))
    assert layer.weight.dtype == torch.bfloat16
    # a LoRA over the 16-bit base gets fp32 layers too, and leaves the base 16-bit when it goes
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    probe = load_model(ModelSpec(tiny[f"{family}_diffusers"], dtype="fp32")).denoiser
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k"]), probe, "p")
    peft_sd = {k: torch.full_like(v, 0.01) for k, v in get_peft_model_state_dict(probe, adapter_name="p").items()}
    lora = L.TurboLora.from_peft(family, peft_sd, alpha=2.0)
    with L.applied(narrow, [(lora, 1.0)]):
        lora_params = [p for n, p in narrow.denoiser.named_parameters() if "lora_" in n]
        assert lora_params and all(p.dtype == torch.float32 for p in lora_params)
        assert torch.isfinite(small(narrow, seed=3).images).all()
    assert all(layer.weight.dtype == torch.bfloat16 for layer in cast.values())


# ---------------------------------------------------------------- hub cache (offline, hub layout)


def _populate_hub_cache(cache_dir: str, repo: str, folder: str, commit: str, refs: list[str]) -> str:
    """Lay a diffusers folder out exactly like huggingface_hub's cache: blobs, snapshots, refs."""
    repo_dir = os.path.join(cache_dir, "models--" + repo.replace("/", "--"))
    snap = os.path.join(repo_dir, "snapshots", commit)
    blobs = os.path.join(repo_dir, "blobs")
    os.makedirs(blobs, exist_ok=True)
    import hashlib

    for dirpath, _, files in os.walk(folder):
        for f in files:
            src = os.path.join(dirpath, f)
            rel = os.path.relpath(src, folder)
            with open(src, "rb") as fh:
                digest = hashlib.sha256(fh.read()).hexdigest()
            blob = os.path.join(blobs, digest)
            if not os.path.exists(blob):
                shutil.copyfile(src, blob)
            dst = os.path.join(snap, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.symlink(os.path.relpath(blob, os.path.dirname(dst)), dst)
    os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
    for ref in refs:
        with open(os.path.join(repo_dir, "refs", ref), "w") as fh:
            fh.write(commit)
    return snap


def _cli(args, env_extra):
    env = dict(os.environ, **env_extra)
    env.pop("HF_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "turbobooth", *args], capture_output=True, text=True, env=env, timeout=600)


def test_hub_repo_revisions_from_local_cache_offline(tiny, tmp_path):
    hub = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    _populate_hub_cache(str(hub), "tiny-org/tiny-zimage-turbo", tiny["zimage_diffusers"], commit, ["main", "v1.0"])
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_secret_token_never_logged"}
    out = tmp_path / "out"
    for model in ("tiny-org/tiny-zimage-turbo", "tiny-org/tiny-zimage-turbo@v1.0", f"tiny-org/tiny-zimage-turbo@{commit}"):
        r = _cli(["-v", "generate", "--model", model, "a dog", "--width", "64", "--height", "64", "--out", str(out)], env)
        assert r.returncode == 0, r.stderr
        assert "hf_secret_token_never_logged" not in r.stdout + r.stderr
        png = r.stdout.strip().splitlines()[-1]
        assert os.path.isfile(png)
    missing = _cli(["generate", "--model", "tiny-org/tiny-zimage-turbo@v9", "a dog", "--out", str(out)], env)
    assert missing.returncode == 2
    assert "v9" in missing.stderr and "HF_HUB_OFFLINE" in missing.stderr
    nothing = _cli(["generate", "--model", "tiny-org/does-not-exist", "a dog", "--out", str(out)], env)
    assert nothing.returncode == 2 and "tiny-org/does-not-exist" in nothing.stderr


# ---------------------------------------------------------------- bad input


def test_nonexistent_path(tmp_path):
    with pytest.raises(ModelSourceError, match="not found"):
        load_model(ModelSpec(str(tmp_path / "nope"), kind="diffusers"))
    with pytest.raises(ModelSourceError, match="model_index.json"):
        load_model(ModelSpec(str(tmp_path), kind="diffusers"))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_corrupt_and_truncated_safetensors(tiny, tmp_path):
    folder = _copy(tiny["zimage_diffusers"], tmp_path / "m")
    weights = os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors")
    size = os.path.getsize(weights)
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ModelSourceError, match="truncated") as e:
        load_model(ModelSpec(folder))
    assert "diffusion_pytorch_model.safetensors" in str(e.value)
    with open(weights, "wb") as f:
        f.write(b"\xff" * 64)
    with pytest.raises(ModelSourceError, match="corrupt|not a valid"):
        load_model(ModelSpec(folder))


def test_pickle_checkpoints_are_refused(tiny, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    with pytest.raises(UnsafeFileError, match="only .safetensors"):
        load_model(ModelSpec(str(ckpt)))
    disguised = tmp_path / "model.safetensors"
    torch.save({"state_dict": {}}, disguised)
    with pytest.raises(UnsafeFileError, match="pickle"):
        load_model(ModelSpec(str(disguised)))
    folder = _copy(tiny["sd1_diffusers"], tmp_path / "sd")
    unet = os.path.join(folder, "unet")
    os.remove(os.path.join(unet, "diffusion_pytorch_model.safetensors"))
    torch.save({}, os.path.join(unet, "diffusion_pytorch_model.bin"))
    with pytest.raises(UnsafeFileError, match="pickle"):
        load_model(ModelSpec(folder))


def test_wrong_family_and_missing_component(tiny, tmp_path):
    with pytest.raises(WrongFamilyError, match="Stable Diffusion 1.x model but Z-Image was requested"):
        load_model(ModelSpec(tiny["sd1_diffusers"], family="zimage"))
    folder = _copy(tiny["zimage_diffusers"], tmp_path / "flux")
    index = os.path.join(folder, "model_index.json")
    info = json.load(open(index))
    info["_class_name"] = "FluxPipeline"
    json.dump(info, open(index, "w"))
    with pytest.raises(WrongFamilyError, match="FluxPipeline"):
        load_model(ModelSpec(folder))
    folder2 = _copy(tiny["zimage_diffusers"], tmp_path / "partial")
    shutil.rmtree(os.path.join(folder2, "vae"))
    with pytest.raises(ModelSourceError, match="'vae'"):
        load_model(ModelSpec(folder2))


def test_spec_validation_names_the_value():
    with pytest.raises(InvalidInputError, match="dtype='int4'"):
        ModelSpec("x", dtype="int4")
    with pytest.raises(InvalidInputError, match="offload"):
        ModelSpec("x", offload="disk")
    with pytest.raises(InvalidInputError, match="split-file"):
        ModelSpec("x", kind="split")
    # repo ids as the Hub accepts them (a name may start with "_"); a local folder of that name wins
    assert ModelSpec("someuser/_my-model").resolved_kind() == "hub"
    assert ModelSpec("Tongyi-MAI/Z-Image-Turbo").resolved_kind() == "hub"
    assert ModelSpec("someuser/-bad").resolved_kind() == "diffusers"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(width=72), "width=72 .* multiple of 16"),
        (dict(height=50), "height=50"),
        (dict(prompts=""), "no prompt"),
        (dict(prompts="\n  \n\t\n"), "no prompt"),
        (dict(steps=0), "steps=0"),
        (dict(steps=-3), "steps=-3"),
        (dict(denoise=0.0), r"denoise=0.0 is outside \(0, 1\]"),
        (dict(denoise=1.5), "denoise=1.5"),
        (dict(images_per_prompt=0), "images_per_prompt=0"),
        (dict(sampler="lms"), "sampler 'lms'"),
        (dict(guidance=Guidance(negative_prompts=("a", "b", "c"), scales=(2.0,))), "3 negative prompts for 1 prompts"),
    ],
)
def test_bad_generation_inputs(zmodel, kwargs, match):
    prompts = kwargs.pop("prompts", "a dog")
    with pytest.raises(InvalidInputError, match=match):
        small(zmodel, prompts, **kwargs)


def test_bad_mask_and_init_batches(zmodel):
    init = torch.rand(1, 64, 64, 3)
    with pytest.raises(InvalidInputError, match="mask is 32x32 but the image is 64x64"):
        small(zmodel, init_image=init, mask=torch.ones(1, 32, 32))
    with pytest.raises(InvalidInputError, match="init image batch has 3 images but the prompts make 2"):
        small(zmodel, "a\nb", init_image=torch.rand(3, 64, 64, 3))
    with pytest.raises(InvalidInputError, match="init image is 32x32"):
        small(zmodel, init_image=torch.rand(1, 32, 32, 3))
    with pytest.raises(InvalidInputError, match="leaves no denoising step"):
        small(zmodel, init_image=init, denoise=0.1, steps=4)
    with pytest.raises(InvalidInputError, match="needs an init image"):
        small(zmodel, mask=torch.ones(1, 64, 64))


def test_sd1_size_multiple_is_8(sdmodel):
    assert small(sdmodel, width=72, height=64).images.shape == (1, 64, 72, 3)
    with pytest.raises(InvalidInputError, match="multiple of 8"):
        small(sdmodel, width=68)


# ---------------------------------------------------------------- independence


def test_manager_and_trainer_never_import_comfyui(tiny):
    """Run real generation with ComfyUI's modules made unimportable."""
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('comfy', 'folder_paths', 'server', 'execution', 'comfy_extras'):
            raise ImportError('ComfyUI import attempted: ' + name)
        return None
sys.meta_path.insert(0, Block())
import turbobooth.manager.cache as c, turbobooth.manager.sampling as s
import turbobooth.trainer
from turbobooth.manager.spec import ModelSpec
m = c.get_model(ModelSpec({tiny['zimage_diffusers']!r}))
print(s.generate(m, 'a dog', width=64, height=64).images.shape)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "torch.Size([1, 64, 64, 3])" in r.stdout
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for pkg in ("manager", "trainer"):
        for dirpath, _, files in os.walk(os.path.join(root, pkg)):
            for f in files:
                if f.endswith(".py"):
                    text = open(os.path.join(dirpath, f), encoding="utf-8").read()
                    for banned in ("import comfy", "from comfy", "import folder_paths", "import server"):
                        assert banned not in text, f"{pkg}/{f} contains {banned!r}"


# ---------------------------------------------------------------- every source format through load_model


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    return write_tiny_models(str(tmp_path_factory.mktemp("tiny-files")), formats=("diffusers", "split", "single_file"))


def test_split_files_and_single_file_load_and_match_the_folder(tiny_files):
    split = tiny_files["zimage_split"]
    z_split = load_model(ModelSpec(split["diffusion_model"], text_encoder=split["text_encoder"], vae=split["vae"],
                                   tokenizer=split["tokenizer"]))
    z_dir = load_model(ModelSpec(tiny_files["zimage_diffusers"]))
    assert z_split.family == "zimage" and z_split.identity.startswith("split:")
    assert torch.allclose(small(z_split, seed=2).images, small(z_dir, seed=2).images, atol=1e-4)
    sd_file = load_model(ModelSpec(tiny_files["sd1_single_file"], tokenizer=tiny_files["sd1_tokenizer"]))
    sd_dir = load_model(ModelSpec(tiny_files["sd1_diffusers"]))
    assert sd_file.family == "sd1" and sd_file.identity.startswith("single:")
    assert torch.allclose(small(sd_file, seed=2).images, small(sd_dir, seed=2).images, atol=1e-4)


def test_wrong_family_files(tiny_files):
    split = tiny_files["zimage_split"]
    with pytest.raises(WrongFamilyError, match="split files"):
        load_model(ModelSpec(split["diffusion_model"], kind="single_file"))
    with pytest.raises(WrongFamilyError):
        load_model(ModelSpec(tiny_files["sd1_single_file"], kind="split", text_encoder=split["text_encoder"],
                             vae=split["vae"], tokenizer=split["tokenizer"]))


# ---------------------------------------------------------------- Z-Image variants


def test_variant_detection_and_defaults(tiny, tmp_path):
    from turbobooth.manager.families import detect_variant, model_defaults

    assert detect_variant(["Tongyi-MAI/Z-Image-Turbo"], 3.0) == "turbo"
    assert detect_variant(["/models/diffusers/Z-Image"], 6.0) == "base"
    assert detect_variant(["ostris/Z-Image-De-Turbo"], 3.0) == "deturbo"
    assert detect_variant(["/models/my_finetune"], 3.0) == "turbo"  # Turbo's own scheduler shift
    assert detect_variant(["/models/my_finetune"], 6.0) == "base"
    assert (model_defaults("zimage", "turbo").steps, model_defaults("zimage", "turbo").guidance) == (8, 0.0)
    assert (model_defaults("zimage", "base").steps, model_defaults("zimage", "base").guidance) == (50, 5.0)
    assert model_defaults("sd1", "").steps == 25

    turbo = load_model(ModelSpec(tiny["zimage_diffusers"]))
    assert turbo.variant == "turbo" and turbo.defaults.steps == 8
    base = load_model(ModelSpec(tiny["zimage_diffusers"], variant="base"))
    assert base.variant == "base" and base.defaults.guidance == 5.0 and base.defaults.label == "Z-Image (Base)"
    calls = []
    base.pipe.transformer.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    generate(base, "a dog", width=32, height=32, steps=None)
    assert calls == [2] * 50, "Base: 50 steps with CFG (conditional and unconditional rows in each pass)"
    from turbobooth.trainer.priors import PriorCache

    prior = PriorCache(base, "a photo of a dog", root=str(tmp_path))  # class images at the variant's settings
    assert (prior.steps, prior.guidance) == (50, 5.0)
    assert PriorCache(turbo, "a photo of a dog", root=str(tmp_path)).key != prior.key
    with pytest.raises(InvalidInputError, match="variant"):
        ModelSpec(tiny["sd1_diffusers"], family="sd1", variant="turbo")
    with pytest.raises(InvalidInputError, match="variant"):
        ModelSpec("x", variant="lightning")


def test_cfg_settings_without_cfg_are_refused(zmodel):
    for g in (Guidance(scales=(0.0,), cfg_normalization=1.5), Guidance(scales=(0.0,), cfg_truncation=0.5)):
        with pytest.raises(InvalidInputError, match="guidance scale 0"):
            small(zmodel, guidance=g)
    small(zmodel, guidance=Guidance(scales=(2.0,), cfg_normalization=1.5))  # with CFG on they act


def test_base_goes_before_turbo_loads_when_only_one_fits(tiny):
    """Train on Base, sample on Turbo with room for one model: the cache lets Base go before loading Turbo."""
    from turbobooth.manager.loading import estimate_bytes

    base_spec = ModelSpec(tiny["zimage_diffusers"], variant="base")
    turbo_spec = ModelSpec(tiny["zimage_diffusers"], variant="turbo")
    probe = load_model(base_spec)
    local = cache_mod.ModelCache(budget_bytes=int(1.5 * max(probe.nbytes, estimate_bytes(turbo_spec))))
    base = local.get(base_spec)
    seen = []
    real_load = local._load

    def load(spec):
        seen.append(cache_mod.is_released(base))  # what is in memory when Turbo's weights start loading
        return real_load(spec)

    local._load = load
    turbo = local.get(turbo_spec)
    assert seen == [True] and base_spec not in local and turbo_spec in local and len(local) == 1
    assert base.variant == "base" and turbo.variant == "turbo" and turbo.defaults.steps == 8
    roomy = cache_mod.ModelCache(budget_bytes=1 << 40)
    roomy.get(base_spec), roomy.get(turbo_spec)
    assert len(roomy) == 2  # with room for both, both stay
    roomy.clear()
