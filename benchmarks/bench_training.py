"""Training benchmarks: TurboBooth's DreamBooth trainer against diffusers' own DreamBooth example scripts,
and against a loop written in this repo on diffusers' training parts.

Run from the repository root:

    .venv/bin/python benchmarks/bench_training.py [--quick] [--threads N] [--diffusers-examples PATH]

Everything runs on the randomly initialised tiny models of
``turbobooth.manager.tiny`` (no downloads), on the CPU, fp32, at resolution
64, batch 1, LoRA rank 16 (alpha 16), lr 1e-4 constant, AdamW, seed 0, with 3
instance images and 4 class images; prior preservation on unless a line says
otherwise (then every step trains one instance and one class image).

**Against diffusers' scripts** (``--diffusers-examples PATH``, default
``$DIFFUSERS_EXAMPLES``: a diffusers checkout, its ``examples`` folder or its
``examples/dreambooth`` folder). ``train_dreambooth_lora_z_image.py`` and
``train_dreambooth_lora.py`` (SD1.x) run unchanged as child processes with
this python, offline (``HF_HUB_OFFLINE=1``), on the tiny models written as
diffusers folders, with the same settings as the TurboBooth run, which runs
in a child process of its own: the model loaded from the same folder by
``trainer.cli.load_pipeline_model``, ``trainer.runs.train`` on the same image
folders, the LoRA saved with ``manager.lora.save_lora_file``. Both children
start through the same launcher in this file (``--launch``), which registers
a global ``torch.optim`` step post-hook, so the step time of either side is
the time between consecutive optimizer steps, measured the same way, without
changing the scripts. Peak RSS is the child's own ``VmHWM`` at its end (the
whole process: interpreter, imports, models, the run). Where a script
fails with prior preservation on the tiny model (diffusers' Z-Image script
does), both sides of that comparison run without it and the output says so;
any other failure prints ``skipped (reason)``.

**Memory options on** (lines ``zimage_memory_options_*``; ``--skip-memory-options`` leaves them out,
``--only-memory-options`` runs nothing else). The Z-Image script with ``--gradient_checkpointing
--use_8bit_adam --cache_latents`` against TurboBooth with ``gradient_checkpointing=True``,
``optimizer="adamw8bit"`` (both bitsandbytes' ``AdamW8bit``), ``memory="none"`` (the options as given) and its
latents cached as always. For a quantized frozen base the script offers ``--bnb_quantization_config_path``
(here ``{"load_in_8bit": true}``) and TurboBooth the model loaded with dtype ``fp8_e4m3fn`` (8-bit storage,
weights cast per layer as it runs). Two 2-step runs of the script first show whether its quantized-base path and its
prior-preservation path run here; an option the script cannot run is printed ``skipped (reason)`` and both sides
run without it (diffusers' bitsandbytes quantizer needs a GPU); TurboBooth then also runs with its fp8 base, as
``turbobooth_fp8_base``, compared with its own run without it. Every run of this case records, at its first
optimizer step, the optimizer's class and state dtypes and the trained denoiser (checkpointing flag, frozen
weights by storage dtype, per-layer casting hooks, bitsandbytes layers), and counts
``torch.utils.checkpoint.checkpoint`` and ``AutoencoderKL.encode`` calls per step; a run that did not use one
of its options is reported as skipped with what it ran without, so no ratio compares unlike runs. The time
the first-step record takes is left out of the step times.

Every child runs with ``CUDA_VISIBLE_DEVICES`` empty: the scripts' ``Accelerator`` would otherwise move their
models to a GPU while TurboBooth trains on the CPU.

Before the training rounds each script runs once per round with an empty
class-image folder (``--max_train_steps 2``): that times the script's own
class-image step (its pipeline calls, at its own settings: the pipeline's
defaults) and shows whether its prior-preservation path runs.

**Against an own loop** (in-process cases ``zimage_lora_prior``,
``sd1_lora_prior``, ``sd1_full_prior``): ``own_loop_on_diffusers_parts`` is a
DreamBooth loop written in this file from the parts diffusers' scripts use
(``Accelerator``, peft ``LoraConfig`` + ``add_adapter``, ``encode_prompt``,
``vae.encode`` once up front, ``DataLoader``, ``AdamW``, ``get_scheduler``;
Z-Image: flow matching with ``compute_density_for_timestep_sampling`` /
``compute_loss_weighting_for_sd3``; SD1.x: ``DDPMScheduler``, epsilon loss).
``own_loop_vae_each_step`` is the same loop encoding the images at every
step. It is not diffusers' code and its figures are not diffusers' figures.

**Class images**: :class:`turbobooth.trainer.priors.PriorCache` making N new
images into an empty folder (batched generation, PNG hashing and atomic
writes) against a bare pipeline loop at the same settings (batches of
``priors.CHUNK``, seeds ``seed + i``, the pipeline's own scheduler, PNGs
saved), and against the scripts' class-image step per image.

Every ratio is printed with its median and min-max over the rounds
(``common.emit_spread``); below 1 means TurboBooth is faster / smaller. The
script prints one ``name: value`` line per figure and never judges them.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import logging
import os
import re
import runpy
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

from common import emit, emit_spread, set_threads  # benchmarks/common.py (on sys.path when run as a script)

INSTANCE_PROMPT = "a photo of sks dog"
CLASS_PROMPT = "a photo of a dog"
RESOLUTION = 64
RANK = 16
LR = 1e-4
SEED = 0
N_INSTANCE = 3
N_CLASS = 4
RESULT_TAG = "BENCH_TRAINING_RESULT "

CASES = {
    "zimage_lora_prior": ("zimage", "lora"),
    "sd1_lora_prior": ("sd1", "lora"),
    "sd1_full_prior": ("sd1", "full"),
}
VARIANTS = ("turbobooth", "own_loop_on_diffusers_parts", "own_loop_vae_each_step")
KEYS = ("step_s", "step_cpu_s", "first_step_s", "peak_rss_mib", "peak_rss_over_imports_mib")
SCRIPTS = {"zimage": "train_dreambooth_lora_z_image.py", "sd1": "train_dreambooth_lora.py"}
PIPELINES = {"zimage": "ZImagePipeline", "sd1": "StableDiffusionPipeline"}
# --------------------------------------------------------------------------- output


def quiet() -> None:
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.ERROR)
    for name in ("turbobooth", "diffusers", "transformers", "accelerate", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


# --------------------------------------------------------------------------- shared inputs


def build_pipe(family: str):
    from turbobooth.manager.tiny import build_tiny_sd1, build_tiny_zimage

    pipe = build_tiny_zimage(SEED) if family == "zimage" else build_tiny_sd1(SEED)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_model(family: str):
    from turbobooth.manager.spec import ModelSpec, TurboModel

    return TurboModel(ModelSpec("tiny"), family, build_pipe(family), f"tiny-{family}")


def synthetic_images(count: int, seed: int) -> list:
    """Smooth random RGB images at the training resolution (deterministic)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:RESOLUTION, 0:RESOLUTION] / RESOLUTION
    for _ in range(count):
        base = rng.uniform(0, 255, size=3)
        slope = rng.uniform(-120, 120, size=(2, 3))
        arr = (
            base + xx[..., None] * slope[0] + yy[..., None] * slope[1] + rng.normal(0, 12, (RESOLUTION, RESOLUTION, 3))
        )
        out.append(Image.fromarray(np.clip(arr, 0, 255).astype("uint8"), "RGB"))
    return out


