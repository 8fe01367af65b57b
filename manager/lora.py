"""LoRA adapters: the TURBO_LORA object, attaching it to a cached model, and its files.

A :class:`TurboLora` holds peft-format tensors (``<module>.lora_A.weight`` /
``<module>.lora_B.weight``, module names as in the diffusers model) for the
denoiser and, optionally, the text encoder. :func:`applied` attaches any number
of them with strengths to a cached pipeline for the duration of a ``with``
block and removes them completely afterwards: the base modules are put back
as they were, so the base weights are never touched.

Files (:func:`save_lora_file`) are written so that ComfyUI's core LoraLoader
and diffusers' ``load_lora_weights`` both read them:

* Z-Image: ``diffusion_model.<module>.lora_A.weight`` / ``lora_B.weight`` plus an
  explicit ``diffusion_model.<module>.alpha`` tensor (ComfyUI ignores alphas kept
  only in the header).
* SD1.x: kohya format, ``lora_unet_<module_with_underscores>.lora_down.weight`` /
  ``lora_up.weight`` / ``.alpha`` and ``lora_te_...`` for the text encoder.

:func:`load_lora_file` reads both back bit-exactly, and also plain diffusers
files (``transformer.`` / ``unet.`` / ``text_encoder.`` prefixed keys).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import uuid
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidInputError, UnsafeFileError, WrongFamilyError

logger = logging.getLogger(__name__)

FORMAT_VERSION = "1"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
ADAPTER_PREFIX = "turbobooth_"

_A, _B = ".lora_A.weight", ".lora_B.weight"
_DOWN, _UP = ".lora_down.weight", ".lora_up.weight"

# One adapter set at a time on a cached pipeline.
_APPLY_LOCK = threading.RLock()


@dataclass(eq=False)
class TurboLora:
    """A trained (or loaded) LoRA for one model family.

    ``state_dict`` maps ``<denoiser module>.lora_A.weight`` / ``.lora_B.weight``
    to tensors; ``text_encoder_state_dict`` does the same for the text encoder.
    ``alpha`` is the default alpha; ``module_alphas`` / ``text_encoder_alphas``
    override it per module (files from other trainers may mix ranks/alphas).
    ``metadata`` holds strings (trigger, base model, training settings).
    """

    family: str
    state_dict: dict
    rank: int
    alpha: float
    target_modules: tuple = ()
    text_encoder_state_dict: dict = field(default_factory=dict)
    text_encoder_targets: tuple = ()
    metadata: dict = field(default_factory=dict)
    module_alphas: dict = field(default_factory=dict)
    text_encoder_alphas: dict = field(default_factory=dict)
    name: str = "lora"

    def __post_init__(self) -> None:
        if self.family not in ("zimage", "sd1"):
            raise InvalidInputError(f"LoRA family must be 'zimage' or 'sd1', got {self.family!r}")
        if not self.state_dict and not self.text_encoder_state_dict:
            raise InvalidInputError("a LoRA needs at least one lora_A/lora_B pair; got an empty state dict")
        if int(self.rank) < 1:
            raise InvalidInputError(f"LoRA rank must be >= 1, got {self.rank!r}")
        self.metadata = {str(k): str(v) for k, v in (self.metadata or {}).items()}
        if not self.target_modules:
            self.target_modules = tuple(sorted(lora_modules(self.state_dict)))
        if not self.text_encoder_targets and self.text_encoder_state_dict:
            self.text_encoder_targets = tuple(sorted(lora_modules(self.text_encoder_state_dict)))

    @property
    def touches_text_encoder(self) -> bool:
        return bool(self.text_encoder_state_dict)

    @property
    def trigger(self) -> str:
        return self.metadata.get("trigger", "")

    def alpha_for(self, module: str, text_encoder: bool = False) -> float:
        table = self.text_encoder_alphas if text_encoder else self.module_alphas
        return float(table.get(module, self.alpha))

    def nbytes(self) -> int:
        tensors = list(self.state_dict.values()) + list(self.text_encoder_state_dict.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def __repr__(self) -> str:
        parts = [self.family, f"rank={self.rank}", f"alpha={self.alpha:g}", f"modules={len(lora_modules(self.state_dict))}"]
        if self.text_encoder_state_dict:
            parts.append(f"te_modules={len(lora_modules(self.text_encoder_state_dict))}")
        if self.trigger:
            parts.append(f"trigger={self.trigger!r}")
        return f"TurboLora({', '.join(parts)})"


def lora_modules(state_dict: dict) -> set[str]:
    """Module names of a peft-format LoRA state dict."""
    return {k[: -len(_A)] for k in state_dict if k.endswith(_A)}


# ---------------------------------------------------------------------------
# attaching adapters to a module with peft, and removing them again
# ---------------------------------------------------------------------------


def _tuner_layers(root) -> list[tuple[str, Any]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in root.named_modules() if isinstance(m, BaseTunerLayer)]


def inject_lora(
    root,
    modules: Iterable[str],
    rank: int,
    alpha: float,
    adapter_name: str,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    init_weights: bool = True,
) -> list[str]:
    """Wrap ``modules`` of ``root`` (exact names or name suffixes) with a peft LoRA adapter.

    Returns the full names of the wrapped modules. The base layers stay the
    very same objects; :func:`remove_adapters` puts them back.
    """
    from peft import LoraConfig, inject_adapter_in_model

    had_config = hasattr(root, "peft_config")
    previous = dict(getattr(root, "peft_config", {}) or {})
    config = LoraConfig(
        r=int(rank),
        lora_alpha=float(alpha),
        target_modules=sorted(set(modules)),
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        lora_dropout=0.0,
        init_lora_weights=init_weights,
        bias="none",
    )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*peft_config.*")
            inject_adapter_in_model(config, root, adapter_name=adapter_name)
    except ValueError as e:
        raise WrongFamilyError(
            f"could not attach the LoRA: none of its target modules exist in this model ({e}). "
            "Was it trained for another model family?"
        ) from e
    # peft keeps a copy of the config on the model; keep ours separate so removal is exact.
    if not had_config:
        root._turbobooth_created_peft_config = True
    previous[adapter_name] = config
    root.peft_config = previous
    wrapped = []
    for name, layer in _tuner_layers(root):
        if adapter_name in layer.lora_A:
            wrapped.append(name)
    return wrapped


def set_active_adapters(root, names: list[str], trainable: Iterable[str] = ()) -> None:
    """Make exactly ``names`` active on every LoRA layer; only ``trainable`` adapters get gradients."""
    trainable = set(trainable)
    for _, layer in _tuner_layers(root):
        present = [n for n in names if n in layer._all_available_adapter_names()]
        layer._active_adapter = list(present)
        for attr in layer.adapter_layer_names:
            container = getattr(layer, attr)
            for key, sub in container.items():
                sub.requires_grad_(key in trainable)


def set_adapter_strength(root, adapter_name: str, strength: float) -> None:
    for _, layer in _tuner_layers(root):
        if hasattr(layer, "set_scale"):
            layer.set_scale(adapter_name, float(strength))


def remove_adapters(root, names: Iterable[str]) -> None:
    """Delete the named adapters; modules left without adapters get their original base layer back."""
    names = list(names)
    layers = _tuner_layers(root)
    for _, layer in layers:
        active_before = [a for a in layer.active_adapters if a not in names]
        for n in names:
            if n in layer._all_available_adapter_names():
                layer.delete_adapter(n)
        layer._active_adapter = active_before
    for full_name, layer in layers:
        if layer._all_available_adapter_names():
            continue
        base = layer.get_base_layer()
        parent_name, _, child = full_name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, base)
    config = getattr(root, "peft_config", None)
    if isinstance(config, dict):
        for n in names:
            config.pop(n, None)
        if not config and getattr(root, "_turbobooth_created_peft_config", False):
            del root.peft_config
            del root._turbobooth_created_peft_config


def _split_pattern(lora: TurboLora, modules: Iterable[str], sd: dict, te: bool) -> tuple[dict, dict]:
    ranks, alphas = {}, {}
    for m in modules:
        r = int(sd[m + _A].shape[0])
        if r != lora.rank:
            ranks[re.escape(m)] = r
        a = lora.alpha_for(m, te)
        if a != lora.alpha:
            alphas[re.escape(m)] = a
    return ranks, alphas


def _resolve_modules(root, modules: list[str], te: bool) -> dict[str, str]:
    """Map stored module names to names in ``root``; CLIP text encoders may or may not have ``text_model.``."""
    existing = {n for n, _ in root.named_modules()}
    resolved, missing = {}, []
    for m in modules:
        if m in existing:
            resolved[m] = m
        elif te and f"text_model.{m}" in existing:
            resolved[m] = f"text_model.{m}"
        elif te and m.startswith("text_model.") and m[len("text_model.") :] in existing:
            resolved[m] = m[len("text_model.") :]
        else:
            missing.append(m)
    if missing:
        where = "text encoder" if te else "denoiser"
        raise WrongFamilyError(
            f"this LoRA does not fit the loaded model: {len(missing)} of its {len(modules)} {where} modules "
            f"do not exist (e.g. {missing[0]!r}). It was probably trained for another model or family."
        )
    return resolved


def canonical_text_encoder_name(module: str) -> str:
    """Text-encoder module names are stored without the ``text_model.`` level (transformers >= 5 layout)."""
    return module[len("text_model.") :] if module.startswith("text_model.") else module


def attach_lora_weights(root, sd: dict, lora: TurboLora, adapter_name: str, strength: float, te: bool = False):
    """Inject ``lora``'s adapter for ``root`` and copy its tensors in."""
    import torch

    modules = sorted(lora_modules(sd))
    if not modules:
        return
    resolved = _resolve_modules(root, modules, te)
    ranks, alphas = _split_pattern(lora, modules, sd, te)
    if any(resolved[m] != m for m in modules):
        ranks = {re.escape(resolved[m]): ranks[re.escape(m)] for m in modules if re.escape(m) in ranks}
        alphas = {re.escape(resolved[m]): alphas[re.escape(m)] for m in modules if re.escape(m) in alphas}
    inject_lora(root, [resolved[m] for m in modules], lora.rank, lora.alpha, adapter_name, ranks, alphas)
    with torch.no_grad():
        for m in modules:
            layer = root.get_submodule(resolved[m])
            for key, target in ((_A, layer.lora_A[adapter_name].weight), (_B, layer.lora_B[adapter_name].weight)):
                src = sd[m + key]
                if tuple(src.shape) != tuple(target.shape):
                    raise WrongFamilyError(
                        f"LoRA tensor {m + key} has shape {tuple(src.shape)} but the model needs "
                        f"{tuple(target.shape)}: the LoRA was trained for a different model size or family"
                    )
                target.copy_(src.to(device=target.device, dtype=target.dtype))
    set_adapter_strength(root, adapter_name, strength)


