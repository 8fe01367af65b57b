"""Run inside a ComfyUI host's Python: map a LoRA file through ComfyUI's own LoRA code.

    python lora_keymap_probe.py --comfyui DIR --family sd1|zimage --model FILE --lora FILE --result OUT.json
        [--unet-config JSON]

Builds ComfyUI's model from ``--model`` with ``comfy.model_detection`` (SD1: the
single-file checkpoint's ``model.diffusion_model.`` part; Z-Image: a split
diffusion-model file), collects the key map ComfyUI's LoraLoader would use
(``comfy.lora.model_lora_keys_unet`` and, for SD1, ``model_lora_keys_clip`` on
ComfyUI's SD1 CLIP), runs ``comfy.lora.load_lora`` on the file, then applies the
patches with a ``ModelPatcher`` and records what each patched weight became.
Writes a JSON report; the test makes the assertions. Uses only ComfyUI and torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _file_modules(lora_sd: dict) -> dict:
    """module key -> (up/B key, down/A key) for kohya (lora_up/down) and peft (lora_B/A) names."""
    out = {}
    for key in lora_sd:
        for up, down in ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight")):
            if key.endswith(up):
                module = key[: -len(up)]
                out[module] = (key, module + down)
    return out


def _patch_alpha(patch):
    """Alpha stored in a load_lora patch: a ("lora", (up, down, alpha, mid)) tuple or a weight-adapter object."""
    if isinstance(patch, tuple):
        return patch[1][2]
    weights = getattr(patch, "weights", None)
    return weights[2] if weights is not None else None


def _target(target) -> tuple[str, tuple | None]:
    """A key-map target: a weight name, or (name, (dim, offset, size)) for a slice of a fused weight."""
    if isinstance(target, tuple):
        return target[0], tuple(target[1]) if len(target) > 1 and target[1] is not None else None
    return target, None


def _load_fitting(model, sd: dict, prefix: str) -> list[str]:
    """Load the weights whose shapes fit ComfyUI's model; return the names of those that do not.

    ComfyUI hard-codes a few widths of the full-size models (e.g. Z-Image's timestep MLP)
    that the tiny models do not share; they are not LoRA targets.
    """
    own = model.diffusion_model.state_dict()
    to_load = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    to_load = model.model_config.process_unet_state_dict(to_load)
    fit = {k: v for k, v in to_load.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    model.diffusion_model.load_state_dict(fit, strict=False)
    return sorted(k for k in to_load if k not in fit)


def _sd1(args, comfy, torch):
    import comfy.lora
    import comfy.model_detection
    import comfy.sd1_clip
    import comfy.utils

    sd = comfy.utils.load_torch_file(args.model)
    prefix = "model.diffusion_model."
    config = comfy.model_detection.model_config_from_unet(sd, prefix, use_base_if_no_match=True)
    config.unet_config.update(json.loads(args.unet_config or "{}"))
    model = config.get_model(sd, prefix, device="cpu")
    model.turbobooth_unfit = _load_fitting(model, sd, prefix)
    unet_map = comfy.lora.model_lora_keys_unet(model, {})
    clip = comfy.sd1_clip.SD1ClipModel(device="cpu")
    clip_map = comfy.lora.model_lora_keys_clip(clip, {})
    return {"unet": (model, unet_map), "clip": (clip, clip_map)}, type(config).__name__


def _zimage(args, comfy, torch):
    import comfy.lora
    import comfy.model_detection
    import comfy.supported_models
    import comfy.utils

    sd = comfy.utils.load_torch_file(args.model)
    unet_config = comfy.model_detection.detect_unet_config(sd, "")
    if unet_config is None or unet_config.get("image_model") != "lumina2":
        raise RuntimeError(f"ComfyUI did not detect a Lumina2/Z-Image model: {unet_config}")
    unet_config.update(json.loads(args.unet_config or "{}"))
    config = comfy.supported_models.ZImage(unet_config)
    model = config.get_model(sd, "", device="cpu")
    model.turbobooth_unfit = _load_fitting(model, sd, "")
    unet_map = comfy.lora.model_lora_keys_unet(model, {})
    return {"unet": (model, unet_map)}, type(config).__name__


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfyui", required=True)
    ap.add_argument("--family", choices=("sd1", "zimage"), required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--lora", required=True)
    ap.add_argument("--result", required=True)
    ap.add_argument("--unet-config", default="")
    args = ap.parse_args()

    report: dict = {"ok": False}
    collect = _Collect()
    logging.getLogger().addHandler(collect)
    try:
        sys.path.insert(0, os.path.abspath(args.comfyui))
        os.chdir(args.comfyui)
        sys.argv = ["main.py", "--cpu"]
        import comfy.options

        comfy.options.enable_args_parsing()  # as main.py does; otherwise --cpu is ignored
        import comfy.lora
        import comfy.model_patcher
        import comfy.supported_models
        import comfy.utils
        import torch

        torch.set_grad_enabled(False)  # ComfyUI builds and patches models under no_grad/inference
        report["has_zimage"] = hasattr(comfy.supported_models, "ZImage")
        if args.family == "zimage" and not report["has_zimage"]:
            report["unsupported"] = "this ComfyUI has no Z-Image model support"
            return 0
        parts, config_name = (_sd1 if args.family == "sd1" else _zimage)(args, comfy, torch)
        report["model_config"] = config_name
        report["weights_not_loaded"] = parts["unet"][0].turbobooth_unfit

        lora_sd = comfy.utils.load_torch_file(args.lora)
        modules = _file_modules(lora_sd)
        key_map = {}
        for _, part_map in parts.values():
            key_map.update(part_map)
        patches = comfy.lora.load_lora(lora_sd, key_map)

        report["file_keys"] = len(lora_sd)
        report["file_modules"] = sorted(modules)
        report["unmapped_modules"] = sorted(m for m in modules if m not in key_map)
        report["patches"] = len(patches)
        report["not_loaded"] = [line for line in collect.lines if "lora key not loaded" in line]

        per_module = {}
        for module, (_up_key, down_key) in sorted(modules.items()):
            if module not in key_map:
                continue
            name, sl = _target(key_map[module])
            part = next(p for p, (_, m) in parts.items() if module in m)
            patch = patches.get(key_map[module])
            per_module[module] = {
                "part": part,
                "target": name,
                "target_exists": name in parts[part][0].state_dict(),
                "slice": list(sl) if sl else None,
                "alpha_in_patch": None if patch is None else _patch_alpha(patch),
                "alpha_in_file": float(lora_sd[module + ".alpha"].item()) if module + ".alpha" in lora_sd else None,
                "rank": int(lora_sd[down_key].shape[0]),
            }
        report["modules"] = per_module

        # Apply the patches the way LoraLoader does (ModelPatcher.add_patches + patch_model) and
        # record, per module, how far the patched weight is from W + alpha/rank * up @ down.
        for part, (model, _) in parts.items():
            if part != "unet":
                continue  # ComfyUI's SD1 CLIP has the real 768 width; the tiny file's tensors cannot be applied to it
            before = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
            patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
            own = {k: v for k, v in patches.items() if _target(k)[0] in before}
            added = patcher.add_patches(own, 1.0)
            report["added_patches"] = len(added)
            patcher.patch_model()
            after = {k: v.detach().clone().float() for k, v in patcher.model.state_dict().items()}
            patcher.unpatch_model()
            errors = {}
            for module, info in per_module.items():
                if info["part"] != part:
                    continue
                up_key, down_key = modules[module]
                up, down = lora_sd[up_key].float(), lora_sd[down_key].float()
                alpha = info["alpha_in_file"] if info["alpha_in_file"] is not None else down.shape[0]
                want_delta = (up.flatten(1) @ down.flatten(1)) * (alpha / down.shape[0])
                got_delta = after[info["target"]] - before[info["target"]]
                if info["slice"]:
                    dim, offset, size = info["slice"]
                    got_delta = got_delta.narrow(dim, offset, size)
                got_delta = got_delta.reshape(want_delta.shape) if got_delta.numel() == want_delta.numel() else got_delta
                if tuple(got_delta.shape) != tuple(want_delta.shape):
                    errors[module] = f"shape {tuple(got_delta.shape)} != {tuple(want_delta.shape)}"
                    continue
                err = (got_delta - want_delta).abs().max().item()
                scale = want_delta.abs().max().item()
                errors[module] = {"max_abs_err": err, "max_abs_delta": scale}
            report["applied"] = errors
        report["ok"] = True
    except Exception as e:  # reported to the test, which fails with it
        report["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    finally:
        report["warnings"] = collect.lines[-50:]
        with open(args.result, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
