"""Generation on a loaded TurboModel: batching, seeds, guidance, LoRAs, img2img, inpainting.

All model work goes through diffusers' own pipelines (ZImagePipeline, ZImageImg2ImgPipeline,
ZImageInpaintPipeline and the StableDiffusion equivalents), built from the already-loaded components.
Inputs are checked in :mod:`.inputs` before anything runs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import Interrupted, InvalidInputError
from .inputs import MAX_IMAGES, Guidance, check_sampler, check_size, finite_tensor, number, parse_prompts, seed_list
from .spec import TurboModel

EMBED_CACHE_SIZE = 64
ENCODE_CHUNK = 16  # prompts per text-encoder call; cancel is checked between chunks


@dataclass
class SampleResult:
    images: object  # torch.Tensor [B,H,W,C] float 0..1 on CPU
    latents: object  # torch.Tensor [B,C,h,w] raw VAE latents (ComfyUI LATENT "samples")
    seeds: list[int]
    prompts: list[str]


@dataclass
class _Job:
    """One checked generation request."""

    prompts: list
    seeds: list
    steps: int
    width: int
    height: int
    per_prompt: int
    sampler: str
    shift: float | None
    guidance: Guidance
    per: list  # (negative prompt, scale) per prompt
    max_len: int
    init_image: object = None
    denoise: float = 1.0
    mask: object = None


def _check_init(width, height, init_image, mask, steps: int, denoise: float, total: int) -> tuple:
    """(width, height, mask) for img2img/inpaint inputs, or a message saying what does not fit."""
    if init_image.ndim != 4 or init_image.shape[-1] not in (3, 4):
        raise InvalidInputError(f"init image must be a ComfyUI IMAGE [B,H,W,C]; got shape {tuple(init_image.shape)}")
    finite_tensor("init image", init_image)
    ih, iw = int(init_image.shape[1]), int(init_image.shape[2])
    width, height = iw if width is None else width, ih if height is None else height
    if (ih, iw) != (height, width):
        raise InvalidInputError(
            f"init image is {iw}x{ih} but width x height is {width}x{height}; resize the image or set the size to match"
        )
    if int(steps * denoise) < 1:
        raise InvalidInputError(
            f"denoise={denoise} with steps={steps} leaves no denoising step (steps x denoise < 1); raise steps or denoise"
        )
    if init_image.shape[0] not in (1, total):
        raise InvalidInputError(
            f"init image batch has {init_image.shape[0]} images but the prompts make {total}; "
            "give 1 init image (shared) or one per generated image"
        )
    if mask is not None:
        finite_tensor("mask", mask)
        mask = mask if mask.ndim == 3 else mask.unsqueeze(0)
        if tuple(mask.shape[-2:]) != (height, width):
            raise InvalidInputError(
                f"mask is {mask.shape[-1]}x{mask.shape[-2]} but the image is {width}x{height}; masks must match the image size"
            )
        if mask.shape[0] not in (1, init_image.shape[0]):
            raise InvalidInputError(f"got {mask.shape[0]} masks for {init_image.shape[0]} init images; give 1 or one per image")
    return width, height, mask


def _job(model: TurboModel, prompts, seed, steps, width, height, images_per_prompt, sampler, shift, guidance,
         init_image, denoise, mask, max_sequence_length) -> _Job:
    d = model.defaults
    prompt_list = parse_prompts(prompts)
    steps = d.steps if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise InvalidInputError(f"steps={steps} is not allowed: use 1 to 1000 ({d.label} default: {d.steps})")
    if isinstance(images_per_prompt, bool) or not isinstance(images_per_prompt, int) or images_per_prompt < 1:
        raise InvalidInputError(f"images_per_prompt={images_per_prompt} is not allowed: use 1 or more")
    total = len(prompt_list) * images_per_prompt
    if total > MAX_IMAGES:
        raise InvalidInputError(f"{total} images in one call is more than the {MAX_IMAGES} allowed; split the batch")
    denoise = number("denoise", denoise, 0.0, 1.0, lo_open=True)
    check_sampler(model.family, sampler)
    if shift is not None:
        shift = number("shift", shift, 0.0, 100.0, lo_open=True)
    if init_image is not None:
        width, height, mask = _check_init(width, height, init_image, mask, steps, denoise, total)
    elif mask is not None:
        raise InvalidInputError("a mask needs an init image to inpaint; connect the image the mask belongs to")
    width = d.default_size if width is None else width
    height = d.default_size if height is None else height
    check_size(model.family, width, height)
    guidance = guidance or Guidance(negative_prompts=("",), scales=(d.guidance,))
    if all(s == 0 for s in guidance.scales) and (guidance.cfg_normalization or guidance.cfg_truncation < 1):
        raise InvalidInputError(
            "cfg_normalization and cfg_truncation act on classifier-free guidance, which is off at guidance scale 0 "
            f"({d.label}'s default); raise the guidance scale or reset them (0 and 1)")
    n = len(prompt_list)
    return _Job(prompt_list, seed_list(seed, n), steps, width, height, images_per_prompt, sampler, shift, guidance,
                guidance.per_prompt(n), max_sequence_length or d.max_sequence_length,
                init_image, denoise, mask)


def embed_cache(model: TurboModel) -> OrderedDict:
    """A small LRU of prompt embeddings per model (most recent last): a repeated prompt skips the text encoder."""
    return model.extras.setdefault("embed_cache", OrderedDict())


def _noise(model: TurboModel, job: _Job):
    """(initial noise, generators): prompt i draws its images from its own generator seeded with seed + i, which
    the pipeline then goes on drawing from for the noise of stochastic samplers (euler_a), as diffusers does with
    a ``generator``; an image thus depends on its own seed only, not on the global RNG or on the other prompts.
    img2img/inpaint: no initial noise; the pipeline draws the init latents' noise from the fresh generators."""
    import torch

    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in job.seeds]
    if job.init_image is not None:
        return None, gens
    factor = model.pipe.vae_scale_factor
    shape = (job.per_prompt, model.denoiser.config.in_channels, job.height // factor, job.width // factor)
    return torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens]), gens


