"""Our LoRA files go through ComfyUI's own LoRA code: every module maps, alpha is honoured.

The files are written by ``turbobooth.manager.lora.save_lora_file`` from adapters
on the same modules the trainer targets. ``lora_keymap_probe.py`` then runs in the
host's Python: it builds ComfyUI's model from the tiny checkpoint with
``comfy.model_detection``, takes the key map from ``comfy.lora.model_lora_keys_unet``
(and ``model_lora_keys_clip`` for SD1.x), loads the file with
``comfy.lora.load_lora`` and applies the patches with a ``ModelPatcher``.
"""

from __future__ import annotations

import json
import os
import subprocess

import comfy_harness as ch
import pytest
import torch
from comfy_harness import unique_prefix

pytestmark = pytest.mark.host

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lora_keymap_probe.py")
RANK, ALPHA = 2, 1.0  # alpha != rank, so a loader that ignored .alpha would scale by 1 instead of 0.5


def _random_adapters(root, targets, seed: int) -> dict:
    """peft-format LoRA tensors for every ``targets`` module of ``root``, random and non-zero."""
    import copy

    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    probe = inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(targets)),
                                    copy.deepcopy(root), "probe")
    shapes = {k: v.shape for k, v in get_peft_model_state_dict(probe, adapter_name="probe").items()}
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=gen) * 0.05 for k, shape in shapes.items()}


def _sd1_lora_file(path: str) -> tuple[str, int, dict]:
    from turbobooth.manager import lora as L
    from turbobooth.manager.families import FAMILIES
    from turbobooth.manager.tiny import build_tiny_sd1

    pipe = build_tiny_sd1(0)
    unet = _random_adapters(pipe.unet, FAMILIES["sd1"].lora_targets, 1)
    te = _random_adapters(pipe.text_encoder, ("q_proj", "k_proj", "v_proj", "out_proj"), 2)
    lora = L.TurboLora.from_peft("sd1", unet, alpha=ALPHA, text_encoder_state_dict=te, metadata={"trigger": "sks"})
    n_modules = len(lora.down_keys)
    # SD1.x's head count is not in the weights; ComfyUI takes it from its SD15 config (diffusers'
    # "attention_head_dim" is really the head count for SD1.x).
    unet_config = {"num_heads": int(pipe.unet.config.attention_head_dim), "num_head_channels": -1}
    return L.save_lora_file(lora, path), n_modules, unet_config


def _zimage_lora_file(path: str) -> tuple[str, int, dict]:
    from turbobooth.manager import lora as L
    from turbobooth.manager.families import FAMILIES
    from turbobooth.manager.tiny import build_tiny_zimage

    transformer = build_tiny_zimage(0).transformer
    sd = _random_adapters(transformer, FAMILIES["zimage"].lora_targets, 3)
    lora = L.TurboLora.from_peft("zimage", sd, alpha=ALPHA, metadata={"trigger": "sks"})
    cfg = transformer.config
    w1 = transformer.layers[0].feed_forward.w1
    # ComfyUI only knows the full-size Z-Image hyper-parameters; give it the tiny ones that
    # are not recoverable from the weights' shapes (head counts, RoPE axes, FFN width rule).
    unet_config = {
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "n_refiner_layers": cfg.n_refiner_layers,
        "axes_dims": list(cfg.axes_dims),
        "axes_lens": list(cfg.axes_lens),
        "rope_theta": float(cfg.rope_theta),
        "norm_eps": float(cfg.norm_eps),
        "z_image_modulation": True,
        "time_scale": float(cfg.t_scale),
        "multiple_of": 1,
        "ffn_dim_multiplier": w1.out_features / cfg.dim,
    }
    return L.save_lora_file(lora, path), len(lora.down_keys), unet_config


