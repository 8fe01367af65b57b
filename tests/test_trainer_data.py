"""Training data: aspect-ratio buckets, captions with [trigger], caption dropout, and exact resume with them on."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from turbobooth.manager.errors import InvalidInputError
from turbobooth.manager.spec import ModelSpec, TurboModel
from turbobooth.manager.tiny import build_tiny_sd1, build_tiny_zimage
from turbobooth.trainer import runs
from turbobooth.trainer.cache import cache_data
from turbobooth.trainer.config import TrainConfig
from turbobooth.trainer.data import bucket_size, caption_lines, load_images, prepare_image, with_captions
from turbobooth.trainer.objective import assemble_batch


def _model(family="zimage"):
    pipe = build_tiny_zimage(0) if family == "zimage" else build_tiny_sd1(0)
    pipe.set_progress_bar_config(disable=True)
    return TurboModel(ModelSpec("tiny"), family, pipe, f"tiny-{family}")


@pytest.fixture(scope="module")
def zmodel():
    return _model("zimage")


def _cfg(tmp_path, name="run", **kw):
    args = dict(family="zimage", resolution=32, steps=4, lr=1e-3, rank=4, output_dir=str(tmp_path / name),
                log_tensorboard=False, instance_prompt="a photo of sks dog", class_prompt="a photo of dog", seed=3)
    args.update(kw)
    return TrainConfig(**args)


def _mixed(colors=((250, 20, 20), (20, 250, 20), (20, 20, 250), (200, 200, 20))):
    """Two landscape and two portrait photos."""
    sizes = [(96, 48), (80, 40), (48, 96), (40, 80)]
    return [Image.new("RGB", s, c) for s, c in zip(sizes, colors, strict=True)]


@pytest.mark.parametrize("size, res, mult, expected", [
    ((1600, 900), 1024, 16, (1360, 768)),  # about 1024**2 pixels at the photo's 16:9
    ((900, 1600), 1024, 16, (768, 1360)),
    ((2048, 2048), 1024, 16, (1024, 1024)),
    ((300, 200), 1024, 16, (288, 192)),  # smaller than the area: never upscaled
    ((512, 512), 512, 8, (512, 512)),
])
def test_bucket_sizes(size, res, mult, expected):
    bw, bh = bucket_size(*size, res, mult)
    assert (bw, bh) == expected and bw % mult == 0 and bh % mult == 0
    assert bw <= size[0] and bh <= size[1]


def test_bucketed_image_keeps_its_aspect_and_is_never_upscaled():
    img = Image.new("RGB", (1600, 900), (10, 20, 30))
    out = prepare_image(img, 1024, center_crop=False, multiple=16)
    assert out.size == (1360, 768) and abs(out.size[0] / out.size[1] - 16 / 9) < 0.02
    small = prepare_image(Image.new("RGB", (100, 60)), 512, center_crop=False, multiple=16)
    assert small.size[0] <= 100 and small.size[1] <= 60
    assert prepare_image(img, 512, center_crop=True, multiple=16).size == (512, 512)


def test_batches_are_drawn_within_a_bucket(zmodel, tmp_path):
    cfg = _cfg(tmp_path, batch_size=2)
    images = load_images(_mixed(), cfg.resolution, cfg.center_crop, multiple=16)
    assert {i.image.size for i in images} == {(32, 16), (16, 32)}
    data = cache_data(zmodel.pipe, "zimage", cfg, images, None, "cpu")
    seen = []
    for micro in range(6):  # three epochs of two batches
        batch = assemble_batch(data, cfg.seed, micro, 2, 0, 1, False)
        assert len({tuple(t.shape) for t in batch.latents}) == 1, "a batch mixes buckets"
        seen.append(sorted(id(t) for t in batch.latents))
    ids = {id(t): i for i, t in enumerate(data.inst_latents)}
    for epoch in range(3):
        members = sorted(ids[x] for b in seen[2 * epoch : 2 * epoch + 2] for x in b)
        assert members == [0, 1, 2, 3], "every image once per epoch"
    again = [sorted(id(t) for t in assemble_batch(data, cfg.seed, m, 2, 0, 1, False).latents) for m in range(6)]
    assert again == seen


def _caption_folder(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, img in enumerate(_mixed()[:3]):
        img.save(folder / f"{i}.png")
    (folder / "0.txt").write_text("[trigger] dog on a beach", encoding="utf-8")
    (folder / "1.txt").write_text("close-up of [trigger] dog", encoding="utf-8")
    return folder


def test_captions_replace_the_trigger_and_fall_back_to_the_instance_prompt(zmodel, tmp_path):
    cfg = _cfg(tmp_path)
    assert cfg.trigger_word == "sks"
    images = load_images(str(_caption_folder(tmp_path)), cfg.resolution, cfg.center_crop, multiple=16)
    data = cache_data(zmodel.pipe, "zimage", cfg, images, None, "cpu")
    assert [data.prompts[i] for i in data.inst_prompt] == ["sks dog on a beach", "close-up of sks dog",
                                                           "a photo of sks dog"]
    other = cfg.replace(trigger="ohwx")
    data = cache_data(zmodel.pipe, "zimage", other, images, None, "cpu")
    assert data.prompts[data.inst_prompt[0]] == "ohwx dog on a beach"
    nameless = cfg.replace(instance_prompt="a photo of a dog", class_prompt="a photo of a dog")
    with pytest.raises(InvalidInputError, match=r"\[trigger\]"):
        cache_data(zmodel.pipe, "zimage", nameless, images, None, "cpu")


def test_captions_setting_replaces_the_image_captions_in_order(zmodel, tmp_path):
    assert caption_lines("[trigger] on grass\n\n a [trigger] toy \n") == ("[trigger] on grass", "", "a [trigger] toy")
    assert caption_lines("a\r\nb") == ("a", "b") and caption_lines(" \n ") == () and caption_lines("") == ()
    cfg = _cfg(tmp_path, captions=["[trigger] on grass", "", "a [trigger] toy"])
    assert cfg.captions == ("[trigger] on grass", "", "a [trigger] toy")
    folder = _caption_folder(tmp_path)  # 0.txt and 1.txt hold captions of their own
    images = with_captions(load_images(str(folder), cfg.resolution, cfg.center_crop, multiple=16), cfg.captions)
    data = cache_data(zmodel.pipe, "zimage", cfg, images, None, "cpu")
    assert [data.prompts[i] for i in data.inst_prompt] == ["sks on grass", "a photo of sks dog", "a sks toy"]
    with pytest.raises(InvalidInputError, match="2 captions were given for 3 instance images"):
        runs.train(zmodel, cfg.replace(captions=("a", "b")), str(folder))
    nameless = cfg.replace(instance_prompt="a photo of a dog", class_prompt="a photo of a dog")
    with pytest.raises(InvalidInputError, match=r"caption of .*0\.png uses \[trigger\]"):
        runs.train(zmodel, nameless, str(folder))


def test_captions_are_part_of_the_trajectory(zmodel, tmp_path):
    cfg = _cfg(tmp_path, steps=1, checkpoint_every=1, captions=("[trigger] on grass", "", ""))
    assert cfg.trajectory_fingerprint() != cfg.replace(captions=("", "", "")).trajectory_fingerprint()
    assert cfg.replace(captions=()).trajectory_fingerprint() == _cfg(tmp_path, steps=1).trajectory_fingerprint()
    folder = str(_caption_folder(tmp_path))
    runs.train(zmodel, cfg, folder)
    with pytest.raises(InvalidInputError, match=r"settings differ \(captions\)"):
        runs.train(zmodel, cfg.replace(resume="latest", captions=("[trigger] on sand", "", "")), folder)


def test_caption_that_is_not_utf8_is_a_clear_error(tmp_path):
    folder = _caption_folder(tmp_path)
    (folder / "2.txt").write_bytes("caf\xe9 [trigger]".encode("latin-1"))
    with pytest.raises(InvalidInputError, match="not UTF-8") as err:
        load_images(str(folder), 32, False, multiple=16)
    assert str(folder / "2.txt") in str(err.value)


def test_caption_dropout_is_a_seeded_share_of_instance_elements(zmodel, tmp_path):
    cfg = _cfg(tmp_path, caption_dropout=0.4)
    images = load_images(_mixed(), 32, False, multiple=16)
    data = cache_data(zmodel.pipe, "zimage", cfg, images, None, "cpu")
    assert data.prompts[data.empty] == ""
    drawn = [assemble_batch(data, cfg.seed, m, 1, 0, 1, False).prompt_index[0] for m in range(400)]
    share = sum(p == data.empty for p in drawn) / len(drawn)
    assert 0.3 < share < 0.5
    assert drawn == [assemble_batch(data, cfg.seed, m, 1, 0, 1, False).prompt_index[0] for m in range(400)]
    with pytest.raises(InvalidInputError, match="caption_dropout"):
        _cfg(tmp_path, caption_dropout=1.0)
    with pytest.raises(InvalidInputError, match="caption_dropout"):
        _cfg(tmp_path, caption_dropout=float("nan"))


def _same(a, b):
    return set(a.tensors) == set(b.tensors) and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


@pytest.mark.parametrize("family", ["zimage", "sd1"])
def test_resume_is_bit_exact_with_buckets_captions_and_dropout(family, tmp_path, one_thread):
    model = _model(family)
    folder = _caption_folder(tmp_path)
    classes = [Image.new("RGB", (32, 32), c) for c in ((90, 90, 90), (120, 60, 30))]
    kw = dict(family=family, steps=4, batch_size=2, caption_dropout=0.3, with_prior_preservation=True,
              num_class_images=2, lr=3e-3)
    full = runs.train(model, _cfg(tmp_path, "full", **kw), str(folder), class_images=classes)
    done = []
    cfg = _cfg(tmp_path, "split", checkpoint_every=2, **kw)
    first = runs.train(model, cfg, str(folder), class_images=classes, on_step=lambda s, t, p: done.append(s),
                       should_stop=lambda: len(done) >= 2)
    assert first.stopped and first.step == 2
    second = runs.train(model, cfg.replace(resume="latest"), str(folder), class_images=classes)
    assert second.step == 4 and second.losses == full.losses
    assert _same(second.lora, full.lora)
    assert all(torch.isfinite(v).all() for v in full.lora.tensors.values())


def test_prompt_only_config_has_no_trigger_problem(zmodel, tmp_path):
    """Images without captions never need a trigger word."""
    cfg = _cfg(tmp_path, instance_prompt="a photo of a dog", class_prompt="a photo of a dog")
    data = cache_data(zmodel.pipe, "zimage", cfg, load_images(_mixed(), 32, False, multiple=16), None, "cpu")
    assert set(data.prompts) == {"a photo of a dog"} and data.empty is None
