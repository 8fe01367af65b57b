"""The DreamBooth training configuration: one frozen, validated dataclass.

Every field is checked in ``__post_init__``; a bad value raises
:class:`~turbobooth.manager.errors.InvalidInputError` naming the value and
what is allowed. Configs round-trip through YAML and JSON; an unknown key is
an error that names the key, so a misspelling is never silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from ..manager.errors import InvalidInputError, check_choices
from ..manager.families import FAMILIES
from ..manager.inputs import MAX_SEED
from ..manager.paths import atomic_file
from .memory import PLANS

MEMORY_CHOICES = ("auto", "none", *PLANS)
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


_CHOICES = {"family": tuple(FAMILIES), "mixed_precision": ("auto", "no", "fp16", "bf16"),
            "lr_scheduler": ("constant", "cosine", "linear"), "train_mode": ("lora", "full"),
            "optimizer": ("adamw", "adamw8bit"), "timestep_sampling": ("uniform", "logit_normal", "shifted"),
            "memory": MEMORY_CHOICES}


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
        check_choices(**{name: (getattr(self, name), allowed) for name, allowed in _CHOICES.items()})
        for name in ("lora_targets", "captions"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        _check(self)

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
            raise InvalidInputError(f"a training config must be a mapping of settings, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, known, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise InvalidInputError(f"unknown training setting(s): {', '.join(hints)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise InvalidInputError(f"the training config is not valid JSON: {e}") from e
        return cls.from_dict(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=True)

    @classmethod
    def from_yaml(cls, text: str) -> TrainConfig:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise InvalidInputError(f"the training config is not valid YAML: {e}") from e
        return cls.from_dict(data or {})

    @classmethod
    def load(cls, path: str) -> TrainConfig:
        """Read a ``.yaml``/``.yml`` or ``.json`` config file."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise InvalidInputError(f"cannot read the training config {path!r}: {e}") from e
        return cls.from_json(text) if path.lower().endswith(".json") else cls.from_yaml(text)

    def save(self, path: str) -> str:
        text = self.to_json() if path.lower().endswith(".json") else self.to_yaml()
        return atomic_file(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _text(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


# Integer settings whose range is not ">= 1": (lowest, highest or None, what the values mean).
_INT_RANGES = {
    **dict.fromkeys(("lr_warmup_steps", "checkpoint_every", "validation_every"), (0, None, "")),
    **dict.fromkeys(("seed", "validation_seed"), (0, MAX_SEED, "")),
    "offload_blocks": (0, None, ": 0 = off, N = transformer blocks kept on the GPU at a time while the other "
                       "blocks' frozen weights wait on the CPU (1 = the least memory)"),
}
# (settings, the rule a value must pass, what the message says is allowed); None passes where the type allows it.
_RULES = (
    (("lr", "prior_loss_weight", "adam_epsilon", "max_grad_norm", "timestep_shift"), lambda v: v > 0,
     "must be a number > 0"),
    (("text_encoder_lr",), lambda v: v > 0, "must be a number > 0 or None (= lr)"),
    (("alpha",), lambda v: v > 0, "must be a number > 0 or None (= rank)"),
    (("adam_beta1", "adam_beta2"), lambda v: 0 <= v < 1, "must be in [0, 1)"),
    (("adam_weight_decay", "min_free_disk_gb", "dop_weight"), lambda v: v >= 0, "must be >= 0"),
    (("ema_decay",), lambda v: 0 <= v < 1, "must be inside (0, 1), e.g. 0.999, or 0 for no EMA"),
    (("caption_dropout",), lambda v: 0 <= v < 1, "must be in [0, 1) (0 = off)"),
    (("trigger",), lambda v: isinstance(v, str) and v == v.strip(),
     "must be one word without surrounding spaces, e.g. 'sks'"),
    (("captions",), lambda v: isinstance(v, tuple) and all(isinstance(c, str) and "\n" not in c for c in v),
     "must be a list of one-line strings, one per instance image"),
    (("cache_to_disk",), lambda v: isinstance(v, bool), "must be true or false"),
    (("instance_prompt",), _text, "must be a non-empty prompt containing the unique token, e.g. 'a photo of sks dog'"),
    (("resume",), _text, "must be None, 'latest' or a checkpoint folder"),
    (("output_dir",), _text, "must be a folder path"),
)
# (refused when, message): settings that do not fit together; {c.<name>} is a setting, {label} the family's name.
_COMBINATIONS = (
    (lambda c: c.timestep_sampling != "uniform" and c.family != "zimage",
     "timestep_sampling={c.timestep_sampling!r} is for Z-Image's flow matching; SD1.x samples its DDPM timesteps "
     "uniformly (leave it 'uniform')"),
    (lambda c: c.dop_weight and not _text(c.dop_class),
     "dop_weight > 0 needs dop_class, the class word that replaces the trigger (e.g. 'dog')"),
    (lambda c: c.dop_weight and c.train_mode != "lora",
     "differential output preservation compares the model with and without the LoRA; it needs train_mode='lora'"),
    (lambda c: c.train_mode == "full" and c.family != "sd1",
     "train_mode='full' is only supported for Stable Diffusion 1.x, not {label}; use train_mode='lora'"),
    (lambda c: c.train_text_encoder and c.family != "sd1",
     "train_text_encoder=True is only supported for Stable Diffusion 1.x; set it to False"),
    (lambda c: c.training_adapter and c.family != "zimage",
     "training_adapter is a Z-Image de-distillation LoRA; leave it empty for Stable Diffusion 1.x"),
    (lambda c: c.training_adapter and c.train_mode != "lora", "training_adapter needs train_mode='lora'"),
    (lambda c: c.with_prior_preservation and not _text(c.class_prompt),
     "class_prompt is empty but with_prior_preservation=True; give the class, e.g. 'a photo of a dog', or turn "
     "prior preservation off"),
    (lambda c: c.validation_every and not _text(c.validation_prompt), "validation_every > 0 needs a validation_prompt"),
    (lambda c: c.offload_blocks and c.family != "zimage",
     "offload_blocks={c.offload_blocks} offloads Z-Image's transformer blocks; {label} trains without it: set "
     "offload_blocks=0"),
    (lambda c: c.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None,
     "optimizer='adamw8bit' needs the bitsandbytes package, which is not installed; install it (pip install "
     "bitsandbytes) or use optimizer='adamw'"),
)


def _check(cfg: TrainConfig) -> None:
    """Types first (integers in range, floats finite: NaN and Inf are refused), then the rules and combinations."""
    step = FAMILIES[cfg.family].size_multiple
    optional = {f.name for f in fields(cfg) if str(f.type).endswith("| None")}
    for f in fields(cfg):
        value, kind = getattr(cfg, f.name), str(f.type)
        if value is None and f.name in optional:
            continue
        if kind.startswith("int"):
            low, high, means = (step, None, "") if f.name == "resolution" else _INT_RANGES.get(f.name, (1, None, ""))
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InvalidInputError(f"{f.name}={value!r} must be an integer >= {low}{means}")
            if high is not None and value > high:
                raise InvalidInputError(f"{f.name}={value!r} must be an integer from {low} to {high}")
        elif kind.startswith("float"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidInputError(f"{f.name}={value!r} must be a number")
            if not math.isfinite(value):
                raise InvalidInputError(f"{f.name}={value!r} must be a finite number (not NaN or infinity)")
    if cfg.resolution % step:
        raise InvalidInputError(
            f"resolution={cfg.resolution} must be a multiple of {step} for {FAMILIES[cfg.family].label}; "
            f"try {max(step, cfg.resolution // step * step)}"
        )
    for names, allowed, text in _RULES:
        for name in names:
            value = getattr(cfg, name)
            if not (value is None and name in optional) and not allowed(value):
                raise InvalidInputError(f"{name}={value!r} {text}")
    for refused, message in _COMBINATIONS:
        if refused(cfg):
            raise InvalidInputError(message.format(c=cfg, label=FAMILIES[cfg.family].label))
