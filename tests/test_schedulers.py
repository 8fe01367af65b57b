"""Sampler choices: each is diffusers' own scheduler, configured like the model's (no model weights needed)."""

from __future__ import annotations

import diffusers
import pytest
from turbobooth.manager.errors import InvalidInputError
from turbobooth.manager.formats import shipped_config
from turbobooth.manager.schedulers import scheduler_for


def _own(family: str):
    """The scheduler a real model of ``family`` ships with."""
    config = shipped_config(family, "scheduler")
    return getattr(diffusers, config["_class_name"]).from_config(config)


@pytest.mark.parametrize(
    "sampler, cls",
    [
        ("euler", diffusers.EulerDiscreteScheduler),
        ("euler_a", diffusers.EulerAncestralDiscreteScheduler),
        ("dpmpp_2m", diffusers.DPMSolverMultistepScheduler),
        ("unipc", diffusers.UniPCMultistepScheduler),
        ("ddim", diffusers.DDIMScheduler),
    ],
)
def test_sd1_samplers_are_configured_like_the_model_scheduler(sampler, cls):
    own = _own("sd1")
    sched = scheduler_for("sd1", own, sampler)
    assert type(sched) is cls and sched is not own
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "steps_offset"):
        assert sched.config[key] == own.config[key], key
    sched.set_timesteps(4)
    assert len(sched.timesteps) == 4


def test_the_model_own_scheduler_is_used_as_loaded_where_nothing_changes():
    sd1, zimage = _own("sd1"), _own("zimage")
    assert scheduler_for("sd1", sd1, "model_default") is sd1
    assert scheduler_for("zimage", zimage, "euler") is zimage
    assert scheduler_for("zimage", zimage, "euler", zimage.config["shift"]) is zimage
    shifted = scheduler_for("zimage", zimage, "euler", 5.0)
    assert type(shifted) is diffusers.FlowMatchEulerDiscreteScheduler and shifted.config.shift == 5.0
    assert not shifted.config.use_dynamic_shifting and zimage.config.shift == 3.0


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "unipc"])
def test_zimage_multistep_samplers_take_the_flow_pipeline_call(sampler):
    sched = scheduler_for("zimage", _own("zimage"), sampler, 4.0)
    assert sched.config.use_flow_sigmas and sched.config.flow_shift == 4.0
    sched.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=0.7, device="cpu")  # what ZImagePipeline passes
    assert len(sched.timesteps) == 4, "the solver builds its own flow sigmas and only takes their count"
    with pytest.raises(InvalidInputError, match=r"shift=0 is outside \(0, 100\]"):
        scheduler_for("zimage", _own("zimage"), sampler, 0)


@pytest.mark.parametrize(
    "family, sampler, allowed",
    [
        ("sd1", "lms", "euler, euler_a, dpmpp_2m, unipc, ddim, model_default"),
        ("zimage", "ddim", "euler, dpmpp_2m, unipc"),
    ],
)
def test_unknown_samplers_name_the_allowed_ones(family, sampler, allowed):
    with pytest.raises(InvalidInputError, match=f"sampler '{sampler}' is not available .* {allowed}"):
        scheduler_for(family, _own(family), sampler)
