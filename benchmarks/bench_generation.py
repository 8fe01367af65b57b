"""Generation benchmarks: TurboSample against a bare diffusers pipeline (and ComfyUI's own sampler).

Run from the repository root:

    .venv/bin/python benchmarks/bench_generation.py [--quick] [--threads N]

Everything runs in one process on randomly initialised models (no downloads):
the tiny Z-Image from ``turbobooth.manager.tiny`` and a mid-size Z-Image
(transformer dim 1024, head dim 128, 4 layers) that shares the tiny text
encoder and VAE. Compared variants are interleaved round by round (the order
rotates every round) after a warm-up, and every figure is a median over the
rounds. The script prints one ``name: value`` line per figure and never
judges the numbers.

With ``COMFYUI_PATH`` pointing at a ComfyUI checkout that runs Z-Image
natively (0.8.0 or newer), the mid-size weights are also written in ComfyUI's
split layout, loaded through ComfyUI's own loaders in this process and sampled
with its KSampler code, so TurboSample can be timed against it.
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
import warnings

from common import emit  # benchmarks/common.py (this folder is on sys.path when run as a script)

PROMPT = "a photo of a red fox in fresh snow, golden hour, sharp focus"
BATCH_PROMPTS = (
    "a photo of a dog on the beach",
    "a portrait of a person in the city, high quality",
    "a red cat with blue eyes in the snow",
    "a green house in the style of an old photo",
)
SEED = 1234
STEPS = 8  # Z-Image-Turbo's default, and what TurboSample uses with steps=0

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

# ComfyUI's template setting for Z-Image-Turbo that the second comparison uses.
COMFY_TEMPLATE = dict(steps=4, sampler="res_multistep", scheduler="simple", cfg=1.0, shift=3.0)


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


class Timings:
    """Per-round wall and CPU times of interleaved variants, and the last output of each."""

    def __init__(self, names):
        self.wall: dict[str, list[float]] = {n: [] for n in names}
        self.cpu: dict[str, list[float]] = {n: [] for n in names}
        self.outputs: dict = {}

    def median(self, name: str) -> float:
        return statistics.median(self.wall[name])

    def ratio(self, a: str, b: str, cpu: bool = False) -> float:
        """Median over rounds of (a's time / b's time in the same round): slow drifts in load cancel."""
        times = self.cpu if cpu else self.wall
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


def interleaved(variants: dict, rounds: int, device: str, warmup: dict | None = None) -> Timings:
    """Warm every variant up, then time ``rounds`` rounds, rotating the order each round."""
    for fn in (warmup or variants).values():
        fn()
    names = list(variants)
    result = Timings(names)
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            wall, cpu, result.outputs[name] = timed(variants[name], device)
            result.wall[name].append(wall)
            result.cpu[name].append(cpu)
    return result


def emit_ratio(name: str, timings: Timings, a: str, b: str) -> None:
    """The wall-time ratio, and the same from process CPU time (less sensitive to other load)."""
    emit(name, timings.ratio(a, b))
    emit(f"{name}_cpu", timings.ratio(a, b, cpu=True))


def max_abs_diff(a, b) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max())


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


def load_with_node(folder: str, device: str):
    import turbobooth
    from turbobooth.nodes.comfy import NONE

    loader = turbobooth.NODE_CLASS_MAPPINGS["TurboBoothLoader"]()
    (model,) = loader.load(
        source="diffusers folder",
        diffusers_model=folder,
        repo_id="",
        revision="main",
        diffusion_model=NONE,
        text_encoder=NONE,
        vae=NONE,
        checkpoint=NONE,
        family="auto",
        dtype="auto",
        device=device,
        offload="none",
    )
    return model


# --------------------------------------------------------------------------- tiny model figures


def bench_cache(folder: str, device: str, rounds: int) -> None:
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
        times.wall["cold"].append(cold)
        times.wall["hit"].append(hit)
        cache.clear()
    emit("cold_load_s", times.median("cold"))
    emit("cache_hit_s", times.median("hit"))
    emit("cache_hit_vs_cold_load_ratio", times.ratio("hit", "cold"))
    load_with_node(folder, device)
    dt_node, _, _ = timed(lambda: load_with_node(folder, device), device)
    emit("loader_node_cache_hit_s", dt_node)


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
    names = list(calls)
    for r in range(rounds):
        for name in names[r % 2 :] + names[: r % 2]:
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
    for name in names:
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


# --------------------------------------------------------------------------- ComfyUI


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


def import_comfy(path: str, device: str):
    """Import ComfyUI's core modules in-process without letting its argument parser see our arguments."""
    sys.path.insert(0, os.path.abspath(path))
    saved = sys.argv
    sys.argv = [saved[0]] + (["--cpu"] if device == "cpu" else [])
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.model_detection
        import comfy.model_management
        import comfy.sample
        import comfy.samplers
        import comfy.sd
        import comfy.supported_models
        import comfy.utils
    finally:
        sys.argv = saved
    return comfy


