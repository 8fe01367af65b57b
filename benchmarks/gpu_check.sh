#!/usr/bin/env bash
# The GPU half of benchmarks/bench_memory.py: real-size Z-Image LoRA training memory and speed on one CUDA card.
#
#   bash benchmarks/gpu_check.sh [--out FILE] [--budget-s 420] [--steps 8]   # on a GPU machine (H200: ~3-5 min)
#   bash benchmarks/gpu_check.sh --dry-run [--out FILE]                      # the same Python on the CPU, small
#
# Writes ONE JSON file (default: $OUT/gpu_check.json where $OUT is set, else benchmarks/gpu_check.json), rewritten
# after every measurement, so a run cut short still leaves what it measured. Each measurement fails soft: its
# error goes into the JSON and the next one runs. Nothing is downloaded (HF_HUB_OFFLINE=1):
#
# * the denoiser is the full Z-Image-Turbo architecture from the shipped config (30 layers, 2 + 2 refiners,
#   dim 3840) with random bf16 weights, built on the card;
# * the text encoder is a TINY random Qwen3 at the real hidden width 2560 (2 layers, not Qwen3-4B's 36) with the
#   tiny byte tokenizer, and the VAE is the tiny random one from turbobooth.manager.tiny. Their memory and time
#   are therefore not the real encoders'; the JSON gives the memory model's estimate both with these encoders
#   and with the real ones (Qwen3-4B + the Flux VAE);
#
# Measurements, in this order (the fp8 plan last: it converts the shared denoiser to fp8 storage in place):
#
# 1. sampling at 1024², 8 steps, guidance 0: TurboSample (turbobooth.manager.sampling.generate) against a bare
#    ZImagePipeline call, interleaved rounds after a warm-up of each; seconds, ratio, max pixel difference, peak;
# 2. for each plan of trainer.memory.PLANS at 512² and 1024²: the project's own trainer.runs.train (batch 1,
#    rank 16, mixed_precision bf16, --steps steps): torch.cuda.max_memory_allocated / max_memory_reserved over
#    the run, seconds per optimizer step (median after the first), and trainer.memory.estimate beside them;
# 3. the bare step of bench_memory.py (peft add_adapter, the project's flow-matching objective, AdamW or
#    AdamW8bit, autocast bf16) at 256², 512² and 1024², for the same option sets, giving the activations the
#    forward keeps (allocated after the forward minus before) per token per block, the figure bench_memory.py
#    measures on the CPU as RSS.
#
# --dry-run runs all of it on the CPU with 2 layers and 1 + 1 refiners at 64² (2 steps), to check the script.
set -uo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT" || exit 1
PY="${TURBOBOOTH_VENV:-$REPO_ROOT/.venv}/bin/python"
if [ ! -x "$PY" ]; then
    echo "[gpu_check] no venv at $PY: running scripts/setup_env.sh" >&2
    bash scripts/setup_env.sh || { echo "[gpu_check] setup_env.sh failed" >&2; exit 1; }
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false

DEFAULT_OUT="${OUT:+$OUT/gpu_check.json}"
DEFAULT_OUT="${DEFAULT_OUT:-$REPO_ROOT/benchmarks/gpu_check.json}"
# the whole run is capped at 8 minutes; the Python part also skips what would not fit in --budget-s
timeout --signal=TERM --kill-after=20 480 "$PY" - --default-out "$DEFAULT_OUT" "$@" <<'PY'
import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback

QWEN3_4B_AND_VAE = 4_022_468_096 + 83_819_683  # as tests/test_memory.py
START = time.monotonic()