@contextmanager
def applied(model, loras: Iterable[tuple[TurboLora, float]]) -> Iterator[Any]:
    """Attach ``loras`` (``(lora, strength)`` pairs) to ``model``'s pipeline for the ``with`` block.

    Adapters are unmerged peft layers, so the base weights are never written;
    on exit every adapter is deleted and the original modules are restored.
    Pairs with strength 0 or ``None`` LoRAs are skipped.
    """
    pairs = [(lora, float(s)) for lora, s in (loras or ()) if lora is not None and float(s) != 0.0]
    if not pairs:
        yield model
        return
    for lora, _ in pairs:
        if lora.family != model.family:
            raise WrongFamilyError(
                f"this LoRA is for {lora.family!r} models but the loaded model is {model.family!r}; "
                "load a LoRA trained for this model family"
            )
    roots = {"denoiser": model.denoiser, "text_encoder": getattr(model.pipe, "text_encoder", None)}
    token = uuid.uuid4().hex[:8]
    attached: dict[str, list[str]] = {"denoiser": [], "text_encoder": []}
    with _APPLY_LOCK:
        previous_active = {k: _active_names(r) for k, r in roots.items() if r is not None}
        try:
            for i, (lora, strength) in enumerate(pairs):
                name = f"{ADAPTER_PREFIX}{token}_{i}"
                if lora.state_dict:
                    attached["denoiser"].append(name)
                    attach_lora_weights(roots["denoiser"], lora.state_dict, lora, name, strength)
                if lora.text_encoder_state_dict:
                    if roots["text_encoder"] is None:
                        raise WrongFamilyError("this LoRA has text-encoder weights but the model has no text encoder")
                    attached["text_encoder"].append(name)
                    attach_lora_weights(roots["text_encoder"], lora.text_encoder_state_dict, lora, name, strength, True)
            for key, names in attached.items():
                if names:
                    set_active_adapters(roots[key], previous_active.get(key, []) + names)
            yield model
        finally:
            for key, names in attached.items():
                if names and roots[key] is not None:
                    remove_adapters(roots[key], names)