def _probe(host: ch.ComfyHost, family: str, model: str, lora: str, unet_config: dict | None = None) -> dict:
    result = os.path.join(host.work_dir, f"probe-{family}-{unique_prefix('r')}.json")
    cmd = [host.python, PROBE, "--comfyui", host.comfyui_dir, "--family", family, "--model", model,
           "--lora", lora, "--result", result]
    if unet_config:
        cmd += ["--unet-config", json.dumps(unet_config)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ch.subprocess_env(), timeout=ch.PROMPT_TIMEOUT,
                          stdin=subprocess.DEVNULL)
    assert os.path.exists(result), f"probe wrote no result (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    with open(result, encoding="utf-8") as f:
        report = json.load(f)
    if report.get("error"):
        pytest.fail(f"ComfyUI probe failed: {report['error']}\n--- output ---\n{proc.stderr[-3000:]}", pytrace=False)
    return report


def _assert_all_mapped(report: dict, n_modules: int) -> None:
    assert len(report["file_modules"]) == n_modules
    assert not report["unmapped_modules"], f"ComfyUI has no key for: {report['unmapped_modules'][:10]}"
    assert not report["not_loaded"], "ComfyUI left LoRA keys unused:\n" + "\n".join(report["not_loaded"][:20])
    # one up, one down and one alpha tensor per module, each used once
    assert report["file_keys"] == 3 * n_modules
    assert report["patches"] == n_modules, "two modules of the file were mapped onto the same weight"
    unfit = {f"diffusion_model.{k}" for k in report["weights_not_loaded"]}
    for module, info in report["modules"].items():
        assert info["target"] not in unfit, f"{module} -> {info['target']}, whose base weight ComfyUI cannot hold"
        assert info["target_exists"], f"{module} -> {info['target']}, which ComfyUI's model does not have"
        assert info["alpha_in_file"] == ALPHA, module
        assert info["alpha_in_patch"] == pytest.approx(ALPHA), f"{module}: ComfyUI did not pick up the file's alpha"


def _assert_applied(report: dict, part_modules: list[str]) -> None:
    """The patched weights moved by exactly alpha/rank * up @ down (so .alpha is honoured numerically)."""
    applied = report["applied"]
    assert report["added_patches"] == len(part_modules)
    for module in part_modules:
        got = applied[module]
        assert isinstance(got, dict), f"{module}: {got}"
        assert got["max_abs_delta"] > 0
        assert got["max_abs_err"] <= 1e-5 + 1e-3 * got["max_abs_delta"], f"{module}: {got}"


def test_sd1_lora_maps_through_comfyui_keys(comfy_host, host_tiny_models, tmp_path):
    path, n_modules, unet_config = _sd1_lora_file(str(tmp_path / "tiny_sd1_lora.safetensors"))
    report = _probe(comfy_host, "sd1", host_tiny_models["sd1_single_file"], path, unet_config)

    _assert_all_mapped(report, n_modules)
    assert not report["weights_not_loaded"], "ComfyUI's model does not fit the tiny U-Net"
    parts = {info["part"] for info in report["modules"].values()}
    assert parts == {"unet", "clip"}, f"expected U-Net and text-encoder modules, got {parts}"
    te = [m for m, info in report["modules"].items() if info["part"] == "clip"]
    assert all(m.startswith("lora_te_") for m in te)
    # the tiny CLIP has 2 layers x 4 projections
    assert len(te) == 8
    unet = [m for m, info in report["modules"].items() if info["part"] == "unet"]
    _assert_applied(report, unet)


def test_zimage_lora_maps_through_comfyui_keys(comfy_host, host_tiny_models, tmp_path):
    path, n_modules, unet_config = _zimage_lora_file(str(tmp_path / "tiny_zimage_lora.safetensors"))
    report = _probe(comfy_host, "zimage", host_tiny_models["zimage_split"]["diffusion_model"], path, unet_config)
    if report.get("unsupported"):
        pytest.skip(f"{report['unsupported']} ({comfy_host.source})")

    _assert_all_mapped(report, n_modules)
    assert report["model_config"] == "ZImage"
    fused = [m for m, info in report["modules"].items() if info["slice"]]
    assert fused and all(m.endswith(("to_q", "to_k", "to_v")) for m in fused), "q/k/v should land in the fused qkv"
    _assert_applied(report, list(report["modules"]))
