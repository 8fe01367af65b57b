"""DreamBooth training: :func:`train` runs one :class:`~.run.Run` (accelerate + diffusers/peft).

Design points (details in :mod:`.run`, :mod:`.state`, :mod:`.adapters` and :mod:`.objective`):

* The cached base pipeline is never changed for good: LoRA training adds a peft adapter through diffusers
  and unloads it afterwards; full fine-tunes (SD1.x) train deep copies.
* Everything random in a step is a pure function of ``(seed, sample position)``, and accelerate's
  ``save_state``/``load_state`` keep the optimizer, schedule and RNG, so a resumed run is bit-identical to an
  uninterrupted one on CPU.
* Checkpoints are ``checkpoint-<step>`` folders, written whole or not at all.
"""

from __future__ import annotations

from collections.abc import Callable

from .cache import _encode_latents, _encode_prompt  # noqa: F401  (reached through this module)
from .config import TrainConfig
from .objective import _Objective  # noqa: F401  (likewise)
from .run import Run, TrainResult


def train(model, config: TrainConfig, instance_images, class_images=None, on_step: Callable | None = None,
          should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Run DreamBooth on ``model`` (a TurboModel); see the module docstring.

    ``instance_images``: PIL images, an IMAGE tensor [B,H,W,C] or a folder.
    ``class_images``: the same, or ``None`` to generate/cache them when prior
    preservation is on. ``on_step(step, total, preview)`` is called after each
    optimizer step (``preview`` is a PIL image on validation steps, else
    ``None``). When ``should_stop()`` returns True the state is saved and a
    result with ``stopped=True`` is returned; running again with
    ``resume="latest"`` continues from there. ``model.lock`` is held throughout.
    """
    run = Run(model, config, on_step=on_step, should_stop=should_stop)
    with model.lock:
        try:
            run.setup(instance_images, class_images)
            while run.global_step < run.config.steps and not run.stopped:
                run.step()
            return run.finish()
        finally:
            run.close()