def _active_names(root) -> list[str]:
    names: list[str] = []
    for _, layer in _tuner_layers(root):
        for a in layer.active_adapters:
            if a not in names:
                names.append(a)
    return names


def extract_lora_state_dict(root, adapter_name: str, text_encoder: bool = False) -> dict:
    """The peft-format tensors (``<module>.lora_A.weight`` ...) of one adapter, detached, on CPU."""
    out = {}
    for name, layer in _tuner_layers(root):
        if text_encoder:
            name = canonical_text_encoder_name(name)
        if adapter_name in getattr(layer, "lora_A", {}):
            out[name + _A] = layer.lora_A[adapter_name].weight.detach().to("cpu").clone().contiguous()
            out[name + _B] = layer.lora_B[adapter_name].weight.detach().to("cpu").clone().contiguous()
    return out


# ---------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------

# Names whose own underscores must survive the kohya "." -> "_" flattening.
_PROTECTED = (
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "proj_in", "proj_out", "to_q", "to_k", "to_v",
    "to_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
    "linear_1", "linear_2", "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm",
    "layer_norm1", "layer_norm2", "token_embedding", "position_embedding", "text_projection",
    "noise_refiner", "context_refiner", "feed_forward", "adaLN_modulation", "all_final_layer", "all_x_embedder",
    "cap_embedder", "t_embedder", "norm_q", "norm_k",
)