def _decode(model: TurboModel, latents):
    """Model-space latents -> (ComfyUI IMAGE [B,H,W,3] in 0..1, raw VAE latents), both on CPU."""
    import torch

    vae = model.pipe.vae
    raw = latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
    with torch.no_grad():
        decoded = vae.decode(raw.to(vae.dtype), return_dict=False)[0]
    return (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu(), raw.float().cpu()


def _run_pipeline(model: TurboModel, job: _Job, p_emb: list, n_emb: list | None, scale: float, rows: list,
                  noise, gens: list, callback):
    """One pipeline call for the images ``rows`` (prompt ``r // per_prompt`` each), all at guidance ``scale``;
    ``p_emb``/``n_emb``: one embedding per prompt, which the pipeline repeats for its images."""
    import torch

    kwargs = dict(num_inference_steps=job.steps, guidance_scale=scale, height=job.height, width=job.width,
                  num_images_per_prompt=job.per_prompt, output_type="latent", callback_on_step_end=callback,
                  generator=[gens[r // job.per_prompt] for r in rows])
    if model.family == "zimage":
        kwargs.update(prompt_embeds=p_emb, negative_prompt_embeds=n_emb, cfg_truncation=job.guidance.cfg_truncation,
                      cfg_normalization=job.guidance.cfg_normalization, max_sequence_length=job.max_len)
    else:
        kwargs.update(prompt_embeds=torch.stack(p_emb),
                      negative_prompt_embeds=None if n_emb is None else torch.stack(n_emb))
    if job.init_image is None:
        return model.pipe(latents=noise[rows].to(model.device), **kwargs).images
    # img2img / inpaint: the pipelines take the image as [B,3,H,W] in 0..1 and normalise it themselves
    image = job.init_image[..., :3].permute(0, 3, 1, 2).float().clamp(0, 1)
    kwargs.update(image=image[rows] if image.shape[0] > 1 else image, strength=float(job.denoise))
    if job.mask is None:
        return _sub_pipeline(model, "img2img")(**kwargs).images
    mask = job.mask.float()
    mask = mask[rows] if mask.shape[0] > 1 else mask
    return _sub_pipeline(model, "inpaint")(mask_image=mask.unsqueeze(1), **kwargs).images


def _sub_pipeline(model: TurboModel, task: str):
    """img2img / inpaint pipeline sharing the loaded components (built once per model)."""
    subs = model.extras.setdefault("pipelines", {})
    sub = subs.get(task)
    if sub is None:
        sub = subs[task] = model.defaults.pipeline_class(task).from_pipe(model.pipe)
        sub.set_progress_bar_config(disable=True)
    sub.scheduler = model.pipe.scheduler
    return sub


def _encode(model: TurboModel, prompts: list[str], max_len: int, loras, should_stop=None) -> list:
    """Per-prompt embeddings through the embedding cache; the missing ones in batched text-encoder calls."""
    import torch

    cache = embed_cache(model)
    lk = tuple((id(lo), float(s)) for lo, s in loras if getattr(lo, "touches_text_encoder", False))
    keys = [(model.family, p, max_len, lk) for p in prompts]
    missing = list(dict.fromkeys(p for p, k in zip(prompts, keys, strict=True) if k not in cache))
    for start in range(0, len(missing), ENCODE_CHUNK):
        if should_stop is not None and should_stop():
            raise Interrupted("generation was cancelled while encoding prompts")
        chunk = missing[start : start + ENCODE_CHUNK]
        with torch.no_grad():
            if model.family == "zimage":  # the pipeline rewrites the list it gets: pass a copy
                embeds, _ = model.pipe.encode_prompt(list(chunk), model.device, False, max_sequence_length=max_len)
            else:
                embeds = list(model.pipe.encode_prompt(list(chunk), model.device, 1, False)[0])
        for p, e in zip(chunk, embeds, strict=True):
            cache[(model.family, p, max_len, lk)] = e
    out = [cache[k] for k in keys]
    for k in keys:
        cache.move_to_end(k)
    while len(cache) > EMBED_CACHE_SIZE:
        cache.popitem(last=False)
    return out


def generate(
    model: TurboModel,
    prompts: str | Sequence[str],
    seed: int | Sequence[int] = 0,
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
    preview: Callable | None = None,
) -> SampleResult:
    """Generate images; see the module docstring.

    ``prompts``: a list, or text with one prompt per line. Prompt ``i`` uses seed ``seed + i`` (mod 2**64)
    for its ``images_per_prompt`` images, so a prompt gives the same images whether it runs alone or in a batch;
    ``seed`` may also be a list with one seed per prompt.
    ``on_step(step, total, shown)`` runs after every step; ``shown`` is None unless ``preview`` is given:
    then ``preview(x0)`` runs first, on the first image's latent [1,C,h,w] (float32, model latent space; the
    x0 estimate where the sampler allows, see :mod:`.previews`), and ``shown`` is what it returned.
    """
    from .lora import applied

    job = _job(model, prompts, seed, steps, width, height, images_per_prompt, sampler, shift, guidance,
               init_image, denoise, mask, max_sequence_length)
    loras = list(loras)
    with model.lock, applied(model, loras):
        return _run(model, job, loras, on_step, should_stop, preview)


def _run(model: TurboModel, job: _Job, loras: list, on_step, should_stop, preview=None) -> SampleResult:
    import torch

    from .previews import StepLatents
    from .schedulers import scheduler_for

    pos = _encode(model, job.prompts, job.max_len, loras, should_stop)
    noise, gens = _noise(model, job)
    groups: dict[float, list[int]] = {}  # prompts sharing a guidance scale: one pipeline call per group
    for i, (_, scale) in enumerate(job.per):
        groups.setdefault(scale, []).append(i)
    total_steps, done = job.steps * len(groups), [0]
    shown = StepLatents(preview) if preview is not None else None  # latent work only when previews are asked for

    def callback(pipe, i, t, kwargs):
        done[0] += 1
        out = shown(pipe, kwargs["latents"]) if shown is not None else None
        if on_step is not None:
            on_step(done[0], total_steps, out)
        if should_stop is not None and should_stop():
            raise Interrupted("generation was cancelled")
        return kwargs

    # diffusers gathers locals() for a callback on every step: pass none when nobody listens
    cb = callback if on_step is not None or should_stop is not None or shown is not None else None
    out_latents, per = [None] * len(job.prompts), job.per_prompt
    base_sched = model.pipe.scheduler
    try:
        model.pipe.scheduler = scheduler_for(model.family, base_sched, job.sampler, job.shift)
        for scale, idx in groups.items():
            cfg_on = scale > 0 if model.family == "zimage" else scale > 1
            negs = _encode(model, [job.per[i][0] for i in idx], job.max_len, loras, should_stop) if cfg_on else None
            rows = [i * per + j for i in idx for j in range(per)]
            if shown is not None:
                shown.begin(None if noise is None else noise[rows])
            lat_out = _run_pipeline(model, job, [pos[i] for i in idx], negs, scale, rows, noise, gens, cb)
            for k, i in enumerate(idx):
                out_latents[i] = lat_out[k * per : (k + 1) * per]
    finally:
        model.pipe.scheduler = base_sched
    images, raw = _decode(model, torch.cat(out_latents, dim=0))
    return SampleResult(images=images, latents=raw, seeds=job.seeds, prompts=job.prompts)
