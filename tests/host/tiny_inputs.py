"""What a workflow needs to run on the tiny models: widget overrides, input pictures, a LoRA file.

Shared by tests/host/test_workflows.py and the browser tests, which set the
same values through the page's widgets instead of in the JSON.
"""

from __future__ import annotations

import os

from PIL import Image
from workflow_api import nodes_of_type, set_widgets

W, H = 64, 48  # tiny runs: multiples of 16
INPAINT_IMAGE = "turbobooth_example.png"


def write_input_images(input_dir: str) -> None:
    """The pictures the LoadImage nodes name: an RGBA image whose transparent part is the inpaint mask."""
    im = Image.new("RGBA", (W, H), (40, 90, 160, 255))
    for x in range(16, 48):
        for y in range(12, 36):
            im.putpixel((x, y), (200, 200, 40, 0))
    im.save(os.path.join(input_dir, INPAINT_IMAGE))
    for i, color in enumerate(((150, 110, 60), (140, 100, 70), (160, 120, 50)), start=1):
        Image.new("RGB", (72, 72), color).save(os.path.join(input_dir, f"subject_{i}.png"))


def write_tiny_lora(loras_dir: str, name: str) -> str:
    """A small random Z-Image LoRA on two attention projections of the tiny transformer."""
    import torch
    from turbobooth.manager.lora import TurboLora, save_lora_file
    from turbobooth.manager.tiny import build_tiny_zimage

    transformer = build_tiny_zimage(0).transformer
    linears = [(n, m) for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(("to_q", "to_v"))]
    assert linears, "the tiny transformer has no to_q/to_v projections"
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for module, lin in linears[:2]:
        sd[f"{module}.lora_A.weight"] = torch.randn(2, lin.in_features, generator=gen) * 0.1
        sd[f"{module}.lora_B.weight"] = torch.randn(lin.out_features, 2, generator=gen) * 0.1
    lora = TurboLora.from_peft("zimage", sd, alpha=2.0, metadata={"trigger": "sks"})
    return save_lora_file(lora, os.path.join(loras_dir, name))


def tokenizer_beside_text_encoder(split: dict) -> None:
    """TurboLoader finds a split-file tokenizer at ``<text encoder stem>_tokenizer``; link the tiny one there."""
    want = os.path.splitext(split["text_encoder"])[0] + "_tokenizer"
    have = split.get("tokenizer")
    if have and not os.path.exists(want) and os.path.realpath(have) != os.path.realpath(want):
        os.symlink(have, want, target_is_directory=True)


def tiny_overrides(tiny: dict, prefix: str) -> dict[str, dict]:
    """node type -> {widget name: value} that point a workflow at the tiny models, small and fast."""
    split = tiny["zimage_split"]
    tokenizer_beside_text_encoder(split)
    return {
        "TurboBoothLoader": dict(
            diffusion_model=os.path.basename(split["diffusion_model"]),
            text_encoder=os.path.basename(split["text_encoder"]),
            vae=os.path.basename(split["vae"]),
            diffusers_model=os.path.basename(tiny["zimage_diffusers"].rstrip(os.sep)),
            # ComfyUI validates every combo, used or not: the unused sources must name existing files too
            checkpoint=os.path.basename(tiny["sd1_single_file"]),
            device="cpu",
        ),
        "TurboBoothSample": dict(width=W, height=H, steps=2),
        "TurboBoothPriorImageGen": dict(count=2, width=W, height=W, steps=2),
        "TurboBoothDreamBoothTrain": dict(steps=2, rank=2, resolution=64, checkpoint_every=0, run_name=prefix),
        "TurboBoothCheckpointSave": dict(name=prefix, overwrite=True),
    }


def point_at_tiny_models(wf: dict, object_info: dict, tiny: dict, prefix: str) -> None:
    """Apply ``tiny_overrides`` to a UI-format workflow; SaveImage prefixes become ``<prefix>_<i>``."""
    for node_type, values in tiny_overrides(tiny, prefix).items():
        set_widgets(wf, object_info, node_type, **values)
    for i, node in enumerate(nodes_of_type(wf, "SaveImage")):
        node["widgets_values"][0] = f"{prefix}_{i}"