def to_pixels(images) -> list:
    """PIL -> [3,H,W] in [-1, 1], as the scripts' ToTensor + Normalize([0.5], [0.5]) do."""
    import numpy as np
    import torch

    return [
        torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous() for im in images
    ]


def lora_targets(family: str) -> tuple:
    from turbobooth.manager.families import defaults_for

    return defaults_for(family).lora_targets


# --------------------------------------------------------------------------- variant: TurboBooth


def now() -> tuple[float, float]:
    """(wall clock, CPU time of this process): CPU time is less disturbed by other load on the machine."""
    return time.perf_counter(), time.process_time()


def run_turbobooth(family: str, mode: str, steps: int, workdir: str) -> tuple[list, tuple]:
    from turbobooth.trainer.config import TrainConfig
    from turbobooth.trainer.runs import train

    model = tiny_model(family)
    config = TrainConfig(
        family=family,
        instance_prompt=INSTANCE_PROMPT,
        class_prompt=CLASS_PROMPT,
        with_prior_preservation=True,
        num_class_images=N_CLASS,
        resolution=RESOLUTION,
        train_mode=mode,
        rank=RANK,
        steps=steps,
        lr=LR,
        batch_size=1,
        seed=SEED,
        output_dir=os.path.join(workdir, "turbobooth"),
        log_tensorboard=False,
    )
    instance, classes = synthetic_images(N_INSTANCE, 1), synthetic_images(N_CLASS, 2)
    stamps: list[tuple[float, float]] = []
    start = now()
    train(model, config, instance, class_images=classes, on_step=lambda s, t, p: stamps.append(now()))
    return stamps, start


# --------------------------------------------------------------------------- variant: own loop on diffusers parts (written here, not diffusers code)


