"""DreamBooth nodes: PriorImageGen, DreamBoothTrain, CheckpointSave."""

from __future__ import annotations

import hashlib
import os

from . import comfy as host

MAX_SEED = 0xFFFFFFFFFFFFFFFF


def _prior_root() -> str:
    return os.path.join(host.output_directory(), "turbobooth_priors")


def _training_root() -> str:
    return os.path.join(host.output_directory(), "turbobooth_training")


class PriorImageGen:
    DESCRIPTION = (
        "Class-prior images for DreamBooth prior preservation, generated with the loaded model at its few-step "
        "settings. They are cached on disk by model, prompt, seed, steps, size and guidance: running again reuses "
        "them, and a larger count only generates the missing ones. Connect your own images to use them instead."
    )
    CATEGORY = "TurboBooth/DreamBooth"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("class_images",)
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("TURBO_MODEL",),
                "class_prompt": ("STRING", {"multiline": True, "default": "a photo of a dog"}),
                "count": ("INT", {"default": 50, "min": 1, "max": 2000}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED}),
                "width": ("INT", {"default": 1024, "min": 16, "max": 4096, "step": 8}),
                "height": ("INT", {"default": 1024, "min": 16, "max": 4096, "step": 8}),
                "steps": ("INT", {"default": 0, "min": 0, "max": 200, "tooltip": "0 = the family's few-step default."}),
            },
            "optional": {
                "own_class_images": ("IMAGE", {"tooltip": "Use these class images instead of generating any."}),
            },
        }

    def generate(self, model, class_prompt, count, seed, width, height, steps, own_class_images=None):
        from ..manager.cache import ensure_loaded
        from ..trainer.priors import class_images

        if own_class_images is not None:
            return (own_class_images,)
        model = ensure_loaded(model)
        host.share_memory(model)
        images = class_images(
            model, class_prompt, int(count), seed=int(seed), width=int(width), height=int(height),
            steps=int(steps) or None, root=_prior_root(), on_step=host.Progress(int(count)),
            should_stop=host.interrupted,
        )
        return (host.pils_to_image(images),)


class DreamBoothTrain:
    DESCRIPTION = (
        "Personalizes the model on 3-5 photos of a subject with DreamBooth (LoRA by default; full fine-tune for "
        "SD1.x). The instance prompt must contain a unique token such as 'sks'. Class images enable prior "
        "preservation. Cancel saves the state; queueing again resumes where it stopped. The cached base model is "
        "never modified."
    )
    CATEGORY = "TurboBooth/DreamBooth"
    RETURN_TYPES = ("TURBO_LORA", "TURBO_MODEL", "IMAGE")
    RETURN_NAMES = ("lora", "model", "loss_plot")
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("TURBO_MODEL",),
                "instance_images": ("IMAGE",),
                "instance_prompt": ("STRING", {"default": "a photo of sks dog"}),
                "class_prompt": ("STRING", {"default": "a photo of a dog"}),
                "steps": ("INT", {"default": 400, "min": 1, "max": 100000}),
                "learning_rate": ("FLOAT", {"default": 1e-4, "min": 0.0, "max": 1.0, "step": 1e-6, "round": False}),
                "rank": ("INT", {"default": 16, "min": 1, "max": 256}),
                "resolution": ("INT", {"default": 1024, "min": 64, "max": 2048, "step": 8}),
                "train_mode": (["lora", "full"], {"default": "lora", "tooltip": "full = fine-tune the whole UNet (SD1.x only)."}),
                "prior_loss_weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED}),
                "run_name": ("STRING", {"default": "dreambooth"}),
            },
            "optional": {
                "class_images": ("IMAGE",),
                "validation_prompt": ("STRING", {"default": ""}),
                "validation_every": ("INT", {"default": 0, "min": 0, "max": 100000}),
                "checkpoint_every": ("INT", {"default": 100, "min": 0, "max": 100000}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
                "gradient_checkpointing": ("BOOLEAN", {"default": False}),
                "mixed_precision": (["no", "fp16", "bf16"], {"default": "no"}),
                "training_adapter": ([host.NONE] + host.folder_list("loras"), {"default": host.NONE,
                                     "tooltip": "Z-Image-Turbo: a de-distillation LoRA active only while training."}),
            },
        }

    def train(self, model, instance_images, instance_prompt, class_prompt, steps, learning_rate, rank, resolution,
              train_mode, prior_loss_weight, seed, run_name, class_images=None, validation_prompt="",
              validation_every=0, checkpoint_every=100, batch_size=1, gradient_checkpointing=False,
              mixed_precision="no", training_adapter=host.NONE):
        import torch

        from ..manager.cache import ensure_loaded
        from ..manager.errors import Interrupted
        from ..manager.paths import safe_name
        from ..trainer.config import TrainConfig
        from ..trainer.loop import train

        model = ensure_loaded(model)
        prior = class_images is not None and float(prior_loss_weight) > 0
        adapter = host.full_path("loras", training_adapter) if training_adapter and training_adapter != host.NONE else None
        fields = dict(
            family=model.family, instance_prompt=instance_prompt, class_prompt=class_prompt if prior else (class_prompt or ""),
            with_prior_preservation=prior, prior_loss_weight=float(prior_loss_weight), resolution=int(resolution),
            train_mode=train_mode, rank=int(rank), steps=int(steps), lr=float(learning_rate), seed=int(seed),
            batch_size=int(batch_size), gradient_checkpointing=bool(gradient_checkpointing),
            mixed_precision=mixed_precision, checkpoint_every=int(checkpoint_every),
            validation_every=int(validation_every), validation_prompt=validation_prompt or "",
            validation_seed=int(seed), training_adapter=adapter, resume="latest",
        )
        if prior:
            fields["num_class_images"] = int(class_images.shape[0])
        # one folder per (model, data, settings): queueing the same graph again resumes it
        h = hashlib.sha256(model.identity.encode())
        h.update(repr(sorted((k, v) for k, v in fields.items() if k not in ("steps", "checkpoint_every"))).encode())
        for batch in (instance_images, class_images):
            if batch is not None:
                h.update(batch.detach().cpu().contiguous().numpy().tobytes())
        fields["output_dir"] = os.path.join(_training_root(), f"{safe_name(run_name, 'dreambooth')}-{h.hexdigest()[:10]}")
        config = TrainConfig(**fields)
        host.share_memory(model)
        with torch.inference_mode(False), torch.enable_grad():
            result = train(
                model, config, host.image_to_pils(instance_images),
                class_images=host.image_to_pils(class_images) if prior else None,
                on_step=host.Progress(int(steps), raise_on_interrupt=False),
                should_stop=host.interrupted,
            )
        if result.stopped:
            host.check_interrupt()  # raises ComfyUI's own interruption after the state was saved
            raise Interrupted(f"training stopped at step {result.step}; queue again to resume from {result.checkpoint_dir}")
        plot = host.pils_to_image([result.loss_plot])
        out_model = result.model if result.model is not None else model
        return (result.lora, out_model, plot)