def _kohya_to_module(flat: str) -> str:
    """``down_blocks_0_attentions_0_..._to_out_0`` -> ``down_blocks.0.attentions.0....to_out.0``."""
    parts = flat.split("_")
    protected = sorted((tuple(p.split("_")) for p in _PROTECTED), key=len, reverse=True)
    out, i = [], 0
    while i < len(parts):
        for ng in protected:
            if tuple(parts[i : i + len(ng)]) == ng:
                out.append("_".join(ng))
                i += len(ng)
                break
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


def _module_to_kohya(module: str) -> str:
    return module.replace(".", "_")


def _check_not_pickle(path: str) -> None:
    ext = os.path.splitext(path)[1].lower()
    if ext in PICKLE_SUFFIXES:
        raise UnsafeFileError(
            f"{os.path.basename(path)!r} is a pickle-based file ({ext}); pickles can run code when loaded, so only "
            ".safetensors LoRA files are accepted. Convert it to safetensors first."
        )
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise InvalidInputError(f"cannot read LoRA file {path!r}: {e}") from e
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise UnsafeFileError(
            f"{os.path.basename(path)!r} is a pickle/zip archive, not safetensors; only .safetensors LoRA files "
            "are accepted"
        )


def lora_file_tensors(lora: TurboLora) -> dict:
    """The tensors exactly as :func:`save_lora_file` writes them."""
    import torch

    out: dict = {}
    if lora.family == "zimage":
        if lora.text_encoder_state_dict:
            raise InvalidInputError("Z-Image LoRA files hold the transformer only; text-encoder LoRA is SD1.x-only")
        for m in sorted(lora_modules(lora.state_dict)):
            out[f"diffusion_model.{m}{_A}"] = lora.state_dict[m + _A]
            out[f"diffusion_model.{m}{_B}"] = lora.state_dict[m + _B]
            out[f"diffusion_model.{m}.alpha"] = torch.tensor(lora.alpha_for(m), dtype=torch.float32)
    else:
        for prefix, sd, te in (("lora_unet_", lora.state_dict, False), ("lora_te_", lora.text_encoder_state_dict, True)):
            for m in sorted(lora_modules(sd)):
                key = prefix + _module_to_kohya(f"text_model.{canonical_text_encoder_name(m)}" if te else m)
                out[key + _DOWN] = sd[m + _A]
                out[key + _UP] = sd[m + _B]
                out[key + ".alpha"] = torch.tensor(lora.alpha_for(m, te), dtype=torch.float32)
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def file_metadata(lora: TurboLora) -> dict[str, str]:
    meta = dict(lora.metadata)
    meta.update(
        {
            "turbobooth_format": FORMAT_VERSION,
            "turbobooth_family": lora.family,
            "turbobooth_rank": str(lora.rank),
            "turbobooth_alpha": repr(float(lora.alpha)),
            "turbobooth_name": lora.name,
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(lora.rank),
            "ss_network_alpha": repr(float(lora.alpha)),
        }
    )
    if lora.family == "zimage":
        meta.setdefault("modelspec.architecture", "z-image/lora")
    else:
        meta.setdefault("modelspec.architecture", "stable-diffusion-v1/lora")
    return {str(k): str(v) for k, v in meta.items()}


