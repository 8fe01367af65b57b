"""Memory of one Z-Image LoRA training step at full width, measured on the CPU, beside ``trainer.memory``'s model.

Run from the repository root (about 10-15 minutes on 2 cores):

    .venv/bin/python benchmarks/bench_memory.py [--depths 2,4,6] [--variants fast,...] [--check-res 512] [--threads 2]

The denoiser is the real Z-Image transformer from the shipped config (``manager.formats.shipped_config``: dim
3840, 30 heads, SwiGLU width 10240, caption width 2560) with random bf16 weights, but only ``n_layers`` main blocks
(``--depths``) and ``n_refiner_layers=1`` (one noise-refiner and one context-refiner block); blocks are counted as
``n_layers + 2 * n_refiner_layers``, as ``trainer.memory.shape_of`` does. One point is one training step at 256²
(256 image tokens + 128 caption tokens), batch 1: rank-16 LoRA on the family's targets via ``add_adapter``,
the project's own flow-matching objective (``trainer.objective._Objective.predict_and_target``), MSE, backward,
optimizer step, under ``torch.autocast("cpu", bfloat16)`` the way the trainer's ``accelerator.autocast()`` runs
bf16 mixed precision. Two steps run; the figures are the peak over both (the second step is the steady state:
the optimizer states exist while the activations are alive).

Variants (the options of ``trainer.memory.PLANS``; the encoders and their offloading are not part of this):

* ``fast``: bf16 weights, no checkpointing, AdamW (plan ``fast``);
* ``bf16_checkpointed``: bf16 weights, gradient checkpointing, AdamW (plan ``bf16_checkpointed``);
* ``fp8_checkpointed``: fp8 (e4m3) storage with bf16 compute (``manager.loading.store_weights``), fp32 LoRA,
  checkpointing, bitsandbytes' AdamW8bit where ``bitsandbytes`` imports, else AdamW (the line says which);
* ``fp8``: fp8 storage without checkpointing, AdamW; ``fp8_checkpointed_adamw``: with checkpointing, AdamW.
  These two separate the options.

LoRA weights are bf16 over a bf16 base (as ``trainer.run`` leaves them under bf16 mixed precision) and fp32 over
an 8-bit base (``cast_training_params``, as ``trainer.run`` does).

Every point runs in its own child process. Memory is RSS from ``/proc/self/status``: ``base`` is the RSS after
the imports, before the model is built; the peak (``VmHWM``) is reset through ``/proc/self/clear_refs`` once the
model, adapter and optimizer exist, so building the model (and the bf16 copy that fp8 storage replaces) does not
count; ``peak_over_base`` is that peak minus ``base``. The children run with ``MALLOC_MMAP_THRESHOLD_=65536``, so
glibc returns every freed tensor to the OS at once and RSS follows the live tensors (a CUDA caching allocator
would keep some of them reserved: see ``max_memory_reserved`` in ``gpu_check.sh``).

Per variant the points are fitted by least squares as ``fixed + blocks × per_block`` and extrapolated to the real
34 blocks (30 layers + 2 + 2 refiners). The activations that the forward pass keeps for backward (RSS after the
forward minus before it, second step) give bytes per token per block, which the script compares with the
model's ``ACT_DIM·dim + ACT_FFN·ffn`` (× 2 bytes) and turns into the ``ACT_DIM`` that the measurement implies.
Then it prints, for every plan at 512², 768² and 1024², ``trainer.memory.estimate`` (the real model, Qwen3-4B and
the VAE as encoders) beside the measured figures extrapolated by resolution (activations linear in tokens: CPU
and GPU SDPA both run flash kernels that keep no ``L × L`` matrix; ``--check-res`` measures one depth at a larger
size to test that). The extrapolated totals add the model's own encoder and fixed terms, which the CPU cannot
measure; the gap figures compare the transformer part alone.

It prints ``name: value`` lines (sizes in MiB unless the name says otherwise) and judges nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MIB = 1024**2
RES = 256  # the measured resolution
REAL_BLOCKS = 34
QWEN3_4B_AND_VAE = 4_022_468_096 + 83_819_683  # Qwen3-4B without lm_head, and the Flux VAE (as tests/test_memory.py)

VARIANTS = {  # storage, gradient checkpointing, optimizer, the plan it is
    "fast": ("bf16", False, "adamw", "fast"),
    "bf16_checkpointed": ("bf16", True, "adamw", "bf16_checkpointed"),
    "fp8_checkpointed": ("fp8", True, "adamw8bit", "fp8_checkpointed"),
    "fp8": ("fp8", False, "adamw", None),
    "fp8_checkpointed_adamw": ("fp8", True, "adamw", None),
}


def emit(name: str, value) -> None:
    if isinstance(value, float):
        value = f"{value:.4g}" if abs(value) < 1e4 else f"{value:.1f}"
    print(f"{name}: {value}", flush=True)


# ---------------------------------------------------------------------------
# the child: one measured point
# ---------------------------------------------------------------------------


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _build(n_layers: int, n_refiner: int, storage: str):
    import torch
    from diffusers import ZImageTransformer2DModel
    from turbobooth.manager.formats import shipped_config

    cfg = {k: v for k, v in shipped_config("zimage", "transformer").items() if not k.startswith("_")}
    cfg.update(n_layers=n_layers, n_refiner_layers=n_refiner)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: no fp32 copy
    try:
        model = ZImageTransformer2DModel.from_config(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():  # created with torch.empty
        model.x_pad_token.normal_(0.0, 0.02)
        model.cap_pad_token.normal_(0.0, 0.02)
    if storage == "fp8":  # what TurboLoader's dtype fp8_e4m3fn does to the denoiser
        from turbobooth.manager.loading import store_weights

        store_weights(model, torch.float8_e4m3fn, torch.bfloat16)
    return model, cfg


def _lora_and_optimizer(model, storage: str, ckpt: bool, optimizer: str, rank: int):
    import torch
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from turbobooth.manager.families import ZIMAGE

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(set(ZIMAGE.lora_targets)),
                                 lora_dropout=0.0, init_lora_weights=True, bias="none"))
    if storage == "fp8":
        cast_training_params(model, dtype=torch.float32)
    if ckpt:
        model.enable_gradient_checkpointing()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    used = optimizer
    if optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb

            opt = bnb.optim.AdamW8bit(params, lr=1e-4, weight_decay=1e-4)
        except Exception as e:  # noqa: BLE001 - any import/backend failure means: measure with AdamW
            used = f"adamw (bitsandbytes unavailable: {type(e).__name__}: {str(e)[:80]})"
            optimizer = "adamw"
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
    return params, opt, used


def _objective():
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler
    from turbobooth.manager.formats import shipped_config
    from turbobooth.trainer.objective import _Objective

    sched = FlowMatchEulerDiscreteScheduler.from_config(shipped_config("zimage", "scheduler"))
    return _Objective(SimpleNamespace(scheduler=sched), "zimage", 0)


def _one_step(model, opt, objective, res: int, caption_tokens: int, cap_dim: int, step: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(step)
    latents = torch.randn(1, 16, res // 8, res // 8, generator=g)
    cond = [torch.randn(caption_tokens, cap_dim, generator=g).to(torch.bfloat16)]
    before = _status("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred, target = objective.predict_and_target(model, latents, cond, [step], "cpu", torch.bfloat16)
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
    after_fwd = _status("VmRSS")
    loss.backward()
    peak_bwd = _status("VmHWM")
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {"before": before, "kept": after_fwd - before, "peak": _status("VmHWM"), "peak_bwd": peak_bwd,
            "seconds": time.perf_counter() - t0, "loss": float(loss.detach())}


def child(point: dict) -> dict:
    import torch

    torch.set_num_threads(point["threads"])
    import diffusers  # noqa: F401 - imported before the base RSS is read
    import peft  # noqa: F401
    from turbobooth.trainer.memory import CAPTION_TOKENS

    storage, ckpt, optimizer, _plan = VARIANTS[point["variant"]]
    base = _status("VmRSS")
    model, cfg = _build(point["n_layers"], point["n_refiner"], storage)
    after_build = _status("VmRSS")
    params, opt, used = _lora_and_optimizer(model, storage, ckpt, optimizer, point["rank"])
    objective = _objective()
    setup = _status("VmRSS")
    reset_ok = _reset_peak()
    steps = [_one_step(model, opt, objective, point["res"], CAPTION_TOKENS, cfg["cap_feat_dim"], i)
             for i in range(point["steps"])]
    return {
        "base": base, "weights": after_build - base, "setup": setup - base,
        "lora_params": sum(p.numel() for p in params), "lora_dtype": str(params[0].dtype).replace("torch.", ""),
        "optimizer": used, "peak_reset": reset_ok,
        "peak_over_base": max(s["peak"] for s in steps) - base, "peak_rss": max(s["peak"] for s in steps),
        "kept": steps[-1]["kept"], "peak_bwd_over_base": max(s["peak_bwd"] for s in steps) - base,
        "step_s": steps[-1]["seconds"], "first_step_s": steps[0]["seconds"], "loss": steps[-1]["loss"],
    }


# ---------------------------------------------------------------------------
# the parent: points, fits, the memory model
# ---------------------------------------------------------------------------


def run_point(variant: str, n_layers: int, n_refiner: int, res: int, args) -> dict:
    point = {"variant": variant, "n_layers": n_layers, "n_refiner": n_refiner, "res": res, "rank": args.rank,
             "threads": args.threads, "steps": args.steps}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="131072", MALLOC_ARENA_MAX="2",
               PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(point)], capture_output=True,
                              text=True, env=env, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        return {**point, "error": f"timed out after {args.child_timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {**point, "error": f"exit {proc.returncode}: {tail[0][:200]}"}
    return {**point, **json.loads(lines[-1][7:]), "child_s": time.perf_counter() - t0}


def tokens(res: int, caption: int) -> int:
    return (res // 16) ** 2 + caption


def fit(xs: list, ys: list) -> tuple[float, float, float]:
    """Least squares ``y = a + b x``: (a, b, largest residual)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    a = my - b * mx
    return a, b, max(abs(y - a - b * x) for x, y in zip(xs, ys, strict=True))


