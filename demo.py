"""The built-in demo: personalize the tiny Z-Image model, then generate with and without the LoRA.

Runs in about a minute on a CPU with no download: the tiny model is built
from random weights. It goes through the same code as the ComfyUI graph
PriorImageGen -> DreamBoothTrain -> CheckpointSave -> TurboSample.
"""

from __future__ import annotations

import os

INSTANCE_PROMPT = "a photo of sks dog"
CLASS_PROMPT = "a photo of a dog"
SCENES = ["a photo of sks dog on the beach", "a photo of sks dog in the snow"]


def _subject_photos(n: int = 4, size: int = 64):
    """Synthetic 'subject' photos: the same orange blob on varied backgrounds."""
    from PIL import Image, ImageDraw

    photos = []
    for i in range(n):
        bg = (40 + 50 * i, 90, 160 - 30 * i)
        im = Image.new("RGB", (size, size), bg)
        d = ImageDraw.Draw(im)
        o = 4 * i
        d.ellipse((12 + o, 16, 44 + o, 48), fill=(235, 140, 40))
        d.ellipse((36 + o // 2, 8, 52 + o // 2, 24), fill=(200, 110, 30))
        photos.append(im)
    return photos


def run_demo(out: str, seed: int = 0, steps: int = 30):
    """Yield the lines to print (paths of everything written)."""
    from .__main__ import save_png
    from .manager.cache import get_model
    from .manager.sampling import generate
    from .manager.spec import ModelSpec
    from .manager.tiny import write_tiny_models
    from .manager.writers import save_lora
    from .trainer.config import TrainConfig
    from .trainer.priors import PriorCache
    from .trainer.runs import train

    out = os.path.abspath(out)
    size = 64
    models = write_tiny_models(os.path.join(out, "tiny_models"), seed=seed, formats=("diffusers",))
    yield f"tiny model: {models['zimage_diffusers']}"
    model = get_model(ModelSpec(models["zimage_diffusers"]))

    photos = _subject_photos(size=size)
    photo_dir = os.path.join(out, "instance_images")
    os.makedirs(photo_dir, exist_ok=True)
    for i, im in enumerate(photos):
        p = os.path.join(photo_dir, f"sks_{i}.png")
        im.save(p)
        yield f"instance image: {p}"

    # 1. class images (cached by content; a rerun generates nothing)
    prior_root = os.path.join(out, "class_images")
    priors = PriorCache(model, CLASS_PROMPT, seed=seed, width=size, height=size, root=prior_root).load(8)
    yield f"class images: {len(priors)} in {prior_root}"

    # 2. a few training steps with prior preservation
    config = TrainConfig(
        family="zimage", instance_prompt=INSTANCE_PROMPT, class_prompt=CLASS_PROMPT, with_prior_preservation=True,
        num_class_images=len(priors), resolution=size, rank=8, steps=steps, lr=5e-3, seed=seed,
        checkpoint_every=max(steps // 2, 1), output_dir=os.path.join(out, "training"), resume="latest",
        log_tensorboard=False, min_free_disk_gb=0.05,
    )
    result = train(model, config, photos, class_images=priors)
    yield f"training: {result.step} steps, loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}"
    plot = os.path.join(out, "loss_plot.png")
    result.loss_plot.save(plot)
    yield f"loss plot: {plot}"
    if result.checkpoint_dir:
        yield f"checkpoint: {result.checkpoint_dir}"

    # 3. save the LoRA (ComfyUI LoraLoader and diffusers load it)
    lora_path = save_lora(result.lora, os.path.join(out, "loras"), "sks_dog_demo")
    yield f"lora: {lora_path}"

    # 4. generate with and without it
    base = generate(model, SCENES, seed=seed, width=size, height=size)
    tuned = generate(model, SCENES, seed=seed, width=size, height=size, loras=[(result.lora, 1.0)])
    for i, prompt in enumerate(SCENES):
        for tag, res in (("base", base), ("lora", tuned)):
            path = save_png(res.images[i], os.path.join(out, f"{tag}_{i}.png"), {"prompt": prompt, "seed": res.seeds[i]})
            yield f"image ({tag}): {path}"
    diff = float((tuned.images - base.images).abs().mean())
    yield f"mean |lora - base| pixel difference: {diff:.4f}"
