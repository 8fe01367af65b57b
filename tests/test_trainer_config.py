"""TrainConfig validation and YAML/JSON round trips; data loading and checks."""

from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image
from turbobooth.manager.errors import InvalidInputError
from turbobooth.trainer.config import TrainConfig
from turbobooth.trainer.data import check_instance_prompt, load_images


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"steps": 0}, r"steps=0 must be an integer >= 1"),
        ({"lr": 0}, r"lr=0 must be a number > 0"),
        ({"lr": -1e-4}, r"lr=-0.0001"),
        ({"rank": 0}, r"rank=0 must be an integer >= 1"),
        ({"resolution": 520}, r"resolution=520 must be a multiple of 16"),
        ({"family": "sd1", "resolution": 500}, r"resolution=500 must be a multiple of 8"),
        ({"with_prior_preservation": True, "class_prompt": "  "}, r"class_prompt is empty"),
        ({"mixed_precision": "fp8"}, r"mixed_precision='fp8'.*no, fp16, bf16"),
        ({"lr_scheduler": "step"}, r"lr_scheduler='step'.*constant, cosine, linear"),
        ({"train_mode": "full"}, r"only supported for Stable Diffusion 1.x"),
        ({"train_text_encoder": True}, r"only supported for Stable Diffusion 1.x"),
        ({"gradient_accumulation_steps": 0}, r"gradient_accumulation_steps=0"),
        ({"batch_size": 0}, r"batch_size=0"),
        ({"keep_last": 0}, r"keep_last=0"),
        ({"family": "sdxl"}, r"family='sdxl' is not supported"),
        ({"instance_prompt": ""}, r"instance_prompt"),
        ({"validation_every": 5}, r"validation_prompt"),
        ({"family": "sd1", "training_adapter": "x.safetensors", "resolution": 512}, r"training_adapter"),
        ({"captions": "a dog"}, r"captions='a dog' must be a list of one-line strings"),
        ({"captions": ("a\nb",)}, r"must be a list of one-line strings, one per instance image"),
        ({"cache_to_disk": "yes"}, r"cache_to_disk='yes' must be true or false"),
    ],
)
def test_validation_messages(changes, match):
    with pytest.raises(InvalidInputError, match=match):
        TrainConfig(**changes)


def test_adamw8bit_needs_bitsandbytes():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(InvalidInputError, match="bitsandbytes"):
            TrainConfig(optimizer="adamw8bit")
    else:
        assert TrainConfig(optimizer="adamw8bit").optimizer == "adamw8bit"


def test_valid_sd1_full_config():
    cfg = TrainConfig(family="sd1", resolution=512, train_mode="full", train_text_encoder=True)
    assert cfg.lora_alpha == cfg.rank and cfg.targets == ("to_q", "to_k", "to_v", "to_out.0")


def test_yaml_and_json_round_trip(tmp_path):
    cfg = TrainConfig(family="sd1", resolution=64, steps=7, lr=3e-4, with_prior_preservation=True,
                      class_prompt="a photo of dog", lora_targets=("to_q", "to_v"), alpha=2.0, resume="latest",
                      captions=("[trigger] on grass", ""), cache_to_disk=True)
    for name in ("run.yaml", "run.json"):
        path = cfg.save(str(tmp_path / name))
        assert TrainConfig.load(path) == cfg
    assert TrainConfig.from_yaml(cfg.to_yaml()) == cfg
    assert TrainConfig.from_json(cfg.to_json()) == cfg


def test_unknown_key_is_named():
    with pytest.raises(InvalidInputError, match=r"'learning_rate'.*did you mean 'lr'|unknown.*'learning_rate'"):
        TrainConfig.from_dict({"learning_rate": 1e-4})
    with pytest.raises(InvalidInputError, match="'stpes'"):
        TrainConfig.from_yaml("stpes: 3\n")


def test_fingerprint_ignores_bookkeeping():
    a = TrainConfig(steps=10, output_dir="a", checkpoint_every=2)
    assert a.trajectory_fingerprint() == TrainConfig(steps=20, output_dir="b").trajectory_fingerprint()
    assert a.trajectory_fingerprint() != TrainConfig(steps=10, lr=1e-3).trajectory_fingerprint()
    # where the latents come from (disk or the encoders) does not change them
    assert a.replace(cache_to_disk=True).trajectory_fingerprint() == a.trajectory_fingerprint()


