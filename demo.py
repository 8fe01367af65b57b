"""The built-in demo: personalize the tiny Z-Image model, then generate with and without the LoRA.

Runs anywhere in a minute on CPU, with no download: the tiny model is built
from random weights. It exercises the same code paths as the ComfyUI nodes.
"""

from __future__ import annotations

import os


def run_demo(out: str, seed: int = 0, steps: int = 30):
    """Yield the lines to print (paths of everything written)."""
    from .__main__ import save_png
    from .manager.cache import get_model
    from .manager.sampling import generate
    from .manager.spec import ModelSpec
    from .manager.tiny import write_tiny_models

    out = os.path.abspath(out)
    models = write_tiny_models(os.path.join(out, "tiny_models"), seed=seed, formats=("diffusers",))
    yield f"tiny model: {models['zimage_diffusers']}"
    model = get_model(ModelSpec(models["zimage_diffusers"]))
    res = generate(model, ["a photo of a dog on the beach", "a photo of a cat in the snow"], seed=seed, width=64, height=64)
    for i, prompt in enumerate(res.prompts):
        path = save_png(res.images[i], os.path.join(out, f"base_{i}.png"), {"prompt": prompt, "seed": res.seeds[i]})
        yield f"image: {path}"
