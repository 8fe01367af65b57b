"""TurboLora: attaching with strengths, bit-exact removal, file formats (ours, diffusers, ComfyUI layout)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from turbobooth.manager import lora as L
from turbobooth.manager.errors import UnsafeFileError, WrongFamilyError
from turbobooth.manager.model import TurboModel
from turbobooth.manager.spec import ModelSpec
from turbobooth.manager.tiny import build_tiny_sd1, build_tiny_zimage

ZTARGETS = ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")
STARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def _model(family: str) -> TurboModel:
    pipe = build_tiny_zimage(0) if family == "zimage" else build_tiny_sd1(0)
    pipe.set_progress_bar_config(disable=True)
    return TurboModel(ModelSpec("tiny"), family, pipe, f"tiny-{family}")


def _random_lora(root, targets, rank, seed, scale=0.05, te=False):
    L.inject_lora(root, targets, rank, rank, "tmp")
    sd = L.extract_lora_state_dict(root, "tmp", text_encoder=te)
    L.remove_adapters(root, ["tmp"])
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * scale for k, v in sd.items()}


def _zimage_forward(model):
    g = torch.Generator().manual_seed(1)
    x = [torch.randn(16, 1, 4, 4, generator=g)]
    cap = [torch.randn(5, 32, generator=g)]
    with torch.no_grad():
        return model.denoiser(x, torch.tensor([0.4]), cap, return_dict=False)[0][0].clone()


def _sd1_image(model, prompt="a photo of sks dog"):
    g = torch.Generator().manual_seed(0)
    return model.pipe(prompt, num_inference_steps=2, height=64, width=64, generator=g, guidance_scale=1.0,
                      output_type="np").images


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same_state(before, module):
    after = module.state_dict()
    return set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)


@pytest.fixture(scope="module")
def zmodel():
    return _model("zimage")


@pytest.fixture(scope="module")
def smodel():
    return _model("sd1")


def test_applied_strength_and_exact_removal(zmodel):
    before = _state(zmodel.denoiser)
    base = _zimage_forward(zmodel)
    lora = L.TurboLora("zimage", _random_lora(zmodel.denoiser, ZTARGETS, 4, 0, scale=0.01), rank=4, alpha=8.0)
    with L.applied(zmodel, [(lora, 1.0)]):
        full = _zimage_forward(zmodel)
    with L.applied(zmodel, [(lora, 0.5)]):
        half = _zimage_forward(zmodel)
    with L.applied(zmodel, [(lora, 0.25), (lora, 0.25)]):
        two_quarters = _zimage_forward(zmodel)
    with L.applied(zmodel, [(lora, 0.0)]):
        off = _zimage_forward(zmodel)
    assert not torch.allclose(full, base)
    ratio = ((full - base).norm() / (half - base).norm()).item()
    assert 1.8 < ratio < 2.2  # small LoRA: effect ~ linear in strength
    assert torch.allclose(two_quarters, half, atol=1e-5)
    assert torch.equal(off, base)
    assert torch.equal(_zimage_forward(zmodel), base)
    assert _same_state(before, zmodel.denoiser)  # same keys (no peft wrappers left) and bit-identical weights
    assert not hasattr(zmodel.denoiser, "peft_config")


def test_applied_removes_on_error(zmodel):
    before = _state(zmodel.denoiser)
    lora = L.TurboLora("zimage", _random_lora(zmodel.denoiser, ZTARGETS, 2, 1), rank=2, alpha=2.0)
    with pytest.raises(RuntimeError, match="boom"), L.applied(zmodel, [(lora, 1.0)]):
        raise RuntimeError("boom")
    assert _same_state(before, zmodel.denoiser)


def test_wrong_family_is_refused(zmodel, smodel):
    lora = L.TurboLora("sd1", _random_lora(smodel.denoiser, STARGETS, 2, 0), rank=2, alpha=2.0)
    with pytest.raises(WrongFamilyError, match="sd1"), L.applied(zmodel, [(lora, 1.0)]):
        pass
    bad = L.TurboLora("zimage", {k.replace("down_blocks", "nope"): v for k, v in lora.state_dict.items()}, 2, 2.0)
    with pytest.raises(WrongFamilyError, match="do not exist"), L.applied(zmodel, [(bad, 1.0)]):
        pass


@pytest.mark.parametrize("rank,alpha", [(4, 4.0), (4, 1.5)])
def test_zimage_file_roundtrip_and_diffusers(zmodel, tmp_path, rank, alpha):
    sd = _random_lora(zmodel.denoiser, ZTARGETS, rank, 3, scale=0.02)
    lora = L.TurboLora("zimage", sd, rank=rank, alpha=alpha, metadata={"trigger": "sks", "base_model": "tiny"})
    path = L.save_lora_file(lora, str(tmp_path / "z"))
    assert path.endswith(".safetensors")
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        alpha_t = f.get_tensor("diffusion_model.layers.0.attention.to_q.alpha")
    assert all(k.startswith("diffusion_model.") for k in keys)
    assert any(k.endswith(".lora_A.weight") for k in keys) and any(k.endswith(".alpha") for k in keys)
    assert alpha_t.item() == alpha
    assert meta["trigger"] == "sks" and meta["turbobooth_family"] == "zimage"

    back = L.load_lora_file(path)
    assert back.family == "zimage" and back.rank == rank and back.alpha == alpha
    assert set(back.state_dict) == set(sd) and all(torch.equal(back.state_dict[k], sd[k]) for k in sd)
    assert back.metadata["trigger"] == "sks"

    before = _state(zmodel.denoiser)
    with L.applied(zmodel, [(back, 1.0)]):
        ours = _zimage_forward(zmodel)
    zmodel.pipe.load_lora_weights(path, adapter_name="check")
    try:
        theirs = _zimage_forward(zmodel)
    finally:
        zmodel.pipe.delete_adapters("check")
    assert torch.allclose(ours, theirs, atol=1e-5)
    zmodel.pipe.unload_lora_weights()
    with torch.no_grad():
        assert all(torch.equal(before[k], v) for k, v in zmodel.denoiser.state_dict().items() if k in before)


def test_sd1_kohya_roundtrip_text_encoder_and_diffusers(tmp_path):
    model = _model("sd1")
    sd = _random_lora(model.denoiser, STARGETS, 4, 5, scale=0.05)
    te = _random_lora(model.pipe.text_encoder, ("q_proj", "k_proj", "v_proj", "out_proj"), 4, 6, scale=0.05, te=True)
    lora = L.TurboLora("sd1", sd, rank=4, alpha=2.0, text_encoder_state_dict=te, metadata={"trigger": "sks"})
    path = L.save_lora_file(lora, str(tmp_path / "s.safetensors"))
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)

    back = L.load_lora_file(path)
    assert back.family == "sd1" and back.alpha == 2.0 and back.touches_text_encoder
    assert set(back.state_dict) == set(sd) and all(torch.equal(back.state_dict[k], sd[k]) for k in sd)
    assert set(back.text_encoder_state_dict) == set(te)
    assert all(torch.equal(back.text_encoder_state_dict[k], te[k]) for k in te)

    base = _sd1_image(model)
    before_unet, before_te = _state(model.denoiser), _state(model.pipe.text_encoder)
    with L.applied(model, [(back, 1.0)]):
        ours = _sd1_image(model)
    assert abs(ours - base).max() > 1e-4
    assert _same_state(before_unet, model.denoiser) and _same_state(before_te, model.pipe.text_encoder)
    model.pipe.load_lora_weights(path)
    theirs = _sd1_image(model)
    assert abs(ours - theirs).max() < 1e-4


def test_plain_diffusers_files_load(zmodel, tmp_path):
    sd = _random_lora(zmodel.denoiser, ("to_q", "to_k"), 2, 7)
    path = str(tmp_path / "pytorch_lora_weights.safetensors")
    save_file({f"transformer.{k}": v for k, v in sd.items()}, path)
    back = L.load_lora_file(path)
    assert back.family == "zimage" and back.rank == 2 and back.alpha == 2.0
    assert all(torch.equal(back.state_dict[k], sd[k]) for k in sd)

    smodel = _model("sd1")
    ssd = _random_lora(smodel.denoiser, ("to_q",), 2, 8)
    path2 = str(tmp_path / "sd1_diffusers.safetensors")
    save_file({f"unet.{k}": v for k, v in ssd.items()}, path2)
    back2 = L.load_lora_file(path2)
    assert back2.family == "sd1" and all(torch.equal(back2.state_dict[k], ssd[k]) for k in ssd)


def test_pickle_files_are_refused(tmp_path):
    for name in ("x.ckpt", "x.pt", "x.bin"):
        p = tmp_path / name
        torch.save({"a": torch.zeros(1)}, p)
        with pytest.raises(UnsafeFileError, match="safetensors"):
            L.load_lora_file(str(p))
    disguised = tmp_path / "x.safetensors"
    torch.save({"a": torch.zeros(1)}, disguised)
    with pytest.raises(UnsafeFileError):
        L.load_lora_file(str(disguised))


def test_save_is_atomic(zmodel, tmp_path):
    lora = L.TurboLora("zimage", _random_lora(zmodel.denoiser, ("to_q",), 2, 9), rank=2, alpha=2.0)
    path = L.save_lora_file(lora, str(tmp_path / "a.safetensors"))
    L.save_lora_file(lora, path)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
