"""The DreamBooth training loop (accelerate + peft).

Design points:

* The cached base pipeline is never changed for good. LoRA training injects
  an unmerged peft adapter into the base denoiser (and, for SD1.x, optionally
  the text encoder) and removes it afterwards; requires_grad flags, train/eval
  mode, gradient checkpointing and accelerate's forward wrappers are restored.
  Full fine-tunes (SD1.x) train deep copies and return a new TurboModel.
* Latents and text embeddings are computed once up front. Every training
  element keeps its own prompt embedding: instance images pair with their
  caption (or the instance prompt) and class images with the class prompt.
* Everything random in a step is a pure function of ``(seed, sample
  position)``: the data order (a seeded permutation per epoch), the noise and
  the timesteps. A resumed run therefore continues exactly where the first
  one stopped; together with the optimizer/scheduler state from the
  checkpoint the result is bit-identical to an uninterrupted run on CPU.
* Checkpoints are written by ``accelerator.save_state`` into a temporary
  folder that is renamed to ``checkpoint-<step>`` once complete.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from ..manager.errors import InvalidInputError, WrongFamilyError
from ..manager.families import defaults_for
from .config import TrainConfig

logger = logging.getLogger(__name__)

ADAPTER = "turbobooth_train"
TRAINING_ADAPTER = "turbobooth_training_adapter"
STATE_FILE = "turbobooth_state.json"
TRAINABLE_FILE = "trainable.safetensors"
CHECKPOINT_FORMAT = 1
TE_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
_warned_turbo = False


@dataclass
class TrainResult:
    lora: Any  # TurboLora | None
    model: Any  # TurboModel | None (full fine-tune: a new model; the cached base is untouched)
    loss_plot: Any  # PIL.Image.Image
    losses: list = field(default_factory=list)
    checkpoint_dir: str | None = None
    stopped: bool = False
    step: int = 0
    total_steps: int = 0
    previews: list = field(default_factory=list)


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------


def _position_generator(seed: int, position: int, salt: int = 0):
    import torch

    g = torch.Generator("cpu")
    g.manual_seed((int(seed) * 1_000_003 + int(position) * 7_919 + salt * 104_729) % (2**63 - 1))
    return g


def _epoch_order(seed: int, epoch: int, n: int, salt: int) -> list[int]:
    import torch

    g = _position_generator(seed, epoch, salt)
    return torch.randperm(n, generator=g).tolist()


def data_index(seed: int, position: int, n: int, salt: int = 0) -> int:
    """Which of ``n`` items sits at ``position`` of the endless, epoch-shuffled stream."""
    epoch, offset = divmod(int(position), n)
    return _epoch_order(seed, epoch, n, 11 + salt)[offset]


def check_output_dir(path: str, min_free_gb: float) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{uuid.uuid4().hex[:6]}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise InvalidInputError(
            f"output_dir {path!r} is not writable ({e.strerror or e}); choose a folder you can write to"
        ) from e
    free_gb = shutil.disk_usage(path).free / 1e9
    if free_gb < min_free_gb:
        raise InvalidInputError(
            f"only {free_gb:.2f} GB free in {path!r}; training needs at least {min_free_gb:g} GB for checkpoints. "
            "Free some space or pick another output_dir"
        )
    return path


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    out = []
    if not os.path.isdir(output_dir):
        return out
    for name in os.listdir(output_dir):
        if name.startswith("checkpoint-") and name[len("checkpoint-") :].isdigit():
            path = os.path.join(output_dir, name)
            if os.path.isfile(os.path.join(path, STATE_FILE)):
                out.append((int(name[len("checkpoint-") :]), path))
    return sorted(out)


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


def loss_plot(losses: list[float], width: int = 640, height: int = 360, title: str = "training loss"):
    """A loss-curve image drawn with PIL (raw loss + moving average)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 56, width - 16, 28, height - 36
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    draw.text((left, 8), title, fill=(0, 0, 0))
    vals = [float(v) for v in losses if v is not None and math.isfinite(float(v))]
    if not vals:
        draw.text((left + 10, (top + bottom) // 2), "no steps yet", fill=(120, 120, 120))
        return img
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * abs(lo or 1), hi + 0.5 * abs(hi or 1)

    def xy(i, v):
        x = left + (right - left) * (i / max(1, len(vals) - 1))
        y = bottom - (bottom - top) * ((v - lo) / (hi - lo))
        return x, y

    for frac in (0.0, 0.5, 1.0):
        v = lo + (hi - lo) * frac
        _, y = xy(0, v)
        draw.line([left - 4, y, left, y], fill=(0, 0, 0))
        draw.text((4, y - 6), f"{v:.4g}", fill=(0, 0, 0))
    draw.text((left, bottom + 8), "step 1", fill=(0, 0, 0))
    draw.text((right - 60, bottom + 8), f"step {len(vals)}", fill=(0, 0, 0))
    if len(vals) == 1:
        x, y = xy(0, vals[0])
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(70, 130, 220))
        return img
    draw.line([xy(i, v) for i, v in enumerate(vals)], fill=(150, 180, 235), width=1)
    ema, smooth = vals[0], []
    k = 2.0 / (min(len(vals), 50) / 5 + 1)
    for v in vals:
        ema = ema + k * (v - ema)
        smooth.append(ema)
    draw.line([xy(i, v) for i, v in enumerate(smooth)], fill=(20, 60, 160), width=2)
    return img


class _TensorBoard:
    def __init__(self, folder: str, enabled: bool):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard missing or broken
            logger.warning("tensorboard is not installed; training metrics are not logged to TensorBoard "
                           "(pip install tensorboard to enable it)")
            return
        self.writer = SummaryWriter(log_dir=folder)

    def log(self, step: int, values: dict) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ---------------------------------------------------------------------------
# caching latents and prompt embeddings
# ---------------------------------------------------------------------------


def _encode_latents(pipe, family: str, images: list, device) -> Any:
    import torch

    from .data import pil_to_tensor

    vae = pipe.vae
    out = []
    with torch.no_grad():
        for img in images:
            px = pil_to_tensor(img).unsqueeze(0).to(device=device, dtype=vae.dtype)
            lat = vae.encode(px).latent_dist.mode().float()
            if family == "zimage":
                lat = (lat - vae.config.shift_factor) * vae.config.scaling_factor
            else:
                lat = lat * vae.config.scaling_factor
            out.append(lat[0].cpu())
    return torch.stack(out)


def _encode_prompt(pipe, family: str, prompt: str, device):
    import torch

    with torch.no_grad():
        if family == "zimage":
            max_len = defaults_for("zimage").max_sequence_length
            return pipe._encode_prompt(prompt=[prompt], device=device, max_sequence_length=max_len)[0].float().cpu()
        emb, _ = pipe.encode_prompt(prompt, device, 1, False)
        return emb[0].float().cpu()


def _token_ids(pipe, prompt: str):
    tok = pipe.tokenizer
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    return ids.input_ids[0]


@dataclass
class TrainData:
    """Cached tensors. ``*_prompt`` are indices into ``prompts``/``embeds``/``ids``."""

    inst_latents: Any
    inst_prompt: list
    class_latents: Any = None
    class_prompt: list = field(default_factory=list)
    prompts: list = field(default_factory=list)
    embeds: list = field(default_factory=list)  # one tensor per prompt ([L_i, D] Z-Image, [77, D] SD1)
    ids: list = field(default_factory=list)  # token ids per prompt (only when training the text encoder)


@dataclass
class Batch:
    latents: Any  # [N, C, h, w]
    prompt_index: list  # per element: index into TrainData.prompts
    is_prior: list  # per element
    positions: list  # per element: stream position (noise and timestep are derived from it)


def assemble_batch(data: TrainData, seed: int, micro_index: int, batch_size: int, rank: int, world: int,
                   with_prior: bool) -> Batch:
    """The elements one process trains on at one micro-step; each keeps its own prompt."""
    import torch

    n_inst = data.inst_latents.shape[0]
    first = (micro_index * world + rank) * batch_size
    positions = list(range(first, first + batch_size))
    inst = [data_index(seed, p, n_inst, 0) for p in positions]
    latents = [data.inst_latents[i] for i in inst]
    prompt_index = [data.inst_prompt[i] for i in inst]
    is_prior = [False] * len(inst)
    pos = list(positions)
    if with_prior:
        n_cls = data.class_latents.shape[0]
        cls = [data_index(seed, p, n_cls, 1) for p in positions]
        latents += [data.class_latents[i] for i in cls]
        prompt_index += [data.class_prompt[i] for i in cls]
        is_prior += [True] * len(cls)
        pos += [p + (1 << 40) for p in positions]
    return Batch(torch.stack(latents), prompt_index, is_prior, pos)


# ---------------------------------------------------------------------------
# the loss
# ---------------------------------------------------------------------------


class _Objective:
    """Noise, timesteps and targets per family; everything derived from the element positions."""

    def __init__(self, pipe, family: str, seed: int):
        self.family = family
        self.seed = seed
        if family == "zimage":
            from diffusers import FlowMatchEulerDiscreteScheduler

            sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
            self.num_train_timesteps = int(sched.config.num_train_timesteps)
            self.sigmas = sched.sigmas.float().cpu()
            self.timesteps = sched.timesteps.float().cpu()
        else:
            from diffusers import DDPMScheduler

            self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
            self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
            self.prediction_type = self.scheduler.config.prediction_type
            if self.prediction_type not in ("epsilon", "v_prediction"):
                raise InvalidInputError(
                    f"the model's scheduler predicts {self.prediction_type!r}; training supports 'epsilon' and "
                    "'v_prediction'"
                )

    def draw(self, positions: list, shape) -> tuple:
        import torch

        noises, idx = [], []
        for p in positions:
            g = _position_generator(self.seed, p, 3)
            noises.append(torch.randn(tuple(shape), generator=g, dtype=torch.float32))
            idx.append(int(torch.randint(0, self.num_train_timesteps, (1,), generator=g)))
        return torch.stack(noises), torch.tensor(idx, dtype=torch.long)

    def predict_and_target(self, denoiser, latents, cond, positions, device, dtype) -> tuple:
        """Model prediction and regression target, both float32 on ``device``."""
        import torch

        noise, idx = self.draw(positions, latents.shape[1:])
        x0 = latents.to(device)
        noise = noise.to(device)
        if self.family == "zimage":
            # Flow matching as ZImagePipeline samples it: x_t = (1 - s) x0 + s noise; the model
            # takes t = 1 - s and its negated output is the velocity noise - x0.
            sigma = self.sigmas[idx].to(device).view(-1, 1, 1, 1)
            timesteps = self.timesteps[idx].to(device)
            noisy = (1.0 - sigma) * x0 + sigma * noise
            model_t = (1000.0 - timesteps) / 1000.0
            inputs = list(noisy.to(dtype).unsqueeze(2).unbind(0))
            out = denoiser(inputs, model_t, cond, return_dict=False)[0]
            pred = -torch.stack([o.float() for o in out]).squeeze(2)
            target = noise - x0
            return pred, target
        t = idx.to(device)
        noisy = self.scheduler.add_noise(x0, noise, t)
        pred = denoiser(noisy.to(dtype), t, cond.to(dtype), return_dict=False)[0].float()
        if self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(x0, noise, t)
        else:
            target = noise
        return pred, target


# ---------------------------------------------------------------------------
# model state bookkeeping (so the cached base ends up exactly as it was)
# ---------------------------------------------------------------------------


def _gc_enabled(module) -> bool:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
            if hasattr(type(module), attr) or attr in getattr(module, "__dict__", {}):
                try:
                    return bool(getattr(module, attr))
                except Exception:  # some models raise when the flag is not defined
                    return False
    return False


class _ModuleGuard:
    """Remembers requires_grad, train mode, gradient checkpointing and instance attributes of a module."""

    def __init__(self, module):
        self.module = module
        self.grad = [(p, p.requires_grad) for p in module.parameters()]
        self.training = module.training
        self.gc = _gc_enabled(module)
        self.attrs = set(module.__dict__)

    def restore(self) -> None:
        m = self.module
        for p, flag in self.grad:
            p.requires_grad_(flag)
        m.train(self.training)
        if _gc_enabled(m) and not self.gc:
            if hasattr(m, "disable_gradient_checkpointing"):
                m.disable_gradient_checkpointing()
            elif hasattr(m, "gradient_checkpointing_disable"):
                m.gradient_checkpointing_disable()
        for key in set(m.__dict__) - self.attrs:  # e.g. accelerate's wrapped forward
            if key not in ("_parameters", "_buffers", "_modules"):
                del m.__dict__[key]


def _strip_prefix(name: str) -> str:
    return name[len("module.") :] if name.startswith("module.") else name


# ---------------------------------------------------------------------------
# train()
# ---------------------------------------------------------------------------


def _make_accelerator(config: TrainConfig, cpu: bool):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # Each call (ComfyUI runs many in one process) starts from fresh accelerate state.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    try:
        return Accelerator(mixed_precision=config.mixed_precision, cpu=cpu)
    except (ValueError, RuntimeError) as e:
        raise InvalidInputError(
            f"mixed_precision={config.mixed_precision!r} is not available on this device ({e}); "
            "use 'no' or 'bf16'"
        ) from e


def _metadata(model, config: TrainConfig, step: int) -> dict:
    spec = model.spec
    return {
        "trigger": config.instance_prompt,
        "instance_prompt": config.instance_prompt,
        "class_prompt": config.class_prompt,
        "base_model": getattr(spec, "source", ""),
        "base_revision": getattr(spec, "revision", None) or "",
        "base_identity": model.identity,
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


def _prepare_class_images(model, config: TrainConfig, class_images, accelerator, on_step, should_stop):
    from . import priors
    from .data import load_images

    if class_images is not None:
        return load_images(class_images, config.resolution, config.center_crop, what="class")
    root = config.class_data_dir or os.path.join(config.output_dir, "class_images")
    cache = priors.PriorCache(model, config.class_prompt, seed=config.seed, width=config.resolution,
                              height=config.resolution, steps=config.class_steps, guidance=config.class_guidance,
                              root=root)
    if accelerator.is_main_process:
        cache.ensure(config.num_class_images, on_step=on_step, should_stop=should_stop)
    accelerator.wait_for_everyone()
    return load_images(cache.load(config.num_class_images), config.resolution, config.center_crop, what="class")


def train(model, config: TrainConfig, instance_images, class_images=None, on_step: Callable | None = None,
          should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Run DreamBooth on ``model`` (a TurboModel); see the module docstring.

    ``instance_images``: PIL images, an IMAGE tensor [B,H,W,C] or a folder.
    ``class_images``: the same, or ``None`` to generate/cache them when prior
    preservation is on. ``on_step(step, total, preview)`` is called after each
    optimizer step (``preview`` is a PIL image on validation steps, else
    ``None``). When ``should_stop()`` returns True the state is saved and a
    result with ``stopped=True`` is returned; running again with
    ``resume="latest"`` continues from there.
    """
    import torch

    from ..manager import lora as lora_mod
    from .data import check_instance_prompt, load_images

    global _warned_turbo
    if not isinstance(config, TrainConfig):
        raise InvalidInputError(f"config must be a TrainConfig, got {type(config).__name__}")
    if config.family != model.family:
        raise WrongFamilyError(
            f"the training config is for {config.family!r} but the model is {model.family!r}; "
            f"set family={model.family!r}"
        )
    output_dir = check_output_dir(config.output_dir, config.min_free_disk_gb)
    config = config.replace(output_dir=output_dir)
    pipe = model.pipe
    family = model.family
    device = torch.device(model.device if model.device else "cpu")

    instance = load_images(instance_images, config.resolution, config.center_crop, what="instance")
    check_instance_prompt(config.instance_prompt, config.class_prompt)
    if family == "zimage" and not config.training_adapter and not _warned_turbo:
        _warned_turbo = True
        logger.warning(
            "training a LoRA directly on Z-Image-Turbo erodes its few-step quality; set training_adapter to a "
            "de-distillation LoRA, or train on a de-turbo/base checkpoint"
        )

    accelerator = _make_accelerator(config, cpu=device.type == "cpu")
    rank, world = accelerator.process_index, accelerator.num_processes

    resume_path = resolve_resume(config, output_dir)
    state_meta = None
    if resume_path is not None:
        state_meta = _check_checkpoint(resume_path, model, config)

    class_data = None
    if config.with_prior_preservation:
        class_data = _prepare_class_images(model, config, class_images, accelerator, None, should_stop)
    elif class_images is not None:
        logger.warning("class images were given but with_prior_preservation is off; they are not used")

    # ---- cache latents and prompt embeddings (frozen VAE and, unless trained, text encoder)
    train_te = bool(config.train_text_encoder)
    prompts: list[str] = []

    def prompt_id(p: str) -> int:
        if p not in prompts:
            prompts.append(p)
        return prompts.index(p)

    data = TrainData(
        inst_latents=_encode_latents(pipe, family, [t.image for t in instance], device),
        inst_prompt=[prompt_id(t.caption or config.instance_prompt) for t in instance],
    )
    if class_data is not None:
        data.class_latents = _encode_latents(pipe, family, [t.image for t in class_data], device)
        data.class_prompt = [prompt_id(config.class_prompt) for _ in class_data]
    data.prompts = prompts
    if train_te:
        data.ids = [_token_ids(pipe, p) for p in prompts]
    else:
        data.embeds = [_encode_prompt(pipe, family, p, device) for p in prompts]

    # ---- what is trained
    from accelerate.utils import set_seed

    set_seed(config.seed)
    guards = []
    injected: list[tuple[Any, list[str]]] = []
    result_pipe = None
    if config.train_mode == "full":
        denoiser = copy.deepcopy(model.denoiser)
        text_encoder = copy.deepcopy(pipe.text_encoder) if train_te else pipe.text_encoder
        denoiser.requires_grad_(True)
        if train_te:
            text_encoder.requires_grad_(True)
        else:
            guards.append(_ModuleGuard(text_encoder))
            text_encoder.requires_grad_(False)
    else:
        denoiser = model.denoiser
        text_encoder = pipe.text_encoder
        guards.append(_ModuleGuard(denoiser))
        guards.append(_ModuleGuard(text_encoder))
    vae_guard = _ModuleGuard(pipe.vae)
    guards.append(vae_guard)
    pipe.vae.requires_grad_(False)

    hooks = []
    tb = None
    try:
        if config.train_mode == "lora":
            denoiser.requires_grad_(False)
            text_encoder.requires_grad_(False)
            active = [ADAPTER]
            denoiser_names: list[str] = []
            injected.append((denoiser, denoiser_names))
            if config.training_adapter:
                adapter = lora_mod.load_lora_file(config.training_adapter)
                if adapter.family != "zimage":
                    raise InvalidInputError(f"training_adapter {config.training_adapter!r} is not a Z-Image LoRA")
                denoiser_names.append(TRAINING_ADAPTER)
                lora_mod.attach_lora_weights(denoiser, adapter.state_dict, adapter, TRAINING_ADAPTER, 1.0)
                active = [TRAINING_ADAPTER, ADAPTER]
            denoiser_names.append(ADAPTER)
            lora_mod.inject_lora(denoiser, config.targets, config.rank, config.lora_alpha, ADAPTER)
            lora_mod.set_active_adapters(denoiser, active, trainable=[ADAPTER])
            if train_te:
                injected.append((text_encoder, [ADAPTER]))
                lora_mod.inject_lora(text_encoder, TE_LORA_TARGETS, config.rank, config.lora_alpha, ADAPTER)
                lora_mod.set_active_adapters(text_encoder, [ADAPTER], trainable=[ADAPTER])
        if config.gradient_checkpointing and hasattr(denoiser, "enable_gradient_checkpointing"):
            denoiser.enable_gradient_checkpointing()
        denoiser.train()
        if train_te:
            text_encoder.train()
            if config.gradient_checkpointing and hasattr(text_encoder, "gradient_checkpointing_enable"):
                text_encoder.gradient_checkpointing_enable()

        params = [p for p in denoiser.parameters() if p.requires_grad]
        te_params = [p for p in text_encoder.parameters() if p.requires_grad] if train_te else []
        if not params:
            raise InvalidInputError(f"no trainable parameters: none of {config.targets} exist in the denoiser")
        groups = [{"params": params, "lr": config.lr}]
        if te_params:
            groups.append({"params": te_params, "lr": config.text_encoder_lr or config.lr})
        if config.optimizer == "adamw8bit":
            import bitsandbytes as bnb

            opt_cls = bnb.optim.AdamW8bit
        else:
            opt_cls = torch.optim.AdamW
        optimizer = opt_cls(groups, betas=(config.adam_beta1, config.adam_beta2),
                            weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
        from diffusers.optimization import get_scheduler

        lr_scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer,
                                     num_warmup_steps=config.lr_warmup_steps * world,
                                     num_training_steps=config.steps * world)
        if train_te:
            d_wrapped, te_wrapped, optimizer, lr_scheduler = accelerator.prepare(
                denoiser, text_encoder, optimizer, lr_scheduler)
        else:
            d_wrapped, optimizer, lr_scheduler = accelerator.prepare(denoiser, optimizer, lr_scheduler)
            te_wrapped = None
        trained = [denoiser] + ([text_encoder] if train_te else [])

        def trainable_state() -> dict:
            out = {}
            for i, module in enumerate(trained):
                for name, p in module.named_parameters():
                    if p.requires_grad:
                        out[f"{i}.{_strip_prefix(name)}"] = p.detach().to("cpu").contiguous()
            return out

        def save_hook(models, weights, folder):
            if accelerator.is_main_process:
                from safetensors.torch import save_file

                save_file(trainable_state(), os.path.join(folder, TRAINABLE_FILE))
            while weights:
                weights.pop()

        def load_hook(models, folder):
            from safetensors.torch import load_file

            saved = load_file(os.path.join(folder, TRAINABLE_FILE))
            with torch.no_grad():
                for i, module in enumerate(trained):
                    for name, p in module.named_parameters():
                        key = f"{i}.{_strip_prefix(name)}"
                        if p.requires_grad:
                            if key not in saved:
                                raise InvalidInputError(f"checkpoint {folder!r} lacks {key!r}; it is from another setup")
                            p.copy_(saved[key].to(device=p.device, dtype=p.dtype))
            while models:
                models.pop()

        hooks.append(accelerator.register_save_state_pre_hook(save_hook))
        hooks.append(accelerator.register_load_state_pre_hook(load_hook))

        start_step, losses = 0, []
        if resume_path is not None:
            accelerator.load_state(resume_path)
            start_step = int(state_meta["step"])
            losses = [float(v) for v in state_meta.get("losses", [])][:start_step]
            logger.info("resumed from %s at step %d", resume_path, start_step)

        objective = _Objective(pipe, family, config.seed)
        dtype = model.dtype if config.train_mode == "lora" else denoiser.dtype
        tb = _TensorBoard(os.path.join(output_dir, "logs"), config.log_tensorboard and accelerator.is_main_process)
        accum = config.gradient_accumulation_steps
        last_ckpt = resume_path
        previews = []
        stopped = False
        step = start_step

        def conditioning(batch: Batch):
            if family == "zimage":
                # a fresh list per step, built from the cache: never extended in place
                return [data.embeds[i].to(device=device, dtype=dtype) for i in batch.prompt_index]
            if train_te:
                ids = torch.stack([data.ids[i] for i in batch.prompt_index]).to(device)
                return te_wrapped(ids)[0]
            return torch.stack([data.embeds[i] for i in batch.prompt_index]).to(device)

        def save_checkpoint(at_step: int) -> str:
            final = os.path.join(output_dir, f"checkpoint-{at_step}")
            tmp = os.path.join(output_dir, f".checkpoint-{at_step}.tmp")
            if accelerator.is_main_process and os.path.exists(tmp):
                shutil.rmtree(tmp)
            accelerator.wait_for_everyone()
            accelerator.save_state(tmp)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                meta = {
                    "format": CHECKPOINT_FORMAT,
                    "step": at_step,
                    "total_steps": config.steps,
                    "model_identity": model.identity,
                    "family": family,
                    "train_mode": config.train_mode,
                    "fingerprint": config.trajectory_fingerprint(),
                    "world_size": world,
                    "losses": losses[:at_step],
                    "config": config.to_dict(),
                }
                with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
                    json.dump(meta, f, indent=2, default=str)
                if os.path.exists(final):
                    shutil.rmtree(final)
                os.replace(tmp, final)
                for _, old in list_checkpoints(output_dir)[: -config.keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
            accelerator.wait_for_everyone()
            logger.info("saved checkpoint %s", final)
            return final

        def agreed_stop() -> bool:
            flag = 1.0 if (should_stop is not None and accelerator.is_main_process and should_stop()) else 0.0
            if world > 1:
                t = torch.tensor([flag], device=accelerator.device)
                flag = float(accelerator.reduce(t, reduction="sum").item())
            return flag > 0

        while step < config.steps:
            step_loss = torch.zeros((), dtype=torch.float32)
            for micro in range(accum):
                batch = assemble_batch(data, config.seed, step * accum + micro, config.batch_size, rank, world,
                                       config.with_prior_preservation)
                sync = micro == accum - 1
                ctx = nullcontext() if sync else accelerator.no_sync(d_wrapped)
                with ctx, accelerator.autocast():
                    cond = conditioning(batch)
                    pred, target = objective.predict_and_target(d_wrapped, batch.latents, cond, batch.positions,
                                                                device, dtype)
                    per_elem = ((pred.float() - target.float()) ** 2).reshape(pred.shape[0], -1).mean(1)
                    mask = torch.tensor(batch.is_prior, device=per_elem.device)
                    loss = per_elem[~mask].mean()
                    if config.with_prior_preservation:
                        loss = loss + config.prior_loss_weight * per_elem[mask].mean()
                    loss = loss / accum
                accelerator.backward(loss)
                step_loss += loss.detach().float().cpu()
            if accelerator.sync_gradients and config.max_grad_norm:
                accelerator.clip_grad_norm_(params + te_params, config.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            mean_loss = float(accelerator.reduce(step_loss.to(accelerator.device), reduction="mean").item()) \
                if world > 1 else float(step_loss)
            losses.append(mean_loss)
            tb.log(step, {"loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0]})
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                last_ckpt = save_checkpoint(step)
            preview = None
            if config.validation_every and step % config.validation_every == 0:
                preview = _validation_image(model, config, denoiser, text_encoder, accelerator, injected)
                if preview is not None:
                    previews.append(preview)
            if on_step is not None and accelerator.is_main_process:
                on_step(step, config.steps, preview)
            if step < config.steps and agreed_stop():
                stopped = True
                break
        if step == start_step and step >= config.steps and resume_path is not None:
            logger.info("the checkpoint is already at step %d of %d; nothing to train", step, config.steps)

        if stopped:
            if not (last_ckpt and last_ckpt.endswith(f"checkpoint-{step}")):
                last_ckpt = save_checkpoint(step)
            logger.info("training stopped at step %d of %d; rerun with resume='latest' to continue", step, config.steps)
        elif config.checkpoint_every and step % config.checkpoint_every and step > start_step:
            last_ckpt = save_checkpoint(step)

        # ---- results
        meta = _metadata(model, config, step)
        lora = None
        new_model = None
        if config.train_mode == "lora":
            sd = lora_mod.extract_lora_state_dict(denoiser, ADAPTER)
            te_sd = lora_mod.extract_lora_state_dict(text_encoder, ADAPTER, text_encoder=True) if train_te else {}
            lora = lora_mod.TurboLora(
                family=family, state_dict=sd, rank=config.rank, alpha=config.lora_alpha,
                target_modules=tuple(config.targets), text_encoder_state_dict=te_sd,
                text_encoder_targets=TE_LORA_TARGETS if train_te else (), metadata=meta,
                name=os.path.basename(output_dir.rstrip(os.sep)) or "lora",
            )
        else:
            result_pipe = _finetuned_pipeline(pipe, accelerator.unwrap_model(d_wrapped),
                                              accelerator.unwrap_model(te_wrapped) if train_te else None)
            new_model = _finetuned_model(model, result_pipe, meta)
        plot = loss_plot(losses)
        if accelerator.is_main_process:
            try:
                plot.save(os.path.join(output_dir, "loss.png"))
            except OSError as e:
                logger.warning("could not save the loss plot: %s", e)
        return TrainResult(lora=lora, model=new_model, loss_plot=plot, losses=list(losses), checkpoint_dir=last_ckpt,
                           stopped=stopped, step=step, total_steps=config.steps, previews=previews)
    finally:
        for h in hooks:
            h.remove()
        if tb is not None:
            tb.close()
        for root, names in injected:
            lora_mod.remove_adapters(root, names)
        for g in guards:
            g.restore()
        if config.train_mode == "full":
            for m in (denoiser, text_encoder if train_te else None):
                if m is not None:
                    m.eval()
                    m.requires_grad_(False)
                    for key in [k for k in m.__dict__ if k in ("forward", "_original_forward")]:
                        del m.__dict__[key]
        accelerator.free_memory()


def _check_checkpoint(path: str, model, config: TrainConfig) -> dict:
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


def _validation_image(model, config: TrainConfig, denoiser, text_encoder, accelerator, injected):
    """One preview at the fixed validation prompt and seed, with the training adapter switched off."""
    import torch

    from ..manager import lora as lora_mod

    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return None
    pipe = model.pipe
    if config.train_mode == "full":
        pipe = _finetuned_pipeline(pipe, denoiser, text_encoder if config.train_text_encoder else None)
    d = defaults_for(model.family)
    was_training = [(m, m.training) for m in (denoiser, text_encoder)]
    has_adapter = any(TRAINING_ADAPTER in names for _, names in injected)
    try:
        if has_adapter:
            lora_mod.set_active_adapters(denoiser, [ADAPTER], trainable=[ADAPTER])
        denoiser.eval()
        text_encoder.eval()
        g = torch.Generator("cpu").manual_seed(config.validation_seed)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            kwargs = dict(num_inference_steps=config.validation_steps or d.steps, guidance_scale=d.guidance,
                          height=config.resolution, width=config.resolution, generator=g, output_type="pil")
            if model.family == "zimage":
                kwargs["max_sequence_length"] = d.max_sequence_length
            image = pipe(prompt=[config.validation_prompt], **kwargs).images[0]
    finally:
        if has_adapter:
            lora_mod.set_active_adapters(denoiser, [TRAINING_ADAPTER, ADAPTER], trainable=[ADAPTER])
        for m, flag in was_training:
            m.train(flag)
        accelerator.wait_for_everyone()
    return image


def _finetuned_pipeline(pipe, unet, text_encoder=None):
    from diffusers import StableDiffusionPipeline

    components = dict(pipe.components)
    components["unet"] = unet
    if text_encoder is not None:
        components["text_encoder"] = text_encoder
    components.setdefault("safety_checker", None)
    components.setdefault("feature_extractor", None)
    new = StableDiffusionPipeline(**components, requires_safety_checker=False)
    new.set_progress_bar_config(disable=True)
    return new


def _finetuned_model(base, pipe, meta: dict):
    import hashlib

    from ..manager.model import TurboModel

    tag = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return TurboModel(
        spec=base.spec,
        family=base.family,
        pipe=pipe,
        identity=f"{base.identity}|finetune:{tag}",
        device=base.device,
        nbytes=base.nbytes,
        extras={"finetune": meta},
    )
