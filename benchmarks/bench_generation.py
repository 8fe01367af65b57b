"""Generation benchmarks: TurboSample against a bare diffusers pipeline and ComfyUI's own nodes.

Run from the repository root:

    .venv/bin/python benchmarks/bench_generation.py [--quick] [--threads N]
    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfyui/python benchmarks/bench_generation.py --quick

Everything runs in one process on randomly initialised models (no downloads):
the tiny Z-Image from ``turbobooth.manager.tiny`` and a mid-size Z-Image
(transformer dim 1024, head dim 128, 4 layers) that shares the tiny text
encoder and VAE. Compared variants are interleaved round by round (the order
rotates every round) after a warm-up. Times are medians over the rounds; every
ratio is the median of the per-round ratios, printed with its smallest and
largest round. The script prints one ``name: value`` line per figure and never
judges the numbers.

With ``COMFYUI_PATH`` pointing at a ComfyUI checkout that runs Z-Image
natively (0.8.0 or newer), the mid-size weights are also written in ComfyUI's
split layout and run through ComfyUI's own node classes in this process
(UNETLoader -> ModelSamplingAuraFlow -> KSampler -> VAEDecode, with
ConditioningZeroOut as the negative), at the setting of ComfyUI's
Z-Image-Turbo template. ComfyUI's ``nodes`` module needs ComfyUI's
requirements (PyAV among them), so run the script with the python ComfyUI
runs on; the checkout is imported by path when it is not pip-installed there.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import statistics
import sys
import tempfile
import time
import types
import warnings

# benchmarks/common.py (this folder is on sys.path when run as a script)
from common import emit, emit_spread, import_turbobooth

PROMPT = "a photo of a red fox in fresh snow, golden hour, sharp focus"
BATCH_PROMPTS = (
    "a photo of a dog on the beach",
    "a portrait of a person in the city, high quality",
    "a red cat with blue eyes in the snow",
    "a green house in the style of an old photo",
)
SEED = 1234
STEPS = 8  # Z-Image-Turbo's default, and what TurboSample uses with steps=0
MID_NAME = "mid-zimage"  # the mid-size folder, beside the tiny one under <tmp>/diffusers

# The mid-size Z-Image transformer: real Z-Image-Turbo head size, rope axes and
# theta, but 1024 wide and 4 layers deep instead of 3840 and 30.
MID_TRANSFORMER = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=16,
    dim=1024,
    n_layers=4,
    n_refiner_layers=2,
    n_heads=8,
    n_kv_heads=8,
    norm_eps=1e-5,
    qk_norm=True,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[32, 48, 48],
    axes_lens=[1536, 512, 512],
)

# ComfyUI's Z-Image-Turbo template (workflow-templates 0.11): UNETLoader -> ModelSamplingAuraFlow shift 3 ->
# KSampler 8 steps, cfg 1, res_multistep / simple, ConditioningZeroOut as the negative -> VAEDecode.
COMFY_TEMPLATE = dict(steps=8, sampler="res_multistep", scheduler="simple", cfg=1.0, shift=3.0)
# The same graph with TurboSample's own solver: the same model evaluations and, given the same noise, the same image.
COMFY_SAME_SAMPLER = "euler"


# --------------------------------------------------------------------------- output and timing


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed(fn, device: str):
    """(wall seconds, process CPU seconds, result) of one call."""
    gc.collect()
    _sync(device)
    cpu = time.process_time()
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, time.process_time() - cpu, out


def rotated(names: list, r: int) -> list:
    k = r % len(names)
    return names[k:] + names[:k]


class Timings:
    """Per-round wall and CPU times of interleaved variants, and the last output of each."""

    def __init__(self, names):
        self.wall: dict[str, list[float]] = {n: [] for n in names}
        self.cpu: dict[str, list[float]] = {n: [] for n in names}
        self.outputs: dict = {}

    def add(self, name: str, wall: float, cpu: float) -> None:
        self.wall[name].append(wall)
        self.cpu[name].append(cpu)

    def median(self, name: str) -> float:
        return statistics.median(self.wall[name])

    def ratios(self, a: str, b: str, cpu: bool = False) -> list[float]:
        """a's time / b's time in each round (same round: slow drifts in machine load cancel)."""
        times = self.cpu if cpu else self.wall
        return [x / y for x, y in zip(times[a], times[b], strict=True)]


def interleaved(variants: dict, rounds: int, device: str, warmup: dict | None = None) -> Timings:
    """Warm every variant up, then time ``rounds`` rounds, rotating the order each round."""
    for fn in (warmup or variants).values():
        fn()
    result = Timings(variants)
    for r in range(rounds):
        for name in rotated(list(variants), r):
            wall, cpu, result.outputs[name] = timed(variants[name], device)
            result.add(name, wall, cpu)
    return result


def emit_ratio(name: str, timings: Timings, a: str, b: str) -> None:
    """The wall-time ratio, and the same from process CPU time (less sensitive to other load), with spreads."""
    emit_spread(name, timings.ratios(a, b))
    emit_spread(f"{name}_cpu", timings.ratios(a, b, cpu=True))


def max_abs_diff(a, b) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max())


def nbytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


@contextlib.contextmanager
def accumulate(obj, attr: str, bucket: dict, key: str):
    """Add the wall time of every ``obj.attr(...)`` call to ``bucket[key]`` (instance-level patch)."""
    original = getattr(obj, attr)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            bucket[key] += time.perf_counter() - start

    setattr(obj, attr, wrapper)
    try:
        yield
    finally:
        delattr(obj, attr)


# --------------------------------------------------------------------------- calls being compared


class Runner:
    """TurboSample and a bare ``ZImagePipeline.__call__`` with identical settings."""

    def __init__(self, model, device: str):
        import turbobooth
        from turbobooth.manager.families import defaults_for

        self.model = model
        self.device = device
        self.node = turbobooth.NODE_CLASS_MAPPINGS["TurboBoothSample"]()
        # what generate() passes as max_sequence_length when the caller gives none
        self.max_len = defaults_for("zimage").max_sequence_length

    def live(self):
        from turbobooth.manager.cache import ensure_loaded

        self.model = ensure_loaded(self.model)
        return self.model

    def node_call(self, prompt: str, seed: int, size: int, steps: int = STEPS, clear_embeddings: bool = False):
        from turbobooth.manager.sampling import embed_cache

        model = self.live()
        if clear_embeddings:
            embed_cache(model).clear()
        images, _latent = self.node.sample(
            model=model,
            prompt=prompt,
            seed=seed,
            steps=steps,
            width=size,
            height=size,
            images_per_prompt=1,
            sampler="euler",
            shift=0.0,
        )
        return images

    def bare_call(self, prompt: str, seed: int, size: int, steps: int = STEPS):
        import torch

        pipe = self.live().pipe
        out = pipe(
            prompt=prompt,
            generator=torch.Generator("cpu").manual_seed(seed),
            num_inference_steps=steps,
            guidance_scale=0.0,
            height=size,
            width=size,
            max_sequence_length=self.max_len,
            output_type="pt",
        )
        return out.images.permute(0, 2, 3, 1).float().cpu()


def use_diffusers_root(root: str) -> None:
    """Let TurboLoader's ``diffusers_model`` widget find the benchmark's folders, which live in a temporary
    ``root`` rather than in ComfyUI's models/diffusers (the widget takes names inside those folders only)."""
    from turbobooth.nodes import comfy as host

    original = host.folder_roots

    def folder_roots(kind: str) -> list[str]:
        return [root, *original(kind)] if kind == "diffusers" else original(kind)

    host.folder_roots = folder_roots


