"""Memory plans for LoRA training on 12-24 GB cards, and the memory model that chooses between them.

A plan is a set of options, each of which can also be set alone in TrainConfig:

* ``quantize_base``: the frozen denoiser stored in 8 bits (fp8) with bf16 compute, each layer cast as it runs
  (manager.loading.store_weights). It comes from TurboLoader (dtype ``fp8_e4m3fn``): the cached base is shared
  and never quantized behind the user's back, so a plan that needs it asks for that load instead;
* ``gradient_checkpointing``: each block's activations are recomputed in backward instead of kept;
* ``optimizer="adamw8bit"``: bitsandbytes' 8-bit AdamW states;
* ``offload_encoders``: the VAE and the text encoder leave the GPU once latents and embeddings are cached,
  and come back for validation previews;
* ``offload_blocks``: the frozen weights of the transformer blocks wait on the CPU and come to the GPU one group
  of N blocks at a time (:mod:`.offload`); the LoRA and its optimizer state stay on the GPU. It costs two
  host-to-GPU copies of the blocks per step (forward, then backward or checkpointing's recomputation).

``memory="auto"`` reads the training device's free memory (``torch.cuda.mem_get_info``) and takes the first
plan, fastest first, whose estimate fits; on a CPU it takes the fastest. The block-offloading plan is the last:
auto takes it only when no other plan fits. An ``offload_blocks`` set in the config applies to every plan.
The estimate is :func:`estimate`: weights by dtype (counted on an empty model built from the config), LoRA
weights, gradients and optimizer states, activations per token per block with and without checkpointing, and a
fixed overhead.
``benchmarks/bench_memory.py`` measures real steps and prints its figures beside these estimates.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace

from ..manager.errors import InvalidInputError, get_logger

logger = get_logger(__name__)
GB = 1024**3


@dataclass(frozen=True)
class Plan:
    name: str
    quantize_base: bool
    gradient_checkpointing: bool
    optimizer: str
    offload_encoders: bool
    card: str  # what it is meant for
    offload_blocks: int = 0  # transformer blocks on the device at a time, the others' frozen weights on the CPU


# fastest first; auto takes the first that fits
PLANS = {
    "fast": Plan("fast", False, False, "adamw", False, "64 GB and more at 1024²"),
    "bf16_checkpointed": Plan("bf16_checkpointed", False, True, "adamw", True, "24 GB"),
    "fp8_checkpointed": Plan("fp8_checkpointed", True, True, "adamw8bit", True, "12-16 GB"),
    "bf16_offloaded": Plan("bf16_offloaded", False, True, "adamw8bit", True, "8 GB; slower", offload_blocks=1),
}

# Activation bytes per token per block, kept for backward (bf16): about ACT_DIM values of width ``dim`` (norms,
# q/k/v, attention output, residuals, LoRA inputs) and ACT_FFN of width ``ffn`` (the SwiGLU's products and w2's
# input). With checkpointing a block keeps only its input (one ``dim``-wide value) and one block at a time
# recomputes the rest; backward needs about BACKWARD_DIM more ``dim``-wide values per token once. Calibrated
# against benchmarks/bench_memory.py's measured CPU steps (full-width blocks, 2026-12-01): ACT_DIM 26 / ACT_FFN 4
# put the three plans 0.6-4.3 % above the measurement, on the safe side.
ACT_DIM, ACT_FFN, BACKWARD_DIM = 26.0, 4.0, 9.0
FIXED_BYTES = 1.0 * GB  # CUDA context, cuBLAS workspace, allocator slack
CAPTION_TOKENS = 128  # a typical prompt after the chat template (the cap is 512)


@dataclass(frozen=True)
class Shape:
    """What the estimate needs to know about a Z-Image-like denoiser and its encoders."""

    denoiser_params: int
    blocks: int  # main + refiner blocks
    refiners: int  # noise refiner blocks (image tokens only); as many context refiners (caption tokens only)
    dim: int
    ffn: int
    lora_params: int  # trainable parameters of the LoRA at this rank
    encoder_params: int  # text encoder + VAE
    block_params: int = 0  # parameters inside the blocks (what offload_blocks moves)


def shape_of(transformer_config: dict, rank: int, targets: tuple, encoder_params: int) -> Shape:
    """Counts from an empty (meta) model built from the config: exact, and no memory used."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import ZImageTransformer2DModel

    with init_empty_weights():
        model = ZImageTransformer2DModel.from_config(transformer_config)
    lora = sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if hasattr(m, "in_features") and any(name.endswith(t) for t in targets))
    cfg = model.config
    in_blocks = sum(p.numel() for c in model.children() if isinstance(c, torch.nn.ModuleList) for p in c.parameters())
    return Shape(model.num_parameters(), cfg.n_layers + 2 * cfg.n_refiner_layers, cfg.n_refiner_layers, cfg.dim,
                 model.layers[0].feed_forward.w1.out_features, lora, encoder_params, in_blocks)


