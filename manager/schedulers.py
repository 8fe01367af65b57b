"""Sampler choices, built from diffusers' schedulers."""

from __future__ import annotations

from .errors import InvalidInputError

ZIMAGE_SAMPLERS = ("euler", "dpmpp_2m", "unipc")
SD1_SAMPLERS = ("euler", "euler_a", "dpmpp_2m", "unipc", "ddim", "model_default")


def _flow_multistep(cls):
    """A flow-sigma multistep scheduler that accepts the ``sigmas=``/``mu=`` call of flow pipelines.

    Flow pipelines (ZImagePipeline) always pass their own sigma list; the
    multistep solvers build their flow sigmas from ``flow_shift`` and only
    need the count.
    """

    class FlowMultistep(cls):
        def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, **kwargs):
            if sigmas is not None:
                num_inference_steps = len(sigmas)
            return super().set_timesteps(num_inference_steps=num_inference_steps, device=device)

    FlowMultistep.__name__ = f"Flow{cls.__name__}"
    return FlowMultistep


def zimage_scheduler(base_config: dict, sampler: str, shift: float | None):
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if sampler not in ZIMAGE_SAMPLERS:
        raise InvalidInputError(f"sampler {sampler!r} is not available for Z-Image; choose one of {', '.join(ZIMAGE_SAMPLERS)}")
    shift = float(base_config.get("shift", 3.0)) if shift is None else float(shift)
    if shift <= 0:
        raise InvalidInputError(f"shift must be > 0, got {shift}")
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


def sd1_scheduler(base_config: dict, sampler: str, base_scheduler=None):
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    if sampler not in SD1_SAMPLERS:
        raise InvalidInputError(f"sampler {sampler!r} is not available for SD1.x; choose one of {', '.join(SD1_SAMPLERS)}")
    if sampler == "model_default" and base_scheduler is not None:
        return base_scheduler
    cls = {
        "euler": EulerDiscreteScheduler,
        "euler_a": EulerAncestralDiscreteScheduler,
        "dpmpp_2m": DPMSolverMultistepScheduler,
        "unipc": UniPCMultistepScheduler,
        "ddim": DDIMScheduler,
        "model_default": EulerDiscreteScheduler,
    }[sampler]
    return cls.from_config(base_config)
