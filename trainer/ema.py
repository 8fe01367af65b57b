"""An exponential moving average of the trained weights: diffusers' ``EMAModel``, kept on the CPU.

Its state rides in every checkpoint (``ema.safetensors`` + ``ema.json``, written by accelerate's save-state
hook), so a resumed run continues the same average. The decay ramps up as diffusers' EMAModel does:
``min(decay, (1 + n) / (10 + n))`` after ``n`` updates.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

from ..manager.errors import InvalidInputError

SHADOW = "ema.safetensors"


def _cpu(params) -> list:
    # EMAModel averages only tensors that require grad (it copies the others), so the CPU copies say they do
    return [p.detach().to("cpu").requires_grad_(True) for p in params]


def make(params, decay: float):
    from diffusers.training_utils import EMAModel

    return EMAModel(_cpu(params), decay=float(decay))


def update(ema, params) -> None:
    """One EMA step after an optimizer step."""
    ema.step(_cpu(params))


def register_hooks(accelerator, ema) -> list:
    """Save and load the EMA with accelerate's save_state/load_state (safetensors, never pickle)."""
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, folder):
        if accelerator.is_main_process:
            state = ema.state_dict()
            shadow = state.pop("shadow_params")
            save_file({f"shadow.{i}": t.contiguous() for i, t in enumerate(shadow)}, os.path.join(folder, SHADOW))
            Path(folder, "ema.json").write_text(json.dumps(state), encoding="utf-8")

    def load_hook(models, folder):
        path = os.path.join(folder, SHADOW)
        if not os.path.isfile(path):
            raise InvalidInputError(f"checkpoint {folder!r} has no EMA weights; it was made with ema_decay off")
        shadow = load_file(path)
        state = json.loads(Path(folder, "ema.json").read_text(encoding="utf-8"))
        ema.load_state_dict({**state, "shadow_params": [shadow[f"shadow.{i}"] for i in range(len(shadow))]})

    return [accelerator.register_save_state_pre_hook(save_hook), accelerator.register_load_state_pre_hook(load_hook)]


@contextmanager
def swapped_in(ema, params):
    """The averaged weights in ``params`` for the ``with`` block (to export them), the trained ones after."""
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)