ap = argparse.ArgumentParser(prog="gpu_check.sh")
ap.add_argument("--dry-run", action="store_true", help="CPU, 2 layers, 1 + 1 refiners, 64², 2 steps")
ap.add_argument("--out", default=None)
ap.add_argument("--default-out", default="gpu_check.json", help=argparse.SUPPRESS)
ap.add_argument("--budget-s", type=float, default=420.0, help="skip measurements that start after this")
ap.add_argument("--steps", type=int, default=8, help="training steps per plan and resolution")
ap.add_argument("--rounds", type=int, default=3, help="sampling rounds after the warm-up")
ap.add_argument("--resolutions", default="512,1024")
args = ap.parse_args()
out_path = args.out or args.default_out
sys.path.insert(0, os.getcwd())

import torch  # noqa: E402

DRY = args.dry_run
DEV = torch.device("cpu" if DRY else "cuda")
CUDA = DEV.type == "cuda"
RESOLUTIONS = [64] if DRY else [int(r) for r in args.resolutions.split(",") if r]
BARE_RES = [64] if DRY else [256, 512, 1024]
SAMPLE_RES = 64 if DRY else 1024
STEPS = 2 if DRY else max(2, args.steps)
ROUNDS = 1 if DRY else max(1, args.rounds)
LAYERS, REFINERS = (2, 1) if DRY else (30, 2)

result = {"meta": {}, "sampling": {}, "train": {}, "bare_steps": {}, "errors": []}


def save():
    result["elapsed_s"] = round(time.monotonic() - START, 2)
    tmp = out_path + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(tmp, out_path)


def sync():
    if CUDA:
        torch.cuda.synchronize()


def reset_peak():
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def allocated():
    return torch.cuda.memory_allocated() if CUDA else 0


def peaks():
    if not CUDA:
        return {}
    free, total = torch.cuda.mem_get_info()
    return {"max_allocated": torch.cuda.max_memory_allocated(), "max_reserved": torch.cuda.max_memory_reserved(),
            "device_used_now": total - free, "max_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)}


@contextlib.contextmanager
def measured(section: dict, key: str):
    """One measurement: skipped past the budget, its error recorded instead of raised."""
    if time.monotonic() - START > args.budget_s:
        section[key] = {"skipped": f"time budget ({args.budget_s:.0f} s) spent"}
        save()
        yield None
        return
    entry = section.setdefault(key, {})
    t0 = time.monotonic()
    try:
        yield entry
    except Exception as e:  # noqa: BLE001 - fail soft: record and go on
        entry["error"] = f"{type(e).__name__}: {str(e)[:600]}"
        result["errors"].append({"what": key, "error": entry["error"], "trace": traceback.format_exc()[-1500:]})
    finally:
        entry["wall_s"] = round(time.monotonic() - t0, 2)
        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()
        save()


def build_model():
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from turbobooth.manager.formats import shipped_config
    from turbobooth.manager.spec import ModelSpec, TurboModel
    from turbobooth.manager.tiny import build_qwen_tokenizer, build_tiny_zimage

    tiny = build_tiny_zimage(0)
    tok = build_qwen_tokenizer()
    cfg = {k: v for k, v in shipped_config("zimage", "transformer").items() if not k.startswith("_")}
    cfg.update(n_layers=LAYERS, n_refiner_layers=REFINERS)
    torch.manual_seed(0)
    t0 = time.monotonic()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEV):  # random weights made where they live: no host copy
            transformer = ZImageTransformer2DModel.from_config(cfg)
            te = Qwen3Model(Qwen3Config(hidden_size=cfg["cap_feat_dim"], intermediate_size=512, num_hidden_layers=2,
                                        num_attention_heads=20, num_key_value_heads=4, head_dim=128,
                                        vocab_size=len(tok), max_position_embeddings=1024, rope_theta=1_000_000.0,
                                        rms_norm_eps=1e-6, tie_word_embeddings=True))
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        transformer.x_pad_token.normal_(0.0, 0.02)
        transformer.cap_pad_token.normal_(0.0, 0.02)
    transformer.eval().requires_grad_(False)
    te.eval().requires_grad_(False)
    vae = tiny.vae.to(device=DEV, dtype=torch.bfloat16)
    sched = FlowMatchEulerDiscreteScheduler.from_config(shipped_config("zimage", "scheduler"))
    pipe = ZImagePipeline(scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    sync()
    result["meta"]["build_s"] = round(time.monotonic() - t0, 2)
    model = TurboModel(ModelSpec("gpu-check-random"), "zimage", pipe, "gpu-check-random", device=DEV.type,
                       variant="turbo")
    return model, cfg


def encoder_params(pipe) -> int:
    return sum(p.numel() for m in (pipe.text_encoder, pipe.vae) for p in m.parameters())


def meta(model, cfg):
    import diffusers

    m = result["meta"]
    m.update(date=time.strftime("%Y-%m-%d %H:%M:%S"), dry_run=DRY, torch=torch.__version__,
             diffusers=diffusers.__version__, device=torch.cuda.get_device_name() if CUDA else "cpu",
             transformer={"n_layers": LAYERS, "n_refiner_layers": REFINERS, "dim": cfg["dim"],
                          "params": sum(p.numel() for p in model.denoiser.parameters()), "weights": "random bf16"},
             text_encoder="tiny random Qwen3, hidden 2560, 2 layers, tiny byte tokenizer (not Qwen3-4B)",
             vae="tiny random AutoencoderKL from turbobooth.manager.tiny (not the Flux VAE)",
             encoder_params=encoder_params(model.pipe), steps=STEPS, rounds=ROUNDS,
             alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""))
    if CUDA:
        m["weights_allocated"] = allocated()
        m["cuda_total"] = torch.cuda.get_device_properties(0).total_memory
    with contextlib.suppress(Exception):
        import bitsandbytes

        m["bitsandbytes"] = bitsandbytes.__version__
    save()


