"""Training state on disk, owned by accelerate: the Accelerator, checkpoints, resume, pruning and logging.

* ``accelerator.save_state`` / ``load_state`` write and read the optimizer, the LR schedule and every
  process's RNG state. The LoRA weights go through ``register_save_state_pre_hook`` /
  ``register_load_state_pre_hook`` with peft's ``get_peft_model_state_dict`` / ``set_peft_model_state_dict``,
  as diffusers' ``train_dreambooth_lora*.py`` scripts do; a full fine-tune is saved by accelerate itself.
* A checkpoint is ``checkpoint-<step>`` beside a ``turbobooth_state.json``, built in a temporary folder by
  :func:`~turbobooth.manager.paths.atomic_dir` and renamed: whole or absent. ``ProjectConfiguration(
  total_limit=keep_last)`` sets how many are kept.
* TensorBoard is ``Accelerator(log_with="tensorboard")`` when tensorboard is installed.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile

from ..manager.errors import InvalidInputError, get_logger
from .config import TrainConfig

logger = get_logger(__name__)

STATE_FILE = "turbobooth_state.json"
CHECKPOINT_FORMAT = 2
_CHECKPOINT = re.compile(r"checkpoint-([0-9]+)")
_warned_tensorboard = False


def resolve_precision(choice: str, device) -> str:
    """``auto``: bf16 where the device computes it natively, else fp32 ("no"); CPU always fp32."""
    if choice != "auto":
        return choice
    import torch

    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def make_accelerator(config: TrainConfig, device, output_dir: str):
    """An Accelerator that leaves the model where TurboLoader put it (``device_placement=False``).

    TensorBoard logging needs tensorboard installed; without it a warning is logged once per process.
    """
    global _warned_tensorboard
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration, is_tensorboard_available

    tensorboard = config.log_tensorboard and is_tensorboard_available()
    if config.log_tensorboard and not tensorboard and not _warned_tensorboard:
        _warned_tensorboard = True
        logger.warning("tensorboard is not installed; training metrics are not logged to TensorBoard "
                       "(pip install tensorboard to enable it)")
    precision = resolve_precision(config.mixed_precision, device)
    project = ProjectConfiguration(project_dir=output_dir, total_limit=config.keep_last)  # logs go there too
    # accelerate keeps one AcceleratorState per process and refuses an Accelerator with another mixed_precision
    # or device ("restart your runtime"). ComfyUI runs many trainings in one process, and accelerate 1.15 has no
    # public call to forget the previous run's state; its own test suite uses these two. The process group
    # (PartialState) is kept. This is the only place that touches accelerate internals.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    try:
        return Accelerator(mixed_precision=precision, cpu=device.type == "cpu", device_placement=False,
                           project_config=project, log_with="tensorboard" if tensorboard else None)
    except (ValueError, RuntimeError) as e:
        raise InvalidInputError(
            f"mixed_precision={config.mixed_precision!r} is not available on this device ({e}); "
            "use 'auto', 'no' or 'bf16'"
        ) from e


def check_output_dir(path: str, min_free_gb: float, create: bool = True) -> str:
    """``path`` made absolute, checked to be writable with ``min_free_gb`` free; created when ``create``.

    ``create=False`` checks the nearest existing parent instead, so a run that is cancelled while it caches
    its data leaves no empty folder behind.
    """
    path = existing = os.path.abspath(os.path.expanduser(path))
    try:
        if create:
            os.makedirs(path, exist_ok=True)
            with tempfile.TemporaryFile(dir=path) as probe:  # a real write: permissions, read-only mounts
                probe.write(b"ok")
        else:
            while not os.path.exists(existing) and os.path.dirname(existing) != existing:
                existing = os.path.dirname(existing)
            if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
                raise OSError(errno.EACCES, f"{existing} is not a writable folder")
    except OSError as e:
        raise InvalidInputError(
            f"output_dir {path!r} is not writable ({e.strerror or e}); choose a folder you can write to"
        ) from e
    free_gb = shutil.disk_usage(existing).free / 1e9
    if free_gb < min_free_gb:
        raise InvalidInputError(
            f"only {free_gb:.2f} GB free in {path!r}; training needs at least {min_free_gb:g} GB for checkpoints. "
            "Free some space or pick another output_dir"
        )
    return path


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """``(step, folder)`` of each complete checkpoint in ``output_dir``, oldest first."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    found = [(int(m[1]), os.path.join(output_dir, m[0])) for m in map(_CHECKPOINT.fullmatch, names) if m]
    return sorted((step, path) for step, path in found if os.path.isfile(os.path.join(path, STATE_FILE)))