def load_with_node(name: str, device: str, dtype: str = "auto"):
    """TurboLoader on the diffusers folder ``name`` (inside the root given to ``use_diffusers_root``)."""
    import turbobooth
    from turbobooth.nodes.comfy import NONE

    loader = turbobooth.NODE_CLASS_MAPPINGS["TurboBoothLoader"]()
    (model,) = loader.load(
        source="diffusers folder",
        diffusers_model=name,
        repo_id="",
        revision="main",
        diffusion_model=NONE,
        text_encoder=NONE,
        vae=NONE,
        checkpoint=NONE,
        family="auto",
        dtype=dtype,
        device=device,
        offload="none",
    )
    return model


# --------------------------------------------------------------------------- loading


def bench_cache(name: str, folder: str, device: str, rounds: int) -> None:
    from turbobooth.manager.cache import ModelCache
    from turbobooth.manager.spec import ModelSpec

    spec = ModelSpec(folder, kind="diffusers", device=device)
    ModelCache().get(spec)  # warm-up: imports, file system cache
    times = Timings(("cold", "hit"))
    for _ in range(rounds):
        cache = ModelCache()
        cold, _, first = timed(lambda cache=cache: cache.get(spec), device)
        hit, _, second = timed(lambda cache=cache: cache.get(spec), device)
        if second is not first:
            emit("cache_hit_returned_other_object", 1)
        times.add("cold", cold, 0.0)
        times.add("hit", hit, 0.0)
        cache.clear()
    emit("cold_load_s", times.median("cold"))
    emit("cache_hit_s", times.median("hit"))
    emit_spread("cache_hit_vs_cold_load_ratio", times.ratios("hit", "cold"))
    load_with_node(name, device)
    dt_node, _, _ = timed(lambda: load_with_node(name, device), device)
    emit("loader_node_cache_hit_s", dt_node)


