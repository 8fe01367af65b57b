"""The prompt-embedding cache: bounded, least recently used out first, and a call with more prompts than fit."""

from __future__ import annotations

import pytest
import torch
from turbobooth.manager import cache as cache_mod
from turbobooth.manager import sampling
from turbobooth.manager.spec import ModelSpec
from turbobooth.manager.tiny import write_tiny_models


@pytest.fixture(scope="module")
def zmodel(tmp_path_factory):
    tiny = write_tiny_models(str(tmp_path_factory.mktemp("tiny")), formats=("diffusers",))
    return cache_mod.get_model(ModelSpec(tiny["zimage_diffusers"]))


def _prompts(cache) -> list[str]:
    return [key[1] for key in cache]


def test_more_prompts_than_the_cache_holds_still_generate(zmodel, monkeypatch):
    monkeypatch.setattr(sampling, "EMBED_CACHE_SIZE", 2)
    cache = sampling.embed_cache(zmodel)
    cache.clear()
    prompts = ["a red dog", "a blue cat", "a green bird"]
    result = sampling.generate(zmodel, prompts, steps=1, width=32, height=32)
    assert result.images.shape == (3, 32, 32, 3)
    assert _prompts(cache) == prompts[1:], "the cache keeps the most recent prompts, up to its size"
    alone = sampling.generate(zmodel, prompts[0], steps=1, width=32, height=32)
    assert torch.allclose(alone.images[0], result.images[0], atol=1e-5), (
        "an evicted prompt is encoded again, to the same image"
    )


def test_a_cached_prompt_used_again_is_kept_over_older_ones(zmodel, monkeypatch):
    monkeypatch.setattr(sampling, "EMBED_CACHE_SIZE", 2)
    cache = sampling.embed_cache(zmodel)
    cache.clear()
    for prompt in ("first", "second", "first", "third"):
        sampling.generate(zmodel, prompt, steps=1, width=32, height=32)
    assert _prompts(cache) == ["first", "third"]