def estimate(plan: Plan, shape: Shape, resolution: int, batch: int) -> dict:
    """Estimated peak bytes of one training step, by part."""
    image, caption = batch * (resolution // 16) ** 2, batch * CAPTION_TOKENS
    main = shape.blocks - 2 * shape.refiners
    # main blocks see image + caption tokens, noise refiners the image, context refiners the caption
    block_tokens = (main + shape.refiners) * (image + caption)
    per_token = (ACT_DIM * shape.dim + ACT_FFN * shape.ffn) * 2
    if plan.gradient_checkpointing:
        activations = block_tokens * shape.dim * 2 + (image + caption) * per_token
    else:
        activations = block_tokens * per_token
    activations += (image + caption) * BACKWARD_DIM * shape.dim * 2
    resident = shape.denoiser_params  # with offload_blocks N: those outside the blocks and N blocks (N main at most)
    if plan.offload_blocks:
        resident += min(plan.offload_blocks, main) * (shape.block_params // shape.blocks) - shape.block_params
    weights = resident * (1 if plan.quantize_base else 2)
    if plan.quantize_base:  # the per-layer cast keeps the running block's bf16 copy for backward
        weights += 2 * shape.denoiser_params // (shape.blocks if plan.gradient_checkpointing else 1)
    parts = {
        "weights": weights,
        "encoders": 0 if plan.offload_encoders else shape.encoder_params * 2,
        "lora_weights_and_grads": shape.lora_params * 8,
        "optimizer": shape.lora_params * (2 if plan.optimizer == "adamw8bit" else 8),
        "activations": int(activations),
        "fixed": int(FIXED_BYTES),
    }
    parts["total"] = sum(parts.values())
    return parts


def with_offload(plan: Plan, offload_blocks: int) -> Plan:
    """``plan`` with the config's ``offload_blocks`` (0: the plan's own)."""
    return replace(plan, offload_blocks=offload_blocks) if offload_blocks else plan


def choose(free_bytes: float | None, shape: Shape, resolution: int, batch: int,
           offload_blocks: int = 0) -> tuple[Plan, dict]:
    """The fastest plan whose estimate fits ``free_bytes`` (None: no limit, a CPU), or a message saying what fits."""
    for plan in PLANS.values():
        plan = with_offload(plan, offload_blocks)
        est = estimate(plan, shape, resolution, batch)
        if free_bytes is None or est["total"] <= free_bytes:
            return plan, est
    lightest = plan  # the last plan; ``est`` is its estimate now
    res = next(  # 64 px steps down to 256 (or just below)
        (r for r in range(resolution, 192, -64) if estimate(lightest, shape, r, batch)["total"] <= free_bytes), None
    )
    if res:
        hint = f"resolution {res} at batch {batch} fits"
    else:
        hint = "even 256² does not fit: free memory on the card (close other programs) or train on a larger one"
    raise InvalidInputError(
        f"no memory plan fits a {resolution}² batch-{batch} LoRA step in {free_bytes / GB:.1f} GB free: the lightest "
        f"({lightest.name}) needs about {est['total'] / GB:.1f} GB; {hint}"
    )


def resolve(config, model, device):
    """The config with its memory plan's options applied (``memory="none"``: as given), and the estimate logged."""
    import torch

    if config.memory == "none" or model.family != "zimage":
        return config
    enc = sum(p.numel() for m in (model.pipe.text_encoder, model.pipe.vae) for p in m.parameters())
    shape = shape_of(dict(model.denoiser.config), config.rank, config.targets, enc)
    batch = config.batch_size * (2 if config.with_prior_preservation else 1)
    if config.memory == "auto":
        cuda = getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available()
        free = float(torch.cuda.mem_get_info(device)[0]) if cuda else None  # None: a CPU, no limit
        plan, est = choose(free, shape, config.resolution, batch, config.offload_blocks)
    else:
        plan = with_offload(PLANS[config.memory], config.offload_blocks)
        est = estimate(plan, shape, config.resolution, batch)
    eight_bit = any(p.dtype.itemsize == 1 for p in model.denoiser.parameters())
    if plan.quantize_base and not eight_bit:
        raise InvalidInputError(
            f"memory plan {plan.name!r} trains on an 8-bit base: load the model with dtype 'fp8_e4m3fn' in "
            "TurboLoader (the shared base is never quantized behind your back), or choose memory='bf16_checkpointed'")
    blocks = f", offload_blocks {plan.offload_blocks}" if plan.offload_blocks else ""
    logger.info("memory plan %s (%s%s): about %.1f GB peak (%s)", plan.name, plan.card, blocks, est["total"] / GB,
                ", ".join(f"{k} {v / GB:.2f}" for k, v in est.items() if k != "total"))
    return config.replace(gradient_checkpointing=config.gradient_checkpointing or plan.gradient_checkpointing,
                          optimizer="adamw8bit" if plan.optimizer == "adamw8bit" else config.optimizer,
                          offload_encoders=config.offload_encoders or plan.offload_encoders,
                          offload_blocks=plan.offload_blocks)


@contextmanager
def encoders_on(pipe, device, offloaded: bool):
    """With ``offload_encoders`` the VAE and text encoder live on the CPU during training; this brings them to
    ``device`` for the ``with`` block (validation previews) and back."""
    if offloaded:
        move_encoders(pipe, device)
    try:
        yield
    finally:
        if offloaded:
            move_encoders(pipe, "cpu")


def move_encoders(pipe, device) -> None:
    for module in (pipe.text_encoder, pipe.vae):
        module.to(device)