def bench_cold_load(prefix: str, folder: str, device: str, rounds: int) -> None:
    """TurboBooth's cold load (a fresh ModelCache, so ``load_model(ModelSpec(folder))``) against a bare
    ``ZImagePipeline.from_pretrained(folder)``, interleaved; every loaded model is dropped before the next load."""
    from diffusers import ZImagePipeline
    from turbobooth.manager.cache import ModelCache
    from turbobooth.manager.spec import ModelSpec

    spec = ModelSpec(folder, device=device)

    def turbo():
        cache = ModelCache()
        cache.get(spec)
        return cache

    def bare():  # from_pretrained builds on the CPU: a bare script moves it only to another device
        pipe = ZImagePipeline.from_pretrained(folder)
        return pipe if device == "cpu" else pipe.to(device)

    variants = {"turbo": turbo, "bare": bare}
    t = Timings(variants)
    for r in range(-1, rounds):  # round -1 is the warm-up: imports, the OS file cache
        for name in rotated(list(variants), r):
            wall, cpu, out = timed(variants[name], device)
            if name == "turbo":
                out.clear()
            del out
            if r >= 0:
                t.add(name, wall, cpu)
    emit(f"{prefix}_cold_load_turbo_s", t.median("turbo"))
    emit(f"{prefix}_cold_load_bare_from_pretrained_s", t.median("bare"))
    emit_ratio(f"{prefix}_cold_load_turbo_vs_bare_ratio", t, "turbo", "bare")


# --------------------------------------------------------------------------- tiny model figures


def bench_tiny_sampling(runner: Runner, size: int, rounds: int, device: str) -> None:
    variants = {
        "node": lambda: runner.node_call(PROMPT, SEED, size, clear_embeddings=True),
        "node_embed_cached": lambda: runner.node_call(PROMPT, SEED, size),
        "bare": lambda: runner.bare_call(PROMPT, SEED, size),
    }
    t = interleaved(variants, rounds, device)
    emit("tiny_node_s", t.median("node"))
    emit("tiny_node_embed_cached_s", t.median("node_embed_cached"))
    emit("tiny_bare_pipeline_s", t.median("bare"))
    emit_ratio("node_vs_bare_pipeline_ratio", t, "node", "bare")
    emit("node_vs_bare_max_abs_diff", max_abs_diff(t.outputs["node"], t.outputs["bare"]))
    emit_ratio("node_vs_bare_pipeline_ratio_embed_cached", t, "node_embed_cached", "bare")
    emit_ratio("embed_cache_repeat_speedup", t, "node", "node_embed_cached")


def bench_overhead_breakdown(runner: Runner, size: int, rounds: int, device: str) -> None:
    """Where the time goes, per call: denoiser, text encoder, VAE decode, and everything else."""
    from turbobooth.manager import schedulers

    pipe = runner.live().pipe
    parts = ("transformer", "text_encoder", "vae_decode")
    calls = {
        "node": lambda: runner.node_call(PROMPT, SEED, size, clear_embeddings=True),
        "bare": lambda: runner.bare_call(PROMPT, SEED, size),
    }
    rows: dict[str, list] = {name: [] for name in calls}
    for r in range(rounds):
        for name in rotated(list(calls), r):
            bucket = dict.fromkeys(parts, 0.0)
            with (
                accumulate(pipe.transformer, "forward", bucket, "transformer"),
                accumulate(pipe.text_encoder, "forward", bucket, "text_encoder"),
                accumulate(pipe.vae, "decode", bucket, "vae_decode"),
            ):
                total, _, _ = timed(calls[name], device)
            bucket["total"] = total
            bucket["other"] = total - sum(bucket[p] for p in parts)
            rows[name].append(bucket)
    for name in calls:
        for part in ("total", *parts, "other"):
            emit(f"tiny_{name}_{part}_ms", statistics.median(b[part] for b in rows[name]) * 1e3)
    extra = statistics.median(n["other"] - b["other"] for n, b in zip(rows["node"], rows["bare"], strict=True))
    emit("tiny_node_own_overhead_ms", extra * 1e3)
    config = dict(pipe.scheduler.config)
    n = 50
    start = time.perf_counter()
    for _ in range(n):
        schedulers.zimage_scheduler(dict(config), "euler", None)
    emit("scheduler_build_ms", (time.perf_counter() - start) / n * 1e3)