def _shape(n_layers: int, n_refiner: int, rank: int, encoders: int):
    from turbobooth.manager.families import ZIMAGE
    from turbobooth.manager.formats import shipped_config
    from turbobooth.trainer import memory as M

    cfg = dict(shipped_config("zimage", "transformer"), n_layers=n_layers, n_refiner_layers=n_refiner)
    return M.shape_of(cfg, rank, ZIMAGE.lora_targets, encoders)


def _model_plan(variant: str):
    from turbobooth.trainer import memory as M

    storage, ckpt, optimizer, plan = VARIANTS[variant]
    return M.PLANS[plan] if plan else M.Plan(variant, storage == "fp8", ckpt, optimizer, True, "ablation")


def report_points(points: list, args) -> None:
    from turbobooth.trainer import memory as M

    for p in points:
        tag = f"point_{p['variant']}_L{p['n_layers']}_R{p['n_refiner']}_{p['res']}"
        if "error" in p:
            emit(f"{tag}_error", p["error"])
            continue
        shape = _shape(p["n_layers"], p["n_refiner"], args.rank, 0)
        est = M.estimate(_model_plan(p["variant"]), shape, p["res"], 1)
        model_part = est["total"] - est["fixed"]
        emit(f"{tag}_blocks", p["n_layers"] + 2 * p["n_refiner"])
        for key in ("base", "weights", "setup", "kept", "peak_bwd_over_base", "peak_over_base", "peak_rss"):
            emit(f"{tag}_{key}_mib", p[key] / MIB)
        emit(f"{tag}_model_estimate_without_fixed_mib", model_part / MIB)
        emit(f"{tag}_model_vs_measured_pct", 100.0 * (model_part / p["peak_over_base"] - 1))
        emit(f"{tag}_lora", f"{p['lora_params']} params, {p['lora_dtype']}, optimizer {p['optimizer']}")
        emit(f"{tag}_step_s", p["step_s"])
        emit(f"{tag}_first_step_s", p["first_step_s"])


