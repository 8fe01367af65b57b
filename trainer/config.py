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
import math
import os
from dataclasses import dataclass, fields
from typing import Any

from ..manager.errors import InvalidInputError, check_choices
from ..manager.families import FAMILIES

MIXED_PRECISION = ("auto", "no", "fp16", "bf16")  # auto: bf16 where the device has it, else fp32
LR_SCHEDULERS = ("constant", "cosine", "linear")
TRAIN_MODES = ("lora", "full")
# trainer.memory.PLANS
MEMORY_CHOICES = ("auto", "none", "fast", "bf16_checkpointed", "fp8_checkpointed", "bf16_offloaded")
TIMESTEP_SAMPLING = ("uniform", "logit_normal", "shifted")
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
        "memory",  # a plan's options (optimizer, checkpointing) are fingerprinted themselves, once resolved
        "offload_encoders",
        "offload_blocks",  # where the frozen weights wait between uses; the same values are computed
        "cache_to_disk",  # the cached tensors are the same whether they come from disk or the encoders
    }
)


SEED_MAX = 2**64 - 1


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
    center_crop: bool = False  # False: aspect-ratio buckets of about resolution**2 pixels (never upscaled)
    caption_dropout: float = 0.0  # share of instance elements trained with an empty prompt
    trigger: str = ""  # what [trigger] in captions becomes; "" = the instance prompt's unique word
    captions: tuple = ()  # one per instance image, in order, replacing .txt captions; "" = the instance prompt
    timestep_sampling: str = "uniform"  # Z-Image: uniform | logit_normal | shifted (see trainer.objective)
    timestep_shift: float = 3.0  # the shift of timestep_sampling="shifted"
    dop_weight: float = 0.0  # differential output preservation: weight of the penalty (0 = off)
    dop_every: int = 1  # run the DOP passes every k steps
    dop_class: str = ""  # the class word that replaces the trigger in DOP prompts, e.g. "dog"
    ema_decay: float = 0.0  # an EMA of the LoRA weights on the CPU, e.g. 0.999 (0 = off)
    memory: str = "auto"  # a memory plan (trainer.memory.PLANS), "auto" (fits the card's free memory) or "none"
    offload_encoders: bool = False  # the VAE and text encoder off the GPU once latents/embeddings are cached
    offload_blocks: int = 0  # Z-Image: frozen block weights on the CPU, this many blocks on the GPU at a time (0 = off)
    cache_to_disk: bool = False  # keep the latents and embeddings in the run folder: a resume skips the encoders
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
    mixed_precision: str = "no"  # "auto" = bf16 where the device supports it, fp32 ("no") on CPU
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

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise _err(f"family={self.family!r} is not supported; allowed: {', '.join(FAMILIES)}")
        for name in ("lora_targets", "captions"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        _check_numbers(self)
        _check_choices(self)
        _check_offload(self)

    # -- derived values -------------------------------------------------------------------

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)

    @property
    def trigger_word(self) -> str:
        """What [trigger] in a caption stands for: ``trigger``, else the instance prompt's first unique word."""
        from .data import unique_words

        found = unique_words(self.instance_prompt, self.class_prompt)
        return self.trigger or (found[0] if found else "")

    @property
    def targets(self) -> tuple:
        return tuple(self.lora_targets) or FAMILIES[self.family].lora_targets

    def trajectory_fingerprint(self) -> str:
        """A hash of every setting that changes the weights step by step (for refusing foreign checkpoints)."""
        data = {k: v for k, v in self.to_dict().items() if k not in _NON_TRAJECTORY}
        if self.lr_scheduler != "constant":
            data["steps"] = self.steps  # the schedule's shape depends on the total
        if not self.captions:
            del data["captions"]  # runs without captions keep the fingerprint (and checkpoints) they had
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    # -- serialisation --------------------------------------------------------------------

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["lora_targets"], out["captions"] = list(self.lora_targets), list(self.captions)
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