def resolve_resume(config: TrainConfig, output_dir: str) -> str | None:
    if config.resume is None:
        return None
    if config.resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.info("resume='latest' but %s has no checkpoint yet; starting from step 0", output_dir)
            return None
        return found[-1][1]
    path = config.resume
    if not os.path.isabs(path) and not os.path.isdir(path):
        path = os.path.join(output_dir, path)
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise InvalidInputError(
            f"resume={config.resume!r}: {path!r} is not a complete TurboBooth checkpoint folder "
            f"(no {STATE_FILE}); use 'latest', a checkpoint-<step> folder, or leave resume empty"
        )
    return path


def check_checkpoint(path: str, model, config: TrainConfig) -> dict:
    """The checkpoint's state file, or a clear error when it belongs to another model, setup or format."""
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        meta = json.load(f)
    problems = []
    if meta.get("format") != CHECKPOINT_FORMAT:
        problems.append(f"checkpoint format {meta.get('format')!r} (expected {CHECKPOINT_FORMAT})")
    if meta.get("model_identity") != model.identity:
        problems.append(f"it was made for model {meta.get('model_identity')!r}, not {model.identity!r}")
    if meta.get("family") != model.family or meta.get("train_mode") != config.train_mode:
        problems.append(f"it is a {meta.get('family')}/{meta.get('train_mode')} run, not {model.family}/{config.train_mode}")
    if meta.get("fingerprint") != config.trajectory_fingerprint():
        old = meta.get("config", {})
        new = config.to_dict()
        diff = sorted(k for k in new if k in old and old[k] != new[k] and k not in ("output_dir", "resume"))
        problems.append("its training settings differ" + (f" ({', '.join(diff)})" if diff else ""))
    if problems:
        raise InvalidInputError(
            f"cannot resume from {path!r}: " + "; ".join(problems)
            + ". Use a different output_dir for a new run, or resume=None to start over"
        )
    if int(meta.get("step", 0)) > config.steps:
        raise InvalidInputError(f"checkpoint {path!r} is at step {meta['step']}, beyond steps={config.steps}")
    return meta


def write_checkpoint(accelerator, output_dir: str, step: int, meta: dict) -> str:
    """``accelerator.save_state`` into ``checkpoint-<step>``, atomically, on every process; then prune.

    The main process builds the folder with :func:`atomic_dir` (a failed or cancelled write leaves nothing
    behind, and a full disk is reported with the space needed) and tells the others where to write their RNG
    state.
    """
    from accelerate.utils import broadcast_object_list

    from ..manager.paths import atomic_dir

    final = os.path.join(output_dir, f"checkpoint-{step}")

    def write(tmp: str | None) -> None:  # on every process; tmp is None except on the main one
        accelerator.save_state(broadcast_object_list([tmp])[0])  # the broadcast is a no-op in a single process
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return
        info = os.path.join(tmp, STATE_FILE)
        with open(info, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, default=str)
        # safetensors writes 0600 files; give every file the mode a plain open() got (the umask applies)
        mode = os.stat(info).st_mode & 0o777
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), mode)

    if accelerator.is_main_process:
        atomic_dir(final, write)
        keep = accelerator.project_configuration.total_limit  # accelerate prunes only its automatic names
        if keep:
            for _, old in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    else:
        write(None)
    accelerator.wait_for_everyone()
    logger.info("saved checkpoint %s", final)
    return final


def register_lora_hooks(accelerator, parts: dict, adapter: str) -> list:
    """The hooks that save/load the ``adapter`` LoRA of each of ``parts`` (name -> module) in save/load_state.

    ``parts`` are the models the run prepared, so they are exactly the models accelerate hands the hooks.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    def save_hook(models, weights, folder):
        from safetensors.torch import save_file

        if accelerator.is_main_process:
            for name, module in parts.items():
                sd = get_peft_model_state_dict(module, adapter_name=adapter)
                save_file({k: v.detach().to("cpu").contiguous() for k, v in sd.items()},
                          os.path.join(folder, f"lora_{name}.safetensors"))
        weights.clear()  # our LoRA files replace accelerate's full model files

    def load_hook(models, folder):
        from safetensors.torch import load_file

        models.clear()  # the LoRA files below stand in for the full model files accelerate would load
        for name, module in parts.items():
            path = os.path.join(folder, f"lora_{name}.safetensors")
            expected = set(get_peft_model_state_dict(module, adapter_name=adapter))
            saved = load_file(path) if os.path.isfile(path) else {}
            if set(saved) != expected:
                raise InvalidInputError(f"checkpoint {folder!r} does not hold this run's {name} LoRA; it is from "
                                        "another setup")
            set_peft_model_state_dict(module, saved, adapter_name=adapter)

    return [accelerator.register_save_state_pre_hook(save_hook), accelerator.register_load_state_pre_hook(load_hook)]
