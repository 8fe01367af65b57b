"""DreamBooth nodes: PriorImageGen, DreamBoothTrain, CheckpointSave."""

from __future__ import annotations

import os

from ..manager.inputs import MAX_SEED
from ..trainer.config import MEMORY_CHOICES
from . import comfy as host

CATEGORY = "TurboBooth/DreamBooth"


class PriorImageGen(host.Node, category=CATEGORY, returns={"class_images": "IMAGE"}, function="generate"):
    DESCRIPTION = (
        "Class-prior images for DreamBooth prior preservation, generated with the loaded model at its few-step "
        "settings. They are cached on disk by model, prompt, seed, steps, size and guidance: running again reuses "
        "them, and a larger count only generates the missing ones. Connect your own images to use them instead."
    )

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
        from ..trainer.priors import PriorCache

        if own_class_images is not None:
            return (own_class_images,)
        model = ensure_loaded(model)
        host.share_memory(model)
        cache = PriorCache(model, class_prompt, seed=int(seed), width=int(width), height=int(height),
                           steps=int(steps) or None, root=os.path.join(host.output_directory(), "turbobooth_priors"))
        images = cache.load(int(count), on_step=host.Progress(int(count)), should_stop=host.interrupted)
        return (host.pils_to_image(images),)


# trainer.config.TrainConfig checks every value, NaN and Inf included
_OPTIONAL_INPUTS = {
    "class_images": ("IMAGE",),
    "validation_prompt": ("STRING", {"default": ""}),
    "validation_every": ("INT", {"default": 0, "min": 0, "max": 100000}),
    "checkpoint_every": ("INT", {"default": 100, "min": 0, "max": 100000}),
    "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
    "gradient_checkpointing": ("BOOLEAN", {"default": False}),
    "mixed_precision": (["no", "auto", "fp16", "bf16"], {"default": "no", "tooltip": "auto: bf16 if the GPU has it."}),
    "training_adapter": ([host.NONE], {"default": host.NONE,  # INPUT_TYPES lists models/loras on each call
                         "tooltip": "Z-Image-Turbo: a de-distillation LoRA active only while training."}),
    "memory": (list(MEMORY_CHOICES), {"default": "auto", "tooltip":
               "auto: the fastest plan that fits the GPU's free memory. fp8_checkpointed (12-16 GB) needs the model "
               "loaded with dtype fp8_e4m3fn; bf16_checkpointed fits 24 GB; bf16_offloaded (8 GB, slower) keeps "
               "the transformer blocks in RAM."}),
    "caption_dropout": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.95, "step": 0.05,
                                  "tooltip": "Share of steps that train an image with an empty prompt."}),
    "dop_weight": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0, "step": 0.05, "tooltip":
                   "Differential output preservation: keep the class (trigger replaced by dop_class) as the base "
                   "renders it. 0 = off."}),
    "dop_class": ("STRING", {"default": "", "tooltip": "The class word for DOP, e.g. 'dog'."}),
    "ema_decay": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.9999, "step": 0.0001, "round": False,
                            "tooltip": "An EMA of the LoRA weights (lora_ema output), e.g. 0.999. 0 = off."}),
    "captions": ("STRING", {"multiline": True, "default": "", "tooltip":
                 "One caption per instance image, in batch order; [trigger] becomes the trigger word and an empty "
                 "line trains that image with the instance prompt. Empty = the instance prompt for all."}),
    "cache_to_disk": ("BOOLEAN", {"default": False, "tooltip": "Keep the image latents and prompt embeddings in "
                      "the run folder: a resumed or re-queued run skips the VAE and text encoder."}),
}


