"""The class-prior image cache: keys, hit/miss/top-up, naming, damaged files, RNG isolation."""

from __future__ import annotations

import os

import pytest
import torch
from turbobooth.manager.errors import InvalidInputError
from turbobooth.manager.spec import ModelSpec, TurboModel
from turbobooth.manager.tiny import build_tiny_zimage
from turbobooth.trainer import priors


@pytest.fixture(scope="module")
def model():
    pipe = build_tiny_zimage(0)
    pipe.set_progress_bar_config(disable=True)
    return TurboModel(ModelSpec("tiny"), "zimage", pipe, "tiny-zimage@rev1")


def _cache(model, root, **kw):
    args = dict(seed=3, width=32, height=32, steps=2, root=str(root))
    args.update(kw)
    return priors.PriorCache(model, "a photo of dog", **args)


def test_key_depends_on_everything(model, tmp_path):
    base = _cache(model, tmp_path)
    assert base.steps == 2 and base.guidance == 0.0  # Turbo settings by default, not the pipeline's 50/5
    others = [
        _cache(model, tmp_path, seed=4), _cache(model, tmp_path, steps=3), _cache(model, tmp_path, width=48),
        _cache(model, tmp_path, guidance=1.0), priors.PriorCache(model, "a photo of cat", seed=3, width=32, height=32,
                                                                 steps=2, root=str(tmp_path)),
    ]
    other_model = TurboModel(ModelSpec("tiny"), "zimage", model.pipe, "tiny-zimage@rev2")
    others.append(_cache(other_model, tmp_path))
    keys = {c.key for c in others} | {base.key}
    assert len(keys) == len(others) + 1
    assert _cache(model, tmp_path).key == base.key


def test_hit_miss_top_up_and_naming(model, tmp_path, monkeypatch):
    calls = []
    real = priors.PriorCache.generate_chunk

    def spy(self, chunk):
        calls.append(chunk)
        return real(self, chunk)

    monkeypatch.setattr(priors.PriorCache, "generate_chunk", spy)
    cache = _cache(model, tmp_path)
    first = cache.ensure(2)
    assert calls == [0] and len(first) == 2
    names = sorted(os.listdir(cache.folder))
    assert [n for n in names if n.endswith(".png")] == [os.path.basename(p) for p in first]
    assert all(priors.NAME.match(os.path.basename(p)) for p in first)
    assert not [n for n in names if n.endswith(".tmp")]

    calls.clear()
    assert cache.ensure(2) == first  # hit: nothing generated
    assert calls == []
    before = {p: os.stat(p).st_mtime_ns for p in first}
    more = cache.ensure(4)  # top-up: only the missing ones are written
    assert calls == [0] and more[:2] == first
    assert {p: os.stat(p).st_mtime_ns for p in first} == before
    assert len([n for n in os.listdir(cache.folder) if n.endswith(".png")]) == 4
    calls.clear()
    cache.ensure(5)  # the fifth image is in the second fixed batch
    assert calls == [1]

    # a fresh cache folder asked for 4 at once gives the same bytes: image i depends only on seed + i
    fresh = _cache(model, tmp_path / "other").ensure(4)
    assert [open(a, "rb").read() for a in fresh] == [open(b, "rb").read() for b in more]


def test_only_valid_pngs_count(model, tmp_path):
    cache = _cache(model, tmp_path)
    paths = cache.ensure(2)
    # junk, a JPEG-named file, a file with a wrong hash and a truncated one
    open(os.path.join(cache.folder, "readme.txt"), "w").write("x")
    open(os.path.join(cache.folder, "00005-0123456789abcdef.png"), "wb").write(b"not a png")
    data = open(paths[1], "rb").read()
    open(paths[1], "wb").write(data[: len(data) // 2])
    assert sorted(cache.existing()) == [0]
    assert cache.count() == 1
    again = cache.ensure(2)
    assert open(again[1], "rb").read() == data  # regenerated identically


def test_generation_does_not_consume_training_rng(model, tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _cache(model, tmp_path).ensure(1)
    assert torch.equal(torch.rand(3), expected)


def test_bad_inputs(model, tmp_path):
    with pytest.raises(InvalidInputError, match="class prompt is empty"):
        priors.PriorCache(model, " ", root=str(tmp_path))
    with pytest.raises(InvalidInputError, match="multiple of 16"):
        _cache(model, tmp_path, width=40)
    with pytest.raises(InvalidInputError, match=">= 1"):
        _cache(model, tmp_path).ensure(0)


def test_every_seed_works_including_the_largest(model, tmp_path):
    top = _cache(model, tmp_path, seed=2**64 - 1)
    paths = top.ensure(5)  # the first batch wraps past 2**64 - 1; the second starts at seed 3
    assert len(paths) == 5
    # image i uses seed (seed + i) mod 2**64: image 1 of the top seed is image 0 of seed 0
    zero = _cache(model, tmp_path / "zero", seed=0).ensure(1)
    assert open(paths[1], "rb").read() == open(zero[0], "rb").read()
    with pytest.raises(InvalidInputError, match="2\\*\\*64 - 1"):
        _cache(model, tmp_path, seed=2**64)


def test_failed_write_removes_its_temp_file(model, tmp_path, monkeypatch):
    import errno

    from turbobooth.manager.paths import WriteError

    def full(path, data):
        with open(path, "wb") as f:
            f.write(data[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    cache = _cache(model, tmp_path)
    monkeypatch.setattr(priors.Path, "write_bytes", full)  # every cache file is written through it
    with pytest.raises(WriteError, match=r"disk is full .* MiB more needed"):
        cache.ensure(1)
    assert not os.path.isdir(cache.folder) or os.listdir(cache.folder) == []


def test_prior_image_gen_node_takes_the_largest_seed(model, tmp_path, monkeypatch):
    import turbobooth
    from turbobooth.nodes import comfy as host

    monkeypatch.setattr(host, "output_directory", lambda: str(tmp_path))
    node = turbobooth.NODE_CLASS_MAPPINGS["TurboBoothPriorImageGen"]()
    max_seed = node.INPUT_TYPES()["required"]["seed"][1]["max"]
    (images,) = node.generate(model, "a photo of dog", 5, max_seed, 32, 32, 1)
    assert tuple(images.shape) == (5, 32, 32, 3) and max_seed == 2**64 - 1