def run_own_loop(family: str, mode: str, steps: int, encode_each_step: bool) -> tuple[list, tuple]:
    """A DreamBooth loop with prior preservation, written in this file from diffusers' training components."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
    from peft import LoraConfig

    pipe = build_pipe(family)
    instance = to_pixels(synthetic_images(N_INSTANCE, 1))
    classes = to_pixels(synthetic_images(N_CLASS, 2))
    start = now()

    accelerator = Accelerator(gradient_accumulation_steps=1, mixed_precision="no")
    set_seed(SEED)
    device = accelerator.device
    vae, text_encoder = pipe.vae, pipe.text_encoder
    denoiser = pipe.transformer if family == "zimage" else pipe.unet
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    denoiser.requires_grad_(False)
    if mode == "lora":
        denoiser.add_adapter(
            LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=list(lora_targets(family)))
        )
    else:
        denoiser.requires_grad_(True)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)

    if family == "zimage":
        noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    else:
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    num_train_timesteps = noise_scheduler.config.num_train_timesteps

    # prompt embeddings once (instance first, class second, like the collated batch)
    with torch.no_grad():
        if family == "zimage":
            inst_embeds, _ = pipe.encode_prompt(
                prompt=INSTANCE_PROMPT, device=device, do_classifier_free_guidance=False, max_sequence_length=512
            )
            class_embeds, _ = pipe.encode_prompt(
                prompt=CLASS_PROMPT, device=device, do_classifier_free_guidance=False, max_sequence_length=512
            )
            prompt_embeds = list(inst_embeds) + list(class_embeds)  # a list of [L_i, D] tensors
        else:
            inst_embeds, _ = pipe.encode_prompt(INSTANCE_PROMPT, device, 1, False)
            class_embeds, _ = pipe.encode_prompt(CLASS_PROMPT, device, 1, False)
            prompt_embeds = torch.cat([inst_embeds, class_embeds], dim=0)

    class PriorDataset(torch.utils.data.Dataset):
        def __len__(self):
            return max(len(instance), len(classes))

        def __getitem__(self, i):
            return {"instance": instance[i % len(instance)], "class": classes[i % len(classes)]}

    def collate(examples):
        pixels = [e["instance"] for e in examples] + [e["class"] for e in examples]
        return {"pixel_values": torch.stack(pixels).contiguous()}

    # cached latents are indexed by batch position, so that loader keeps its order
    loader = torch.utils.data.DataLoader(PriorDataset(), batch_size=1, shuffle=encode_each_step, collate_fn=collate)
    latents_cache = None
    if not encode_each_step:
        with torch.no_grad():
            latents_cache = [vae.encode(b["pixel_values"].to(device, dtype=vae.dtype)).latent_dist for b in loader]

    lr_scheduler = get_scheduler(
        "constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=steps * accelerator.num_processes
    )
    denoiser, optimizer, loader, lr_scheduler = accelerator.prepare(denoiser, optimizer, loader, lr_scheduler)
    sigmas_all = noise_scheduler.sigmas.to(device) if family == "zimage" else None

    stamps: list[tuple[float, float]] = []
    global_step = 0
    denoiser.train()
    while global_step < steps:
        for batch_index, batch in enumerate(loader):
            with accelerator.accumulate(denoiser):
                if latents_cache is not None:
                    model_input = latents_cache[batch_index].mode()
                else:
                    with torch.no_grad():
                        dist = vae.encode(batch["pixel_values"].to(device, dtype=vae.dtype)).latent_dist
                    model_input = dist.mode() if family == "zimage" else dist.sample()
                if family == "zimage":
                    model_input = (model_input - vae.config.shift_factor) * vae.config.scaling_factor
                    noise = torch.randn_like(model_input)
                    bsz = model_input.shape[0]
                    u = compute_density_for_timestep_sampling(
                        weighting_scheme="none", batch_size=bsz, logit_mean=0.0, logit_std=1.0, mode_scale=1.29
                    )
                    indices = (u * num_train_timesteps).long()
                    timesteps = noise_scheduler.timesteps[indices].to(device)
                    sigmas = sigmas_all[indices].view(-1, 1, 1, 1)
                    noisy = (1.0 - sigmas) * model_input + sigmas * noise
                    model_inputs = list(noisy.unsqueeze(2).unbind(0))
                    out = denoiser(model_inputs, (1000 - timesteps) / 1000, prompt_embeds, return_dict=False)[0]
                    model_pred = -torch.stack(out, dim=0).squeeze(2)
                    target = noise - model_input
                    weighting = compute_loss_weighting_for_sd3(weighting_scheme="none", sigmas=sigmas)
                    pred, pred_prior = torch.chunk(model_pred, 2, dim=0)
                    tgt, tgt_prior = torch.chunk(target, 2, dim=0)
                    w, w_prior = torch.chunk(weighting, 2, dim=0)
                    loss = (w.float() * (pred.float() - tgt.float()) ** 2).reshape(tgt.shape[0], -1).mean(1).mean()
                    prior_loss = (
                        (w_prior.float() * (pred_prior.float() - tgt_prior.float()) ** 2)
                        .reshape(tgt_prior.shape[0], -1)
                        .mean(1)
                        .mean()
                    )
                else:
                    model_input = model_input * vae.config.scaling_factor
                    noise = torch.randn_like(model_input)
                    bsz = model_input.shape[0]
                    timesteps = torch.randint(0, num_train_timesteps, (bsz,), device=device).long()
                    noisy = noise_scheduler.add_noise(model_input, noise, timesteps)
                    model_pred = denoiser(noisy, timesteps, prompt_embeds).sample
                    pred, pred_prior = torch.chunk(model_pred, 2, dim=0)
                    tgt, tgt_prior = torch.chunk(noise, 2, dim=0)
                    loss = F.mse_loss(pred.float(), tgt.float(), reduction="mean")
                    prior_loss = F.mse_loss(pred_prior.float(), tgt_prior.float(), reduction="mean")
                loss = loss + 1.0 * prior_loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                global_step += 1
            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}
            accelerator.log(logs, step=global_step)
            stamps.append(now())
            if global_step >= steps:
                break
    accelerator.end_training()
    return stamps, start


# --------------------------------------------------------------------------- in-process cases: child process


def _status_mib(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def current_rss_mib() -> float:
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    """This process's peak RSS since its ``exec`` (``VmHWM``). ``ru_maxrss`` is not used: on Linux it also counts
    the parent's memory that a vfork/fork child shares until it execs, so it would report the parent's size."""
    return _status_mib("VmHWM")


def child(spec: str, steps: int, warmup: int, threads: int) -> None:
    quiet()
    set_threads(threads)
    case, variant = spec.split(":")
    family, mode = CASES[case]
    # the imports every variant needs, so that "over imports" compares the same thing
    import accelerate  # noqa: F401
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    from diffusers import StableDiffusionPipeline, ZImagePipeline  # noqa: F401
    from turbobooth.manager import tiny  # noqa: F401

    rss_imports = current_rss_mib()
    with tempfile.TemporaryDirectory(prefix="tb-bench-train-") as workdir:
        if variant == "turbobooth":
            stamps, start = run_turbobooth(family, mode, steps, workdir)
        else:
            stamps, start = run_own_loop(family, mode, steps, encode_each_step=variant == "own_loop_vae_each_step")
    peak = peak_rss_mib()
    result = step_stats(stamps, warmup)
    result["first_step_s"] = stamps[0][0] - start[0] if stamps else float("nan")
    result["peak_rss_mib"] = peak
    result["peak_rss_over_imports_mib"] = peak - rss_imports
    print(RESULT_TAG + json.dumps(result), flush=True)


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.update(
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TB_BENCH_THREADS=str(threads),
        PYTHONUNBUFFERED="1",
        CUDA_VISIBLE_DEVICES="",  # every side on the CPU, whatever the machine has
    )
    return env


def run_child(case: str, variant: str, args) -> dict | str:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--variant",
        f"{case}:{variant}",
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(args.threads), timeout=900)
    except subprocess.TimeoutExpired:
        return "timed out after 900 s"
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    return failure_reason(proc.stderr or proc.stdout, proc.returncode)


def step_stats(stamps: list, warmup: int) -> dict:
    """Median wall / CPU time between consecutive optimizer steps, the first ``warmup`` steps left out."""
    skip = max(0, warmup - 1)
    wall = [b[0] - a[0] for a, b in zip(stamps, stamps[1:], strict=False)][skip:]
    cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:], strict=False)][skip:]
    nan = float("nan")
    return {
        "steps": len(stamps),
        "step_s": statistics.median(wall) if wall else nan,
        "step_cpu_s": statistics.median(cpu) if cpu else nan,
    }


def ratios(num: list, den: list, key: str) -> list:
    """Per-round ratios ``num[r][key] / den[r][key]`` over the rounds both sides have."""
    out = []
    for a, b in zip(num, den, strict=False):
        if a and b and a.get(key) and b.get(key) and a[key] == a[key] and b[key] == b[key]:
            out.append(a[key] / b[key])
    return out


def bench_own_loop(args) -> None:
    rounds: dict[tuple[str, str], list] = {(c, v): [] for c in CASES for v in VARIANTS}  # None for a failed round
    errors: dict[tuple[str, str], str] = {}
    for r in range(args.rounds):
        for case in CASES:
            k = r % len(VARIANTS)
            for variant in VARIANTS[k:] + VARIANTS[:k]:
                out = run_child(case, variant, args)
                rounds[(case, variant)].append(out if isinstance(out, dict) else None)
                if not isinstance(out, dict):
                    errors[(case, variant)] = out

    def med(case, variant, key):
        vals = [r[key] for r in rounds[(case, variant)] if r]
        return statistics.median(vals) if vals else None

    for case in CASES:
        for variant in VARIANTS:
            if not any(rounds[(case, variant)]):
                emit(f"{case}_{variant}", f"skipped ({errors.get((case, variant), 'no result')})")
                continue
            for key in KEYS:
                emit(f"{case}_{key}_{variant}", med(case, variant, key))
        tb = rounds[(case, "turbobooth")]
        for other in VARIANTS[1:]:
            base, tag = rounds[(case, other)], f"{case}_turbobooth_vs_{other}"
            emit_spread(f"{tag}_step_time_ratio", ratios(tb, base, "step_s"))
            emit_spread(f"{tag}_step_cpu_time_ratio", ratios(tb, base, "step_cpu_s"))
        base = rounds[(case, VARIANTS[1])]
        for key in ("peak_rss_mib", "peak_rss_over_imports_mib"):
            emit_spread(f"{case}_turbobooth_vs_{VARIANTS[1]}_{key.replace('_mib', '')}_ratio", ratios(tb, base, key))


# --------------------------------------------------------------------------- launcher (both sides of the scripts' comparison)


def launch(out_path: str, target: str, argv: list) -> None:
    """Run ``target`` (a diffusers example script, or ``turbobooth`` with a JSON config) in this process, recording
    every optimizer step and every pipeline call; write the record to ``out_path`` however the run ends."""
    record: dict = {"t0": time.perf_counter(), "stamps": [], "calls": [], "error": None}
    try:
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook

        set_threads(int(os.environ.get("TB_BENCH_THREADS", "1")))
        if os.environ.get("TB_BENCH_INSPECT") == "1":
            register_optimizer_step_post_hook(inspecting_stamper(record))
        else:
            register_optimizer_step_post_hook(lambda _opt, _a, _k: record["stamps"].append(now()))
        time_pipeline_calls(record["calls"])
        if target == "turbobooth":
            run_turbobooth_cli(json.loads(argv[0]))
        else:
            sys.argv = [target, *argv]
            sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
            runpy.run_path(target, run_name="__main__")
        del torch
    except SystemExit as e:
        if e.code not in (None, 0):
            record["error"] = f"exit status {e.code}"
        raise
    except BaseException as e:
        record["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        raise
    finally:
        record["peak_rss_mib"] = peak_rss_mib()
        with open(out_path, "w", encoding="utf-8") as f:
            json.dump(record, f)


def inspecting_stamper(record: dict):
    """The step hook of the memory-options case. Besides the stamps it keeps, per step, how many
    ``torch.utils.checkpoint.checkpoint`` calls and ``AutoencoderKL.encode`` calls ran so far, and at the first
    step what the optimizer and the trained denoiser are (see :func:`inspect_first_step`); the time that takes is
    left out of every later stamp."""
    import torch.utils.checkpoint as cp
    from diffusers import AutoencoderKL

    counts = {"checkpoint": 0, "encode": 0}

    def counting(fn, key):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            counts[key] += 1
            return fn(*a, **k)

        return wrapper

    # diffusers' models look the function up at each call (torch.utils.checkpoint.checkpoint), so both sides count
    cp.checkpoint = counting(cp.checkpoint, "checkpoint")
    AutoencoderKL.encode = counting(AutoencoderKL.encode, "encode")
    record.update(checkpoint_calls=[], encode_calls=[])
    offset = [0.0, 0.0]

    def hook(opt, _args, _kwargs):
        wall, cpu = now()
        record["stamps"].append((wall - offset[0], cpu - offset[1]))
        record["checkpoint_calls"].append(counts["checkpoint"])
        record["encode_calls"].append(counts["encode"])
        if len(record["stamps"]) == 1:
            record["inspect"] = inspect_first_step(opt)
            after = now()
            offset[0] += after[0] - wall
            offset[1] += after[1] - cpu

    return hook


def inspect_first_step(opt) -> dict:
    """The optimizer's class and state dtypes, and the trained denoiser (the diffusers model with trainable
    parameters): checkpointing on, frozen weights by storage dtype, per-layer casting hooks, bitsandbytes layers."""
    import collections
    import gc

    import torch
    from diffusers.models.modeling_utils import ModelMixin

    inner = getattr(opt, "optimizer", opt)  # accelerate's wrapper holds the real one
    states = [
        v for st in inner.state.values() for k, v in st.items() if k in ("state1", "state2", "exp_avg", "exp_avg_sq")
    ]
    out = {
        "optimizer": f"{type(inner).__module__}.{type(inner).__qualname__}",
        "min_8bit_size": getattr(getattr(inner, "args", None), "min_8bit_size", None),  # bitsandbytes only
        "optimizer_state_dtypes": dict(
            collections.Counter(str(v.dtype).removeprefix("torch.") for v in states if torch.is_tensor(v))
        ),
    }
    trained = [
        o for o in gc.get_objects() if isinstance(o, ModelMixin) and any(p.requires_grad for p in o.parameters())
    ]
    if len(trained) != 1:
        out["denoiser"] = f"{len(trained)} diffusers models with trainable parameters"
        return out
    model = trained[0]
    frozen: collections.Counter = collections.Counter()
    for p in model.parameters():
        if not p.requires_grad:
            frozen[str(p.dtype).removeprefix("torch.")] += p.numel() * p.element_size()
    from turbobooth.manager.loading import CastIn

    out.update(
        denoiser=type(model).__name__,
        denoiser_checkpointing=bool(model.is_gradient_checkpointing),
        frozen_bytes=dict(frozen),
        layerwise_cast_modules=sum(
            1 for m in model.modules() if any(isinstance(h, CastIn) for h in m._forward_pre_hooks.values())
        ),
        quantized_modules=sum(1 for m in model.modules() if type(m).__name__ in ("Linear8bitLt", "Linear4bit")),
    )
    return out


def time_pipeline_calls(calls: list) -> None:
    """Wrap the two pipelines' ``__call__`` to record each call's time, image count, size, steps and guidance."""
    import diffusers

    for name in PIPELINES.values():
        cls = getattr(diffusers, name)
        orig = cls.__call__
        sig = inspect.signature(orig)

        @functools.wraps(orig)
        def timed(self, *a, _orig=orig, _sig=sig, _name=name, **k):
            start = time.perf_counter()
            out = _orig(self, *a, **k)
            end = time.perf_counter()
            try:
                bound = _sig.bind(self, *a, **k)
                bound.apply_defaults()
                p = bound.arguments
            except TypeError:
                p = {}
            images = getattr(out, "images", None)
            if images is None and isinstance(out, tuple):
                images = out[0]
            size = getattr(images[0], "size", None) if images is not None and len(images) else None
            calls.append(
                {
                    "pipeline": _name,
                    "start": start,
                    "end": end,
                    "images": len(images) if images is not None else 0,
                    "size": list(size) if size else None,
                    "steps": p.get("num_inference_steps"),
                    "guidance": p.get("guidance_scale"),
                }
            )
            return out

        cls.__call__ = timed


def run_turbobooth_cli(spec: dict) -> None:
    """TurboBooth as its command line runs it: load the folder, train on image folders, save the LoRA."""
    from turbobooth.manager.lora import save_lora_file
    from turbobooth.trainer.cli import load_pipeline_model
    from turbobooth.trainer.config import TrainConfig
    from turbobooth.trainer.runs import train

    quiet()
    prior = spec["class_dir"] is not None
    options = {k: spec[k] for k in ("gradient_checkpointing", "optimizer", "memory") if k in spec}
    config = TrainConfig(
        family=spec["family"],
        instance_prompt=INSTANCE_PROMPT,
        class_prompt=CLASS_PROMPT if prior else "",
        with_prior_preservation=prior,
        num_class_images=N_CLASS,
        resolution=RESOLUTION,
        train_mode="lora",
        rank=RANK,
        steps=spec["steps"],
        lr=LR,
        batch_size=1,
        seed=SEED,
        output_dir=spec["output_dir"],
        log_tensorboard=spec["log_tensorboard"],
        **options,
    )
    if spec.get("dtype", "auto") == "auto":
        model = load_pipeline_model(spec["model"], spec["family"], None, "cpu")
    else:  # the CLI has no dtype: TurboLoader's load with the dtype (fp8_e4m3fn: 8-bit storage, cast per layer)
        from turbobooth.manager.loading import load_model
        from turbobooth.manager.spec import ModelSpec

        model = load_model(ModelSpec(source=spec["model"], family=spec["family"], device="cpu", dtype=spec["dtype"]))
    result = train(model, config, spec["instance_dir"], class_images=spec["class_dir"])
    save_lora_file(result.lora, os.path.join(spec["output_dir"], "lora.safetensors"))


def failure_reason(text: str, returncode) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception|Interrupt|Exit)\b", ln):
            return ln[:300]
    return (lines[-1] if lines else f"exit status {returncode}")[:300]


def spawn(target: str, argv: list, workdir: str, tag: str, args, env: dict | None = None) -> dict:
    """Run the launcher in a child (``env``: variables added to its environment); its record (optimizer-step
    stamps, pipeline calls, peak RSS, error)."""
    out, log = os.path.join(workdir, f"{tag}.json"), os.path.join(workdir, f"{tag}.log")
    cmd = [sys.executable, os.path.abspath(__file__), "--launch", out, target, *argv]
    timed_out = False
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env={**child_env(args.threads), **(env or {})}, cwd=workdir
        )
        try:
            proc.wait(timeout=args.child_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            timed_out = True
    try:
        with open(out, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        record = {"t0": 0.0, "stamps": [], "calls": [], "error": None}
    with open(log, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if timed_out:
        record["error"] = f"timed out after {args.child_timeout} s"
    elif proc.returncode != 0:
        record["error"] = failure_reason(text, proc.returncode) if not record.get("error") else record["error"]
    record.setdefault("peak_rss_mib", float("nan"))
    record.update(step_stats(record["stamps"], args.warmup))
    first = record["stamps"][0][0] - record["t0"] if record["stamps"] else float("nan")
    record["to_first_step_s"] = first
    if record.get("checkpoint_calls"):  # the memory-options case: per-step counts after the first step
        n = len(record["checkpoint_calls"]) - 1
        diff = record["checkpoint_calls"][-1] - record["checkpoint_calls"][0]
        record["checkpoint_calls_per_step"] = diff / n if n else record["checkpoint_calls"][0]
        record["vae_encodes_after_first_step"] = record["encode_calls"][-1] - record["encode_calls"][0]
    return record


# --------------------------------------------------------------------------- against diffusers' example scripts


def find_examples(path: str | None) -> str | None:
    """The folder holding diffusers' DreamBooth scripts: ``path`` itself, ``path/dreambooth`` or
    ``path/examples/dreambooth``."""
    if not path:
        return None
    for folder in (os.path.join(path, "examples", "dreambooth"), os.path.join(path, "dreambooth"), path):
        if any(os.path.isfile(os.path.join(folder, s)) for s in SCRIPTS.values()):
            return os.path.abspath(folder)
    return None


def checkout_commit(folder: str) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", folder, "log", "-1", "--format=%H %cs"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return out.stdout.strip() or "unknown (not a git checkout)"


def tracker_choice() -> tuple[str, bool] | None:
    """(``--report_to`` for the scripts, ``log_tensorboard`` for TurboBooth): the same logging on both sides."""
    import importlib.util

    from accelerate.tracking import get_available_trackers

    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        return "tensorboard", True
    if not get_available_trackers():
        return "all", False  # "all" of no installed tracker: no logging, the same as log_tensorboard=False
    return None


def script_argv(
    family: str,
    model: str,
    instance_dir: str,
    class_dir: str | None,
    n_class: int,
    steps: int,
    output_dir: str,
    report_to: str,
) -> list:
    """The scripts' flags for the TurboBooth run's settings."""
    argv = [
        "--pretrained_model_name_or_path",
        model,
        "--instance_data_dir",
        instance_dir,
        "--instance_prompt",
        INSTANCE_PROMPT,
        "--output_dir",
        output_dir,
        "--resolution",
        str(RESOLUTION),
        "--center_crop",
        "--train_batch_size",
        "1",
        "--rank",
        str(RANK),
        "--learning_rate",
        str(LR),
        "--lr_scheduler",
        "constant",
        "--lr_warmup_steps",
        "0",
        "--max_train_steps",
        str(steps),
        "--checkpointing_steps",
        "100000000",
        "--seed",
        str(SEED),
        "--mixed_precision",
        "no",
        "--adam_weight_decay",
        "1e-4",
        "--max_grad_norm",
        "1.0",
        "--report_to",
        report_to,
    ]
    if class_dir is not None:
        argv += [
            "--with_prior_preservation",
            "--prior_loss_weight",
            "1.0",
            "--class_data_dir",
            class_dir,
            "--class_prompt",
            CLASS_PROMPT,
            "--num_class_images",
            str(n_class),
            "--sample_batch_size",
            str(min(4, n_class)),
            "--prior_generation_precision",
            "fp32",
        ]
    if family == "zimage":  # latents cached as TurboBooth does; LoRA on TurboBooth's targets; no final inference
        argv += [
            "--lora_alpha",
            str(RANK),
            "--lora_layers",
            ",".join(lora_targets(family)),
            "--cache_latents",
            "--skip_final_inference",
        ]
    else:  # alpha = rank and the attention projections are fixed in this script; it has no latent cache
        argv += ["--pre_compute_text_embeddings"]
    return argv


def write_inputs(work: str) -> dict:
    """Tiny diffusers folders, a folder of instance PNGs and, per family, a plain folder of PriorCache's class PNGs."""
    from turbobooth.manager.tiny import write_tiny_models
    from turbobooth.trainer import priors

    paths = write_tiny_models(os.path.join(work, "models"), seed=SEED, formats=("diffusers",))
    inputs = {"instance_dir": os.path.join(work, "instance")}
    os.makedirs(inputs["instance_dir"])
    for i, im in enumerate(synthetic_images(N_INSTANCE, 1)):
        im.save(os.path.join(inputs["instance_dir"], f"{i}.png"))
    for family in SCRIPTS:
        inputs[f"{family}_model"] = paths[f"{family}_diffusers"]
        folder = inputs[f"{family}_class_dir"] = os.path.join(work, f"class_{family}")
        os.makedirs(folder)
        cache = priors.PriorCache(
            tiny_model(family),
            CLASS_PROMPT,
            seed=SEED,
            width=RESOLUTION,
            height=RESOLUTION,
            root=os.path.join(work, "prior_cache"),
        )
        for path in cache.ensure(N_CLASS):
            shutil.copy(path, folder)  # only the images: the scripts count every file in the folder
    return inputs


