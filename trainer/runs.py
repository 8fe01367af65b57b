"""Training entry points: :func:`train` runs one :class:`~.run.Run` in ``config.output_dir``, and
:func:`train_in_run_folder` picks that folder, so queueing the same training again resumes it and a finished
run is reused from disk.

A run folder is named by what decides the weights: the model identity, the trajectory settings
(:meth:`TrainConfig.trajectory_fingerprint`, so a new validation prompt, checkpoint interval or more steps
keep the folder) and the instance/class image pixels. A finished LoRA run leaves ``final.safetensors`` and
``final.json`` there; asking for the same steps again loads it back without training, even in a new process.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from ..manager.errors import get_logger
from ..manager.paths import atomic_file, safe_name
from .config import TrainConfig
from .run import Run, TrainResult, notify
from .state import list_checkpoints

logger = get_logger(__name__)

FINAL_LORA = "final.safetensors"
FINAL_INFO = "final.json"
FINAL_EMA = "final_ema.safetensors"
STEP_LOG = "steps.jsonl"  # one JSON object per optimizer step: step, total, loss, lr, time
PREVIEW = "preview.png"  # the latest validation image
_RUN_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_. -]{0,150}-[0-9a-f]{10}$")  # safe_name(run_name)-<hash>


def image_bytes(images) -> list[bytes]:
    if images is None:
        return []
    if hasattr(images, "detach"):
        return [images.detach().cpu().contiguous().numpy().tobytes()]
    return [f"{im.mode}{im.size}".encode() + im.tobytes() for im in images]


def run_folder(root: str, run_name: str, model, config: TrainConfig, instance_images, class_images=None) -> str:
    """``<root>/<run_name>-<hash of model, trajectory and images>``."""
    h = hashlib.sha256(model.identity.encode())
    h.update(config.trajectory_fingerprint().encode())
    for i, batch in enumerate((instance_images, class_images)):
        h.update(f"|{i}|".encode())
        for data in image_bytes(batch):
            h.update(data)
    return os.path.join(os.path.abspath(root), f"{safe_name(run_name, 'dreambooth')}-{h.hexdigest()[:10]}")


def _info(model, config: TrainConfig) -> dict:
    return {"model_identity": model.identity, "fingerprint": config.trajectory_fingerprint(), "steps": config.steps}


def load_finished(model, config: TrainConfig) -> TrainResult | None:
    """The finished LoRA of this exact run (same model, trajectory and steps), or None."""
    from ..manager.lora import load_lora_file
    from .plot import loss_plot

    folder = config.output_dir
    try:
        with open(os.path.join(folder, FINAL_INFO), encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    if {k: info.get(k) for k in ("model_identity", "fingerprint", "steps")} != _info(model, config):
        return None
    lora = load_lora_file(os.path.join(folder, FINAL_LORA))
    ema_path = os.path.join(folder, FINAL_EMA)
    lora_ema = load_lora_file(ema_path) if config.ema_decay and os.path.isfile(ema_path) else None
    losses = [float(v) for v in info.get("losses", [])]
    logger.info("reusing the finished run in %s (%d steps); nothing to train", folder, config.steps)
    return TrainResult(lora=lora, model=None, loss_plot=loss_plot(losses), losses=losses,
                       checkpoint_dir=info.get("checkpoint"), step=config.steps, total_steps=config.steps,
                       lora_ema=lora_ema)


def save_finished(model, config: TrainConfig, result: TrainResult) -> None:
    """``final.safetensors`` + ``final.json`` (written last: only a whole pair counts)."""
    from ..manager.lora import save_lora_file

    folder = config.output_dir
    save_lora_file(result.lora, os.path.join(folder, FINAL_LORA))
    if result.lora_ema is not None:
        save_lora_file(result.lora_ema, os.path.join(folder, FINAL_EMA))
    info = dict(_info(model, config), losses=result.losses,
                checkpoint=os.path.basename(result.checkpoint_dir) if result.checkpoint_dir else None)
    text = json.dumps(info, indent=2).encode("utf-8")
    atomic_file(os.path.join(folder, FINAL_INFO), lambda tmp: Path(tmp).write_bytes(text))


class StepLog:
    """An ``on_step`` wrapper that appends each optimizer step to ``<run>/steps.jsonl`` and keeps the latest
    validation image in ``<run>/preview.png``, then calls ``on_step`` (with ``info`` when it takes one).

    Lines are appended whole with one ``write`` (``O_APPEND``), so a reader may read while training runs and
    skips a last line that has no newline yet.
    """

    def __init__(self, folder: str, on_step: Callable | None, keep_until: int) -> None:
        self.folder, self.on_step, self.keep_until = folder, on_step, keep_until
        self.path = os.path.join(folder, STEP_LOG)
        self._started = False

    def __call__(self, step: int, total: int, preview=None, info: dict | None = None) -> None:
        if not self._started:  # the first step (the folder exists by then): drop the steps a resume repeats
            kept = [r for r in _read_rows(self.path) if r["step"] <= self.keep_until]
            text = "".join(json.dumps(r) + "\n" for r in kept).encode("utf-8")
            atomic_file(self.path, lambda tmp: Path(tmp).write_bytes(text))
            self._started = True
        row = {"step": int(step), "total": int(total), "time": round(time.time(), 3), **(info or {})}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if preview is not None:
            try:
                atomic_file(os.path.join(self.folder, PREVIEW), lambda tmp: preview.save(tmp, format="PNG"))
            except OSError as e:
                logger.warning("could not save the validation preview: %s", e)
        notify(self.on_step, step, total, preview, row)


def _read_rows(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return []
    rows = []
    for line in text.split("\n")[:-1]:  # the last piece is empty or a line still being written
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def run_path(root: str, run_id: str, name: str) -> str | None:
    """``<root>/<run_id>/<name>`` if ``run_id`` is a run folder's name (never a path) and the file exists."""
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id) or ".." in run_id:
        return None
    base = os.path.realpath(root)
    folder = os.path.realpath(os.path.join(base, run_id))
    if os.path.dirname(folder) != base or not os.path.isdir(folder):
        return None
    path = os.path.join(folder, name)
    return path if os.path.isfile(path) and os.path.dirname(os.path.realpath(path)) == folder else None