def fits(points: list, args) -> dict:
    """Per variant: fixed + blocks × per_block for weights, setup, kept activations and the peak (256² points)."""
    out = {}
    for variant in args.variants:
        pts = [p for p in points if p["variant"] == variant and p["res"] == RES and "error" not in p
               and p["n_refiner"] == 1]
        if len(pts) < 2:
            emit(f"fit_{variant}", f"skipped ({len(pts)} points)")
            continue
        blocks = [p["n_layers"] + 2 for p in pts]
        f = {key: fit(blocks, [p[key] for p in pts]) for key in ("weights", "setup", "kept", "peak_over_base")}
        out[variant] = f
        for key, (a, b, resid) in f.items():
            emit(f"fit_{variant}_{key}", f"{a / MIB:.1f} + blocks x {b / MIB:.2f} MiB (max residual {resid / MIB:.1f} "
                 f"MiB, {len(pts)} points)")
        a, b, _ = f["peak_over_base"]
        emit(f"fit_{variant}_peak_over_base_34_blocks_256_gib", (a + REAL_BLOCKS * b) / 1024**3)
    return out


def _img(res: int) -> int:
    return (res // 16) ** 2


def _point(points: list, variant: str, n_layers: int, n_refiner: int, res: int):
    return next((p for p in points if (p["variant"], p["n_layers"], p["n_refiner"], p["res"]) ==
                 (variant, n_layers, n_refiner, res) and "error" not in p), None)


# where the backward transient of a variant without its own --check-res point comes from
_G0_FROM = {"fp8": "fast", "fp8_checkpointed": "bf16_checkpointed", "fp8_checkpointed_adamw": "fp8_checkpointed"}


def derive(points: list, f: dict, args) -> dict:
    """Per variant, the parts of ``peak = fixed + Σ_blocks (s + g_b·T_block) + g0·T_img``:

    * ``g_b``: bytes per token that a block keeps for backward (kept-activation slope ÷ a main block's tokens;
      for fp8 storage without checkpointing the bf16 copies of the block's weights, which the per-layer casting
      leaves in the autograd graph, are taken out first: they do not grow with tokens);
    * ``s``: the token-independent bytes per block (weights, LoRA, its gradients and optimizer states, those
      bf16 copies): the peak slope minus ``g_b`` × a main block's tokens;
    * ``g0``: what else grows with the image tokens (the gradients alive in backward, and with checkpointing the
      one block recomputed at a time), from a ``--check-res`` point: the growth of its peak per image token minus
      the ``g_b`` of its blocks that see the image (``n_layers`` main + 1 noise refiner).

    A main block sees image + caption tokens, a noise refiner the image tokens, a context refiner the caption."""
    from turbobooth.trainer.memory import CAPTION_TOKENS as CAP

    t_main = _img(RES) + CAP
    out = {}
    for v, fv in f.items():
        storage, ckpt = VARIANTS[v][:2]
        retained = 2 * fv["weights"][1] if storage == "fp8" and not ckpt else 0.0
        g_b = (fv["kept"][1] - retained) / t_main
        d = {"g_b": g_b, "s": fv["peak_over_base"][1] - g_b * t_main, "retained": retained}
        d["real_256"] = fv["peak_over_base"][0] + 32 * fv["peak_over_base"][1] + 2 * d["s"] + g_b * t_main
        d["nonblock_fixed"] = fv["peak_over_base"][0] + 2 * fv["peak_over_base"][1] - (2 * d["s"] + g_b * t_main)
        for p in points:
            if p["variant"] == v and p["res"] != RES and p["n_refiner"] == 1 and "error" not in p:
                low = _point(points, v, p["n_layers"], 1, RES)
                if low:
                    g = (p["peak_over_base"] - low["peak_over_base"]) / (_img(p["res"]) - _img(RES))
                    d["g0"], d["g0_from"] = g - (p["n_layers"] + 1) * g_b, f"{v} at {p['res']}²"
        out[v] = d
    for v, d in out.items():
        src = _G0_FROM.get(v)
        while "g0" not in d and src in out:
            if "g0" in out[src]:
                d["g0"], d["g0_from"] = out[src]["g0"], out[src]["g0_from"] + f" (no {v} point)"
            src = _G0_FROM.get(src)
        d.setdefault("g0", 0.0)
        d.setdefault("g0_from", "none measured: 0")
    return out


def real_peak(d: dict, res: int) -> float:
    """The transformer part of a step of the real 34 blocks at ``res`` (peak over base), from :func:`derive`."""
    return d["real_256"] + (_img(res) - _img(RES)) * (32 * d["g_b"] + d["g0"])


def report_derived(points: list, f: dict, dd: dict, args) -> None:
    from turbobooth.trainer import memory as M

    shape = _shape(2, 1, args.rank, 0)
    dim, ffn, t_main = shape.dim, shape.ffn, _img(RES) + M.CAPTION_TOKENS
    model_full = (M.ACT_DIM * dim + M.ACT_FFN * ffn) * 2
    emit("model_act_bytes_per_token_per_block", f"{model_full:.0f} (ACT_DIM {M.ACT_DIM:g} x dim {dim} + ACT_FFN "
         f"{M.ACT_FFN:g} x ffn {ffn}, x 2 bytes)")
    emit("model_checkpointed_bytes_per_token_per_block", f"{dim * 2} (dim x 2 bytes)")
    lora_per_block = shape.lora_params / shape.blocks
    for v, d in dd.items():
        fv = f[v]
        emit(f"derived_{v}_kept_bytes_per_token_per_block", f"{d['g_b']:.0f}")
        if d["retained"]:
            emit(f"derived_{v}_kept_bf16_weight_copies_per_block_mib", d["retained"] / MIB)
        if VARIANTS[v][1]:
            emit(f"derived_{v}_checkpoint_bytes_over_dim_x2", d["g_b"] / (dim * 2))
        else:
            emit(f"derived_{v}_vs_model_act_ratio", d["g_b"] / model_full)
            for ffn_k in (M.ACT_FFN, 4.0):
                emit(f"derived_{v}_implied_act_dim_at_act_ffn_{ffn_k:g}", (d["g_b"] / 2 - ffn_k * ffn) / dim)
        emit(f"derived_{v}_static_per_block_mib", d["s"] / MIB)
        emit(f"derived_{v}_lora_bytes_per_param_at_setup", (fv["setup"][1] - fv["weights"][1]) / lora_per_block)
        emit(f"derived_{v}_nonblock_fixed_mib", d["nonblock_fixed"] / MIB)
        emit(f"derived_{v}_backward_transient_bytes_per_image_token", f"{d['g0']:.0f} (from {d['g0_from']})")
        emit(f"derived_{v}_real_34_blocks_256_gib", d["real_256"] / 1024**3)
    if "fast" in dd and "bf16_checkpointed" in dd:
        emit("derived_checkpointed_transient_minus_one_full_block_bytes_per_token",
             f"{dd['bf16_checkpointed']['g0'] - dd['fast']['g_b']:.0f} (compare fast's transient "
             f"{dd['fast']['g0']:.0f})")
    pair = _point(points, "fast", min(args.depths), 2, RES)
    one = _point(points, "fast", min(args.depths), 1, RES)
    if pair and one and "fast" in dd:
        d = dd["fast"]
        pred = one["peak_over_base"] + 2 * d["s"] + d["g_b"] * (_img(RES) + M.CAPTION_TOKENS)
        emit("check_refiner_pair_measured_increment_mib", (pair["peak_over_base"] - one["peak_over_base"]) / MIB)
        emit("check_refiner_pair_predicted_increment_mib", (pred - one["peak_over_base"]) / MIB)
        emit("check_refiner_pair_error_pct", 100.0 * (pred / pair["peak_over_base"] - 1))
    for p in points:
        if p["res"] != RES and "error" not in p:
            low = _point(points, p["variant"], p["n_layers"], 1, RES)
            if low:
                emit(f"check_{p['variant']}_L{p['n_layers']}_kept_per_token_{p['res']}_vs_{RES}",
                     (p["kept"] / (_img(p["res"]) + M.CAPTION_TOKENS)) / (low["kept"] / t_main))


def table(f: dict, dd: dict, args) -> None:
    """Every variant at 512/768/1024 on the real 34 blocks: the memory model against the measured figures."""
    from turbobooth.trainer import memory as M

    real = _shape(30, 2, args.rank, QWEN3_4B_AND_VAE)
    for variant in args.variants:
        plan = _model_plan(variant)
        for res in (512, 768, 1024):
            est = M.estimate(plan, real, res, 1)
            tag = f"{variant}_{res}"
            model_part = est["total"] - est["encoders"] - est["fixed"]
            emit(f"model_{tag}_total_gib", est["total"] / 1024**3)
            emit(f"model_{tag}_transformer_part_gib", model_part / 1024**3)
            if variant not in dd:
                continue
            measured = real_peak(dd[variant], res)
            emit(f"measured_{tag}_transformer_part_gib", measured / 1024**3)
            emit(f"measured_{tag}_plus_model_encoders_and_fixed_gib",
                 (measured + est["encoders"] + est["fixed"]) / 1024**3)
            emit(f"model_vs_measured_{tag}_transformer_part_pct", 100.0 * (model_part / measured - 1))


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depths", default="2,4,6", help="n_layers of the measured points (n_refiner_layers=1)")
    ap.add_argument("--ablation-depths", default="2,4", help="n_layers for the variants that are no plan")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--check-res", default="512", help="resolutions measured once at the smallest depth, for "
                    "fast, bf16_checkpointed and fp8_checkpointed ('' = none)")
    ap.add_argument("--refiner-check", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure fast at the smallest depth with n_refiner_layers=2")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child-timeout", type=int, default=900)
    ap.add_argument("--save-points", help="write the measured points to this JSON file")
    ap.add_argument("--load-points", help="analyse these saved points instead of measuring")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.depths = [int(d) for d in args.depths.split(",") if d]
    args.ablation_depths = [int(d) for d in args.ablation_depths.split(",") if d]
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; allowed: {', '.join(VARIANTS)}")
    args.check_res = [int(r) for r in args.check_res.split(",") if r]
    return args