def bench_batch(runner: Runner, size: int, rounds: int, device: str) -> None:
    import torch

    def one_call():
        return runner.node_call("\n".join(BATCH_PROMPTS), SEED, size)

    def four_calls():
        return torch.cat([runner.node_call(p, SEED + i, size) for i, p in enumerate(BATCH_PROMPTS)], dim=0)

    t = interleaved({"batch": one_call, "calls": four_calls}, rounds, device)
    emit("batch4_one_call_s", t.median("batch"))
    emit("batch4_four_calls_s", t.median("calls"))
    emit_ratio("batch4_vs_4_calls_throughput_ratio", t, "calls", "batch")
    emit("batch4_vs_4_calls_max_abs_diff", max_abs_diff(t.outputs["batch"], t.outputs["calls"]))


# --------------------------------------------------------------------------- mid-size model


def build_mid_pipeline(seed: int = 0):
    import torch
    from diffusers import ZImageTransformer2DModel
    from turbobooth.manager.tiny import build_tiny_zimage

    pipe = build_tiny_zimage(seed)
    torch.manual_seed(seed + 100)
    cap_dim = pipe.text_encoder.config.hidden_size
    transformer = ZImageTransformer2DModel(cap_feat_dim=cap_dim, **MID_TRANSFORMER)
    with torch.no_grad():  # created with torch.empty in diffusers
        transformer.x_pad_token.normal_(0.0, 0.02)
        transformer.cap_pad_token.normal_(0.0, 0.02)
    pipe.transformer = transformer.eval()
    return pipe


def bench_bf16(size: int, rounds: int, device: str) -> None:
    """TurboSample on the mid-size model loaded with dtype="bf16" against dtype="fp32" (on a CPU, bf16 stores
    16-bit weights and computes each layer in fp32, manager.loading.store_weights)."""
    fp32 = Runner(load_with_node(MID_NAME, device, dtype="fp32"), device)
    bf16 = Runner(load_with_node(MID_NAME, device, dtype="bf16"), device)
    runners = {"bf16": bf16, "fp32": fp32}
    variants = {k: (lambda r=r: r.node_call(PROMPT, SEED, size, clear_embeddings=True)) for k, r in runners.items()}
    warm = {
        k: (lambda r=r: r.node_call(PROMPT, SEED, size, steps=1, clear_embeddings=True)) for k, r in runners.items()
    }
    from turbobooth.manager import cache as cache_mod

    loads_before = cache_mod.CACHE.loads
    t = interleaved(variants, rounds, device, warmup=warm)
    p = f"mid_{size}"
    emit(f"{p}_bf16_reloads_during_run", cache_mod.CACHE.loads - loads_before)
    emit(f"{p}_bf16_node_s", t.median("bf16"))
    emit(f"{p}_fp32_node_s", t.median("fp32"))
    emit_ratio(f"{p}_bf16_vs_fp32_time_ratio", t, "bf16", "fp32")
    emit(f"{p}_bf16_vs_fp32_max_abs_diff", max_abs_diff(t.outputs["bf16"], t.outputs["fp32"]))
    low, full = bf16.live(), fp32.live()
    emit("mid_bf16_module_nbytes_mib", low.nbytes / 2**20)
    emit("mid_fp32_module_nbytes_mib", full.nbytes / 2**20)
    emit("mid_bf16_vs_fp32_module_nbytes_ratio", low.nbytes / full.nbytes)
    emit("mid_bf16_vs_fp32_denoiser_nbytes_ratio", nbytes(low.pipe.transformer) / nbytes(full.pipe.transformer))


