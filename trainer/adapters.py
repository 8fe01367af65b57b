"""The trained LoRA and the training adapter on the shared model, through diffusers and peft.

The cached base is never changed for good: the trainable LoRA is added with diffusers' ``add_adapter`` (and,
for the SD1.x text encoder, peft's ``inject_adapter_in_model``), the optional Z-Image training adapter is
loaded with ``load_lora_weights``, and ``pipe.unload_lora_weights()`` puts the original modules back at the
end. :class:`ModuleGuard` restores requires_grad, train/eval mode, gradient checkpointing and instance
attributes (accelerate's forward wrappers), so the base is bit-identical afterwards.
"""

from __future__ import annotations

import functools
import os
import warnings
from contextlib import contextmanager

from ..manager.errors import InvalidInputError, WrongFamilyError, get_logger

logger = get_logger(__name__)

ADAPTER = "turbobooth_lora"
# Not a substring of ADAPTER: peft selects an adapter's keys by substring.
TRAINING_ADAPTER = "turbobooth_dedistill"
TE_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def gc_enabled(module) -> bool:
    # what diffusers' ``is_gradient_checkpointing`` and transformers 5's ``is_activation_checkpointing`` compute
    # (transformers' old name now warns)
    return any(getattr(m, "gradient_checkpointing", False) for m in module.modules())


class ModuleGuard:
    """Remembers requires_grad, train mode, gradient checkpointing and instance attributes of a module."""

    def __init__(self, module):
        self.module = module
        self.grad = [(p, p.requires_grad) for p in module.parameters()]
        self.training = module.training
        self.gc = gc_enabled(module)
        self.attrs = set(module.__dict__)

    def restore(self) -> None:
        m = self.module
        for p, flag in self.grad:
            p.requires_grad_(flag)
        m.train(self.training)
        if gc_enabled(m) and not self.gc:
            if hasattr(m, "disable_gradient_checkpointing"):
                m.disable_gradient_checkpointing()
            elif hasattr(m, "gradient_checkpointing_disable"):
                m.gradient_checkpointing_disable()
        for key in set(m.__dict__) - self.attrs:  # e.g. accelerate's wrapped forward, peft's config
            del m.__dict__[key]


def _lora_config(rank: int, alpha: float, targets):
    from peft import LoraConfig

    # peft's defaults: no dropout, lora_B zero (the new adapter adds nothing at step 0), no bias
    return LoraConfig(r=int(rank), lora_alpha=float(alpha), target_modules=sorted(set(targets)))


def add_trainable_lora(model, config, text_encoder=None) -> None:
    """The training adapter (if any) plus the trainable ``ADAPTER``; only ``ADAPTER`` gets gradients (peft freezes
    the rest of a module it injects into, and ``activate`` the training adapter)."""
    from peft import inject_adapter_in_model

    denoiser = model.denoiser
    if config.training_adapter:
        from ..manager.lora import attach, load_lora_file

        adapter = load_lora_file(config.training_adapter)
        if adapter.family != model.family:
            raise WrongFamilyError(
                f"training_adapter {os.path.basename(config.training_adapter)!r} is a {adapter.family} LoRA, but the "
                f"model is {model.family}; pick a de-distillation LoRA made for this model"
            )
        attach(model, adapter, TRAINING_ADAPTER)
    try:
        with warnings.catch_warnings():  # a second adapter beside the training adapter is what we want
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            denoiser.add_adapter(_lora_config(config.rank, config.lora_alpha, config.targets), adapter_name=ADAPTER)
    except ValueError as e:  # peft: none of the target modules exist
        raise no_trainable(config) from e
    if text_encoder is not None:
        # transformers 5's add_adapter wants peft >= 0.22 (not released); peft's own injector does the same
        te_config = _lora_config(config.rank, config.lora_alpha, TE_LORA_TARGETS)
        inject_adapter_in_model(te_config, text_encoder, adapter_name=ADAPTER)
    activate(denoiser, with_training_adapter=bool(config.training_adapter))


