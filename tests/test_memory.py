"""Memory plans: the memory model at real Z-Image size (meta tensors, nothing allocated) and the planner's choices."""

from __future__ import annotations

import pytest
from turbobooth.manager.errors import InvalidInputError
from turbobooth.manager.families import ZIMAGE
from turbobooth.manager.formats import shipped_config
from turbobooth.trainer import memory as M

GB = M.GB
QWEN3_4B_AND_VAE = 4_022_468_096 + 83_819_683  # Qwen3-4B without lm_head, and the Flux VAE


@pytest.fixture(scope="module")
def real():
    return M.shape_of(shipped_config("zimage", "transformer"), 16, ZIMAGE.lora_targets, QWEN3_4B_AND_VAE)


def test_real_shape_counts(real):
    assert 6.0e9 < real.denoiser_params < 6.4e9  # Z-Image's 6.15B transformer
    assert real.blocks == 34 and real.dim == 3840 and real.ffn == 10240
    assert real.lora_params == 34 * 16 * (4 * 2 * 3840 + 3 * (3840 + 10240))  # rank 16: q/k/v/out and SwiGLU


def test_estimates_are_ordered_and_grow_with_resolution(real):
    totals = [M.estimate(p, real, 1024, 1)["total"] for p in M.PLANS.values()]
    assert totals == sorted(totals, reverse=True), "plans go from fastest (heaviest) to lightest"
    for plan in M.PLANS.values():
        assert M.estimate(plan, real, 512, 1)["total"] < M.estimate(plan, real, 1024, 1)["total"]
    light = M.estimate(M.PLANS["fp8_checkpointed"], real, 1024, 1)
    # 8-bit weights, plus the bf16 copy of the one block that the per-layer cast keeps for backward
    assert light["weights"] == real.denoiser_params + 2 * real.denoiser_params // real.blocks and light["encoders"] == 0
    assert M.estimate(M.PLANS["bf16_checkpointed"], real, 1024, 1)["weights"] == 2 * real.denoiser_params


@pytest.mark.parametrize("free_gb, resolution, expected", [
    (80, 1024, "fast"), (24, 1024, "bf16_checkpointed"), (14, 1024, "fp8_checkpointed"),
    (12, 768, "fp8_checkpointed"), (None, 1024, "fast"),
    (10, 1024, "fp8_checkpointed"), (9, 1024, "bf16_offloaded"), (6, 1024, "bf16_offloaded"),
    (3, 512, "bf16_offloaded"),
])
def test_planner_takes_the_fastest_plan_that_fits(real, free_gb, resolution, expected):
    plan, est = M.choose(None if free_gb is None else free_gb * GB, real, resolution, 1)
    assert plan.name == expected
    if free_gb is not None:
        assert est["total"] <= free_gb * GB


def test_targets_the_issue_states(real):
    """The lightest plan fits a 1024² rank-16 step in 16 GB; bf16 with checkpointing in 24 GB (by the model)."""
    assert M.estimate(M.PLANS["fp8_checkpointed"], real, 1024, 1)["total"] <= 16 * GB
    assert M.estimate(M.PLANS["bf16_checkpointed"], real, 1024, 1)["total"] <= 24 * GB


def test_a_plan_that_cannot_fit_says_what_would(real):
    with pytest.raises(InvalidInputError, match=r"no memory plan fits a 1024² .* 3.0 GB free.*bf16_offloaded"):
        M.choose(3 * GB, real, 1024, 1)
    with pytest.raises(InvalidInputError, match="resolution .* fits"):
        M.choose(9.5 * GB, real, 2048, 1)


def test_quantized_plan_asks_for_an_8_bit_load(tmp_path):
    from turbobooth.manager.spec import ModelSpec, TurboModel
    from turbobooth.manager.tiny import build_tiny_zimage
    from turbobooth.trainer.config import TrainConfig

    model = TurboModel(ModelSpec("tiny"), "zimage", build_tiny_zimage(0), "tiny")
    cfg = TrainConfig(resolution=32, output_dir=str(tmp_path), memory="fp8_checkpointed")
    with pytest.raises(InvalidInputError, match="fp8_e4m3fn"):
        M.resolve(cfg, model, "cpu")
    resolved = M.resolve(cfg.replace(memory="bf16_checkpointed"), model, "cpu")
    assert resolved.gradient_checkpointing and resolved.offload_encoders and resolved.optimizer == "adamw"
    assert M.resolve(cfg.replace(memory="auto"), model, "cpu") == cfg.replace(memory="auto")  # CPU: fastest plan
    with pytest.raises(InvalidInputError, match="memory"):
        TrainConfig(memory="tiny_card")


