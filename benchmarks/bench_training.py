"""Training benchmarks: TurboBooth's DreamBooth trainer against a loop built from diffusers' own training parts.

Run from the repository root:

    .venv/bin/python benchmarks/bench_training.py [--quick] [--threads N]

Everything runs on the randomly initialised tiny models of
``turbobooth.manager.tiny`` (no downloads), at resolution 64, batch 1, prior
preservation on (so every step trains one instance and one class image),
LoRA rank 16 on the family's default target modules, AdamW, fp32.

Training cases, each measured for three variants:

* ``turbobooth``: :func:`turbobooth.trainer.loop.train` with a
  :class:`~turbobooth.trainer.config.TrainConfig`; step times come from the
  ``on_step`` timestamps.
* ``diffusers_baseline``: a DreamBooth loop written here with the parts
  diffusers' DreamBooth example scripts use: ``accelerate.Accelerator``,
  peft ``LoraConfig`` + ``add_adapter`` on the transformer/UNet (or the whole
  UNet for the full fine-tune), the pipeline's ``encode_prompt`` once up front,
  ``vae.encode`` once up front (cached latents, as TurboBooth does), a
  ``DataLoader``, ``torch.optim.AdamW`` and ``diffusers.optimization.get_scheduler``.
  Z-Image uses ``FlowMatchEulerDiscreteScheduler`` with
  ``compute_density_for_timestep_sampling`` / ``compute_loss_weighting_for_sd3``
  (flow matching, negated transformer output); SD1.x uses ``DDPMScheduler``
  noise and the epsilon loss.
* ``diffusers_vae_each_step``: the same loop, but the images go through
  ``vae.encode`` at every step (the scripts' default without latent caching).

Step time is the median time between consecutive optimizer steps after the
first ``--warmup`` steps. ``first_step_s`` is the time from the start of the
training call (models already built) to the end of step 1, i.e. setup plus one
step. Each variant runs in its own child process (this script with a hidden
``--variant`` flag), so ``peak_rss_mib`` is that process's own
``ru_maxrss``: interpreter, imports, the tiny models and the training run.
With ``--rounds`` > 1 every variant runs that many times (the order rotates
per round) and the figures are medians over the rounds.

Prior-image throughput: class images generated the way
:class:`turbobooth.trainer.priors.PriorCache` makes them (one
``sampling.generate`` call per image, seed ``seed + i``) against one batched
``generate`` call with the class prompt repeated (prompt ``i`` uses seed
``seed + i``, so the images are the same; their largest pixel difference is
printed).

The script prints one ``name: value`` line per figure and never judges the
numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

from common import emit, set_threads  # benchmarks/common.py (this folder is on sys.path when run as a script)

INSTANCE_PROMPT = "a photo of sks dog"
CLASS_PROMPT = "a photo of a dog"
RESOLUTION = 64
RANK = 16
LR = 1e-4
SEED = 0
N_INSTANCE = 4
N_CLASS = 4
RESULT_TAG = "BENCH_TRAINING_RESULT "

CASES = {
    "zimage_lora_prior": ("zimage", "lora"),
    "sd1_lora_prior": ("sd1", "lora"),
    "sd1_full_prior": ("sd1", "full"),
}
VARIANTS = ("turbobooth", "diffusers_baseline", "diffusers_vae_each_step")
KEYS = ("step_s", "step_s_mean", "step_cpu_s", "first_step_s", "peak_rss_mib", "peak_rss_over_imports_mib")


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
    from turbobooth.manager.model import TurboModel
    from turbobooth.manager.spec import ModelSpec

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
    from turbobooth.trainer.loop import train

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


# --------------------------------------------------------------------------- variant: diffusers baseline


def run_baseline(family: str, mode: str, steps: int, encode_each_step: bool) -> tuple[list, tuple]:
    """A DreamBooth loop with prior preservation made of diffusers' training components."""
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


# --------------------------------------------------------------------------- child process


