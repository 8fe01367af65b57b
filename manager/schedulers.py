"""Sampler choices, built from diffusers' schedulers."""

from __future__ import annotations

from .inputs import check_sampler, number

#: SD1.x sampler -> diffusers scheduler class, configured like the model's own (``model_default``: that one)
SD1_SCHEDULERS = {
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "ddim": "DDIMScheduler",
}


def _flow_multistep(cls):
    """A flow-sigma multistep scheduler that accepts the ``sigmas=``/``mu=`` call of flow pipelines.

    Flow pipelines (ZImagePipeline) always pass their own sigma list; the multistep solvers build their flow
    sigmas from ``flow_shift`` and only need the count. The img2img and inpaint pipelines also noise the init
    latents with ``scale_noise``, which only the flow-matching Euler scheduler has.
    """

    class FlowMultistep(cls):
        def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, **kwargs):
            if sigmas is not None:
                num_inference_steps = len(sigmas)
            return super().set_timesteps(num_inference_steps=num_inference_steps, device=device)

        def scale_noise(self, sample, timestep, noise):
            """Flow matching's forward process at ``timestep``, where img2img and inpainting start:
            ``(1 - sigma) * sample + sigma * noise`` with this schedule's own sigma."""
            sigma = self.sigmas[self.index_for_timestep(timestep.flatten()[0])].to(sample.device, sample.dtype)
            return sigma * noise + (1.0 - sigma) * sample

    FlowMultistep.__name__ = f"Flow{cls.__name__}"
    return FlowMultistep


def zimage_scheduler(base_config: dict, sampler: str, shift: float | None):
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    check_sampler("zimage", sampler)
    shift = number("shift", base_config.get("shift", 3.0) if shift is None else shift, 0.0, 100.0, lo_open=True)
    if sampler == "euler":
        return FlowMatchEulerDiscreteScheduler.from_config(base_config, shift=shift, use_dynamic_shifting=False)
    common = dict(
        num_train_timesteps=int(base_config.get("num_train_timesteps", 1000)),
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        flow_shift=shift,
        solver_order=2,
    )
    if sampler == "dpmpp_2m":
        return _flow_multistep(DPMSolverMultistepScheduler)(algorithm_type="dpmsolver++", **common)
    return _flow_multistep(UniPCMultistepScheduler)(**common)


def scheduler_for(family: str, base, sampler: str, shift: float | None = None):
    """The scheduler for ``sampler``, configured like the model's own ``base``: ``base`` itself where the sampler
    (and, for Z-Image, the shift) is the model's own."""
    import diffusers

    check_sampler(family, sampler)
    if family == "zimage":
        own_euler = type(base).__name__ == "FlowMatchEulerDiscreteScheduler"
        if sampler == "euler" and own_euler and shift in (None, base.config.get("shift")):
            return base  # the model's own flow-matching Euler scheduler, as loaded
        return zimage_scheduler(dict(base.config), sampler, shift)
    if sampler == "model_default":
        return base
    return getattr(diffusers, SD1_SCHEDULERS[sampler]).from_config(base.config)