def _int(cfg: TrainConfig, name: str, minimum: int, maximum: int | None = None) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _err(f"{name}={value!r} must be an integer >= {minimum}")
    if maximum is not None and value > maximum:
        raise _err(f"{name}={value!r} must be an integer from {minimum} to {maximum}")


def _finite_floats(cfg: TrainConfig) -> None:
    """Every float setting (``float`` or ``float | None``) must be a finite number: NaN and Inf are refused."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if "float" not in str(f.type) or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _err(f"{f.name}={value!r} must be a number")
        if not math.isfinite(value):
            raise _err(f"{f.name}={value!r} must be a finite number (not NaN or infinity)")


def _check_numbers(cfg: TrainConfig) -> None:  # noqa: C901 - a flat list of checks reads best
    """Integers in range, finite positive floats, a resolution that fits the family."""
    step = FAMILIES[cfg.family].size_multiple
    _int(cfg, "steps", 1)
    _int(cfg, "rank", 1)
    _int(cfg, "batch_size", 1)
    _int(cfg, "gradient_accumulation_steps", 1)
    _int(cfg, "num_class_images", 1)
    _int(cfg, "lr_warmup_steps", 0)
    _int(cfg, "checkpoint_every", 0)
    _int(cfg, "keep_last", 1)
    _int(cfg, "validation_every", 0)
    _int(cfg, "seed", 0, SEED_MAX)
    _int(cfg, "validation_seed", 0, SEED_MAX)
    _finite_floats(cfg)
    _int(cfg, "resolution", step)
    if cfg.resolution % step:
        raise _err(
            f"resolution={cfg.resolution} must be a multiple of {step} for {FAMILIES[cfg.family].label}; "
            f"try {max(step, cfg.resolution // step * step)}"
        )
    for name in ("lr", "prior_loss_weight", "adam_epsilon", "max_grad_norm"):
        value = getattr(cfg, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise _err(f"{name}={value!r} must be a number > 0")
    if cfg.text_encoder_lr is not None and not (isinstance(cfg.text_encoder_lr, (int, float)) and cfg.text_encoder_lr > 0):
        raise _err(f"text_encoder_lr={cfg.text_encoder_lr!r} must be a number > 0 or None (= lr)")
    if cfg.alpha is not None and not (isinstance(cfg.alpha, (int, float)) and cfg.alpha > 0):
        raise _err(f"alpha={cfg.alpha!r} must be a number > 0 or None (= rank)")
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(cfg, name)
        if not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise _err(f"{name}={value!r} must be in [0, 1)")
    if not isinstance(cfg.adam_weight_decay, (int, float)) or cfg.adam_weight_decay < 0:
        raise _err(f"adam_weight_decay={cfg.adam_weight_decay!r} must be >= 0")
    if cfg.min_free_disk_gb < 0:
        raise _err(f"min_free_disk_gb={cfg.min_free_disk_gb!r} must be >= 0")
    _int(cfg, "dop_every", 1)
    if cfg.dop_weight < 0 or cfg.timestep_shift <= 0:
        raise _err(f"dop_weight={cfg.dop_weight!r} must be >= 0 and timestep_shift={cfg.timestep_shift!r} > 0")
    if cfg.ema_decay and not 0 < cfg.ema_decay < 1:
        raise _err(f"ema_decay={cfg.ema_decay!r} must be inside (0, 1), e.g. 0.999, or 0 for no EMA")
    if not 0 <= cfg.caption_dropout < 1:
        raise _err(f"caption_dropout={cfg.caption_dropout!r} must be in [0, 1) (0 = off)")
    if not isinstance(cfg.trigger, str) or cfg.trigger != cfg.trigger.strip():
        raise _err(f"trigger={cfg.trigger!r} must be one word without surrounding spaces, e.g. 'sks'")
    if not isinstance(cfg.captions, tuple) or not all(isinstance(c, str) and "\n" not in c for c in cfg.captions):
        raise _err(f"captions={cfg.captions!r} must be a list of one-line strings, one per instance image")
    if not isinstance(cfg.cache_to_disk, bool):
        raise _err(f"cache_to_disk={cfg.cache_to_disk!r} must be true or false")


def _check_choices(cfg: TrainConfig) -> None:  # noqa: C901 - a flat list of checks reads best
    """Allowed names, combinations that make sense, prompts and paths."""
    check_choices(mixed_precision=(cfg.mixed_precision, MIXED_PRECISION), lr_scheduler=(cfg.lr_scheduler, LR_SCHEDULERS),
                  train_mode=(cfg.train_mode, TRAIN_MODES), optimizer=(cfg.optimizer, OPTIMIZERS),
                  timestep_sampling=(cfg.timestep_sampling, TIMESTEP_SAMPLING), memory=(cfg.memory, MEMORY_CHOICES))
    if cfg.timestep_sampling != "uniform" and cfg.family != "zimage":
        raise _err(f"timestep_sampling={cfg.timestep_sampling!r} is for Z-Image's flow matching; SD1.x samples "
                   "its DDPM timesteps uniformly (leave it 'uniform')")
    if cfg.dop_weight and (not isinstance(cfg.dop_class, str) or not cfg.dop_class.strip()):
        raise _err("dop_weight > 0 needs dop_class, the class word that replaces the trigger (e.g. 'dog')")
    if cfg.dop_weight and cfg.train_mode != "lora":
        raise _err("differential output preservation compares the model with and without the LoRA; "
                   "it needs train_mode='lora'")
    if cfg.train_mode == "full" and cfg.family != "sd1":
        raise _err(
            f"train_mode='full' is only supported for Stable Diffusion 1.x, not {FAMILIES[cfg.family].label}; "
            "use train_mode='lora'"
        )
    if cfg.train_text_encoder and cfg.family != "sd1":
        raise _err("train_text_encoder=True is only supported for Stable Diffusion 1.x; set it to False")
    if cfg.training_adapter and cfg.family != "zimage":
        raise _err("training_adapter is a Z-Image de-distillation LoRA; leave it empty for Stable Diffusion 1.x")
    if cfg.training_adapter and cfg.train_mode != "lora":
        raise _err("training_adapter needs train_mode='lora'")
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise _err(
                "optimizer='adamw8bit' needs the bitsandbytes package, which is not installed; "
                "install it (pip install bitsandbytes) or use optimizer='adamw'"
            ) from e
    if not isinstance(cfg.instance_prompt, str) or not cfg.instance_prompt.strip():
        raise _err("instance_prompt must be a non-empty prompt containing the unique token, e.g. 'a photo of sks dog'")
    if cfg.with_prior_preservation and (not isinstance(cfg.class_prompt, str) or not cfg.class_prompt.strip()):
        raise _err(
            "class_prompt is empty but with_prior_preservation=True; give the class, e.g. 'a photo of a dog', "
            "or turn prior preservation off"
        )
    if cfg.class_steps is not None:
        _int(cfg, "class_steps", 1)
    if cfg.validation_steps is not None:
        _int(cfg, "validation_steps", 1)
    if cfg.resume is not None and (not isinstance(cfg.resume, str) or not cfg.resume.strip()):
        raise _err(f"resume={cfg.resume!r} must be None, 'latest' or a checkpoint folder")
    if not isinstance(cfg.output_dir, str) or not cfg.output_dir.strip():
        raise _err(f"output_dir={cfg.output_dir!r} must be a folder path")
    if cfg.validation_every and not cfg.validation_prompt.strip():
        raise _err("validation_every > 0 needs a validation_prompt")


def _check_offload(cfg: TrainConfig) -> None:
    value = cfg.offload_blocks
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _err(f"offload_blocks={value!r} must be an integer >= 0: 0 = off, N = transformer blocks kept on the "
                   "GPU at a time while the other blocks' frozen weights wait on the CPU (1 = the least memory)")
    if value and cfg.family != "zimage":
        raise _err(f"offload_blocks={value} offloads Z-Image's transformer blocks; {FAMILIES[cfg.family].label} "
                   "trains without it: set offload_blocks=0")
