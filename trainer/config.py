"""The DreamBooth training configuration: one frozen, validated dataclass.

Every field is checked in ``__post_init__``; a bad value raises
:class:`~turbobooth.manager.errors.InvalidInputError` naming the value and
what is allowed. Configs round-trip through YAML and JSON; an unknown key is
an error that names the key, so a misspelling is never silently ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, fields
from typing import Any

from ..manager.errors import InvalidInputError
from ..manager.families import FAMILIES

MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "cosine", "linear")
TRAIN_MODES = ("lora", "full")
OPTIMIZERS = ("adamw", "adamw8bit")
# Fields that do not change the training trajectory; a checkpoint made with other values still resumes.
_NON_TRAJECTORY = frozenset(
    {
        "output_dir",
        "resume",
        "checkpoint_every",
        "keep_last",
        "validation_every",
        "validation_prompt",
        "validation_seed",
        "validation_steps",
        "steps",
        "model_source",
        "model_revision",
        "instance_data_dir",
        "class_data_dir",
        "log_tensorboard",
        "min_free_disk_gb",
    }
)


def _err(msg: str) -> InvalidInputError:
    return InvalidInputError(msg)


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one DreamBooth run.

    ``family`` must match the model (``"zimage"`` or ``"sd1"``); ``resolution``
    must be a multiple of the family's step (16 for Z-Image, 8 for SD1.x).
    ``resume`` is ``None``, ``"latest"`` or a checkpoint folder path.
    """

    family: str = "zimage"
    instance_prompt: str = "a photo of sks dog"
    class_prompt: str = ""
    with_prior_preservation: bool = False
    prior_loss_weight: float = 1.0
    num_class_images: int = 100
    class_steps: int | None = None  # sampling steps for class images; None = the family's default (Turbo: 8)
    class_guidance: float | None = None  # None = the family's default (Turbo: 0)
    resolution: int = 1024
    center_crop: bool = True
    train_mode: str = "lora"
    rank: int = 16
    alpha: float | None = None  # None = rank
    lora_targets: tuple = ()  # empty = the family's defaults
    train_text_encoder: bool = False  # SD1.x only: LoRA on CLIP (lora mode) or full text-encoder fine-tune (full mode)
    text_encoder_lr: float | None = None
    steps: int = 500
    lr: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    optimizer: str = "adamw"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 0
    output_dir: str = "turbobooth_output"
    checkpoint_every: int = 0  # 0 = only when stopped and at the end
    keep_last: int = 2
    resume: str | None = None
    validation_every: int = 0
    validation_prompt: str = ""
    validation_seed: int = 0
    validation_steps: int | None = None
    training_adapter: str | None = None  # Z-Image de-distillation LoRA, active only while training
    log_tensorboard: bool = True
    min_free_disk_gb: float = 0.5
    # CLI only: where the model and the instance images come from.
    model_source: str | None = None
    model_revision: str | None = None
    instance_data_dir: str | None = None
    class_data_dir: str | None = None

    def __post_init__(self) -> None:  # noqa: C901 - a flat list of checks reads best
        if self.family not in FAMILIES:
            raise _err(f"family={self.family!r} is not supported; allowed: {', '.join(FAMILIES)}")
        step = FAMILIES[self.family].size_multiple
        if isinstance(self.lora_targets, list):
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        _int(self, "steps", 1)
        _int(self, "rank", 1)
        _int(self, "batch_size", 1)
        _int(self, "gradient_accumulation_steps", 1)
        _int(self, "num_class_images", 1)
        _int(self, "lr_warmup_steps", 0)
        _int(self, "checkpoint_every", 0)
        _int(self, "keep_last", 1)
        _int(self, "validation_every", 0)
        _int(self, "seed", 0)
        _int(self, "validation_seed", 0)
        _int(self, "resolution", step)
        if self.resolution % step:
            raise _err(
                f"resolution={self.resolution} must be a multiple of {step} for {FAMILIES[self.family].label}; "
                f"try {max(step, self.resolution // step * step)}"
            )
        for name in ("lr", "prior_loss_weight", "adam_epsilon", "max_grad_norm"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise _err(f"{name}={value!r} must be a number > 0")
        if self.text_encoder_lr is not None and not (isinstance(self.text_encoder_lr, (int, float)) and self.text_encoder_lr > 0):
            raise _err(f"text_encoder_lr={self.text_encoder_lr!r} must be a number > 0 or None (= lr)")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise _err(f"alpha={self.alpha!r} must be a number > 0 or None (= rank)")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise _err(f"{name}={value!r} must be in [0, 1)")
        if not isinstance(self.adam_weight_decay, (int, float)) or self.adam_weight_decay < 0:
            raise _err(f"adam_weight_decay={self.adam_weight_decay!r} must be >= 0")
        for name, value, allowed in (
            ("mixed_precision", self.mixed_precision, MIXED_PRECISION),
            ("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS),
            ("train_mode", self.train_mode, TRAIN_MODES),
            ("optimizer", self.optimizer, OPTIMIZERS),
        ):
            if value not in allowed:
                raise _err(f"{name}={value!r} is not supported; allowed: {', '.join(allowed)}")
        if self.train_mode == "full" and self.family != "sd1":
            raise _err(
                f"train_mode='full' is only supported for Stable Diffusion 1.x, not {FAMILIES[self.family].label}; "
                "use train_mode='lora'"
            )
        if self.train_text_encoder and self.family != "sd1":
            raise _err("train_text_encoder=True is only supported for Stable Diffusion 1.x; set it to False")
        if self.training_adapter and self.family != "zimage":
            raise _err("training_adapter is a Z-Image de-distillation LoRA; leave it empty for Stable Diffusion 1.x")
        if self.training_adapter and self.train_mode != "lora":
            raise _err("training_adapter needs train_mode='lora'")
        if self.optimizer == "adamw8bit":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError as e:
                raise _err(
                    "optimizer='adamw8bit' needs the bitsandbytes package, which is not installed; "
                    "install it (pip install bitsandbytes) or use optimizer='adamw'"
                ) from e
        if not isinstance(self.instance_prompt, str) or not self.instance_prompt.strip():
            raise _err("instance_prompt must be a non-empty prompt containing the unique token, e.g. 'a photo of sks dog'")
        if self.with_prior_preservation and (not isinstance(self.class_prompt, str) or not self.class_prompt.strip()):
            raise _err(
                "class_prompt is empty but with_prior_preservation=True; give the class, e.g. 'a photo of a dog', "
                "or turn prior preservation off"
            )
        if self.class_steps is not None:
            _int(self, "class_steps", 1)
        if self.validation_steps is not None:
            _int(self, "validation_steps", 1)
        if self.resume is not None and (not isinstance(self.resume, str) or not self.resume.strip()):
            raise _err(f"resume={self.resume!r} must be None, 'latest' or a checkpoint folder")
        if not isinstance(self.output_dir, str) or not self.output_dir.strip():
            raise _err(f"output_dir={self.output_dir!r} must be a folder path")
        if self.validation_every and not self.validation_prompt.strip():
            raise _err("validation_every > 0 needs a validation_prompt")

    # -- derived values -------------------------------------------------------------------

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)

    @property
    def targets(self) -> tuple:
        return tuple(self.lora_targets) or FAMILIES[self.family].lora_targets

    def trajectory_fingerprint(self) -> str:
        """A hash of every setting that changes the weights step by step (for refusing foreign checkpoints)."""
        data = {k: v for k, v in self.to_dict().items() if k not in _NON_TRAJECTORY}
        if self.lr_scheduler != "constant":
            data["steps"] = self.steps  # the schedule's shape depends on the total
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    # -- serialisation --------------------------------------------------------------------

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["lora_targets"] = list(self.lora_targets)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        if not isinstance(data, dict):
            raise _err(f"a training config must be a mapping of settings, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            import difflib

            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, known, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise _err(f"unknown training setting(s): {', '.join(hints)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise _err(f"the training config is not valid JSON: {e}") from e
        return cls.from_dict(data)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=True)

    @classmethod
    def from_yaml(cls, text: str) -> TrainConfig:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise _err(f"the training config is not valid YAML: {e}") from e
        return cls.from_dict(data or {})

    @classmethod
    def load(cls, path: str) -> TrainConfig:
        """Read a ``.yaml``/``.yml`` or ``.json`` config file."""
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise _err(f"cannot read the training config {path!r}: {e}") from e
        if path.lower().endswith(".json"):
            return cls.from_json(text)
        return cls.from_yaml(text)

    def save(self, path: str) -> str:
        text = self.to_json() if path.lower().endswith(".json") else self.to_yaml()
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
        return path


def _int(cfg: TrainConfig, name: str, minimum: int) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _err(f"{name}={value!r} must be an integer >= {minimum}")