# --------------------------------------------------------------------------- ComfyUI


class ComfyUnavailable(Exception):
    """This ComfyUI cannot run the comparison; the message says why."""


def comfyui_support(path: str | None) -> tuple[bool, str]:
    """Whether ``path`` is a ComfyUI with native Z-Image support, and why not."""
    if not path:
        return False, "COMFYUI_PATH is not set"
    models = os.path.join(path, "comfy", "supported_models.py")
    lumina = os.path.join(path, "comfy", "ldm", "lumina", "model.py")
    if not os.path.isfile(models):
        return False, f"COMFYUI_PATH={path} has no comfy/supported_models.py"
    with open(models, encoding="utf-8") as f:
        text = f.read()
    lumina_text = ""
    if os.path.isfile(lumina):
        with open(lumina, encoding="utf-8") as f:
            lumina_text = f.read()
    if "class ZImage" not in text and "z_image" not in text:
        return False, f"the ComfyUI at {path} predates native Z-Image support (0.8.0+ needed)"
    if "z_image_modulation" not in lumina_text:
        return False, f"the ComfyUI at {path} has no Z-Image NextDiT settings in comfy/ldm/lumina/model.py"
    return True, ""


def _forget_modules_under(root: str) -> None:
    """Undo a failed ComfyUI import, so TurboBooth's host adapter does not find half of ComfyUI afterwards."""

    def under(module) -> bool:
        places = [getattr(module, "__file__", None) or ""]
        path = getattr(module, "__path__", None)  # comfy/ is a namespace package: no __file__
        if isinstance(path, list) or type(path).__name__ == "_NamespacePath":
            places += list(path)
        return any(str(p).startswith(root + os.sep) for p in places)

    for name in [name for name, module in list(sys.modules.items()) if under(module)]:
        sys.modules.pop(name, None)
    sys.path[:] = [p for p in sys.path if not os.path.abspath(p or ".").startswith(root)]


def import_comfy(path: str, device: str):
    """Import ComfyUI's core and its node modules in-process, without letting its argument parser see ours."""
    root = os.path.abspath(path)
    sys.path.insert(0, root)
    saved = sys.argv
    sys.argv = [saved[0]] + (["--cpu"] if device == "cpu" else [])
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.model_detection
        import comfy.model_management
        import comfy.sd
        import comfy.supported_models
        import comfy.utils
        import folder_paths
        from comfy_extras import nodes_model_advanced, nodes_sd3

        import nodes
    except ImportError as e:
        _forget_modules_under(root)
        raise ComfyUnavailable(
            f"ComfyUI's node modules do not import with {sys.executable} ({type(e).__name__}: {e}); "
            "run this script with the python ComfyUI runs on"
        ) from e
    finally:
        sys.argv = saved
    comfy.utils.set_progress_bar_enabled(False)  # no tqdm bar per KSampler call in the output
    return types.SimpleNamespace(
        comfy=comfy,
        nodes=nodes,
        folder_paths=folder_paths,
        ModelSamplingAuraFlow=nodes_model_advanced.ModelSamplingAuraFlow,
        EmptySD3LatentImage=nodes_sd3.EmptySD3LatentImage,
    )


@contextlib.contextmanager
def zimage_detection(comfy, cfg: dict):
    """ComfyUI reads the Z-Image layout from the weights only for the full-size model (dim 3840); for the
    smaller test widths its detection is given the Z-Image settings of the diffusers config ``cfg``."""
    detection = comfy.model_detection
    original = detection.model_config_from_unet
    settings = dict(
        n_heads=cfg["n_heads"],
        n_kv_heads=cfg["n_kv_heads"],
        n_refiner_layers=cfg["n_refiner_layers"],
        axes_dims=list(cfg["axes_dims"]),
        axes_lens=list(cfg["axes_lens"]),
        rope_theta=float(cfg["rope_theta"]),
        ffn_dim_multiplier=8.0 / 3.0,
        multiple_of=1,  # diffusers sizes the feed-forward as int(dim / 3 * 8)
        z_image_modulation=True,
        time_scale=float(cfg["t_scale"]),
        pad_tokens_multiple=32,
    )

    def detect(state_dict, prefix, *args, **kwargs):
        found = original(state_dict, prefix, *args, **kwargs)
        if isinstance(found, comfy.supported_models.ZImage):
            return found
        unet = detection.detect_unet_config(state_dict, prefix, metadata=kwargs.get("metadata"))
        unet.update(settings)
        return comfy.supported_models.ZImage(unet)

    detection.model_config_from_unet = detect
    try:
        yield
    finally:
        detection.model_config_from_unet = original


