"""One DreamBooth training run: :class:`Run` with ``setup``, ``step``, ``checkpoint`` and ``finish``, driven by
:func:`~.runs.train`.

accelerate owns the state (optimizer, schedule, RNG, checkpoints, logging; see :mod:`.state`); diffusers and
peft own the adapters (see :mod:`.adapters`). The shared model stays on the device TurboLoader chose (with
``offload_blocks`` its blocks' frozen weights wait on the CPU during the run, see :mod:`.offload`), and the
caller holds ``model.lock`` for the whole run so sampling never touches the model meanwhile.

* The cached base pipeline is never changed for good: LoRA training adds a peft adapter through diffusers
  and unloads it afterwards; full fine-tunes (SD1.x) train deep copies and return a new TurboModel.
* Everything random in a step is a pure function of ``(seed, sample position)`` (:mod:`.objective`), and
  accelerate's ``save_state``/``load_state`` keep the optimizer, schedule and RNG, so a resumed run is
  bit-identical to an uninterrupted one on CPU.
* Checkpoints are ``checkpoint-<step>`` folders, written whole or not at all.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from ..manager.errors import InvalidInputError, WrongFamilyError, get_logger
from ..manager.families import defaults_for
from . import adapters as A
from . import cache as C
from . import ema as E
from . import memory as M
from . import offload as O
from . import state as S
from .config import TrainConfig
from .objective import SEED_SPACE, _Objective, assemble_batch
from .plot import save_loss_plot

logger = get_logger(__name__)


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
    lora_ema: Any = None  # the EMA of the LoRA weights, when ema_decay is on


class Run:
    """One run: ``setup``, ``step`` until done or stopped, ``finish``, then ``close`` (as :func:`~.runs.train` does)."""

    def __init__(self, model, config: TrainConfig, on_step: Callable | None = None,
                 should_stop: Callable[[], bool] | None = None):
        import torch

        if not isinstance(config, TrainConfig):
            raise InvalidInputError(f"config must be a TrainConfig, got {type(config).__name__}")
        if config.family != model.family:
            raise WrongFamilyError(
                f"the training config is for {config.family!r} but the model is {model.family!r}; "
                f"set family={model.family!r}"
            )
        self.output_dir = S.check_output_dir(config.output_dir, config.min_free_disk_gb, create=False)
        self.device = torch.device(model.device or "cpu")
        self.config = M.resolve(config.replace(output_dir=self.output_dir), model, self.device)
        self.model, self.pipe, self.family = model, model.pipe, model.family
        self.on_step, self.should_stop = on_step, should_stop
        self.lora_mode = config.train_mode == "lora"
        self.train_te = bool(config.train_text_encoder)
        self.accelerator = None
        self.global_step = self.start_step = 0
        self.losses: list[float] = []
        self.previews: list = []
        self.trained: list = []  # the modules that get gradients
        self.stopped = False
        self.last_checkpoint: str | None = None
        self._guards: list = []
        self._hooks: list = []
        self._adapters = self._logging = False
        self.ema = None
        self._offloaded = False

    # -- setup ----------------------------------------------------------------------------

    def setup(self, instance_images, class_images=None) -> None:
        """Images, accelerator, cached latents, adapters, optimizer; loads the checkpoint when resuming."""
        from accelerate.utils import set_seed

        from .data import check_instance_prompt, class_train_images, load_images, with_captions

        cfg, multiple = self.config, defaults_for(self.family).size_multiple  # bucket sides
        instance = with_captions(load_images(instance_images, cfg.resolution, cfg.center_crop, what="instance",
                                             multiple=multiple), cfg.captions)
        check_instance_prompt(cfg.instance_prompt, cfg.class_prompt)
        A.warn_turbo(self.family, cfg)
        self.accelerator = acc = S.make_accelerator(cfg, self.device, self.output_dir)
        self.rank, self.world = acc.process_index, acc.num_processes
        resume_path = S.resolve_resume(cfg, self.output_dir)
        resume_meta = S.check_checkpoint(resume_path, self.model, cfg) if resume_path else None
        class_data = class_train_images(self.model, cfg, self.output_dir, acc, class_images, self.should_stop,
                                        multiple)
        self.data = C.train_data(self.pipe, self.family, self.model.identity, cfg, instance, class_data, self.device,
                                 self.should_stop, self.output_dir if cfg.cache_to_disk else None, acc.is_main_process)
        self._offloaded = cfg.offload_encoders and self.device.type == "cuda"
        if self._offloaded:  # latents and embeddings are cached: the VAE and text encoder leave the GPU
            M.move_encoders(self.pipe, "cpu")
        set_seed(cfg.seed % 2**32)  # numpy takes 32-bit seeds only
        self._trainables()
        self._optimizer()
        if resume_path is not None:
            acc.load_state(resume_path)
            self.global_step = self.start_step = int(resume_meta["step"])
            self.losses = [float(v) for v in resume_meta.get("losses", [])][: self.start_step]
            self.last_checkpoint = resume_path
            logger.info("resumed from %s at step %d", resume_path, self.start_step)
        self._hooks += O.enable(self.denoiser, cfg.offload_blocks, self.device, self.optim)  # frozen blocks to the CPU
        S.check_output_dir(self.output_dir, cfg.min_free_disk_gb)  # created now that the data is cached
        self.objective = _Objective(self.pipe, self.family, cfg.seed, cfg.timestep_sampling, cfg.timestep_shift)
        self.dtype = self.model.dtype if self.lora_mode else self.denoiser.dtype
        self._logging = bool(acc.log_with)
        if self._logging:  # the settings as hyper-parameters: plain values only
            acc.init_trackers("logs", config={k: v for k, v in cfg.to_dict().items()
                                              if isinstance(v, (int, float, str, bool))})

    def _trainables(self) -> None:
        """What is trained: adapters on the shared modules (LoRA) or deep copies (full); guards for the rest."""
        cfg, pipe, guard = self.config, self.pipe, self._guards
        guard.append(A.ModuleGuard(pipe.vae))
        pipe.vae.requires_grad_(False)
        if self.lora_mode:
            self.denoiser, self.text_encoder = self.model.denoiser, pipe.text_encoder
            guard += [A.ModuleGuard(self.denoiser), A.ModuleGuard(self.text_encoder)]
            self._adapters = True
            A.add_trainable_lora(self.model, cfg, self.text_encoder if self.train_te else None)
        else:
            self.denoiser = copy.deepcopy(self.model.denoiser).requires_grad_(True)
            self.text_encoder = copy.deepcopy(pipe.text_encoder) if self.train_te else pipe.text_encoder
            if not self.train_te:
                guard.append(A.ModuleGuard(self.text_encoder))
            self.text_encoder.requires_grad_(self.train_te)
        self.trained = [self.denoiser] + ([self.text_encoder] if self.train_te else [])
        for m in self.trained:
            m.train()
            if cfg.gradient_checkpointing and hasattr(m, "enable_gradient_checkpointing"):  # diffusers
                m.enable_gradient_checkpointing()
            elif cfg.gradient_checkpointing and hasattr(m, "gradient_checkpointing_enable"):  # transformers
                m.gradient_checkpointing_enable()

    def _optimizer(self) -> None:
        import torch
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import cast_training_params

        cfg, acc = self.config, self.accelerator
        found = [[p for p in m.parameters() if p.requires_grad] for m in self.trained]  # denoiser, text encoder
        if not found[0]:
            raise A.no_trainable(cfg)
        eight_bit = any(p.dtype.itemsize == 1 for p in found[0])
        if self.lora_mode and (acc.mixed_precision == "fp16" or eight_bit):  # fp16 grad scaling, 8-bit base
            cast_training_params(self.trained, dtype=torch.float32)  # the LoRA (and its optimizer state) in fp32
        self.params = [p for group in found for p in group]
        lrs = (cfg.lr, cfg.text_encoder_lr or cfg.lr)  # found has no text-encoder entry when it is not trained
        groups = [{"params": group, "lr": lr} for group, lr in zip(found, lrs, strict=False) if group]
        if cfg.optimizer == "adamw8bit":
            import bitsandbytes as bnb

            opt_cls = bnb.optim.AdamW8bit
        else:
            opt_cls = torch.optim.AdamW
        optimizer = opt_cls(groups, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
                            eps=cfg.adam_epsilon)
        scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps * self.world,
                                  num_training_steps=cfg.steps * self.world)
        self.d_wrapped, *te, self.optim, self.lr_scheduler = acc.prepare(*self.trained, optimizer, scheduler)
        self.te_wrapped = te[0] if te else None
        if cfg.ema_decay:
            self.ema = E.make(self.params, cfg.ema_decay)
            self._hooks += E.register_hooks(acc, self.ema)
        if self.lora_mode:  # a full fine-tune is saved by accelerate itself
            parts = {"denoiser": self.denoiser, **({"text_encoder": self.text_encoder} if self.train_te else {})}
            self._hooks += S.register_lora_hooks(acc, parts, A.ADAPTER)

    # -- training -------------------------------------------------------------------------

    def step(self) -> float:
        """One optimizer step (all its micro-batches); checkpoints, previews and the stop request on schedule."""
        import torch

        cfg, acc = self.config, self.accelerator
        accum = cfg.gradient_accumulation_steps
        prior_weight = cfg.prior_loss_weight if cfg.with_prior_preservation else None
        step_loss = torch.zeros((), dtype=torch.float32)
        for micro in range(accum):
            batch = assemble_batch(self.data, cfg.seed, self.global_step * accum + micro, cfg.batch_size, self.rank,
                                   self.world, cfg.with_prior_preservation)
            ctx = nullcontext() if micro == accum - 1 else acc.no_sync(self.d_wrapped)
            with ctx, acc.autocast():
                loss = self.objective.loss(self.d_wrapped, batch, self._conditioning, self.device, self.dtype,
                                           prior_weight, self._dop()) / accum
            acc.backward(loss)
            step_loss += loss.detach().float().cpu()
        mean_loss = self._all(float(step_loss), "mean")
        if not math.isfinite(mean_loss):
            raise self._diverged(self.global_step + 1, mean_loss)
        if acc.sync_gradients and cfg.max_grad_norm:
            acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.optim.step()
        if self.ema is not None:
            E.update(self.ema, self.params)
        self.lr_scheduler.step()
        self.optim.zero_grad(set_to_none=True)
        self.global_step += 1
        self.losses.append(mean_loss)
        info = {"loss": mean_loss, "lr": self.lr_scheduler.get_last_lr()[0]}
        acc.log(info, step=self.global_step)
        self._after_step(info)
        return mean_loss

    def _after_step(self, info: dict) -> None:
        cfg, step = self.config, self.global_step
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            self.checkpoint()
        preview = None
        if cfg.validation_every and step % cfg.validation_every == 0:
            preview = self._preview()
            if preview is not None:
                self.previews.append(preview)
                if self._logging:  # a [1, H, W, 3] uint8 batch for accelerate's TensorBoard tracker
                    import numpy as np

                    self.accelerator.get_tracker("tensorboard").log_images(
                        {"validation": np.asarray(preview)[None]}, step=step, dataformats="NHWC")
        if self.accelerator.is_main_process:
            notify(self.on_step, step, cfg.steps, preview, info)
        if step < cfg.steps and self._agreed_stop():
            self.stopped = True

    def _dop(self):
        """(weight, DOP prompts, LoRA-off context) on the steps that run differential output preservation."""
        cfg = self.config
        if not cfg.dop_weight or self.global_step % cfg.dop_every:
            return None
        return cfg.dop_weight, self.data.dop_prompt, lambda: A.lora_off(self.denoiser, bool(cfg.training_adapter))

    def _conditioning(self, prompt_index: list):
        """The text conditioning of elements whose prompts are ``prompt_index`` (indices into the cache)."""
        import torch

        data = self.data
        if self.family == "zimage":
            # a fresh list per step, built from the cache: never extended in place
            return [data.embeds[i].to(device=self.device, dtype=self.dtype) for i in prompt_index]
        if self.train_te:
            ids = torch.stack([data.ids[i] for i in prompt_index]).to(self.device)
            return self.te_wrapped(ids)[0]
        return torch.stack([data.embeds[i] for i in prompt_index]).to(self.device)

    def _agreed_stop(self) -> bool:
        acc = self.accelerator
        flag = 1.0 if (self.should_stop is not None and acc.is_main_process and self.should_stop()) else 0.0
        return self._all(flag, "sum") > 0

    def _all(self, value: float, reduction: str) -> float:
        """``value`` combined over the processes; as it is in a single process, where accelerate's default device
        (cuda:0) need not be the model's."""
        if self.world == 1:
            return value
        import torch

        acc = self.accelerator
        return float(acc.reduce(torch.tensor([value], dtype=torch.float32, device=acc.device), reduction=reduction))

    def _diverged(self, step: int, loss: float | None = None) -> InvalidInputError:
        what = ("the weights became NaN or infinite" if loss is None
                else f"loss became {'NaN' if math.isnan(loss) else 'infinite'}")
        return InvalidInputError(
            f"{what} at step {step}; lower the learning rate (lr={self.config.lr:g}) or max_grad_norm, or use "
            "mixed_precision='no'. Nothing non-finite was saved"
        )

    def _preview(self):
        """One preview at the fixed validation prompt and seed, with the training adapter switched off."""
        import torch

        acc, cfg = self.accelerator, self.config
        if not acc.is_main_process:
            acc.wait_for_everyone()
            return None
        pipe = self.pipe if self.lora_mode else A.finetuned_pipeline(
            self.pipe, self.denoiser, self.text_encoder if self.train_te else None)
        d = self.model.defaults
        was_training = [(m, m.training) for m in (self.denoiser, self.text_encoder)]
        swap = bool(cfg.training_adapter)
        try:
            if swap:
                A.activate(self.denoiser, with_training_adapter=False)
            for m, _ in was_training:
                m.eval()
            kwargs = dict(num_inference_steps=cfg.validation_steps or d.steps, guidance_scale=d.guidance,
                          height=cfg.resolution, width=cfg.resolution, output_type="pil",
                          generator=torch.Generator("cpu").manual_seed(cfg.validation_seed % SEED_SPACE))
            if self.family == "zimage":
                kwargs["max_sequence_length"] = d.max_sequence_length
            with torch.no_grad(), torch.random.fork_rng(devices=[]), M.encoders_on(pipe, self.device, self._offloaded):
                image = pipe(prompt=[cfg.validation_prompt], **kwargs).images[0]
        finally:
            if swap:
                A.activate(self.denoiser, with_training_adapter=True)
            for m, flag in was_training:
                m.train(flag)
            acc.wait_for_everyone()
        return image

    # -- state ----------------------------------------------------------------------------

    def checkpoint(self) -> str:
        """``checkpoint-<step>`` through ``accelerator.save_state`` (atomic; only finite weights)."""
        if not A.check_finite(self.trained):
            raise self._diverged(self.global_step)
        cfg = self.config
        meta = {
            "format": S.CHECKPOINT_FORMAT, "step": self.global_step, "total_steps": cfg.steps,
            "model_identity": self.model.identity, "family": self.family, "train_mode": cfg.train_mode,
            "fingerprint": cfg.trajectory_fingerprint(), "world_size": self.world,
            "losses": self.losses[: self.global_step], "config": cfg.to_dict(),
        }
        self.last_checkpoint = S.write_checkpoint(self.accelerator, self.output_dir, self.global_step, meta)
        return self.last_checkpoint

    def finish(self) -> TrainResult:
        """The final checkpoint (when stopped or off-schedule), then the LoRA or the fine-tuned model."""
        cfg, step, acc = self.config, self.global_step, self.accelerator
        if self.stopped:
            if not (self.last_checkpoint and self.last_checkpoint.endswith(f"checkpoint-{step}")):
                self.checkpoint()
            logger.info("training stopped at step %d of %d; rerun with resume='latest' to continue", step, cfg.steps)
        elif cfg.checkpoint_every and step % cfg.checkpoint_every and step > self.start_step:
            self.checkpoint()
        elif step == self.start_step and self.last_checkpoint:
            logger.info("the checkpoint is already at step %d of %d; nothing to train", step, cfg.steps)
        if not A.check_finite(self.trained):
            raise self._diverged(step)
        meta = A.metadata(self.model, cfg, step)
        lora = new_model = lora_ema = None
        if self.lora_mode:
            name, te = os.path.basename(self.output_dir.rstrip(os.sep)) or "lora", self.text_encoder if self.train_te else None
            lora = A.export_lora(self.model, cfg, te, meta, name)
            if self.ema is not None:
                with E.swapped_in(self.ema, self.params):
                    lora_ema = A.export_lora(self.model, cfg, te, {**meta, "ema_decay": cfg.ema_decay}, name + "_ema")
        else:
            pipe = A.finetuned_pipeline(self.pipe, acc.unwrap_model(self.d_wrapped),
                                        acc.unwrap_model(self.te_wrapped) if self.train_te else None)
            new_model = A.finetuned_model(self.model, pipe, meta)
        plot = save_loss_plot(self.losses, os.path.join(self.output_dir, "loss.png") if acc.is_main_process else None)
        return TrainResult(lora=lora, model=new_model, loss_plot=plot, losses=list(self.losses),
                           checkpoint_dir=self.last_checkpoint, stopped=self.stopped, step=step, total_steps=cfg.steps,
                           previews=self.previews, lora_ema=lora_ema)

    def close(self) -> None:
        """Put the shared model back exactly as it was (always runs, also after errors)."""
        for h in self._hooks:
            h.remove()
        if self._offloaded:
            M.move_encoders(self.pipe, self.device)
        if self._logging:
            self.accelerator.end_training()
        if self._adapters:
            self.pipe.unload_lora_weights()  # every adapter off; the original modules are back
        for g in self._guards:
            g.restore()
        if not self.lora_mode:  # the fine-tuned copies, ready for inference
            for m in self.trained:
                m.eval()
                m.requires_grad_(False)
                for key in [k for k in m.__dict__ if k in ("forward", "_original_forward")]:
                    del m.__dict__[key]
        if self.accelerator is not None:
            self.accelerator.free_memory()


def notify(on_step, step: int, total: int, preview, info: dict) -> None:
    """``on_step(step, total, preview)``, plus ``info=`` when it declares that parameter (older ones do not)."""
    if on_step is None:
        return
    try:
        takes_info = "info" in inspect.signature(on_step).parameters
    except (TypeError, ValueError):
        takes_info = False
    on_step(step, total, preview, **({"info": info} if takes_info else {}))
