"""``python -m turbobooth train --config``: one process, and two CPU processes under torchrun (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from PIL import Image
from turbobooth.manager import lora as L
from turbobooth.trainer import cli
from turbobooth.trainer.config import TrainConfig


@pytest.fixture(scope="module")
def zimage_folder(tmp_path_factory):
    from turbobooth.manager.tiny import build_tiny_zimage, save_diffusers

    return save_diffusers(build_tiny_zimage(0), str(tmp_path_factory.mktemp("models") / "tiny-zimage"))


def _setup(tmp_path, folder, **kw):
    data = tmp_path / "photos"
    data.mkdir()
    for i, c in enumerate([(250, 20, 20), (20, 250, 20), (20, 20, 250), (200, 200, 20)]):
        Image.new("RGB", (40, 36), c).save(data / f"{i}.png")
    args = dict(family="zimage", resolution=32, steps=2, lr=1e-3, rank=2, output_dir=str(tmp_path / "out"),
                model_source=folder, instance_data_dir=str(data), log_tensorboard=False, checkpoint_every=2)
    args.update(kw)
    return TrainConfig(**args).save(str(tmp_path / "run.yaml"))


def test_cli_single_process(tmp_path, zimage_folder):
    config = _setup(tmp_path, zimage_folder)
    assert cli.main(["train", "--config", config, "--lora-name", "subject"]) == 0
    lora = L.load_lora_file(str(tmp_path / "out" / "subject.safetensors"))
    assert lora.family == "zimage" and lora.metadata["steps"] == "2"
    assert os.path.isdir(tmp_path / "out" / "checkpoint-2")


def test_cli_cache_to_disk_flag_keeps_the_data_cache_for_a_resume(tmp_path, zimage_folder, caplog):
    from turbobooth.trainer.cache import CACHE_FILE

    config = _setup(tmp_path, zimage_folder, checkpoint_every=1)
    assert cli.main(["--config", config, "--cache-to-disk"]) == 0
    assert os.path.isfile(tmp_path / "out" / CACHE_FILE)
    with caplog.at_level("INFO", logger="turbobooth"):
        assert cli.main(["--config", config, "--cache-to-disk", "--resume", "latest", "--steps", "3"]) == 0
    assert "read the cached latents" in caplog.text and "resumed from" in caplog.text
    assert L.load_lora_file(str(tmp_path / "out" / "lora.safetensors")).metadata["steps"] == "3"
    assert cli.main(["--config", config, "--no-cache-to-disk", "--output-dir", str(tmp_path / "plain")]) == 0
    assert not os.path.exists(tmp_path / "plain" / CACHE_FILE)


def test_cli_reports_config_errors(tmp_path, zimage_folder):
    bad = tmp_path / "bad.yaml"
    bad.write_text("family: zimage\nlearning_rate: 0.1\n")
    assert cli.main(["--config", str(bad)]) == cli.EXIT_ERROR


def test_cli_overrides_are_checked_like_the_config(tmp_path, zimage_folder, caplog):
    """An override that the config would refuse (steps 0, an empty folder or resume) is refused, never ignored."""
    config = _setup(tmp_path, zimage_folder)
    cases = ((["--steps", "0"], "steps=0"), (["--output-dir", ""], "output_dir"), (["--resume", ""], "resume"))
    for flags, fragment in cases:
        caplog.clear()
        assert cli.main(["--config", config, *flags]) == cli.EXIT_ERROR
        assert fragment in caplog.text
    assert not os.path.exists(tmp_path / "out"), "nothing is trained or written"


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path, zimage_folder):
    config = _setup(tmp_path, zimage_folder, batch_size=1)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "turbobooth", "train", "--config", config, "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    assert os.path.isfile(out / "lora.safetensors")
    ckpt = out / "checkpoint-2"
    # both processes wrote their RNG state: the run really had world size 2
    assert sorted(n for n in os.listdir(ckpt) if n.startswith("random_states")) == ["random_states_0.pkl",
                                                                                 "random_states_1.pkl"]
    import json

    assert json.load(open(ckpt / "turbobooth_state.json"))["world_size"] == 2