# -- 1. sampling --------------------------------------------------------------------------------------------


def sampling(model):
    from turbobooth.manager.sampling import generate

    prompt, size = "a photo of a dog on a beach", SAMPLE_RES
    pipe = model.pipe

    def turbo():
        return generate(model, prompt, seed=0, steps=8, width=size, height=size).images

    def bare():
        out = pipe(prompt=[prompt], generator=torch.Generator("cpu").manual_seed(0), num_inference_steps=8,
                   guidance_scale=0.0, height=size, width=size, max_sequence_length=512, output_type="pt")
        return out.images.permute(0, 2, 3, 1).float().cpu()

    with measured(result["sampling"], f"zimage_{size}_8_steps") as entry:
        if entry is None:
            return
        entry["settings"] = f"{size}², 8 steps, guidance 0, seed 0, euler (TurboSample default), batch 1"
        times = {"turbosample": [], "bare_pipeline": []}
        outputs, peak = {}, {}
        for rnd in range(ROUNDS + 1):  # round 0 is the warm-up
            order = [("turbosample", turbo), ("bare_pipeline", bare)]
            for name, fn in order if rnd % 2 == 0 else order[::-1]:
                reset_peak()
                sync()
                t0 = time.perf_counter()
                with torch.no_grad():
                    outputs[name] = fn()
                sync()
                if rnd:
                    times[name].append(time.perf_counter() - t0)
                peak[name] = peaks().get("max_allocated")
        for name, ts in times.items():
            entry[f"{name}_s"] = [round(t, 4) for t in ts]
            entry[f"{name}_median_s"] = statistics.median(ts)
            entry[f"{name}_peak_allocated"] = peak[name]
        ratios = [a / b for a, b in zip(times["turbosample"], times["bare_pipeline"], strict=True)]
        entry["turbosample_vs_bare_ratio"] = statistics.median(ratios)
        entry["turbosample_vs_bare_ratio_min_max"] = [min(ratios), max(ratios)]
        entry["max_abs_diff"] = float((outputs["turbosample"].float() - outputs["bare_pipeline"].float()).abs().max())


# -- 2. the trainer, per plan -------------------------------------------------------------------------------