# ---- data ----------------------------------------------------------------------------


def test_zero_images_is_an_error(tmp_path):
    with pytest.raises(InvalidInputError, match="no instance images"):
        load_images([], 32)
    with pytest.raises(InvalidInputError, match="no instance images"):
        load_images(str(tmp_path), 32)


def test_one_image_warns(caplog):
    with caplog.at_level(logging.WARNING):
        out = load_images([Image.new("RGB", (40, 40))], 32)
    assert len(out) == 1 and "only 1 instance image" in caplog.text


def test_mixed_sizes_modes_and_tensors(caplog, tmp_path):
    imgs = [
        Image.new("RGB", (100, 50), (255, 0, 0)),
        Image.new("L", (30, 90), 128),
        Image.new("RGBA", (64, 64), (0, 0, 255, 0)),
    ]
    with caplog.at_level(logging.WARNING):
        out = load_images(imgs, 32)
    assert all(t.image.size == (32, 32) and t.image.mode == "RGB" for t in out)
    assert "is L, not RGB" in caplog.text and "is RGBA, not RGB" in caplog.text
    assert out[2].image.getpixel((5, 5)) == (255, 255, 255)  # transparent -> white
    tensor = torch.rand(2, 48, 40, 3)
    assert [t.image.size for t in load_images(tensor, 32)] == [(32, 32), (32, 32)]
    imgs[0].save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a photo of sks dog on a beach")
    Image.new("RGB", (40, 40)).save(tmp_path / "b.jpg")
    (tmp_path / "notes.md").write_text("ignored")
    folder = load_images(str(tmp_path), 32)
    assert [t.caption for t in folder] == ["a photo of sks dog on a beach", None]


def test_prompt_without_unique_token_warns(caplog):
    with caplog.at_level(logging.WARNING):
        assert not check_instance_prompt("a photo of a dog", "a photo of a dog")
        assert not check_instance_prompt("a photo of dog")
    assert "unique identifier" in caplog.text
    assert check_instance_prompt("a photo of sks dog", "a photo of a dog")


FLOAT_FIELDS = ("lr", "prior_loss_weight", "max_grad_norm", "adam_beta1", "adam_beta2", "adam_epsilon",
                "adam_weight_decay", "alpha", "text_encoder_lr", "class_guidance", "min_free_disk_gb")


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_are_refused_by_name(name, value):
    with pytest.raises(InvalidInputError, match=rf"^{name}=.*finite"):
        TrainConfig(**{name: value})


def test_seed_range_and_auto_precision():
    assert TrainConfig(seed=2**64 - 1, validation_seed=2**64 - 1).seed == 2**64 - 1
    with pytest.raises(InvalidInputError, match="seed=18446744073709551616 must be an integer from 0 to"):
        TrainConfig(seed=2**64)
    assert TrainConfig(mixed_precision="auto").mixed_precision == "auto"


@pytest.mark.parametrize("value", [-1, 1.5, "2", True, None])
def test_offload_blocks_must_be_a_count(value):
    with pytest.raises(InvalidInputError, match=rf"^offload_blocks={value!r} must be an integer >= 0: 0 = off"):
        TrainConfig(offload_blocks=value)


def test_offload_blocks_is_for_zimage_and_keeps_the_fingerprint(tmp_path):
    with pytest.raises(InvalidInputError, match="offload_blocks=2 offloads Z-Image's transformer blocks.*=0"):
        TrainConfig(family="sd1", resolution=512, offload_blocks=2)
    cfg = TrainConfig(offload_blocks=3, memory="bf16_offloaded")
    assert TrainConfig.load(cfg.save(str(tmp_path / "run.yaml"))) == cfg
    # where the frozen weights wait between uses does not change a single value: checkpoints resume either way
    assert cfg.trajectory_fingerprint() == TrainConfig(memory="bf16_offloaded").trajectory_fingerprint()
    assert cfg.trajectory_fingerprint() == TrainConfig().trajectory_fingerprint()