def jobs_for(args) -> list:
    jobs = [(v, d, 1, RES) for v in args.variants
            for d in (args.depths if VARIANTS[v][3] else args.ablation_depths)]
    if args.refiner_check and "fast" in args.variants:
        jobs.append(("fast", min(args.depths), 2, RES))
    jobs += [(v, min(args.depths), 1, r) for r in args.check_res
             for v in ("fast", "bf16_checkpointed", "fp8_checkpointed") if v in args.variants]
    return jobs


def main(argv=None) -> None:
    args = parse(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import import_turbobooth

    import_turbobooth()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return
    import torch

    t0 = time.perf_counter()
    emit("setup", f"Z-Image transformer at full width (shipped config), random bf16 weights, n_refiner_layers=1, "
         f"{RES}², batch 1, LoRA rank {args.rank}, {args.steps} steps per point, {args.threads} threads, torch "
         f"{torch.__version__}, one child process per point")
    if args.load_points:
        with open(args.load_points) as fh:
            points = json.load(fh)
        emit("points", f"loaded from {args.load_points}")
    else:
        points = []
        for variant, depth, refiner, res in jobs_for(args):
            points.append(run_point(variant, depth, refiner, res, args))
            emit(f"progress_{variant}_L{depth}_R{refiner}_{res}", f"{points[-1].get('child_s', 0):.0f} s"
                 + (f" ({points[-1]['error']})" if "error" in points[-1] else ""))
    if args.save_points:
        with open(args.save_points, "w") as fh:
            json.dump(points, fh, indent=1)
    report_points(points, args)
    f = fits(points, args)
    dd = derive(points, f, args)
    report_derived(points, f, dd, args)
    table(f, dd, args)
    emit("total_s", time.perf_counter() - t0)


if __name__ == "__main__":
    main()