def read_step_log(root: str, run_id: str) -> list[dict] | None:
    """The steps of run ``run_id`` under ``root`` (the last row per step), or None for an unknown id."""
    path = run_path(root, run_id, STEP_LOG)
    if path is None:
        return None
    by_step = {row["step"]: row for row in _read_rows(path)}
    return [by_step[k] for k in sorted(by_step)]


def train(model, config: TrainConfig, instance_images, class_images=None, on_step: Callable | None = None,
          should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Run DreamBooth on ``model`` (a TurboModel) in ``config.output_dir``; see :mod:`.run`.

    ``instance_images``: PIL images, an IMAGE tensor [B,H,W,C] or a folder. ``class_images``: the same, or
    ``None`` to generate/cache them when prior preservation is on. ``on_step(step, total, preview)`` is called
    after each optimizer step (``preview`` is a PIL image on validation steps, else ``None``). When
    ``should_stop()`` returns True the state is saved and a result with ``stopped=True`` is returned; running
    again with ``resume="latest"`` continues from there. ``model.lock`` is held throughout.
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


def train_in_run_folder(model, config: TrainConfig, root: str, run_name: str, instance_images, class_images=None,
                        on_step: Callable | None = None, should_stop: Callable[[], bool] | None = None,
                        on_run: Callable[[str], None] | None = None) -> TrainResult:
    """Train in the run folder for these settings and images: reuse, resume or start, then keep the result.

    ``on_run(folder)`` is called once the folder is known; every step is logged there (:class:`StepLog`).
    """
    folder = run_folder(root, run_name, model, config, instance_images, class_images)
    config = config.replace(output_dir=folder)
    done = load_finished(model, config) if config.train_mode == "lora" else None
    if on_run is not None:
        on_run(folder)
    if done is not None:
        return done
    # resume from the newest checkpoint at or below ``steps`` (fewer steps than a previous run asked for)
    start, resume = ([(0, None)] + [c for c in list_checkpoints(folder) if c[0] <= config.steps])[-1]
    config = config.replace(resume=resume)
    log = StepLog(folder, on_step, keep_until=start)
    result = train(model, config, instance_images, class_images=class_images, on_step=log, should_stop=should_stop)
    if result.lora is not None and not result.stopped:
        save_finished(model, config, result)
    return result