def save_lora_file(lora: TurboLora, path: str) -> str:
    """Write ``lora`` to ``path`` (``.safetensors``) atomically and return the absolute path."""
    from safetensors.torch import save_file

    path = os.path.abspath(os.fspath(path))
    if not path.lower().endswith((".safetensors", ".sft")):
        path += ".safetensors"
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise InvalidInputError(f"cannot create the folder {folder!r} for the LoRA file: {e}") from e
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
    try:
        save_file(lora_file_tensors(lora), tmp, metadata=file_metadata(lora))
        os.replace(tmp, path)
    except OSError as e:
        raise InvalidInputError(f"cannot write the LoRA file {path!r}: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    logger.info("saved %r to %s", lora, path)
    return path


def _pairs_from(tensors: dict, prefix: str, a: str, b: str, rename) -> tuple[dict, dict]:
    sd, alphas = {}, {}
    for key, value in tensors.items():
        if not key.startswith(prefix) or not key.endswith(a):
            continue
        flat = key[len(prefix) : -len(a)]
        up = prefix + flat + b
        if up not in tensors:
            raise InvalidInputError(f"LoRA file is incomplete: {key!r} has no matching {up!r}")
        module = rename(flat)
        sd[module + _A] = value
        sd[module + _B] = tensors[up]
        alpha_key = prefix + flat + ".alpha"
        if alpha_key in tensors:
            alphas[module] = float(tensors[alpha_key].float().item())
    return sd, alphas


def _diffusers_alpha(meta: dict, prefix: str) -> float | None:
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    value = data.get(f"{prefix}.lora_alpha")
    return float(value) if value is not None else None


def load_lora_file(path: str) -> TurboLora:
    """Read a LoRA written by :func:`save_lora_file`, or a plain diffusers/kohya one."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InvalidInputError(f"LoRA file not found: {path!r}")
    _check_not_pickle(path)
    try:
        tensors = load_file(path)
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types
        raise InvalidInputError(f"{path!r} is not a readable .safetensors LoRA file: {e}") from e
    meta.pop("format", None)

    keys = list(tensors)
    te_sd: dict = {}
    te_alphas: dict = {}
    if any(k.startswith("diffusion_model.") for k in keys):
        family = "zimage"
        if any(k.endswith(_DOWN) for k in keys):
            sd, alphas = _pairs_from(tensors, "diffusion_model.", _DOWN, _UP, lambda s: s)
        else:
            sd, alphas = _pairs_from(tensors, "diffusion_model.", _A, _B, lambda s: s)
    elif any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_")) for k in keys):
        flat_names = [k for k in keys if k.startswith("lora_unet_")]
        family = "zimage" if any(("refiner" in k or "lora_unet_layers_" in k) for k in flat_names) else "sd1"
        sd, alphas = _pairs_from(tensors, "lora_unet_", _DOWN, _UP, _kohya_to_module)
        for te_prefix in ("lora_te_", "lora_te1_"):
            more, more_alphas = _pairs_from(
                tensors, te_prefix, _DOWN, _UP, lambda f: canonical_text_encoder_name(_kohya_to_module(f))
            )
            te_sd.update(more)
            te_alphas.update(more_alphas)
    elif any(k.startswith("transformer.") for k in keys):
        family = "zimage"
        sd, alphas = _pairs_from(tensors, "transformer.", _A, _B, lambda s: s)
        default = _diffusers_alpha(meta, "transformer")
        if default is not None:
            alphas = {m: alphas.get(m, default) for m in lora_modules(sd)}
    elif any(k.startswith(("unet.", "text_encoder.")) for k in keys):
        family = "sd1"
        sd, alphas = _pairs_from(tensors, "unet.", _A, _B, lambda s: s)
        te_sd, te_alphas = _pairs_from(tensors, "text_encoder.", _A, _B, canonical_text_encoder_name)
        for prefix, table, s in (("unet", alphas, sd), ("text_encoder", te_alphas, te_sd)):
            default = _diffusers_alpha(meta, prefix)
            if default is not None:
                for m in lora_modules(s):
                    table.setdefault(m, default)
    else:
        raise InvalidInputError(
            f"{os.path.basename(path)!r} is not a LoRA format TurboBooth reads (expected Z-Image "
            "'diffusion_model.'/'transformer.' keys or SD1.x kohya 'lora_unet_'/diffusers 'unet.' keys); "
            f"first key: {keys[0] if keys else '(none)'!r}"
        )
    if not sd and not te_sd:
        raise InvalidInputError(f"{os.path.basename(path)!r} holds no LoRA weight pairs")
    family = meta.get("turbobooth_family", family)
    ranks = [int(v.shape[0]) for k, v in {**sd, **te_sd}.items() if k.endswith(_A)]
    rank = int(meta.get("turbobooth_rank", 0)) or max(set(ranks), key=ranks.count)
    if "turbobooth_alpha" in meta:
        alpha = float(meta["turbobooth_alpha"])
    else:
        found = list(alphas.values()) + list(te_alphas.values())
        alpha = max(set(found), key=found.count) if found else float(rank)
    # Modules without an alpha tensor use alpha = their rank (scale 1), as diffusers does.
    for table, s in ((alphas, sd), (te_alphas, te_sd)):
        for m in lora_modules(s):
            table.setdefault(m, float(s[m + _A].shape[0]))
    module_alphas = {m: a for m, a in alphas.items() if a != alpha}
    te_module_alphas = {m: a for m, a in te_alphas.items() if a != alpha}
    user_meta = {k: v for k, v in meta.items() if not k.startswith(("turbobooth_", "ss_network_"))}
    return TurboLora(
        family=family,
        state_dict=sd,
        rank=rank,
        alpha=alpha,
        text_encoder_state_dict=te_sd,
        metadata=user_meta,
        module_alphas=module_alphas,
        text_encoder_alphas=te_module_alphas,
        name=meta.get("turbobooth_name", os.path.splitext(os.path.basename(path))[0]),
    )


__all__ = [
    "TurboLora",
    "applied",
    "attach_lora_weights",
    "extract_lora_state_dict",
    "inject_lora",
    "load_lora_file",
    "lora_file_tensors",
    "lora_modules",
    "remove_adapters",
    "save_lora_file",
    "set_active_adapters",
]