class DreamBoothTrain(host.Node, category=CATEGORY, function="train", returns={
        "lora": "TURBO_LORA", "model": "TURBO_MODEL", "loss_plot": "IMAGE", "lora_ema": "TURBO_LORA"}):
    DESCRIPTION = (
        "Personalizes the model on 3-5 photos of a subject with DreamBooth (LoRA by default; full fine-tune for "
        "SD1.x). The instance prompt must contain a unique token such as 'sks'. Class images enable prior "
        "preservation. Cancel saves the state; queueing again resumes where it stopped. The cached base model is "
        "never modified."
    )

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
            "optional": {**_OPTIONAL_INPUTS, "training_adapter": ([host.NONE] + host.folder_list("loras"),
                                                                  _OPTIONAL_INPUTS["training_adapter"][1])},
            "hidden": {"unique_id": "UNIQUE_ID"},  # the node id the live dashboard's events name
        }

    def train(self, model, instance_images, instance_prompt, class_prompt, steps, learning_rate, rank, resolution,
              train_mode, prior_loss_weight, seed, run_name, class_images=None, validation_prompt="",
              validation_every=0, checkpoint_every=100, batch_size=1, gradient_checkpointing=False,
              mixed_precision="no", training_adapter=host.NONE, unique_id=None, memory="auto", caption_dropout=0.0,
              dop_weight=0.0, dop_class="", ema_decay=0.0, captions="", cache_to_disk=False):
        widgets = dict(locals())  # every input by name; _train_config picks the settings
        from ..manager.cache import ensure_loaded
        from ..manager.errors import Interrupted

        model = ensure_loaded(model)
        config = _train_config(model, widgets)
        host.share_memory(model)
        progress = host.TrainProgress(int(steps), unique_id)
        result = _train(model, config, run_name, instance_images, class_images, progress)
        if result.stopped:
            host.check_interrupt()  # raises ComfyUI's own interruption after the state was saved
            raise Interrupted(f"training stopped at step {result.step}; queue again to resume from {result.checkpoint_dir}")
        return (result.lora, result.model if result.model is not None else model,
                host.pils_to_image([result.loss_plot]), result.lora_ema)


def _train(model, config, run_name, instance_images, class_images, progress):
    """trainer.runs.train_in_run_folder with gradients on; ``progress`` feeds the bar and the live dashboard."""
    import torch

    from ..trainer.runs import train_in_run_folder

    result = None
    try:
        with torch.inference_mode(False), torch.enable_grad():
            result = train_in_run_folder(
                model, config, host.training_root(), run_name, host.image_to_pils(instance_images),
                class_images=host.image_to_pils(class_images) if config.with_prior_preservation else None,
                on_step=progress, should_stop=host.interrupted, on_run=progress.run_started)
        return result
    finally:
        progress.finished(result.step if result else 0, stopped=result is None or result.stopped)


def _train_config(model, w: dict):
    """The TrainConfig for DreamBoothTrain's inputs ``w`` (the run folder is chosen in trainer.runs)."""
    from ..trainer.config import TrainConfig
    from ..trainer.data import caption_lines

    prior = w["class_images"] is not None and float(w["prior_loss_weight"]) > 0
    fields = dict(
        family=model.family, instance_prompt=w["instance_prompt"], class_prompt=w["class_prompt"] or "",
        with_prior_preservation=prior, prior_loss_weight=float(w["prior_loss_weight"]),
        resolution=int(w["resolution"]), train_mode=w["train_mode"], rank=int(w["rank"]), steps=int(w["steps"]),
        lr=float(w["learning_rate"]), seed=int(w["seed"]), batch_size=int(w["batch_size"]),
        gradient_checkpointing=bool(w["gradient_checkpointing"]), mixed_precision=w["mixed_precision"],
        checkpoint_every=int(w["checkpoint_every"]), validation_every=int(w["validation_every"]),
        validation_prompt=w["validation_prompt"] or "", validation_seed=int(w["seed"]),
        training_adapter=host.full_path("loras", w["training_adapter"]),
        output_dir=host.training_root(), memory=w["memory"], caption_dropout=float(w["caption_dropout"]),
        dop_weight=float(w["dop_weight"]), dop_class=(w["dop_class"] or "").strip(), ema_decay=float(w["ema_decay"]),
        captions=caption_lines(w["captions"] or ""), cache_to_disk=bool(w["cache_to_disk"]),
    )
    if prior:
        fields["num_class_images"] = int(w["class_images"].shape[0])
    return TrainConfig(**fields)


class CheckpointSave(host.Node, category=CATEGORY, returns={"path": "STRING"}, function="save"):
    DESCRIPTION = (
        "Saves a trained LoRA (into models/loras, loadable by ComfyUI's LoraLoader and diffusers) or a fully "
        "fine-tuned model (diffusers folder into models/diffusers, or an SD1.x single file into models/checkpoints). "
        "Writes are atomic, names are sanitised and never silently overwrite: they auto-increment unless overwrite "
        "is on."
    )
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
        from ..manager.errors import InvalidInputError
        from ..manager.writers import save_lora, save_model

        if lora is not None:
            path = save_lora(lora, _first_root("loras"), name, overwrite=bool(overwrite))
        elif model is not None:
            kind = "checkpoints" if model_format.startswith("single") else "diffusers"
            path = save_model(model, _first_root(kind), name, model_format, overwrite=bool(overwrite))
        else:
            raise InvalidInputError("CheckpointSave needs a lora or a model input; connect DreamBoothTrain's output")
        return {"ui": {"text": [path]}, "result": (path,)}


def _first_root(kind: str) -> str:
    return (host.folder_roots(kind) or [os.path.join(host.output_directory(), kind)])[0]