class CheckpointSave:
    DESCRIPTION = (
        "Saves a trained LoRA (into models/loras, loadable by ComfyUI's LoraLoader and diffusers) or a fully "
        "fine-tuned model (diffusers folder into models/diffusers, or an SD1.x single file into models/checkpoints). "
        "Writes are atomic, names are sanitised and never silently overwrite: they auto-increment unless overwrite "
        "is on."
    )
    CATEGORY = "TurboBooth/DreamBooth"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "name": ("STRING", {"default": "turbobooth_dreambooth"}),
                "model_format": (["diffusers folder", "single file (SD1.x)"], {"default": "diffusers folder",
                                 "tooltip": "For a full fine-tune; LoRAs are always one .safetensors file."}),
                "overwrite": ("BOOLEAN", {"default": False}),
            },
            "optional": {
                "lora": ("TURBO_LORA",),
                "model": ("TURBO_MODEL",),
            },
        }

    def save(self, name, model_format, overwrite, lora=None, model=None):
        from ..manager.export import save_lora, save_model

        if lora is not None:
            path = save_lora(lora, _first_root("loras"), name, overwrite=bool(overwrite))
        elif model is not None:
            kind = "checkpoints" if model_format.startswith("single") else "diffusers"
            path = save_model(model, _first_root(kind), name, model_format, overwrite=bool(overwrite))
        else:
            from ..manager.errors import InvalidInputError

            raise InvalidInputError("CheckpointSave needs a lora or a model input; connect DreamBoothTrain's output")
        return {"ui": {"text": [path]}, "result": (path,)}


def _first_root(kind: str) -> str:
    roots = host.folder_roots(kind)
    if roots:
        return roots[0]
    return os.path.join(host.output_directory(), kind)


TRAINING_NODES = {
    "TurboBoothPriorImageGen": PriorImageGen,
    "TurboBoothDreamBoothTrain": DreamBoothTrain,
    "TurboBoothCheckpointSave": CheckpointSave,
}
TRAINING_DISPLAY_NAMES = {
    "TurboBoothPriorImageGen": "PriorImageGen",
    "TurboBoothDreamBoothTrain": "DreamBoothTrain",
    "TurboBoothCheckpointSave": "CheckpointSave",
}