def load_comfy_vae(comfy, path: str, vae_config):
    """VAELoader's ``comfy.sd.VAE``, given an explicit config: ComfyUI detects only the full-size VAE widths."""
    import torch

    sd = comfy.utils.load_torch_file(path)
    widths = list(vae_config.block_out_channels)
    z = int(vae_config.latent_channels)
    ddconfig = {
        "double_z": True,
        "z_channels": z,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": widths[0],
        "ch_mult": [w // widths[0] for w in widths],
        "num_res_blocks": int(vae_config.layers_per_block),
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    # Z-Image's VAE has no quant convs; ComfyUI's configurable AutoencoderKL always has them.
    sd.setdefault("quant_conv.weight", torch.eye(2 * z)[:, :, None, None])
    sd.setdefault("quant_conv.bias", torch.zeros(2 * z))
    sd.setdefault("post_quant_conv.weight", torch.eye(z)[:, :, None, None])
    sd.setdefault("post_quant_conv.bias", torch.zeros(z))
    return comfy.sd.VAE(sd=sd, config={"params": {"embed_dim": z, "ddconfig": ddconfig}})


class ComfyZImage:
    """The mid-size Z-Image run through ComfyUI's own node classes, as the Z-Image-Turbo template wires them:
    UNETLoader -> ModelSamplingAuraFlow -> KSampler (positive, ConditioningZeroOut negative) -> VAEDecode.

    ComfyUI cannot load the tiny Qwen3 text encoder, so the positive conditioning comes from our text encoder,
    computed once, as a cached CLIPTextEncode output would be; the VAE is loaded with an explicit config.
    """

    def __init__(self, api, files: dict, pipe, prompt: str, max_len: int, device: str):
        self.api = api
        folder, name = os.path.split(files["diffusion_model"])
        api.folder_paths.add_model_folder_path("diffusion_models", folder)
        with zimage_detection(api.comfy, dict(pipe.transformer.config)):
            (model,) = api.nodes.UNETLoader().load_unet(unet_name=name, weight_dtype="default")
        self.shift = float(model.get_model_object("model_sampling").shift)
        (self.model,) = api.ModelSamplingAuraFlow().patch_aura(model=model, shift=COMFY_TEMPLATE["shift"])
        self.vae = load_comfy_vae(api.comfy, files["vae"], pipe.vae.config)
        self.positive = self._conditioning(pipe, prompt, max_len, device)
        (self.negative,) = api.nodes.ConditioningZeroOut().zero_out(conditioning=self.positive)
        self.ksampler = api.nodes.KSampler()
        self.decoder = api.nodes.VAEDecode()

    @staticmethod
    def _conditioning(pipe, prompt: str, max_len: int, device: str):
        import torch

        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(
                prompt, device=device, do_classifier_free_guidance=False, max_sequence_length=max_len
            )
        return [[embeds[0].unsqueeze(0), {}]]

    def generate(self, seed: int, size: int, sampler: str, steps: int = COMFY_TEMPLATE["steps"]):
        """EmptySD3LatentImage -> KSampler -> VAEDecode at the template's cfg and scheduler; IMAGE [B,H,W,C]."""
        t = COMFY_TEMPLATE
        latent = self.api.EmptySD3LatentImage.execute(width=size, height=size, batch_size=1).result[0]
        (samples,) = self.ksampler.sample(
            model=self.model,
            seed=seed,
            steps=steps,
            cfg=t["cfg"],
            sampler_name=sampler,
            scheduler=t["scheduler"],
            positive=self.positive,
            negative=self.negative,
            latent_image=latent,
            denoise=1.0,
        )
        (images,) = self.decoder.decode(vae=self.vae, samples=samples)
        return images


def probe_memory_sharing(runner: Runner) -> str:
    """Run TurboSample once with ComfyUI's memory manager present; disable the sharing if it breaks sampling.

    TurboSample registers its model with ``comfy.model_management`` on every
    call. If ComfyUI's loading path makes that registration release the very
    model being sampled, the node cannot run in this ComfyUI at all; the
    timings then go on without the registration, and this says why.
    """
    from turbobooth.manager import cache as cache_mod
    from turbobooth.nodes import comfy as host

    loads = cache_mod.CACHE.loads
    try:
        runner.node_call(PROMPT, SEED, 64, steps=1)
        error = None
    except Exception as e:  # the failure is what this probe reports
        error = f"{type(e).__name__}: {e}"
    reloaded = cache_mod.CACHE.loads - loads
    runner.live()
    if error is None and not reloaded:
        return "on"
    host.share_memory = lambda model: None
    what = f"sampling failed ({error})" if error else f"the model was reloaded {reloaded} time(s)"
    return f"off for these timings: share_memory() released the model being sampled; {what}"


def comfyui_version(path: str) -> str:
    try:
        with open(os.path.join(path, "comfyui_version.py"), encoding="utf-8") as f:
            for line in f:
                if line.startswith("__version__"):
                    return line.split("=", 1)[1].strip().strip("\"'")
    except OSError:
        pass
    return "unknown"


def setup_comfy(args, runner: Runner, tmp: str, comfy_path: str | None) -> ComfyZImage | None:
    """ComfyUI's graph on the mid-size weights, or None (and a ``comfyui_comparison: skipped (why)`` line)."""
    from turbobooth.manager import writers

    ok, why = comfyui_support(comfy_path)
    if not ok:
        emit("comfyui_comparison", f"skipped ({why})")
        return None
    start = time.perf_counter()
    try:
        api = import_comfy(comfy_path, args.device)
    except ComfyUnavailable as e:
        emit("comfyui_comparison", f"skipped ({e})")
        return None
    import torch

    torch.set_num_threads(args.threads)  # in case an import changed it
    pipe = runner.live().pipe
    files = writers.save_zimage_split(pipe, os.path.join(tmp, "comfy"), "mid_zimage")
    graph = ComfyZImage(api, files, pipe, PROMPT, runner.max_len, args.device)
    emit(
        "comfyui_comparison",
        "on (ComfyUI's UNETLoader, ModelSamplingAuraFlow, ConditioningZeroOut, KSampler, VAEDecode)",
    )
    emit("comfyui_version", comfyui_version(comfy_path))
    emit("comfyui_model_shift", graph.shift)
    emit(
        "comfyui_template",
        "{steps} steps {sampler}/{scheduler} cfg {cfg} ModelSamplingAuraFlow shift {shift}".format(**COMFY_TEMPLATE),
    )
    emit("comfyui_setup_s", time.perf_counter() - start)
    emit("turbo_memory_sharing_with_comfyui", probe_memory_sharing(runner))
    return graph


# --------------------------------------------------------------------------- main


def bench_mid(args, tmp: str, comfy_path: str | None) -> None:
    from turbobooth.manager import cache as cache_mod
    from turbobooth.manager.tiny import save_diffusers

    device = args.device
    start = time.perf_counter()
    pipe = build_mid_pipeline()
    folder = save_diffusers(pipe, os.path.join(tmp, "diffusers", MID_NAME))
    emit("mid_transformer_params_m", sum(p.numel() for p in pipe.transformer.parameters()) / 1e6)
    del pipe
    runner = Runner(load_with_node(MID_NAME, device), device)
    emit("mid_setup_s", time.perf_counter() - start)
    bench_cold_load("mid", folder, device, args.load_rounds)

    graph = setup_comfy(args, runner, tmp, comfy_path)
    for size in args.mid_sizes:
        variants = {
            "node": lambda size=size: runner.node_call(PROMPT, SEED, size, clear_embeddings=True),
            "bare": lambda size=size: runner.bare_call(PROMPT, SEED, size),
        }
        warm = {
            "node": lambda size=size: runner.node_call(PROMPT, SEED, size, steps=1, clear_embeddings=True),
            "bare": lambda size=size: runner.bare_call(PROMPT, SEED, size, steps=1),
        }
        if graph is not None:
            variants.update(
                comfy_template=lambda size=size: graph.generate(SEED, size, COMFY_TEMPLATE["sampler"]),
                comfy_same=lambda size=size: graph.generate(SEED, size, COMFY_SAME_SAMPLER, steps=STEPS),
            )
            warm.update(
                comfy_template=lambda size=size: graph.generate(SEED, size, COMFY_TEMPLATE["sampler"], steps=1),
                comfy_same=lambda size=size: graph.generate(SEED, size, COMFY_SAME_SAMPLER, steps=1),
            )
        loads_before = cache_mod.CACHE.loads
        t = interleaved(variants, args.mid_rounds, device, warmup=warm)
        p = f"mid_{size}"
        emit(f"{p}_node_s", t.median("node"))
        emit(f"{p}_bare_pipeline_s", t.median("bare"))
        emit_ratio(f"{p}_node_vs_bare_pipeline_ratio", t, "node", "bare")
        emit(f"{p}_node_vs_bare_max_abs_diff", max_abs_diff(t.outputs["node"], t.outputs["bare"]))
        if graph is not None:
            emit(f"{p}_comfyui_template_s", t.median("comfy_template"))
            emit_ratio(f"{p}_turbo_vs_comfyui_template_ratio", t, "node", "comfy_template")
            emit(f"{p}_comfyui_same_evals_s", t.median("comfy_same"))
            emit_ratio(f"{p}_turbo_vs_comfyui_same_evals_ratio", t, "node", "comfy_same")
            emit(
                f"{p}_turbo_vs_comfyui_same_evals_max_abs_diff",
                max_abs_diff(t.outputs["node"], t.outputs["comfy_same"]),
            )
            emit(f"{p}_turbo_reloads_during_run", cache_mod.CACHE.loads - loads_before)
    bench_bf16(args.mid_sizes[0], args.mid_rounds, device)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes and fewer rounds")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads (default 1: stable timings on a shared machine)"
    )
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds for the tiny model (default 15, quick 9)")
    ap.add_argument("--mid-rounds", type=int, default=3, help="timed rounds for the mid-size model (default 3)")
    ap.add_argument(
        "--load-rounds", type=int, default=None, help="timed rounds of each cold-load comparison (default 25, quick 15)"
    )
    ap.add_argument(
        "--tiny-size", type=int, default=None, help="image side for the tiny model (default 256, quick 128)"
    )
    ap.add_argument(
        "--mid-sizes", default=None, help="comma-separated sides for the mid-size model (default 256,512; quick 256)"
    )
    ap.add_argument(
        "--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout (default: $COMFYUI_PATH)"
    )
    ap.add_argument("--skip-mid", action="store_true", help="only the tiny-model figures")
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (9 if args.quick else 15)
    args.load_rounds = args.load_rounds or (15 if args.quick else 25)
    args.tiny_size = args.tiny_size or (128 if args.quick else 256)
    sizes = args.mid_sizes or ("256" if args.quick else "256,512")
    args.mid_sizes = [int(s) for s in sizes.split(",") if s.strip()]
    return args


def quiet() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.getLogger("turbobooth").setLevel(logging.WARNING)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    quiet()
    import diffusers

    import_turbobooth()
    from turbobooth.manager.tiny import write_tiny_models

    emit("python", sys.executable)
    emit("torch_threads", torch.get_num_threads())
    emit("torch_version", torch.__version__)
    emit("diffusers_version", diffusers.__version__)
    emit("device", args.device)
    emit("quick", int(args.quick))
    emit("tiny_size", args.tiny_size)
    emit("tiny_rounds", args.rounds)
    emit("mid_sizes", ",".join(str(s) for s in args.mid_sizes))
    emit("mid_rounds", args.mid_rounds)
    emit("load_rounds", args.load_rounds)
    emit("steps", STEPS)
    emit("loadavg_1m_start", os.getloadavg()[0])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="turbobooth-bench-") as tmp:
        folder = write_tiny_models(tmp, formats=("diffusers",))["zimage_diffusers"]
        use_diffusers_root(os.path.dirname(folder))
        name = os.path.basename(folder)
        bench_cache(name, folder, args.device, args.rounds)
        bench_cold_load("tiny", folder, args.device, args.load_rounds)
        runner = Runner(load_with_node(name, args.device), args.device)
        bench_tiny_sampling(runner, args.tiny_size, args.rounds, args.device)
        bench_overhead_breakdown(runner, args.tiny_size, args.rounds, args.device)
        bench_batch(runner, args.tiny_size, args.rounds, args.device)
        if not args.skip_mid:
            bench_mid(args, tmp, args.comfyui)
    emit("total_s", time.perf_counter() - started)
    emit("loadavg_1m_end", os.getloadavg()[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