def activate(denoiser, with_training_adapter: bool, lora_weight: float = 1.0) -> None:
    """``[TRAINING_ADAPTER, ADAPTER]`` while training, ``[ADAPTER]`` for previews; the training adapter stays frozen."""
    from peft.functional import set_requires_grad

    names = [TRAINING_ADAPTER, ADAPTER] if with_training_adapter else [ADAPTER]
    denoiser.set_adapters(names, [1.0] * (len(names) - 1) + [lora_weight])  # peft makes active adapters trainable
    if with_training_adapter:
        set_requires_grad(denoiser, TRAINING_ADAPTER, False)


@contextmanager
def lora_off(denoiser, with_training_adapter: bool):
    """ADAPTER at weight 0 for the ``with`` block (its output then adds exactly nothing), then as in training."""
    activate(denoiser, with_training_adapter, lora_weight=0.0)
    try:
        yield
    finally:
        activate(denoiser, with_training_adapter)


def check_finite(modules) -> bool:
    """True when every trainable parameter of ``modules`` is finite."""
    return all(bool(p.isfinite().all()) for m in modules for p in m.parameters() if p.requires_grad)


def export_lora(model, config, text_encoder, metadata: dict, name: str):
    """The trained ``ADAPTER`` as a TurboLora (peft's ``get_peft_model_state_dict``; never the training adapter)."""
    from peft import get_peft_model_state_dict

    from ..manager.lora import TurboLora

    def weights(module):  # CPU copies: the run goes on changing the live ones
        state = get_peft_model_state_dict(module, adapter_name=ADAPTER)
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    te = weights(text_encoder) if text_encoder is not None else None
    lora = TurboLora.from_peft(model.family, weights(model.denoiser), config.lora_alpha, te, metadata, name)
    lora.check_finite()
    return lora


def metadata(model, config, step: int) -> dict:
    """What the LoRA file records; never a local path."""
    return {
        "trigger": config.instance_prompt,
        "instance_prompt": config.instance_prompt,
        "class_prompt": config.class_prompt,
        "base_model": model.base_name(),
        "base_revision": getattr(model.spec, "revision", None) or "",
        "family": model.family,
        "train_mode": config.train_mode,
        "rank": config.rank,
        "alpha": config.lora_alpha,
        "steps": step,
        "lr": config.lr,
        "lr_scheduler": config.lr_scheduler,
        "prior_preservation": config.with_prior_preservation,
        "prior_loss_weight": config.prior_loss_weight,
        "num_class_images": config.num_class_images if config.with_prior_preservation else 0,
        "resolution": config.resolution,
        "seed": config.seed,
        "training_adapter": os.path.basename(config.training_adapter) if config.training_adapter else "",
    }


def finetuned_pipeline(pipe, unet, text_encoder=None):
    from diffusers import StableDiffusionPipeline

    te = pipe.text_encoder if text_encoder is None else text_encoder
    parts = {**pipe.components, "unet": unet, "text_encoder": te}
    new = StableDiffusionPipeline(**parts, requires_safety_checker=False)
    new.set_progress_bar_config(disable=True)
    return new


def finetuned_model(base, pipe, meta: dict):
    import hashlib
    import json

    from ..manager.spec import TurboModel

    tag = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:12]
    identity = f"{base.identity}|finetune:{tag}"
    return TurboModel(base.spec, base.family, pipe, identity, base.device, base.nbytes, extras={"finetune": meta})


def no_trainable(config) -> InvalidInputError:
    return InvalidInputError(f"no trainable parameters: none of {config.targets} exist in the denoiser")


def warn_turbo(family: str, config) -> None:
    """Once per process: training straight on Z-Image-Turbo erodes its few-step quality."""
    if family == "zimage" and not config.training_adapter:
        _warn_turbo_once()


@functools.cache
def _warn_turbo_once() -> None:
    logger.warning(
        "training a LoRA directly on Z-Image-Turbo erodes its few-step quality; set training_adapter to a "
        "de-distillation LoRA, or train on a de-turbo/base checkpoint"
    )
