"""CheckpointSave: names, no silent overwrite, atomic writes, and files that load back."""

from __future__ import annotations

import os

import pytest
import torch
import turbobooth
from PIL import Image
from turbobooth.manager import lora as L
from turbobooth.manager.errors import InvalidInputError
from turbobooth.manager.loading import load_model
from turbobooth.manager.paths import safe_name, unique_path
from turbobooth.manager.sampling import generate
from turbobooth.manager.spec import ModelSpec, TurboModel
from turbobooth.manager.tiny import build_tiny_sd1, build_tiny_zimage
from turbobooth.manager.writers import save_lora, save_model
from turbobooth.trainer import runs
from turbobooth.trainer.config import TrainConfig


def _squares(size):
    return [Image.new("RGB", (size, size), c) for c in ((250, 20, 20), (235, 45, 15), (255, 0, 40))]


@pytest.fixture(scope="module")
def zlora(tmp_path_factory):
    pipe = build_tiny_zimage(0)
    model = TurboModel(ModelSpec("tiny"), "zimage", pipe, "tiny-zimage")
    cfg = TrainConfig(family="zimage", resolution=32, steps=2, lr=1e-3, rank=4, log_tensorboard=False,
                      output_dir=str(tmp_path_factory.mktemp("run")), instance_prompt="a photo of sks dog")
    return runs.train(model, cfg, _squares(32)).lora


@pytest.mark.parametrize(
    "name, expected",
    [
        ("my lora", "my lora"),
        ("../../etc/passwd", "etc_passwd"),
        ("..\\..\\evil", "evil"),
        ("/abs/path/x", "abs_path_x"),
        ("we|ird*na:me?", "we_ird_na_me_"),
        ("", "turbobooth"),
        ("..", "turbobooth"),
    ],
)
def test_names_are_sanitised(name, expected):
    assert safe_name(name) == expected
    assert os.sep not in safe_name(name) and ".." not in safe_name(name).split(os.sep)


def test_lora_names_auto_increment_unless_overwrite(zlora, tmp_path):
    first = save_lora(zlora, str(tmp_path), "sks_dog")
    second = save_lora(zlora, str(tmp_path), "sks_dog.safetensors")
    third = save_lora(zlora, str(tmp_path), "../sks_dog")
    assert [os.path.basename(p) for p in (first, second, third)] == [
        "sks_dog.safetensors", "sks_dog_00001.safetensors", "sks_dog_00002.safetensors"]
    assert all(os.path.dirname(p) == str(tmp_path) for p in (first, second, third))
    before = os.path.getmtime(first)
    again = save_lora(zlora, str(tmp_path), "sks_dog", overwrite=True)
    assert again == first and os.path.getmtime(first) >= before
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp") or n.startswith(".")]
    loaded = L.load_lora_file(first)
    assert loaded.family == "zimage" and loaded.metadata.get("instance_prompt", "").startswith("a photo of sks")


def test_checkpoint_save_node_writes_a_loadable_lora(zlora, tmp_path, monkeypatch):
    from turbobooth.nodes import comfy as host

    monkeypatch.setattr(host, "folder_roots", lambda kind: [str(tmp_path / kind)])
    node = turbobooth.NODE_CLASS_MAPPINGS["TurboBoothCheckpointSave"]()
    out = node.save("sks dog", "diffusers folder", False, lora=zlora)
    path = out["result"][0]
    assert path == str(tmp_path / "loras" / "sks dog.safetensors") and out["ui"]["text"] == [path]
    with pytest.raises(InvalidInputError, match="needs a lora or a model"):
        node.save("x", "diffusers folder", False)


def test_unwritable_output_folder_is_a_clear_error(zlora, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InvalidInputError, match="cannot create output folder"):
        save_lora(zlora, str(blocker / "loras"), "x")


def test_full_finetune_saves_as_folder_and_sd1_single_file(tmp_path):
    pipe = build_tiny_sd1(0)
    base = TurboModel(ModelSpec("tiny"), "sd1", pipe, "tiny-sd1")
    cfg = TrainConfig(family="sd1", resolution=64, steps=2, lr=1e-3, train_mode="full", log_tensorboard=False,
                      output_dir=str(tmp_path / "run"), instance_prompt="a photo of sks dog")
    tuned = runs.train(base, cfg, _squares(64)).model
    folder = save_model(tuned, str(tmp_path / "diffusers"), "sks full")
    single = save_model(tuned, str(tmp_path / "checkpoints"), "sks full", "single file (SD1.x)")
    assert os.path.isfile(os.path.join(folder, "model_index.json")) and single.endswith("sks full.safetensors")
    assert save_model(tuned, str(tmp_path / "diffusers"), "sks full").endswith("sks full_00001")
    ref = generate(tuned, "a photo of sks dog", seed=3, steps=3, width=64, height=64).images
    for spec in (ModelSpec(folder), ModelSpec(single, tokenizer=os.path.splitext(single)[0] + "_tokenizer")):
        back = load_model(spec)
        assert torch.allclose(generate(back, "a photo of sks dog", seed=3, steps=3, width=64, height=64).images,
                              ref, atol=1e-4)
    with pytest.raises(InvalidInputError, match="single-file export is for SD1.x"):
        save_model(TurboModel(ModelSpec("t"), "zimage", build_tiny_zimage(0), "z"), str(tmp_path), "z", "single file")


def test_unique_path_never_returns_an_existing_file(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"x")
    (tmp_path / "a_00001.safetensors").write_bytes(b"x")
    assert unique_path(str(tmp_path), "a", ".safetensors") == str(tmp_path / "a_00002.safetensors")