def current_rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


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
            stamps, start = run_baseline(family, mode, steps, encode_each_step=variant == "diffusers_vae_each_step")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    skip = max(0, warmup - 1)
    wall = [b[0] - a[0] for a, b in zip(stamps, stamps[1:], strict=False)][skip:]
    cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:], strict=False)][skip:]
    nan = float("nan")
    result = {
        "steps": len(stamps),
        "step_s": statistics.median(wall) if wall else nan,
        "step_s_mean": statistics.fmean(wall) if wall else nan,
        "step_cpu_s": statistics.median(cpu) if cpu else nan,
        "first_step_s": stamps[0][0] - start[0] if stamps else nan,
        "peak_rss_mib": peak,
        "peak_rss_over_imports_mib": peak - rss_imports,
    }
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_child(case: str, variant: str, args) -> dict | str:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(args.threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
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
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    except subprocess.TimeoutExpired:
        return "timed out after 900 s"
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
    return tail[0][:300]


def bench_training(args) -> None:
    results: dict[tuple[str, str], list[dict]] = {(c, v): [] for c in CASES for v in VARIANTS}
    errors: dict[tuple[str, str], str] = {}
    for r in range(args.rounds):
        for case in CASES:
            k = r % len(VARIANTS)
            for variant in VARIANTS[k:] + VARIANTS[:k]:
                out = run_child(case, variant, args)
                if isinstance(out, dict):
                    results[(case, variant)].append(out)
                else:
                    errors[(case, variant)] = out

    def med(case, variant, key):
        vals = [r[key] for r in results[(case, variant)]]
        return statistics.median(vals) if vals else None

    for case in CASES:
        for variant in VARIANTS:
            if (case, variant) in errors and not results[(case, variant)]:
                emit(f"{case}_error_{variant}", errors[(case, variant)])
                continue
            for key in KEYS:
                emit(f"{case}_{key}_{variant}", med(case, variant, key))
        tb, base, each = (med(case, v, "step_s") for v in VARIANTS)
        if tb and base:
            emit(f"{case}_step_time_ratio", tb / base)
        if tb and each:
            emit(f"{case}_step_time_ratio_vs_vae_each_step", tb / each)
        tb, base = (med(case, v, "step_cpu_s") for v in VARIANTS[:2])
        if tb and base:
            emit(f"{case}_step_cpu_time_ratio", tb / base)
        for key in ("peak_rss_mib", "peak_rss_over_imports_mib"):
            tb, base = (med(case, v, key) for v in VARIANTS[:2])
            if tb and base:
                emit(f"{case}_{key.replace('_mib', '')}_ratio", tb / base)


# --------------------------------------------------------------------------- prior-image throughput


def bench_priors(args) -> None:
    import torch
    from turbobooth.manager import sampling
    from turbobooth.trainer import priors

    count = args.prior_images
    for family in ("zimage", "sd1"):
        model = tiny_model(family)
        cache = priors.PriorCache(
            model, CLASS_PROMPT, seed=SEED, width=RESOLUTION, height=RESOLUTION, root=tempfile.gettempdir()
        )

        def one_at_a_time(cache=cache):
            out = []
            for i in range(count):
                with torch.random.fork_rng(devices=[]):
                    result = sampling.generate(
                        cache.model,
                        [cache.class_prompt],
                        seed=cache.seed + i,
                        steps=cache.steps,
                        width=cache.width,
                        height=cache.height,
                        guidance=sampling.Guidance(negative_prompts=("",), scales=(cache.guidance,)),
                    )
                out.append(priors._tensor_to_pil(result.images[0]))
            return out

        def batched(cache=cache):  # what PriorCache does: fixed batches of priors.CHUNK images
            chunks = (count + priors.CHUNK - 1) // priors.CHUNK
            return [im for c in range(chunks) for im in cache.generate_chunk(c)][:count]

        variants = {"one_at_a_time": one_at_a_time, "batched": batched}
        outputs = {name: fn() for name, fn in variants.items()}  # warm-up
        times: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for r in range(args.prior_rounds):
            for name in names[r % 2 :] + names[: r % 2]:
                start = time.perf_counter()
                outputs[name] = variants[name]()
                times[name].append(time.perf_counter() - start)
        import numpy as np

        diff = max(
            int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())
            for a, b in zip(outputs["batched"], outputs["one_at_a_time"], strict=True)
        )
        ips = {name: count / statistics.median(ts) for name, ts in times.items()}
        emit(f"prior_{family}_images", count)
        emit(f"prior_{family}_steps", cache.steps)
        emit(f"prior_{family}_guidance", cache.guidance)
        emit(f"prior_{family}_images_per_s_one_at_a_time", ips["one_at_a_time"])
        emit(f"prior_{family}_images_per_s_batched", ips["batched"])
        emit(f"prior_{family}_batched_speedup", ips["batched"] / ips["one_at_a_time"])
        emit(f"prior_{family}_batched_max_abs_pixel_diff", diff)


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, one round, fewer prior images")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in every process (default 1)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 60; --quick 25)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="steps left out of the step time (default 10; --quick 5)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="runs per variant (default 3; --quick 1)")
    parser.add_argument("--prior-images", type=int, default=None, help="class images per timing (default 8; --quick 4)")
    parser.add_argument("--prior-rounds", type=int, default=None, help="timed rounds (default 5; --quick 3)")
    parser.add_argument("--skip-priors", action="store_true", help="only the training figures")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    q = args.quick
    args.steps = args.steps or (25 if q else 60)
    args.warmup = args.warmup if args.warmup is not None else (5 if q else 10)
    args.rounds = args.rounds or (1 if q else 3)
    args.prior_images = args.prior_images or (4 if q else 8)
    args.prior_rounds = args.prior_rounds or (3 if q else 5)

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
    emit("train_steps", args.steps)
    emit("warmup_steps", args.warmup)
    emit("rounds", args.rounds)
    start = time.perf_counter()
    bench_training(args)
    if not args.skip_priors:
        bench_priors(args)
    emit("total_s", time.perf_counter() - start)


if __name__ == "__main__":
    main()