def images(res: int, n: int = 3):
    from PIL import Image

    g = torch.Generator().manual_seed(res)
    return [Image.fromarray((torch.rand(res, res, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(n)]


def estimates(model, plan_name: str, res: int) -> dict:
    from turbobooth.manager.families import ZIMAGE
    from turbobooth.trainer import memory as M

    plan = M.PLANS[plan_name]
    here = M.shape_of(dict(model.denoiser.config), 16, ZIMAGE.lora_targets, encoder_params(model.pipe))
    real = M.shape_of(dict(model.denoiser.config), 16, ZIMAGE.lora_targets, QWEN3_4B_AND_VAE)
    est = M.estimate(plan, here, res, 1)
    return {"model_estimate_these_encoders": est, "model_estimate_real_encoders_total": M.estimate(plan, real, res, 1)["total"],
            "model_estimate_without_fixed": est["total"] - est["fixed"]}


def train_plan(model, plan_name: str, res: int):
    from turbobooth.trainer.config import TrainConfig
    from turbobooth.trainer.runs import train

    with measured(result["train"], f"{plan_name}_{res}") as entry:
        if entry is None:
            return
        entry.update(estimates(model, plan_name, res))
        stamps = []

        def on_step(step, total, preview):
            sync()
            stamps.append(time.perf_counter())

        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig(family="zimage", instance_prompt="a photo of sks dog", resolution=res, center_crop=True,
                              steps=STEPS, memory=plan_name, mixed_precision="bf16", rank=16, lr=1e-4,
                              output_dir=os.path.join(tmp, "run"), log_tensorboard=False, min_free_disk_gb=0.0)
            reset_peak()
            entry["allocated_before"] = allocated()
            sync()
            t0 = time.perf_counter()
            res_obj = train(model, cfg, images(res), on_step=on_step)
            sync()
            entry.update(peaks())
            entry["losses"] = [round(float(v), 5) for v in res_obj.losses]
            del res_obj
        deltas = [b - a for a, b in zip(stamps, stamps[1:])]
        entry["first_step_incl_setup_s"] = stamps[0] - t0 if stamps else None
        entry["step_s"] = [round(d, 4) for d in deltas]
        entry["step_median_s"] = statistics.median(deltas) if deltas else None
        if CUDA and entry.get("max_allocated"):
            entry["model_vs_measured_allocated_pct"] = round(
                100 * (entry["model_estimate_these_encoders"]["total"] / entry["max_allocated"] - 1), 1)
            entry["model_without_fixed_vs_measured_allocated_pct"] = round(
                100 * (entry["model_estimate_without_fixed"] / entry["max_allocated"] - 1), 1)


# -- 3. the bare step of bench_memory.py --------------------------------------------------------------------

BARE = {"fast": (False, "adamw"), "bf16_checkpointed": (True, "adamw"), "fp8_checkpointed": (True, "adamw8bit")}


def bare_step(model, variant: str, res: int, fp8: bool):
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    from turbobooth.manager.families import ZIMAGE
    from turbobooth.manager.formats import shipped_config
    from turbobooth.trainer.memory import CAPTION_TOKENS
    from turbobooth.trainer.objective import _Objective

    ckpt, optimizer = BARE[variant]
    with measured(result["bare_steps"], f"{variant}_{res}") as entry:
        if entry is None:
            return
        dit = model.denoiser
        try:
            dit.requires_grad_(False)
            dit.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=sorted(set(ZIMAGE.lora_targets)),
                                       lora_dropout=0.0, init_lora_weights=True, bias="none"), adapter_name="bench")
            if fp8:
                cast_training_params(dit, dtype=torch.float32)
            if ckpt:
                dit.enable_gradient_checkpointing()
            dit.train()
            params = [p for p in dit.parameters() if p.requires_grad]
            entry["lora_params"] = sum(p.numel() for p in params)
            entry["optimizer"] = optimizer
            if optimizer == "adamw8bit":
                try:
                    import bitsandbytes as bnb

                    opt = bnb.optim.AdamW8bit(params, lr=1e-4, weight_decay=1e-4)
                except Exception as e:  # noqa: BLE001
                    entry["optimizer"] = f"adamw (bitsandbytes unavailable: {type(e).__name__})"
                    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
            else:
                opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
            sched = FlowMatchEulerDiscreteScheduler.from_config(shipped_config("zimage", "scheduler"))
            objective = _Objective(SimpleNamespace(scheduler=sched), "zimage", 0)
            reset_peak()
            entry["allocated_before"] = allocated()
            times, kept = [], []
            for step in range(3 if not DRY else 2):
                g = torch.Generator().manual_seed(step)
                latents = torch.randn(1, 16, res // 8, res // 8, generator=g)
                cond = [torch.randn(CAPTION_TOKENS, 2560, generator=g).to(device=DEV, dtype=torch.bfloat16)]
                sync()
                t0 = time.perf_counter()
                before = allocated()
                with torch.autocast(DEV.type, dtype=torch.bfloat16):
                    pred, target = objective.predict_and_target(dit, latents, cond, [step], DEV, torch.bfloat16)
                    loss = torch.nn.functional.mse_loss(pred.float(), target.float())
                kept.append(allocated() - before)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync()
                times.append(time.perf_counter() - t0)
                del pred, target, loss
            entry.update(peaks())
            entry["kept_after_forward"] = kept[-1]
            tokens = (res // 16) ** 2 + CAPTION_TOKENS
            blocks = LAYERS + 2 * REFINERS
            entry["kept_per_token_per_block"] = round(kept[-1] / tokens / blocks, 1)
            entry["tokens_main_block"] = tokens
            entry["step_s"] = [round(t, 4) for t in times]
            entry["step_median_after_first_s"] = statistics.median(times[1:])
            del opt, params
        finally:
            with contextlib.suppress(Exception):
                dit.disable_gradient_checkpointing()
            with contextlib.suppress(Exception):
                model.pipe.unload_lora_weights()
            dit.eval().requires_grad_(False)
            entry["lora_left_after_cleanup"] = any("lora_" in n for n, _ in dit.named_parameters())


def to_fp8(model):
    with measured(result["meta"], "fp8_conversion") as entry:
        if entry is None:
            return False
        from turbobooth.manager.loading import store_weights  # what TurboLoader's dtype fp8_e4m3fn does

        store_weights(model.denoiser, torch.float8_e4m3fn, torch.bfloat16)
        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()
            entry["weights_allocated_fp8"] = allocated()
        return True


def main():
    if CUDA and not torch.cuda.is_available():
        result["errors"].append({"what": "device", "error": "no CUDA device; use --dry-run on a CPU"})
        save()
        return 2
    model = None
    with measured(result["meta"], "build") as entry:
        if entry is not None:
            model, cfg = build_model()
            meta(model, cfg)
    if model is None:
        return 1
    sampling(model)
    for plan in ("fast", "bf16_checkpointed", "bf16_offloaded"):
        for res in RESOLUTIONS:
            train_plan(model, plan, res)
    for variant in ("fast", "bf16_checkpointed"):
        for res in BARE_RES:
            bare_step(model, variant, res, fp8=False)
    if to_fp8(model):
        for res in RESOLUTIONS:
            train_plan(model, "fp8_checkpointed", res)
        for res in BARE_RES:
            bare_step(model, "fp8_checkpointed", res, fp8=True)
    result["done"] = True
    save()
    print(f"[gpu_check] wrote {out_path} ({len(result['errors'])} errors, {time.monotonic() - START:.0f} s)")
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except Exception as e:  # noqa: BLE001 - whatever happens, the JSON says so
        result["errors"].append({"what": "main", "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]})
        save()
        code = 1
    sys.exit(code)
PY
rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "[gpu_check] stopped by the 8-minute cap; the JSON holds what was measured" >&2
fi
exit "$rc"
