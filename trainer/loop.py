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

from .adapters import ADAPTER, TRAINING_ADAPTER
from .config import TrainConfig
from .objective import Batch, TrainData, _encode_latents, _encode_prompt, _Objective, assemble_batch, data_index
from .plot import loss_plot
from .run import Run, TrainResult
from .state import STATE_FILE, check_output_dir, list_checkpoints, resolve_resume


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


__all__ = [
    "ADAPTER", "STATE_FILE", "TRAINING_ADAPTER", "Batch", "Run", "TrainData", "TrainResult", "_Objective",
    "_encode_latents", "_encode_prompt", "assemble_batch", "check_output_dir", "data_index", "list_checkpoints",
    "loss_plot", "resolve_resume", "train",
]