def test_offloaded_blocks_leave_one_group_of_weights_on_the_card(real):
    """The blocks hold all but ~12M of Z-Image's parameters; with offload_blocks N the card keeps the rest and N
    blocks (the activations, LoRA and optimizer terms do not change)."""
    assert real.denoiser_params - 12_000_000 < real.block_params < real.denoiser_params
    per_block = real.block_params // real.blocks
    outside = real.denoiser_params - real.block_params
    offloaded = M.estimate(M.PLANS["bf16_offloaded"], real, 1024, 1)
    checkpointed = M.estimate(M.PLANS["bf16_checkpointed"], real, 1024, 1)
    assert offloaded["weights"] == 2 * (outside + per_block)
    assert offloaded["activations"] == checkpointed["activations"]
    four = M.estimate(M.with_offload(M.PLANS["bf16_checkpointed"], 4), real, 1024, 1)
    assert four["weights"] == 2 * (outside + 4 * per_block) and four["optimizer"] == checkpointed["optimizer"]
    # more blocks per group than main blocks: one list at a time is the most the card holds
    many = M.estimate(M.with_offload(M.PLANS["bf16_checkpointed"], 99), real, 1024, 1)
    assert many["weights"] == 2 * (outside + 30 * per_block) < 2 * real.block_params
    # an 8-bit base: its 8-bit group plus the running block's bf16 copy
    fp8 = M.estimate(M.with_offload(M.PLANS["fp8_checkpointed"], 1), real, 1024, 1)
    assert fp8["weights"] == outside + per_block + 2 * real.denoiser_params // real.blocks


def test_offload_blocks_from_the_config_applies_to_every_plan(real):
    """auto takes the block-offloading plan only when nothing else fits; a config's offload_blocks offloads in the
    fastest plan that then fits (here bf16 with checkpointing, on an 8 GB card at 1024²)."""
    assert M.choose(8 * GB, real, 1024, 1)[0].name == "bf16_offloaded"
    plan, est = M.choose(8 * GB, real, 1024, 1, offload_blocks=2)
    assert (plan.name, plan.offload_blocks) == ("bf16_checkpointed", 2) and est["total"] <= 8 * GB
    assert M.choose(None, real, 1024, 1, offload_blocks=2)[0] == M.with_offload(M.PLANS["fast"], 2)
    assert M.with_offload(M.PLANS["bf16_offloaded"], 0).offload_blocks == 1


def test_resolve_turns_on_block_offload(tmp_path):
    from turbobooth.manager.spec import ModelSpec, TurboModel
    from turbobooth.manager.tiny import build_tiny_zimage
    from turbobooth.trainer.config import TrainConfig

    model = TurboModel(ModelSpec("tiny"), "zimage", build_tiny_zimage(0), "tiny")
    cfg = TrainConfig(resolution=32, output_dir=str(tmp_path), memory="bf16_offloaded")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(InvalidInputError, match="bitsandbytes"):
            M.resolve(cfg, model, "cpu")
    else:
        resolved = M.resolve(cfg, model, "cpu")
        assert resolved.offload_blocks == 1 and resolved.gradient_checkpointing and resolved.optimizer == "adamw8bit"
        assert M.resolve(cfg.replace(offload_blocks=3), model, "cpu").offload_blocks == 3
    assert M.resolve(cfg.replace(memory="fast", offload_blocks=2), model, "cpu").offload_blocks == 2
    assert M.resolve(cfg.replace(memory="auto"), model, "cpu").offload_blocks == 0  # a CPU: the fastest plan
    assert M.resolve(cfg.replace(memory="none", offload_blocks=2), model, "cpu").offload_blocks == 2
