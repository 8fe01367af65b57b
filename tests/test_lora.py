"""TurboLora: strengths and exact removal, every LoRA layout in use, our files, refusals."""

from __future__ import annotations

import copy
import os
import struct
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from turbobooth.manager import lora as L
from turbobooth.manager.errors import InvalidInputError, UnsafeFileError, WrongFamilyError
from turbobooth.manager.spec import ModelSpec, TurboModel
from turbobooth.manager.tiny import build_tiny_sd1, build_tiny_zimage

ZTARGETS = ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")
STARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def _model(family: str) -> TurboModel:
    pipe = build_tiny_zimage(0) if family == "zimage" else build_tiny_sd1(0)
    pipe.set_progress_bar_config(disable=True)
    return TurboModel(ModelSpec("tiny"), family, pipe, f"tiny-{family}")


def _random_peft(root, targets, rank, seed, scale=0.05, te=False) -> dict:
    """A random peft-format LoRA state dict for ``root`` (module names as the model has them)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    probe = copy.deepcopy(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)), probe, "p")
    sd = get_peft_model_state_dict(probe, adapter_name="p")
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * scale for k, v in sd.items()}


def _zimage_forward(denoiser):
    g = torch.Generator().manual_seed(1)
    x = [torch.randn(16, 1, 4, 4, generator=g)]
    cap = [torch.randn(5, 32, generator=g)]
    with torch.no_grad():
        return denoiser(x, torch.tensor([0.4]), cap, return_dict=False)[0][0].clone()


def _merged_forward(denoiser, updates: dict[str, tuple[torch.Tensor, torch.Tensor, float]]):
    """The same low-rank update applied by hand: W += scale * B @ A on a copy of the model."""
    merged = copy.deepcopy(denoiser)
    with torch.no_grad():
        for module, (a, b, scale) in updates.items():
            merged.get_submodule(module).weight += scale * (b.float() @ a.float())
    return _zimage_forward(merged)


def _updates(sd: dict, scale: float) -> dict:
    return {k[: -len(".lora_A.weight")]: (sd[k], sd[k.replace("lora_A", "lora_B")], scale)
            for k in sd if k.endswith(".lora_A.weight")}


def _sd1_image(model, prompt="a photo of sks dog"):
    g = torch.Generator().manual_seed(0)
    return model.pipe(prompt, num_inference_steps=2, height=64, width=64, generator=g, guidance_scale=1.0,
                      output_type="np").images


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same_state(before, module):
    after = module.state_dict()
    return set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)


def _apply_forward(model, lora, strength=1.0):
    with model.lock, L.applied(model, [(lora, strength)]):
        return _zimage_forward(model.denoiser)


@pytest.fixture(scope="module")
def zmodel():
    return _model("zimage")


@pytest.fixture(scope="module")
def smodel():
    return _model("sd1")


def test_applied_strength_and_exact_removal(zmodel):
    before = _state(zmodel.denoiser)
    base = _zimage_forward(zmodel.denoiser)
    lora = L.TurboLora.from_peft("zimage", _random_peft(zmodel.denoiser, ZTARGETS, 4, 0, scale=0.01), alpha=8.0)
    full = _apply_forward(zmodel, lora, 1.0)
    half = _apply_forward(zmodel, lora, 0.5)
    with L.applied(zmodel, [(lora, 0.25), (lora, 0.25)]):
        two_quarters = _zimage_forward(zmodel.denoiser)
    off = _apply_forward(zmodel, lora, 0.0)
    assert not torch.allclose(full, base)
    ratio = ((full - base).norm() / (half - base).norm()).item()
    assert 1.8 < ratio < 2.2  # small LoRA: effect ~ linear in strength
    assert torch.allclose(two_quarters, half, atol=1e-5)
    assert torch.equal(off, base)
    assert torch.equal(_zimage_forward(zmodel.denoiser), base)
    assert _same_state(before, zmodel.denoiser)  # same keys (no peft wrappers left) and bit-identical weights
    assert not hasattr(zmodel.denoiser, "peft_config")


def test_applied_removes_on_error(zmodel):
    before = _state(zmodel.denoiser)
    lora = L.TurboLora.from_peft("zimage", _random_peft(zmodel.denoiser, ZTARGETS, 2, 1), alpha=2.0)
    with pytest.raises(RuntimeError, match="boom"), L.applied(zmodel, [(lora, 1.0)]):
        raise RuntimeError("boom")
    assert _same_state(before, zmodel.denoiser)


def test_wrong_family_is_refused(zmodel, smodel):
    before = _state(zmodel.denoiser)
    lora = L.TurboLora.from_peft("sd1", _random_peft(smodel.denoiser, STARGETS, 2, 0), alpha=2.0)
    with pytest.raises(WrongFamilyError, match="sd1"), L.applied(zmodel, [(lora, 1.0)]):
        pass
    sd = _random_peft(zmodel.denoiser, ("to_q",), 2, 0)
    bad = L.TurboLora.from_peft("zimage", {k.replace("layers.", "nope."): v for k, v in sd.items()}, alpha=2.0)
    with pytest.raises(WrongFamilyError, match="do not fit|does not fit"), L.applied(zmodel, [(bad, 1.0)]):
        pass
    wide = L.TurboLora.from_peft("zimage", {k: torch.cat([v, v], dim=1) if "lora_A" in k else v
                                            for k, v in sd.items()}, alpha=2.0)
    with pytest.raises(WrongFamilyError, match="does not fit"), L.applied(zmodel, [(wide, 1.0)]):
        pass
    assert _same_state(before, zmodel.denoiser)


@pytest.mark.parametrize("strength", [float("nan"), float("inf")])
def test_non_finite_strength_and_weights_are_refused(zmodel, tmp_path, strength):
    sd = _random_peft(zmodel.denoiser, ("to_q",), 2, 2)
    lora = L.TurboLora.from_peft("zimage", sd, alpha=2.0)
    with pytest.raises(InvalidInputError, match="strength"), L.applied(zmodel, [(lora, strength)]):
        pass
    poisoned = L.TurboLora.from_peft("zimage", {k: v.clone().fill_(strength) for k, v in sd.items()}, alpha=2.0)
    with pytest.raises(InvalidInputError, match="NaN or Inf"):
        L.save_lora_file(poisoned, str(tmp_path / "bad.safetensors"))
    assert not os.listdir(tmp_path)
    with pytest.raises(InvalidInputError, match="NaN or Inf"), L.applied(zmodel, [(poisoned, 1.0)]):
        pass


@pytest.mark.parametrize("rank,alpha", [(4, 4.0), (4, 1.5)])
def test_zimage_file_roundtrip_and_metadata(zmodel, tmp_path, rank, alpha):
    sd = _random_peft(zmodel.denoiser, ZTARGETS, rank, 3, scale=0.02)
    meta = {"trigger": "sks dog", "base_model": "Tongyi-MAI/Z-Image-Turbo@main", "resolution": "512"}
    lora = L.TurboLora.from_peft("zimage", sd, alpha=alpha, metadata=meta, name="mine")
    path = L.save_lora_file(lora, str(tmp_path / "z"))
    assert path.endswith(".safetensors")
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~_umask()
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        file_meta = f.metadata()
        alpha_t = f.get_tensor("diffusion_model.layers.0.attention.to_q.alpha")
    assert all(k.startswith("diffusion_model.") for k in keys)
    assert alpha_t.item() == alpha
    assert file_meta["modelspec.sai_model_spec"] == "1.0.0" and file_meta["modelspec.architecture"] == "z-image/lora"
    assert file_meta["modelspec.trigger_phrase"] == "sks dog" and file_meta["modelspec.resolution"] == "512x512"
    assert file_meta["ss_network_dim"] == str(rank) and float(file_meta["ss_network_alpha"]) == alpha
    assert file_meta["ss_sd_model_name"] == "Tongyi-MAI/Z-Image-Turbo@main" and file_meta["modelspec.date"]
    assert not any(str(tmp_path) in v for v in file_meta.values())

    back = L.load_lora_file(path)
    assert back.family == "zimage" and back.rank == rank and back.alpha == alpha and back.name == "mine"
    assert set(back.tensors) == set(lora.tensors) and all(torch.equal(back.tensors[k], lora.tensors[k])
                                                           for k in lora.tensors)
    assert back.metadata["trigger"] == "sks dog"
    before = _state(zmodel.denoiser)
    ours = _apply_forward(zmodel, back)
    assert torch.allclose(ours, _merged_forward(zmodel.denoiser, _updates(sd, alpha / rank)), atol=1e-5)
    assert _same_state(before, zmodel.denoiser)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------
# Z-Image layouts in the wild, each built by hand the way its tool writes it
# ---------------------------------------------------------------------------


def _layout_files(sd: dict, rank: int, tmp_path) -> dict[str, tuple[str, float]]:
    """file path and the LoRA scale each layout implies, for the same A/B matrices."""
    mods = sorted(k[: -len(".lora_A.weight")] for k in sd if k.endswith(".lora_A.weight"))
    a = {m: sd[m + ".lora_A.weight"] for m in mods}
    b = {m: sd[m + ".lora_B.weight"] for m in mods}
    files = {}

    def write(name, tensors, scale):
        path = str(tmp_path / f"{name}.safetensors")
        save_file({k: v.contiguous() for k, v in tensors.items()}, path)
        files[name] = (path, scale)

    # ai-toolkit: diffusion_model.<diffusers name>.lora_A/B, alpha = rank (no alpha tensors)
    write("ai_toolkit", {**{f"diffusion_model.{m}.lora_A.weight": a[m] for m in mods},
                         **{f"diffusion_model.{m}.lora_B.weight": b[m] for m in mods}}, 1.0)
    # musubi-tuner / kohya: lora_unet_<name with underscores>.lora_down/up + alpha
    musubi = {}
    for m in mods:
        flat = "lora_unet_" + m.replace(".", "_")
        musubi.update({f"{flat}.lora_down.weight": a[m], f"{flat}.lora_up.weight": b[m],
                       f"{flat}.alpha": torch.tensor(2.0)})
    write("musubi", musubi, 2.0 / rank)
    # DiffSynth-Studio: peft keys with the adapter name, no prefix, alpha = rank
    write("diffsynth", {**{f"{m}.lora_A.default.weight": a[m] for m in mods},
                        **{f"{m}.lora_B.default.weight": b[m] for m in mods}}, 1.0)
    # diffusers: transformer.<name>.lora_A/B
    write("diffusers", {**{f"transformer.{m}.lora_A.weight": a[m] for m in mods},
                        **{f"transformer.{m}.lora_B.weight": b[m] for m in mods}}, 1.0)
    return files


@pytest.mark.parametrize("layout", ["ai_toolkit", "musubi", "diffsynth", "diffusers"])
def test_every_zimage_layout_gives_the_same_update(zmodel, tmp_path, layout):
    rank = 4
    sd = _random_peft(zmodel.denoiser, ZTARGETS, rank, 11, scale=0.02)
    path, scale = _layout_files(sd, rank, tmp_path)[layout]
    lora = L.load_lora_file(path)
    assert lora.family == "zimage"
    expected = _merged_forward(zmodel.denoiser, _updates(sd, scale))
    assert not torch.allclose(expected, _zimage_forward(zmodel.denoiser), atol=1e-4)
    assert torch.allclose(_apply_forward(zmodel, lora), expected, atol=1e-5)


def test_comfyui_trainer_layout_with_fused_qkv(zmodel, tmp_path):
    """ComfyUI's trainer: fused attention.qkv (shared down, stacked up), attention.out, alpha 1, .diff extras."""
    rank, dim = 4, zmodel.denoiser.config.dim
    g = torch.Generator().manual_seed(5)
    down = torch.randn(rank, dim, generator=g) * 0.05
    up = torch.randn(3 * dim, rank, generator=g) * 0.05
    out_down, out_up = torch.randn(rank, dim, generator=g) * 0.05, torch.randn(dim, rank, generator=g) * 0.05
    w1 = zmodel.denoiser.get_submodule("layers.0.feed_forward.w1").weight
    ff_down, ff_up = torch.randn(rank, w1.shape[1], generator=g) * 0.05, torch.randn(w1.shape[0], rank, generator=g) * 0.05
    p = "diffusion_model.layers.0."
    tensors = {
        p + "attention.qkv.lora_down.weight": down, p + "attention.qkv.lora_up.weight": up,
        p + "attention.qkv.alpha": torch.tensor(1.0),
        p + "attention.out.lora_down.weight": out_down, p + "attention.out.lora_up.weight": out_up,
        p + "attention.out.alpha": torch.tensor(1.0),
        p + "feed_forward.w1.lora_down.weight": ff_down, p + "feed_forward.w1.lora_up.weight": ff_up,
        p + "feed_forward.w1.alpha": torch.tensor(1.0),
        p + "attention_norm1.diff": torch.zeros(dim),
    }
    path = str(tmp_path / "comfy_trained.safetensors")
    save_file(tensors, path)
    lora = L.load_lora_file(path)
    scale = 1.0 / rank
    q, k, v = up.chunk(3, dim=0)
    updates = {"layers.0.attention.to_q": (down, q, scale), "layers.0.attention.to_k": (down, k, scale),
               "layers.0.attention.to_v": (down, v, scale), "layers.0.attention.to_out.0": (out_down, out_up, scale),
               "layers.0.feed_forward.w1": (ff_down, ff_up, scale)}
    assert torch.allclose(_apply_forward(zmodel, lora), _merged_forward(zmodel.denoiser, updates), atol=1e-5)