class ComfyZImage:
    """The mid-size Z-Image loaded through ComfyUI's own loaders, sampled with its KSampler code.

    ComfyUI reads the Z-Image layout from the weights only for the full-size
    model (dim 3840) and its Qwen3-4B text encoder; for the smaller test widths
    its detection is given the Z-Image settings, and the conditioning comes
    from our (tiny) text encoder, as a cached CLIPTextEncode output would.
    """

    def __init__(self, comfy, files: dict, pipe, transformer_config: dict):
        import torch

        self.comfy = comfy
        self.torch = torch
        self.patcher = self._load_diffusion_model(files["diffusion_model"], transformer_config)
        self.vae = self._load_vae(files["vae"], pipe.vae.config)
        self.shift = float(self.patcher.get_model_object("model_sampling").shift)
        self.template_patcher = self._with_shift(COMFY_TEMPLATE["shift"])

    def _load_diffusion_model(self, path: str, cfg: dict):
        comfy = self.comfy
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
            return comfy.sd.load_diffusion_model(path)
        finally:
            detection.model_config_from_unet = original

    def _load_vae(self, path: str, vae_config):
        torch = self.torch
        comfy = self.comfy
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

    def _with_shift(self, shift: float):
        """What ComfyUI's ModelSamplingAuraFlow node does, when the shift differs from the model's."""
        if abs(shift - self.shift) < 1e-9:
            return self.patcher
        import comfy.model_sampling as ms

        class Sampling(ms.ModelSamplingDiscreteFlow, ms.CONST):
            pass

        sampling = Sampling(self.patcher.model.model_config)
        sampling.set_parameters(shift=shift, multiplier=1.0)
        patcher = self.patcher.clone()
        patcher.add_object_patch("model_sampling", sampling)
        return patcher

    def conditioning(self, pipe, prompt: str, max_len: int, device: str):
        import torch

        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(
                prompt, device=device, do_classifier_free_guidance=False, max_sequence_length=max_len
            )
        return [[embeds[0].unsqueeze(0), {}]]

    def generate(self, cond, seed: int, size: int, steps: int, sampler: str, scheduler: str, template: bool = False):
        """EmptySD3LatentImage -> KSampler (cfg 1) -> VAEDecode; returns IMAGE [B,H,W,C]."""
        comfy = self.comfy
        patcher = self.template_patcher if template else self.patcher
        latent = self.torch.zeros([1, 16, size // 8, size // 8])
        latent = comfy.sample.fix_empty_latent_channels(patcher, latent)
        noise = comfy.sample.prepare_noise(latent, seed)
        samples = comfy.sample.sample(
            patcher,
            noise,
            steps,
            1.0,
            sampler,
            scheduler,
            cond,
            cond,
            latent,
            denoise=1.0,
            disable_pbar=True,
            seed=seed,
        )
        return self.vae.decode(samples)

    def generate_template(self, cond, seed: int, size: int, steps: int | None = None):
        t = COMFY_TEMPLATE
        return self.generate(cond, seed, size, steps or t["steps"], t["sampler"], t["scheduler"], template=True)


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


# --------------------------------------------------------------------------- main


def bench_mid(args, tmp: str, comfy_path: str | None) -> None:
    from turbobooth.manager import cache as cache_mod
    from turbobooth.manager.tiny import save_diffusers

    device = args.device
    start = time.perf_counter()
    pipe = build_mid_pipeline()
    folder = save_diffusers(pipe, os.path.join(tmp, "diffusers", "mid-zimage"))
    emit("mid_transformer_params_m", sum(p.numel() for p in pipe.transformer.parameters()) / 1e6)
    model = load_with_node(folder, device)
    runner = Runner(model, device)
    emit("mid_setup_s", time.perf_counter() - start)

    comfy_model = None
    ok, why = comfyui_support(comfy_path)
    if not ok:
        emit("comfyui_comparison", f"skipped ({why})")
    else:
        from turbobooth.manager import writers as formats

        start = time.perf_counter()
        comfy = import_comfy(comfy_path, device)
        import torch

        torch.set_num_threads(args.threads)  # in case an import changed it
        files = formats.save_zimage_split(runner.live().pipe, os.path.join(tmp, "comfy"), "mid_zimage")
        comfy_model = ComfyZImage(comfy, files, runner.live().pipe, dict(runner.live().pipe.transformer.config))
        cond = comfy_model.conditioning(runner.live().pipe, PROMPT, runner.max_len, device)
        emit("comfyui_version", comfyui_version(comfy_path))
        emit("comfyui_model_shift", comfy_model.shift)
        emit("comfyui_template", "{steps} steps {sampler}/{scheduler} cfg {cfg} shift {shift}".format(**COMFY_TEMPLATE))
        emit("comfyui_setup_s", time.perf_counter() - start)
        sharing = probe_memory_sharing(runner)
        emit("turbo_memory_sharing_with_comfyui", sharing)

    for size in args.mid_sizes:
        variants = {
            "node": lambda size=size: runner.node_call(PROMPT, SEED, size, clear_embeddings=True),
            "bare": lambda size=size: runner.bare_call(PROMPT, SEED, size),
        }
        warm = {
            "node": lambda size=size: runner.node_call(PROMPT, SEED, size, steps=1, clear_embeddings=True),
            "bare": lambda size=size: runner.bare_call(PROMPT, SEED, size, steps=1),
        }
        if comfy_model is not None:
            variants.update(
                comfy_same=lambda size=size: comfy_model.generate(cond, SEED, size, STEPS, "euler", "simple"),
                comfy_template=lambda size=size: comfy_model.generate_template(cond, SEED, size),
            )
            warm.update(
                comfy_same=lambda size=size: comfy_model.generate(cond, SEED, size, 1, "euler", "simple"),
                comfy_template=lambda size=size: comfy_model.generate_template(cond, SEED, size, steps=1),
            )
        loads_before = cache_mod.CACHE.loads
        t = interleaved(variants, args.mid_rounds, device, warmup=warm)
        p = f"mid_{size}"
        emit(f"{p}_node_s", t.median("node"))
        emit(f"{p}_bare_pipeline_s", t.median("bare"))
        emit_ratio(f"{p}_node_vs_bare_pipeline_ratio", t, "node", "bare")
        emit(f"{p}_node_vs_bare_max_abs_diff", max_abs_diff(t.outputs["node"], t.outputs["bare"]))
        if comfy_model is not None:
            emit(f"{p}_comfyui_same_evals_s", t.median("comfy_same"))
            emit(f"{p}_comfyui_template_s", t.median("comfy_template"))
            emit_ratio(f"{p}_turbo_vs_comfyui_same_evals_ratio", t, "node", "comfy_same")
            emit_ratio(f"{p}_turbo_vs_comfyui_template_ratio", t, "node", "comfy_template")
            emit(f"{p}_turbo_vs_comfyui_max_abs_diff", max_abs_diff(t.outputs["node"], t.outputs["comfy_same"]))
            emit(f"{p}_turbo_reloads_during_run", cache_mod.CACHE.loads - loads_before)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="smaller sizes and fewer rounds (a few minutes on 2 CPU cores)"
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads (default 1: stable timings on a shared machine)"
    )
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds for the tiny model (default 15, quick 9)")
    ap.add_argument("--mid-rounds", type=int, default=3, help="timed rounds for the mid-size model (default 3)")
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
    from turbobooth.manager.tiny import write_tiny_models

    emit("torch_threads", torch.get_num_threads())
    emit("torch_version", torch.__version__)
    emit("diffusers_version", diffusers.__version__)
    emit("device", args.device)
    emit("quick", int(args.quick))
    emit("tiny_size", args.tiny_size)
    emit("tiny_rounds", args.rounds)
    emit("mid_sizes", ",".join(str(s) for s in args.mid_sizes))
    emit("mid_rounds", args.mid_rounds)
    emit("steps", STEPS)
    emit("loadavg_1m_start", os.getloadavg()[0])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="turbobooth-bench-") as tmp:
        folder = write_tiny_models(tmp, formats=("diffusers",))["zimage_diffusers"]
        bench_cache(folder, args.device, args.rounds)
        runner = Runner(load_with_node(folder, args.device), args.device)
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
