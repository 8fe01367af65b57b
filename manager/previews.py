"""Live previews while sampling: the first image's latent after every step, as an x0 estimate where cheap.

The latents diffusers hands ``callback_on_step_end`` are already in ComfyUI's model space: the pipelines decode
them as ``latents / scaling_factor + shift_factor``, which undoes ComfyUI's ``process_in`` for the same VAE
(SD1.x: ``SD15``, scale 0.18215; Z-Image: ``Flux``, scale 0.3611, shift 0.1159).
"""

from __future__ import annotations

from collections.abc import Callable

from .errors import get_logger

logger = get_logger(__name__)

#: schedulers whose step is a plain Euler step in sigma: x_next = x + (sigma_next - sigma) * d, x0 = x - sigma * d
EULER_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "EulerDiscreteScheduler")


class StepLatents:
    """Turns each step's latents into ``preview(x0)`` for the first image of the batch.

    For Euler steps the x0 estimate follows from two consecutive latents:
    ``d = (x_next - x) / (sigma_next - sigma)`` and ``x0 = x_next - sigma_next * d`` (at the last step
    ``sigma_next`` is 0, so the estimate is the output itself). The first step of a txt2img call uses the
    noise it started from; where the latents before a step are not known (the first step of img2img) and
    for the multistep and ancestral samplers, the noisy latent itself is previewed.
    """

    def __init__(self, preview: Callable):
        self.preview = preview
        self.begin()

    def begin(self, first_latents=None) -> None:
        """A new pipeline call; ``first_latents``: the noise its first step starts from (txt2img), else None."""
        self.prev = None
        self.first = None if first_latents is None else first_latents[:1].detach().float()

    def __call__(self, pipe, latents):
        x_next = latents[:1].detach().float().clone()  # the pipeline's next step must not change it
        scheduler = pipe.scheduler
        prev = self.prev
        if prev is None and self.first is not None:
            prev = self.first.to(x_next.device) * float(getattr(scheduler, "init_noise_sigma", 1.0))
        self.prev = x_next
        return self.preview(_euler_x0(scheduler, prev, x_next))


def _euler_x0(scheduler, x, x_next):
    """The x0 estimate of the Euler step that just moved ``x`` to ``x_next``; ``x_next`` when it cannot tell.

    Only a deterministic Euler step tells (the pipelines pass no ``s_churn``, so SD1's Euler adds no noise either).
    """
    sigmas = getattr(scheduler, "sigmas", None)
    euler = type(scheduler).__name__ in EULER_SCHEDULERS and not scheduler.config.get("stochastic_sampling", False)
    index = getattr(scheduler, "step_index", None)  # already advanced past the step just taken
    if x is None or sigmas is None or not euler or index is None or not 1 <= index < len(sigmas):
        return x_next
    sigma, sigma_next = float(sigmas[index - 1]), float(sigmas[index])
    if sigma == sigma_next:
        return x_next
    d = (x_next - x) / (sigma_next - sigma)
    return x_next - sigma_next * d


class GuardedPreview:
    """``preview(x0)`` around a host's latent decoder (``decode(x0) -> preview``).

    ``x0`` arrives in our VAE's latent space (``raw = x0 / scaling_factor + shift_factor``); when the host's
    latent format scales differently (``host = (raw - shift) * scale``) it is converted first. The first
    time the decoder fails it logs once and turns itself off, so a preview never fails a generation.
    """

    def __init__(self, decode: Callable, vae_config, scale: float, shift: float = 0.0):
        self.decode, self.failed = decode, False
        ours = (float(vae_config.scaling_factor), float(getattr(vae_config, "shift_factor", None) or 0.0))
        theirs = (float(scale), float(shift or 0.0))
        same = all(abs(a - b) < 1e-6 for a, b in zip(ours, theirs, strict=True))
        self.convert = None if same else (ours, theirs)

    def __call__(self, x0):
        if self.failed:
            return None
        try:
            if self.convert is not None:
                (s, h), (hs, hh) = self.convert
                x0 = (x0 / s + h - hh) * hs
            return self.decode(x0)
        except Exception:
            self.failed = True
            logger.warning("the live preview failed; sampling goes on without previews", exc_info=True)
            return None
