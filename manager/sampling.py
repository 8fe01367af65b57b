"""Generation on a loaded TurboModel: batching, seeds, guidance, LoRAs, img2img, inpainting.

All model work goes through diffusers' own pipelines (ZImagePipeline,
ZImageImg2ImgPipeline, ZImageInpaintPipeline and the StableDiffusion
equivalents), built from the already-loaded components.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import Interrupted, InvalidInputError
from .families import defaults_for
from .model import TurboModel

logger = logging.getLogger(__name__)

_SAMPLE_LOCK = threading.RLock()
EMBED_CACHE_SIZE = 64


@dataclass(frozen=True)
class Guidance:
    """Negative prompts and guidance, per prompt or shared (TURBO_GUIDANCE)."""

    negative_prompts: tuple[str, ...] = ("",)
    scales: tuple[float, ...] = (0.0,)
    cfg_truncation: float = 1.0
    cfg_normalization: float = 0.0

    def __post_init__(self) -> None:
        if not self.scales:
            raise InvalidInputError("guidance needs at least one guidance scale")
        for s in self.scales:
            if not (0.0 <= float(s) <= 100.0):
                raise InvalidInputError(f"guidance scale {s} is outside the allowed range 0..100")
        if not (0.0 <= float(self.cfg_truncation) <= 1.0):
            raise InvalidInputError(f"cfg_truncation {self.cfg_truncation} must be within 0..1 (1 = never truncate)")
        if float(self.cfg_normalization) < 0.0:
            raise InvalidInputError(f"cfg_normalization {self.cfg_normalization} must be >= 0 (0 = off)")

    def for_prompt(self, index: int, count: int) -> tuple[str, float]:
        neg = self.negative_prompts if self.negative_prompts else ("",)
        if len(neg) not in (1, count):
            raise InvalidInputError(
                f"got {len(neg)} negative prompts for {count} prompts; give one negative prompt, or one per prompt"
            )
        if len(self.scales) not in (1, count):
            raise InvalidInputError(
                f"got {len(self.scales)} guidance scales for {count} prompts; give one scale, or one per prompt"
            )
        return neg[index if len(neg) > 1 else 0], float(self.scales[index if len(self.scales) > 1 else 0])

    @staticmethod
    def default_for(family: str) -> Guidance:
        d = defaults_for(family)
        return Guidance(negative_prompts=("",), scales=(d.guidance,))


@dataclass
class SampleResult:
    images: object  # torch.Tensor [B,H,W,C] float 0..1 on CPU
    latents: object  # torch.Tensor [B,C,h,w] raw VAE latents (ComfyUI LATENT "samples")
    seeds: list[int]
    prompts: list[str]


def parse_prompts(text: str | Sequence[str]) -> list[str]:
    """One prompt per non-empty line."""
    lines = text.splitlines() if isinstance(text, str) else list(text)
    prompts = [p.strip() for p in lines if isinstance(p, str) and p.strip()]
    if not prompts:
        raise InvalidInputError("no prompt given: write at least one non-empty line (one prompt per line = a batch)")
    return prompts


def check_size(family: str, width: int, height: int) -> None:
    d = defaults_for(family)
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or v <= 0 or v % d.size_multiple:
            lo = (max(int(v), d.size_multiple) // d.size_multiple) * d.size_multiple if isinstance(v, int) else 0
            raise InvalidInputError(
                f"{name}={v} is not allowed for {d.label}: it must be a positive multiple of {d.size_multiple} "
                f"(nearest allowed: {lo} or {lo + d.size_multiple})"
            )


class _EmbedCache:
    """A small LRU of prompt embeddings per model, so a repeated prompt skips the text encoder."""

    def __init__(self, size: int = EMBED_CACHE_SIZE):
        self.size = size
        self.items: OrderedDict = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key, compute: Callable):
        if key in self.items:
            self.items.move_to_end(key)
            self.hits += 1
            return self.items[key]
        self.misses += 1
        value = compute()
        self.items[key] = value
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return value

    def clear(self) -> None:
        self.items.clear()


def embed_cache(model: TurboModel) -> _EmbedCache:
    cache = model.extras.get("embed_cache")
    if cache is None:
        cache = model.extras["embed_cache"] = _EmbedCache()
    return cache


def _lora_key(loras) -> tuple:
    return tuple((id(lora), float(strength)) for lora, strength in loras)


def _noise(model: TurboModel, seeds: list[int], width: int, height: int, per_prompt: int):
    """Initial noise: prompt i draws its images from its own generator seeded with seed + i."""
    import torch

    pipe = model.pipe
    factor = pipe.vae_scale_factor
    if model.family == "zimage":
        channels = pipe.transformer.in_channels
    else:
        channels = pipe.unet.config.in_channels
    shape = (per_prompt, channels, height // factor, width // factor)
    chunks = []
    for s in seeds:
        g = torch.Generator("cpu").manual_seed(int(s))
        chunks.append(torch.randn(shape, generator=g, dtype=torch.float32))
    return torch.cat(chunks, dim=0)


def _encode(model: TurboModel, prompts: list[str], max_len: int, loras) -> list:
    """Per-prompt embeddings through the embedding cache."""
    import torch

    pipe = model.pipe
    cache = embed_cache(model)
    lk = _lora_key([(lo, s) for lo, s in loras if getattr(lo, "touches_text_encoder", False)])
    device = model.device
    out = []
    for p in prompts:
        def compute(p=p):
            with torch.no_grad():
                if model.family == "zimage":
                    return pipe._encode_prompt(prompt=[p], device=device, max_sequence_length=max_len)[0]
                emb, _ = pipe.encode_prompt(p, device, 1, False)
                return emb[0]

        out.append(cache.get((model.family, p, max_len, lk), compute))
    return out


def _to_image_tensor(decoded):
    """[B,3,H,W] in -1..1 -> ComfyUI IMAGE [B,H,W,3] in 0..1 on CPU."""
    return (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu()


def _decode(model: TurboModel, latents):
    import torch

    vae = model.pipe.vae
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    raw = latents / scale + shift
    with torch.no_grad():
        decoded = vae.decode(raw.to(vae.dtype), return_dict=False)[0]
    return _to_image_tensor(decoded), raw.float().cpu()


def _encode_init(model: TurboModel, image):
    """ComfyUI IMAGE [B,H,W,C] 0..1 -> pipeline image tensor [B,3,H,W] in 0..1 (the pipeline normalises)."""
    return image[..., :3].permute(0, 3, 1, 2).float().clamp(0, 1)


def generate(
    model: TurboModel,
    prompts: str | Sequence[str],
    seed: int = 0,
    steps: int | None = None,
    width: int | None = None,
    height: int | None = None,
    images_per_prompt: int = 1,
    sampler: str = "euler",
    shift: float | None = None,
    guidance: Guidance | None = None,
    loras: Sequence = (),
    init_image=None,
    denoise: float = 1.0,
    mask=None,
    max_sequence_length: int | None = None,
    on_step: Callable | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> SampleResult:
    """Generate images; see the module docstring.

    ``prompts``: a list, or text with one prompt per line. Prompt ``i`` uses
    seed ``seed + i`` for its ``images_per_prompt`` images, so a prompt gives
    the same images whether it runs alone or in a batch.
    """
    import torch

    from . import schedulers

    family = model.family
    d = defaults_for(family)
    prompt_list = parse_prompts(prompts)
    steps = d.steps if steps is None else steps
    if not isinstance(steps, int) or steps < 1:
        raise InvalidInputError(f"steps={steps} is not allowed: use 1 or more ({d.label} default: {d.steps})")
    if not isinstance(images_per_prompt, int) or images_per_prompt < 1:
        raise InvalidInputError(f"images_per_prompt={images_per_prompt} is not allowed: use 1 or more")
    if not (0.0 < float(denoise) <= 1.0):
        raise InvalidInputError(f"denoise={denoise} is outside (0, 1]: 1.0 repaints fully, small values stay close to the init image")
    if init_image is not None:
        if init_image.ndim != 4 or init_image.shape[-1] not in (3, 4):
            raise InvalidInputError(f"init image must be a ComfyUI IMAGE [B,H,W,C]; got shape {tuple(init_image.shape)}")
        ih, iw = int(init_image.shape[1]), int(init_image.shape[2])
        width = iw if width is None else width
        height = ih if height is None else height
        if (ih, iw) != (height, width):
            raise InvalidInputError(
                f"init image is {iw}x{ih} but width x height is {width}x{height}; resize the image or set the size to match"
            )
        if int(steps * float(denoise)) < 1:
            raise InvalidInputError(
                f"denoise={denoise} with steps={steps} leaves no denoising step (steps x denoise < 1); "
                "raise steps or denoise"
            )
        total = len(prompt_list) * images_per_prompt
        if init_image.shape[0] not in (1, total):
            raise InvalidInputError(
                f"init image batch has {init_image.shape[0]} images but the prompts make {total}; "
                "give 1 init image (shared) or one per generated image"
            )
    elif mask is not None:
        raise InvalidInputError("a mask needs an init image to inpaint; connect the image the mask belongs to")
    width = d.default_size if width is None else width
    height = d.default_size if height is None else height
    check_size(family, width, height)
    if mask is not None:
        m = mask if mask.ndim == 3 else mask.unsqueeze(0)
        if tuple(m.shape[-2:]) != (height, width):
            raise InvalidInputError(
                f"mask is {m.shape[-1]}x{m.shape[-2]} but the image is {width}x{height}; masks must match the image size"
            )
        if m.shape[0] not in (1, init_image.shape[0]):
            raise InvalidInputError(f"got {m.shape[0]} masks for {init_image.shape[0]} init images; give 1 or one per image")
        mask = m
    guidance = guidance or Guidance.default_for(family)
    max_len = max_sequence_length or d.max_sequence_length
    n = len(prompt_list)
    per = [guidance.for_prompt(i, n) for i in range(n)]
    seeds = [int(seed) + i for i in range(n)]

    if loras:
        from . import lora as lora_mod

        adapters = lora_mod.applied(model, list(loras))
    else:
        adapters = contextlib.nullcontext()
    with _SAMPLE_LOCK, adapters:
        pipe = model.pipe
        pos = _encode(model, prompt_list, max_len, loras)
        noise = _noise(model, seeds, width, height, images_per_prompt)
        # group prompts sharing a guidance scale: one pipeline call per group
        groups: dict[float, list[int]] = {}
        for i, (_, scale) in enumerate(per):
            groups.setdefault(scale, []).append(i)
        total_steps = steps * len(groups)
        done = [0]

        def callback(_pipe, i, t, kwargs):
            done[0] += 1
            if on_step is not None:
                on_step(done[0], total_steps, None)
            if should_stop is not None and should_stop():
                raise Interrupted("generation was cancelled")
            return kwargs

        if on_step is None and should_stop is None:
            callback = None  # diffusers gathers locals() for a callback on every step
        out_latents = [None] * n
        base_sched = pipe.scheduler
        try:
            own_euler = type(base_sched).__name__ == "FlowMatchEulerDiscreteScheduler"
            if family == "zimage" and sampler == "euler" and own_euler and shift in (None, base_sched.config.get("shift")):
                pass  # the model's own flow-matching Euler scheduler, as loaded
            elif family == "zimage":
                pipe.scheduler = schedulers.zimage_scheduler(dict(base_sched.config), sampler, shift)
            else:
                pipe.scheduler = schedulers.sd1_scheduler(dict(base_sched.config), sampler, base_sched)
            for scale, idx in groups.items():
                cfg_on = scale > 0 if family == "zimage" else scale > 1
                negs = _encode(model, [per[i][0] for i in idx], max_len, loras) if cfg_on else None
                rows = [i * images_per_prompt + j for i in idx for j in range(images_per_prompt)]
                lat = noise[rows]
                p_emb = [pos[i] for i in idx for _ in range(images_per_prompt)]
                n_emb = [negs[k] for k, _ in enumerate(idx) for _ in range(images_per_prompt)] if cfg_on else None
                lat_out = _run_pipeline(
                    model, p_emb, n_emb, scale, guidance, steps, width, height, lat, max_len, callback,
                    init_image, denoise, mask, rows, seeds, images_per_prompt,
                )
                for k, i in enumerate(idx):
                    out_latents[i] = lat_out[k * images_per_prompt : (k + 1) * images_per_prompt]
        finally:
            pipe.scheduler = base_sched
        latents = torch.cat(out_latents, dim=0)
        images, raw = _decode(model, latents)
    return SampleResult(images=images, latents=raw, seeds=seeds, prompts=prompt_list)


def _run_pipeline(model, p_emb, n_emb, scale, guidance, steps, width, height, latents, max_len, callback,
                  init_image, denoise, mask, rows, seeds, per_prompt):
    import torch

    pipe = model.pipe
    family = model.family
    common = dict(
        num_inference_steps=steps,
        guidance_scale=scale,
        height=height,
        width=width,
        output_type="latent",
        callback_on_step_end=callback,
    )
    if family == "zimage":
        common.update(
            prompt_embeds=list(p_emb),
            negative_prompt_embeds=list(n_emb) if n_emb is not None else None,
            cfg_truncation=guidance.cfg_truncation,
            cfg_normalization=guidance.cfg_normalization,
            max_sequence_length=max_len,
        )
    else:
        common.update(
            prompt_embeds=torch.stack(list(p_emb)),
            negative_prompt_embeds=torch.stack(list(n_emb)) if n_emb is not None else None,
        )
    if init_image is None:
        return pipe(latents=latents.to(model.device), **common).images
    # img2img / inpaint: the init latents get noise from our per-prompt generators
    image = _encode_init(model, init_image)
    if image.shape[0] > 1:
        image = image[rows]
    by_prompt: dict[int, object] = {}
    gens = []
    for r in rows:
        i = r // per_prompt
        if i not in by_prompt:
            by_prompt[i] = torch.Generator("cpu").manual_seed(seeds[i])
        gens.append(by_prompt[i])
    if mask is None:
        sub = _sub_pipeline(model, "img2img")
        return sub(image=image, strength=float(denoise), generator=gens, **common).images
    sub = _sub_pipeline(model, "inpaint")
    m = mask.float()
    if m.shape[0] > 1:
        m = m[rows]
    return sub(image=image, mask_image=m.unsqueeze(1), strength=float(denoise), generator=gens, **common).images


def _sub_pipeline(model: TurboModel, task: str):
    """img2img / inpaint pipeline sharing the loaded components (built once per model)."""
    subs = model.extras.setdefault("pipelines", {})
    sub = subs.get(task)
    if sub is None:
        sub = subs[task] = _pipeline_class(model.family, task).from_pipe(model.pipe)
        sub.set_progress_bar_config(disable=True)
    sub.scheduler = model.pipe.scheduler
    return sub


def _pipeline_class(family: str, task: str):
    import diffusers

    names = {
        ("zimage", "img2img"): "ZImageImg2ImgPipeline",
        ("zimage", "inpaint"): "ZImageInpaintPipeline",
        ("sd1", "img2img"): "StableDiffusionImg2ImgPipeline",
        ("sd1", "inpaint"): "StableDiffusionInpaintPipeline",
    }
    return getattr(diffusers, names[(family, task)])