# ---------------------------------------------------------------------------
# SD1.x
# ---------------------------------------------------------------------------


def test_sd1_kohya_roundtrip_text_encoder_and_diffusers(tmp_path):
    model = _model("sd1")
    sd = _random_peft(model.denoiser, STARGETS, 4, 5, scale=0.05)
    te = _random_peft(model.pipe.text_encoder, ("q_proj", "k_proj", "v_proj", "out_proj"), 4, 6, scale=0.05)
    lora = L.TurboLora.from_peft("sd1", sd, alpha=2.0, text_encoder_state_dict=te, metadata={"trigger": "sks"})
    path = L.save_lora_file(lora, str(tmp_path / "s.safetensors"))
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        assert f.get_tensor("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha").item() == 2.0
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)

    back = L.load_lora_file(path)
    assert back.family == "sd1" and back.alpha == 2.0 and back.touches_text_encoder and back.rank == 4
    assert all(torch.equal(back.tensors[k], lora.tensors[k]) for k in lora.tensors)

    base = _sd1_image(model)
    before_unet, before_te = _state(model.denoiser), _state(model.pipe.text_encoder)
    with L.applied(model, [(back, 1.0)]):
        ours = _sd1_image(model)
    assert abs(ours - base).max() > 1e-4
    assert _same_state(before_unet, model.denoiser) and _same_state(before_te, model.pipe.text_encoder)
    # the same update by hand: W += alpha/rank * B @ A on copies of the UNet and the text encoder
    unet, text = copy.deepcopy(model.denoiser), copy.deepcopy(model.pipe.text_encoder)
    with torch.no_grad():
        for root, peft in ((unet, sd), (text, te)):
            for module, (a, b, scale) in _updates(peft, 2.0 / 4).items():
                root.get_submodule(module).weight += scale * (b @ a)
    merged = copy.copy(model)
    merged.pipe = type(model.pipe)(**{**model.pipe.components, "unet": unet, "text_encoder": text},
                                   requires_safety_checker=False)
    merged.pipe.set_progress_bar_config(disable=True)
    assert abs(ours - _sd1_image(merged)).max() < 1e-4