def bench_scripts(args, class_step: dict) -> None:
    examples = find_examples(args.diffusers_examples)
    if examples is None:
        why = (
            "no --diffusers-examples / DIFFUSERS_EXAMPLES"
            if not args.diffusers_examples
            else (f"no DreamBooth scripts under {args.diffusers_examples}")
        )
        emit("diffusers_scripts", f"skipped ({why})")
        return
    tracking = tracker_choice()
    if tracking is None:
        emit(
            "diffusers_scripts",
            "skipped (an experiment tracker other than tensorboard is installed; install "
            "tensorboard so that both sides log the same way)",
        )
        return
    report_to, log_tb = tracking
    import diffusers

    emit("diffusers_scripts", examples)
    emit("diffusers_scripts_commit", checkout_commit(examples))
    emit("diffusers_version", diffusers.__version__)
    emit("diffusers_scripts_report_to", f"{report_to} (TurboBooth log_tensorboard={log_tb})")
    work = tempfile.mkdtemp(prefix="tb-bench-scripts-")
    try:
        inputs = write_inputs(work)
        if not args.only_memory_options:
            plain_scripts(args, examples, inputs, work, report_to, log_tb, class_step)
        if not args.skip_memory_options:
            bench_memory_options(args, examples, inputs, work, report_to, log_tb)
    finally:
        if args.keep_work:
            emit("diffusers_scripts_workdir", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


def plain_scripts(args, examples, inputs, work, report_to, log_tb, class_step) -> None:
    """Both scripts at the default options against TurboBooth at the same settings."""
    sides = ("turbobooth", "diffusers_script")
    runs: dict = {(f, s): [] for f in SCRIPTS for s in sides}
    state = {f: {"prior": True, "note": "on", "skip": None} for f in SCRIPTS}
    for family, name in SCRIPTS.items():
        if not os.path.isfile(os.path.join(examples, name)):
            state[family]["skip"] = f"{name} not found in {examples}"
    n = 0
    for r in range(args.rounds):
        for family, name in SCRIPTS.items():
            st = state[family]
            if st["skip"]:
                continue
            try:
                n = script_round(
                    args,
                    family,
                    os.path.join(examples, name),
                    inputs,
                    work,
                    report_to,
                    log_tb,
                    st,
                    runs,
                    class_step,
                    r,
                    n,
                )
            except Exception as e:  # the bench reports, it does not crash
                st["skip"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    for family in SCRIPTS:
        st = state[family]
        if st["skip"]:
            emit(f"{family}_diffusers_script", f"skipped ({st['skip']})")
            continue
        emit(f"{family}_diffusers_script", SCRIPTS[family])
        emit(f"{family}_script_comparison_prior_preservation", st["note"])
        if family == "sd1":
            emit(
                "sd1_script_comparison_note",
                "train_dreambooth_lora.py has no latent cache: it runs vae.encode "
                "at every step, TurboBooth encodes once; it also reloads the pipeline after saving the LoRA",
            )
        for side in sides:
            recs = [x for x in runs[(family, side)] if x]
            if not recs:
                emit(f"{family}_script_comparison_{side}", f"skipped ({st.get('errors', {}).get(side)})")
                continue
            for key in ("step_s", "step_cpu_s", "to_first_step_s", "peak_rss_mib"):
                emit(f"{family}_script_comparison_{key}_{side}", statistics.median(x[key] for x in recs))
        tb, sc = runs[(family, "turbobooth")], runs[(family, "diffusers_script")]
        if any(tb) and any(sc):
            tag = f"{family}_turbobooth_vs_diffusers_script"
            emit_spread(f"{tag}_step_time_ratio", ratios(tb, sc, "step_s"))
            emit_spread(f"{tag}_step_cpu_time_ratio", ratios(tb, sc, "step_cpu_s"))
            emit_spread(f"{tag}_peak_rss_ratio", ratios(tb, sc, "peak_rss_mib"))
            emit_spread(f"{tag}_to_first_step_ratio", ratios(tb, sc, "to_first_step_s"))


def script_round(args, family, script, inputs, work, report_to, log_tb, st, runs, class_step, r, n) -> int:
    """One round for one family: the script's class-image step, then TurboBooth and the script, alternating."""
    sides = ("turbobooth", "diffusers_script")
    # the script's own class-image step (empty class folder), and whether its prior path runs
    n += 1
    n_probe = args.script_class_images[family]
    probe_dir = os.path.join(work, f"probe_{n}")
    argv = script_argv(
        family,
        inputs[f"{family}_model"],
        inputs["instance_dir"],
        os.path.join(probe_dir, "class"),
        n_probe,
        2,
        probe_dir,
        report_to,
    )
    probe = spawn(script, argv, work, f"probe_{n}", args)
    calls = [c for c in probe["calls"] if c["images"]]
    if calls:
        class_step.setdefault(family, []).append(
            {
                "s_per_image": sum(c["end"] - c["start"] for c in calls) / sum(c["images"] for c in calls),
                "settings": {k: calls[0][k] for k in ("size", "steps", "guidance")},
                "images": sum(c["images"] for c in calls),
            }
        )
    if probe["error"] and st["prior"]:
        st["prior"] = False
        where = "after its class-image step" if calls else "before any class image"
        st["note"] = (
            f"off (diffusers' script fails with prior preservation on the tiny model, {where}: "
            f"{probe['error']}); both sides of this comparison run without it"
        )
    # the training comparison, order alternating per round
    order = sides if r % 2 == 0 else sides[::-1]
    for side in order:
        n += 1
        out_dir = os.path.join(work, f"out_{n}")
        class_dir = inputs[f"{family}_class_dir"] if st["prior"] else None
        if side == "turbobooth":
            spec = {
                "family": family,
                "model": inputs[f"{family}_model"],
                "steps": args.steps,
                "instance_dir": inputs["instance_dir"],
                "class_dir": class_dir,
                "output_dir": out_dir,
                "log_tensorboard": log_tb,
            }
            rec = spawn("turbobooth", [json.dumps(spec)], work, f"run_{n}", args)
        else:
            argv = script_argv(
                family,
                inputs[f"{family}_model"],
                inputs["instance_dir"],
                class_dir,
                N_CLASS,
                args.steps,
                out_dir,
                report_to,
            )
            rec = spawn(script, argv, work, f"run_{n}", args)
        if rec["error"] or rec["steps"] < args.steps:
            runs[(family, side)].append(None)
            st.setdefault("errors", {})[side] = rec["error"] or f"only {rec['steps']} steps"
        else:
            runs[(family, side)].append(rec)
    return n


# --------------------------------------------------------------------------- memory options on, both sides

MEMORY_FAMILY = "zimage"
MEMORY_TAG = "zimage_memory_options"
MEMORY_SIDES = ("turbobooth", "diffusers_script", "turbobooth_fp8_base")
BNB_CONFIG = {"load_in_8bit": True}  # the script's quantized base: bitsandbytes LLM.int8 storage of the DiT
MEMORY_FLAGS = ["--gradient_checkpointing", "--use_8bit_adam"]  # --cache_latents is in script_argv already


def memory_script_argv(inputs: dict, class_dir, steps: int, out_dir: str, report_to: str, bnb_path) -> list:
    argv = script_argv(
        MEMORY_FAMILY,
        inputs[f"{MEMORY_FAMILY}_model"],
        inputs["instance_dir"],
        class_dir,
        N_CLASS,
        steps,
        out_dir,
        report_to,
    )
    argv += MEMORY_FLAGS
    if bnb_path:
        argv += ["--bnb_quantization_config_path", bnb_path]
    return argv


def memory_turbobooth_spec(inputs: dict, class_dir, steps: int, out_dir: str, log_tb: bool, fp8: bool) -> dict:
    """TurboBooth with the same options: checkpointing, bitsandbytes' AdamW8bit, and (``fp8``) the frozen base
    stored in fp8 (TurboLoader dtype ``fp8_e4m3fn``, cast per layer as it runs); latents are always cached."""
    return {
        "family": MEMORY_FAMILY,
        "model": inputs[f"{MEMORY_FAMILY}_model"],
        "steps": steps,
        "instance_dir": inputs["instance_dir"],
        "class_dir": class_dir,
        "output_dir": out_dir,
        "log_tensorboard": log_tb,
        "gradient_checkpointing": True,
        "optimizer": "adamw8bit",
        "memory": "none",  # the options exactly as given, no plan on top
        "dtype": "fp8_e4m3fn" if fp8 else "auto",
    }


def fp8_training_note() -> str:
    import importlib.util

    have = "installed" if importlib.util.find_spec("torchao") else "not installed"
    return (
        "not used (the script's --do_fp8_training converts the DiT's linears to torchao Float8 training: fp8 "
        f"compute on an sm89+ GPU, not 8-bit storage of a frozen base; torchao is {have})"
    )


def memory_probes(args, script: str, inputs: dict, work: str, report_to: str, bnb_path: str) -> dict:
    """Two 2-step runs of the script, once: does its quantized-base path run here, and its prior-preservation path
    with the memory flags on. Both sides then run with what the script can do."""
    state = {"quantized": None, "prior": True, "note": "on", "skip": None}
    env = {"TB_BENCH_INSPECT": "1"}
    out = os.path.join(work, "mem_probe_quant")
    rec = spawn(
        script, memory_script_argv(inputs, None, 2, out, report_to, bnb_path), work, "mem_probe_quant", args, env
    )
    if rec["error"]:
        state["quantized"] = (
            f"diffusers' script with --bnb_quantization_config_path {json.dumps(BNB_CONFIG)}: {rec['error']}"
        )
    quant = bnb_path if state["quantized"] is None else None
    out = os.path.join(work, "mem_probe_prior")
    argv = memory_script_argv(inputs, inputs[f"{MEMORY_FAMILY}_class_dir"], 2, out, report_to, quant)
    rec = spawn(script, argv, work, "mem_probe_prior", args, env)
    if rec["error"]:
        state["prior"] = False
        state["note"] = (
            f"off (diffusers' script fails with prior preservation and the memory options on the tiny model: "
            f"{rec['error']}); both sides of this comparison run without it"
        )
    return state


def memory_check(rec: dict, side: str, quantized: bool) -> str | None:
    """Why a run did not use the options it was given (None: it used them all)."""
    seen = rec.get("inspect") or {}
    if not seen:
        return "no record of the first step (optimizer, denoiser)"
    missing = []
    if not seen.get("optimizer", "").endswith("AdamW8bit"):
        missing.append(f"8-bit AdamW (its optimizer was {seen.get('optimizer')})")
    if "denoiser_checkpointing" not in seen:
        missing.append(f"a single trained denoiser to inspect ({seen.get('denoiser')})")
    elif not seen["denoiser_checkpointing"] or not rec.get("checkpoint_calls_per_step"):
        missing.append("gradient checkpointing")
    if rec.get("vae_encodes_after_first_step"):
        missing.append(f"cached latents ({rec['vae_encodes_after_first_step']} VAE encodes after step 1)")
    if quantized and side != "diffusers_script" and not seen.get("layerwise_cast_modules"):
        missing.append("the fp8-stored base (no per-layer casting hooks on the denoiser)")
    if quantized and side == "diffusers_script" and not seen.get("quantized_modules"):
        missing.append("the quantized base (no bitsandbytes layers in the denoiser)")
    return f"{side} ran without " + ", ".join(missing) if missing else None


def memory_round(args, script, inputs, work, report_to, log_tb, state, bnb_path, runs, r) -> None:
    """One round of the memory-options case: the sides in an order that rotates per round."""
    class_dir = inputs[f"{MEMORY_FAMILY}_class_dir"] if state["prior"] else None
    quantized = state["quantized"] is None
    sides = [s for s in MEMORY_SIDES if s != "turbobooth_fp8_base" or not quantized]
    k = r % len(sides)
    for side in sides[k:] + sides[:k]:
        tag = f"mem_{side}_{r}"
        out_dir = os.path.join(work, tag)
        if side == "diffusers_script":
            argv = memory_script_argv(
                inputs, class_dir, args.steps, out_dir, report_to, bnb_path if quantized else None
            )
            target = script
        else:
            fp8 = quantized or side == "turbobooth_fp8_base"
            argv = [json.dumps(memory_turbobooth_spec(inputs, class_dir, args.steps, out_dir, log_tb, fp8))]
            target = "turbobooth"
        rec = spawn(target, argv, work, tag, args, {"TB_BENCH_INSPECT": "1"})
        why = rec["error"] or (f"only {rec['steps']} steps" if rec["steps"] < args.steps else None)
        why = why or memory_check(rec, side, quantized or side == "turbobooth_fp8_base")
        runs[side].append(None if why else rec)
        if why:
            state.setdefault("errors", {})[side] = why


def emit_memory_setup(state: dict) -> None:
    quant = state["quantized"]
    script_flags = " ".join(MEMORY_FLAGS + ["--cache_latents"])
    if quant is None:
        script_flags += f" --bnb_quantization_config_path ({json.dumps(BNB_CONFIG)})"
    emit(f"{MEMORY_TAG}_diffusers_script", f"{SCRIPTS[MEMORY_FAMILY]} {script_flags}")
    emit(
        f"{MEMORY_TAG}_turbobooth",
        "gradient_checkpointing=True, optimizer='adamw8bit', memory='none', latents cached (always)"
        + (", model dtype fp8_e4m3fn" if quant is None else ""),
    )
    emit(f"{MEMORY_TAG}_gradient_checkpointing", "on (--gradient_checkpointing / gradient_checkpointing=True)")
    emit(f"{MEMORY_TAG}_8bit_adamw", "on (--use_8bit_adam / optimizer='adamw8bit': bitsandbytes.optim.AdamW8bit)")
    emit(f"{MEMORY_TAG}_cached_latents", "on (--cache_latents / TurboBooth always)")
    if quant is None:
        emit(
            f"{MEMORY_TAG}_quantized_base",
            f"on (script: bitsandbytes {json.dumps(BNB_CONFIG)}; TurboBooth: fp8_e4m3fn)",
        )
    else:
        emit(f"{MEMORY_TAG}_quantized_base", f"skipped ({quant}); both sides of this comparison run without it")
    emit(f"{MEMORY_TAG}_fp8_training", fp8_training_note())
    emit(f"{MEMORY_TAG}_prior_preservation", state["note"])


def emit_memory_checks(side: str, rec: dict) -> None:
    """What the first step of one run showed: the options were really on."""
    seen = rec["inspect"]
    states = seen.get("optimizer_state_dtypes", {})
    eight = states.get("uint8", 0)
    small = seen.get("min_8bit_size")
    note = (
        f"; bitsandbytes keeps the states of tensors under {small} elements in 32 bits, and every LoRA tensor of "
        "the tiny model is smaller"
    )
    note = "" if eight else note
    emit(
        f"{MEMORY_TAG}_optimizer_{side}", f"{seen['optimizer']} (8-bit states: {eight} of {sum(states.values())}{note})"
    )
    emit(f"{MEMORY_TAG}_checkpointed_blocks_per_step_{side}", rec["checkpoint_calls_per_step"])
    emit(f"{MEMORY_TAG}_vae_encodes_after_first_step_{side}", rec["vae_encodes_after_first_step"])
    weights = ", ".join(f"{k} {v / 2**20:.3f} MiB" for k, v in sorted(seen["frozen_bytes"].items()))
    extra = []
    if seen.get("layerwise_cast_modules"):
        extra.append(f"{seen['layerwise_cast_modules']} per-layer cast modules")
    if seen.get("quantized_modules"):
        extra.append(f"{seen['quantized_modules']} bitsandbytes layers")
    emit(f"{MEMORY_TAG}_frozen_denoiser_weights_{side}", weights + (f" ({', '.join(extra)})" if extra else ""))


def bench_memory_options(args, examples: str, inputs: dict, work: str, report_to: str, log_tb: bool) -> None:
    """Z-Image with the memory options on, on both sides: TurboBooth against diffusers' script."""
    script = os.path.join(examples, SCRIPTS[MEMORY_FAMILY])
    if not os.path.isfile(script):
        emit(MEMORY_TAG, f"skipped ({SCRIPTS[MEMORY_FAMILY]} not found in {examples})")
        return
    bnb_path = os.path.join(work, "bnb_config.json")
    with open(bnb_path, "w", encoding="utf-8") as f:
        json.dump(BNB_CONFIG, f)
    state = memory_probes(args, script, inputs, work, report_to, bnb_path)
    emit_memory_setup(state)
    runs: dict = {s: [] for s in MEMORY_SIDES}
    for r in range(args.rounds):
        memory_round(args, script, inputs, work, report_to, log_tb, state, bnb_path, runs, r)
    for side in MEMORY_SIDES:
        recs = [x for x in runs[side] if x]
        if not recs:
            if side in state.get("errors", {}):
                emit(f"{MEMORY_TAG}_{side}", f"skipped ({state['errors'][side]})")
            continue
        if len(recs) < len(runs[side]):
            emit(f"{MEMORY_TAG}_{side}_failed_rounds",
                 f"{len(runs[side]) - len(recs)} of {len(runs[side])} ({state.get('errors', {}).get(side)})")
        emit_memory_checks(side, recs[0])
        for key in ("step_s", "step_cpu_s", "to_first_step_s", "peak_rss_mib"):
            emit(f"{MEMORY_TAG}_{key}_{side}", statistics.median(x[key] for x in recs))
    tb, sc, fp8 = runs["turbobooth"], runs["diffusers_script"], runs["turbobooth_fp8_base"]
    pairs = [("turbobooth_vs_diffusers_script", tb, sc), ("turbobooth_fp8_base_vs_turbobooth", fp8, tb)]
    for name, num, den in pairs:
        if any(num) and any(den):
            tag = f"{MEMORY_TAG}_{name}"
            emit_spread(f"{tag}_step_time_ratio", ratios(num, den, "step_s"))
            emit_spread(f"{tag}_step_cpu_time_ratio", ratios(num, den, "step_cpu_s"))
            emit_spread(f"{tag}_peak_rss_ratio", ratios(num, den, "peak_rss_mib"))
            if name.endswith("diffusers_script"):
                emit_spread(f"{tag}_to_first_step_ratio", ratios(num, den, "to_first_step_s"))


# --------------------------------------------------------------------------- class images


def bare_pipeline_loop(pipe, family: str, count: int, steps: int, guidance: float, folder: str) -> None:
    """The pipeline called in batches of ``priors.CHUNK``, seeds ``SEED + i``, PNGs saved: the same work as
    PriorCache without its cache."""
    import torch
    from turbobooth.trainer import priors

    os.makedirs(folder, exist_ok=True)
    for first in range(0, count, priors.CHUNK):
        n = min(priors.CHUNK, count - first)
        gens = [torch.Generator("cpu").manual_seed(SEED + first + i) for i in range(n)]
        kwargs = {"max_sequence_length": 512} if family == "zimage" else {"negative_prompt": [""] * n}
        images = pipe(
            prompt=[CLASS_PROMPT] * n,
            height=RESOLUTION,
            width=RESOLUTION,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            **kwargs,
        ).images
        for i, im in enumerate(images):
            im.save(os.path.join(folder, f"{first + i:05d}.png"))


def bench_priors(args, class_step: dict) -> None:
    from turbobooth.trainer import priors

    count = args.prior_images
    for family in SCRIPTS:
        model = tiny_model(family)
        base = tempfile.mkdtemp(prefix="tb-bench-priors-")
        try:
            n = [0]

            def ours(model=model, base=base, n=n):
                n[0] += 1
                cache = priors.PriorCache(
                    model,
                    CLASS_PROMPT,
                    seed=SEED,
                    width=RESOLUTION,
                    height=RESOLUTION,
                    root=os.path.join(base, f"ours_{n[0]}"),
                )
                cache.ensure(count)
                return cache

            cache = ours()  # warm-up; its settings are the family's class-image defaults
            steps, guidance = cache.steps, cache.guidance

            def bare(model=model, base=base, n=n, family=family, steps=steps, guidance=guidance):
                n[0] += 1
                bare_pipeline_loop(model.pipe, family, count, steps, guidance, os.path.join(base, f"bare_{n[0]}"))

            bare()
            times: dict[str, list[float]] = {"turbobooth": [], "bare": []}
            fns = {"turbobooth": ours, "bare": bare}
            names = list(fns)
            for r in range(args.prior_rounds):
                for name in names[r % 2 :] + names[: r % 2]:
                    start = time.perf_counter()
                    fns[name]()
                    times[name].append(time.perf_counter() - start)
        finally:
            shutil.rmtree(base, ignore_errors=True)
        emit(
            f"prior_{family}_settings",
            f"{count} images, {RESOLUTION}x{RESOLUTION}, {steps} steps, guidance {guidance}, batches of {priors.CHUNK}",
        )
        for name, ts in times.items():
            emit(f"prior_{family}_s_per_image_{name}", statistics.median(ts) / count)
        emit_spread(
            f"prior_{family}_turbobooth_vs_bare_pipeline_loop_time_ratio",
            [a / b for a, b in zip(times["turbobooth"], times["bare"], strict=True)],
        )
        script = class_step.get(family)
        if not script:
            emit(
                f"prior_{family}_vs_diffusers_script_class_step",
                "skipped (the script's class-image step did not run: see the diffusers_scripts lines)",
            )
            continue
        s = script[0]["settings"]
        emit(
            f"prior_{family}_diffusers_script_class_step_settings",
            f"{script[0]['images']} images, {s['size'][0]}x{s['size'][1]}, {s['steps']} steps, guidance "
            f"{s['guidance']} (the pipeline's defaults: the script passes only the prompt)",
        )
        emit(f"prior_{family}_s_per_image_diffusers_script", statistics.median(x["s_per_image"] for x in script))
        ours_per_image = [t / count for t in times["turbobooth"]]
        emit_spread(
            f"prior_{family}_turbobooth_vs_diffusers_script_s_per_image_ratio",
            [a / b["s_per_image"] for a, b in zip(ours_per_image, script, strict=False)],
        )


# --------------------------------------------------------------------------- main


def main() -> None:
    if len(sys.argv) > 3 and sys.argv[1] == "--launch":
        launch(sys.argv[2], sys.argv[3], sys.argv[4:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds, fewer class images")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in every process (default 1)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 60; --quick 25)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="steps left out of the step time (default 10; --quick 5)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="runs per variant (default 3; --quick 2)")
    parser.add_argument("--prior-images", type=int, default=None, help="class images per timing (default 8; --quick 4)")
    parser.add_argument("--prior-rounds", type=int, default=None, help="timed rounds (default 5; --quick 3)")
    parser.add_argument(
        "--diffusers-examples",
        default=os.environ.get("DIFFUSERS_EXAMPLES"),
        help="a diffusers checkout (or its examples/dreambooth folder) whose DreamBooth scripts to "
        "compare with (default $DIFFUSERS_EXAMPLES)",
    )
    parser.add_argument(
        "--script-class-images",
        type=int,
        default=None,
        help="class images the Z-Image script makes in its class-image step, at its 1024x1024 "
        "50-step defaults (default 4; --quick 1; SD1.x always 4)",
    )
    parser.add_argument("--child-timeout", type=int, default=900, help="seconds per child process (default 900)")
    parser.add_argument("--skip-own-loop", action="store_true", help="leave out the in-process own-loop cases")
    parser.add_argument("--skip-scripts", action="store_true", help="leave out diffusers' scripts")
    parser.add_argument("--skip-priors", action="store_true", help="leave out the class-image timings")
    parser.add_argument(
        "--skip-memory-options", action="store_true", help="leave out the Z-Image comparison with the memory options on"
    )
    parser.add_argument(
        "--only-memory-options",
        action="store_true",
        help="run only the Z-Image comparison with the memory options on (no own loop, no class images, "
        "no comparison at the default options)",
    )
    parser.add_argument("--keep-work", action="store_true", help="keep the scripts' work folder (logs, outputs)")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    q = args.quick
    args.steps = args.steps or (25 if q else 60)
    args.warmup = args.warmup if args.warmup is not None else (5 if q else 10)
    args.rounds = args.rounds or (2 if q else 3)
    args.prior_images = args.prior_images or (4 if q else 8)
    args.prior_rounds = args.prior_rounds or (3 if q else 5)
    if args.only_memory_options:
        args.skip_own_loop = args.skip_priors = True
    zimage_class = args.script_class_images or (1 if q else N_CLASS)
    args.script_class_images = {"zimage": zimage_class, "sd1": N_CLASS}

    if args.variant:
        child(args.variant, args.steps, args.warmup, args.threads)
        return

    quiet()
    set_threads(args.threads)
    import torch

    emit("threads", torch.get_num_threads())
    emit("torch", torch.__version__)
    emit("device", "cpu")
    emit("resolution", RESOLUTION)
    emit("lora_rank", RANK)
    emit("instance_images", N_INSTANCE)
    emit("class_images", N_CLASS)
    emit("train_steps", args.steps)
    emit("warmup_steps", args.warmup)
    emit("rounds", args.rounds)
    start = time.perf_counter()
    class_step: dict = {}
    if not args.skip_own_loop:
        bench_own_loop(args)
    for skip, name, fn in (
        (args.skip_scripts, "diffusers_scripts", bench_scripts),
        (args.skip_priors, "prior", bench_priors),
    ):
        if not skip:
            try:
                fn(args, class_step)
            except Exception as e:  # the bench reports, it does not crash
                emit(name, f"skipped ({type(e).__name__}: {e})".splitlines()[0][:300])
    emit("total_s", time.perf_counter() - start)


if __name__ == "__main__":
    main()