def test_plain_diffusers_sd1_file_loads(smodel, tmp_path):
    ssd = _random_peft(smodel.denoiser, ("to_q",), 2, 8)
    path = str(tmp_path / "sd1_diffusers.safetensors")
    save_file({f"unet.{k}": v for k, v in ssd.items()}, path)
    back = L.load_lora_file(path)
    assert back.family == "sd1" and back.rank == 2
    base = _sd1_image(smodel)
    with L.applied(smodel, [(back, 1.0)]):
        assert abs(_sd1_image(smodel) - base).max() > 1e-5


# ---------------------------------------------------------------------------
# refusals and files
# ---------------------------------------------------------------------------


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


def test_lora_whose_header_length_is_128_mod_256_loads(zmodel, tmp_path):
    """The old guard took any file starting with 0x80 for a pickle: about 1 valid file in 256."""
    sd = _random_peft(zmodel.denoiser, ("to_q",), 2, 4)
    lora = L.TurboLora.from_peft("zimage", sd, alpha=2.0)
    for pad in range(0, 2048, 8):
        lora.metadata["pad"] = "x" * pad
        path = L.save_lora_file(lora, str(tmp_path / "p.safetensors"))
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len % 256 == 128:
            break
    else:
        pytest.fail("no padding gave a header length of 128 mod 256")
    assert open(path, "rb").read(1) == b"\x80"
    assert L.load_lora_file(path).rank == 2


def test_unknown_layout_and_empty_files_are_clear_errors(tmp_path):
    path = str(tmp_path / "weird.safetensors")
    save_file({"foo.bar": torch.zeros(2)}, path)
    with pytest.raises(InvalidInputError, match="not a LoRA layout"):
        L.load_lora_file(path)
    save_file({}, path)
    with pytest.raises(InvalidInputError, match="no tensors"):
        L.load_lora_file(path)


def test_save_is_atomic(zmodel, tmp_path):
    lora = L.TurboLora.from_peft("zimage", _random_peft(zmodel.denoiser, ("to_q",), 2, 9), alpha=2.0)
    path = L.save_lora_file(lora, str(tmp_path / "a.safetensors"))
    L.save_lora_file(lora, path)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_failed_write_leaves_no_temp_file_and_names_the_space(zmodel, tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    lora = L.TurboLora.from_peft("zimage", _random_peft(zmodel.denoiser, ("to_q",), 2, 9), alpha=2.0)

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="disk is full") as err:
        L.save_lora_file(lora, str(tmp_path / "a.safetensors"))
    assert "MiB free" in str(err.value) and str(tmp_path / "a.safetensors") in str(err.value)
    assert list(tmp_path.iterdir()) == []
