"""Loading models from every source a ComfyUI user has.

Sources: a diffusers folder (ComfyUI's ``models/diffusers/<name>``), a Hugging
Face repo id at a revision (through huggingface_hub's cache, honouring
``HF_HUB_OFFLINE`` and ``HF_TOKEN``), ComfyUI's split Z-Image files, and SD1.x
single-file checkpoints. Only safetensors are ever deserialised.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re

from .errors import ModelSourceError, UnsafeFileError, WrongFamilyError, explained, get_logger
from .families import FAMILIES, PIPELINE_FAMILIES, defaults_for, detect_variant
from .formats import NO_SAFETY_CHECKER, PICKLE_SUFFIXES, check_safetensors, load_sd1_single_file, load_zimage_split
from .spec import ModelSpec, TurboModel

logger = get_logger(__name__)

WEIGHTED_COMPONENTS = ("transformer", "unet", "text_encoder", "vae")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"]


# diffusers warns on every img2img pipeline built from loaded components that an empty list of modules should
# stay in float32; it names nothing, so it says nothing
logging.getLogger("diffusers.models.modeling_utils").addFilter(
    lambda record: "should be kept in float32: []" not in record.getMessage()
)
# peft imports bitsandbytes when it is installed, and bitsandbytes then warns on every start that an optional CPU
# 4-bit kernel package is missing; TurboBooth uses only its 8-bit AdamW
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "gemm_4bit_forward from kernels-community" not in record.getMessage()
)


def resolve_torch_dtype(name: str, device: str):
    """Map a dtype choice to (compute dtype, storage dtype or None).

    fp8 always stores 8-bit weights. On a CPU, bf16/fp16 also store the weights in 16 bits but compute in fp32:
    CPUs without native bf16 run 16-bit matmuls several times slower.
    """
    import torch

    cuda = device.startswith("cuda")
    if name == "auto":
        if cuda and torch.cuda.is_available():
            return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16), None
        return torch.float32, None
    if name.startswith("fp8"):
        storage = torch.float8_e4m3fn if name == "fp8_e4m3fn" else torch.float8_e5m2
        return (torch.bfloat16 if cuda else torch.float32), storage
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    return (torch.float32, dtype) if not cuda and dtype != torch.float32 else (dtype, None)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelSourceError(f"device {device!r} was requested but no CUDA device is available; use 'auto' or 'cpu'")
    return device


def inspect_diffusers_folder(folder: str, expected_family: str = "auto") -> str:
    """Check a diffusers folder and return its family, with errors that say what is wrong."""
    index = os.path.join(folder, "model_index.json")
    if not os.path.isdir(folder):
        raise ModelSourceError(
            f"model folder not found: {folder}. Expected a diffusers folder with model_index.json "
            "(in ComfyUI: models/diffusers/<name>), a Hugging Face repo id, or a .safetensors file"
        )
    if not os.path.isfile(index):
        raise ModelSourceError(
            f"{folder} has no model_index.json, so it is not a diffusers model folder. "
            "For ComfyUI split files choose 'split files'; for one .safetensors checkpoint choose 'single file'"
        )
    try:
        with open(index, encoding="utf-8") as f:
            info = json.load(f)
    except ValueError as e:
        raise ModelSourceError(f"{index} is not valid JSON: {e}") from e
    cls = info.get("_class_name", "")
    family = PIPELINE_FAMILIES.get(cls)
    if family is None:
        raise WrongFamilyError(
            f"{folder} holds a {cls or 'unknown'} model; TurboBooth runs Z-Image (ZImagePipeline) and "
            "Stable Diffusion 1.x (StableDiffusionPipeline)"
        )
    if family == "sd1":
        unet_cfg = os.path.join(folder, "unet", "config.json")
        if os.path.isfile(unet_cfg):
            with open(unet_cfg, encoding="utf-8") as f:
                cross = json.load(f).get("cross_attention_dim")
            if isinstance(cross, int) and cross in (1024, 2048):
                raise WrongFamilyError(
                    f"{folder} is a Stable Diffusion 2.x/XL-style model (cross_attention_dim={cross}); only SD1.x is supported"
                )
    if expected_family != "auto" and family != expected_family:
        raise WrongFamilyError(
            f"{folder} is a {defaults_for(family).label} model but {defaults_for(expected_family).label} was requested; "
            "set family to 'auto' or pick the matching model"
        )
    for comp in FAMILIES[family].components:
        if comp not in info or not os.path.isdir(os.path.join(folder, comp)):
            raise ModelSourceError(
                f"{folder} is missing the '{comp}' component that a {defaults_for(family).label} model needs; "
                "the download is incomplete"
            )
    for comp in (c for c in WEIGHTED_COMPONENTS if c in info):
        _check_weights(os.path.join(folder, comp))
    return family


def _check_weights(where: str) -> None:
    """A component folder holds whole safetensors weights, not (only) pickles."""
    files = sorted(glob.glob(os.path.join(glob.escape(where), "*")))  # hidden files left out
    safes = [f for f in files if f.endswith(".safetensors")]
    pickles = [f for f in files if f.lower().endswith(PICKLE_SUFFIXES)]
    if not safes and pickles:
        raise UnsafeFileError(
            f"{where} has only pickle weights ({os.path.basename(pickles[0])}); "
            "TurboBooth loads only .safetensors. Download the safetensors variant."
        )
    if not safes:
        raise ModelSourceError(f"{where} has no .safetensors weights; the download is incomplete")
    for f in safes:
        check_safetensors(f)


def fingerprint(paths: list[str], exact_time: bool = False) -> str:
    """Identity of local weights: names, sizes and modification times (no hashing of gigabytes); whole seconds
    for the on-disk cache keys, nanoseconds (``exact_time``) to notice a file replaced in the same second."""
    h = hashlib.sha256()
    for p in sorted(paths):
        try:
            st = os.stat(p)
            stamp = st.st_mtime_ns if exact_time else int(st.st_mtime)
            h.update(f"{os.path.abspath(p)}|{st.st_size}|{stamp}".encode())
        except OSError:
            h.update(p.encode())
    return h.hexdigest()[:16]


def _spec_files(spec: ModelSpec) -> list[str]:
    """The local weight files of a spec (none for a hub repo)."""
    kind = spec.resolved_kind()
    if kind == "hub":
        return []
    if kind == "diffusers":
        folder = glob.escape(os.path.expanduser(spec.source))
        return [f for c in WEIGHTED_COMPONENTS for f in glob.glob(os.path.join(folder, c, "*.safetensors"))]
    return [f for f in (spec.source, spec.text_encoder, spec.vae) if f]


def file_stamp(spec: ModelSpec) -> str:
    """Sizes and modification times of the spec's local weight files: a file replaced at the same path
    changes it, so the cache and ComfyUI's IS_CHANGED load it again. Empty for hub repos."""
    files = _spec_files(spec)
    return fingerprint(files, exact_time=True) if files else ""


def estimate_bytes(spec: ModelSpec) -> int:
    """The size on disk of the spec's weight files: about what loading it will take (0 for hub repos)."""
    return sum(os.path.getsize(f) for f in _spec_files(spec) if os.path.isfile(f))


def hub_snapshot(repo_id: str, revision: str | None) -> tuple[str, str]:
    """Resolve a repo id + revision to a local snapshot folder via huggingface_hub's cache.

    Offline (``HF_HUB_OFFLINE=1``) only the local cache is used. The token
    comes from ``HF_TOKEN`` / the hub login and is never logged.
    """
    from huggingface_hub import errors, snapshot_download

    revision = revision or "main"
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    where = "HF_HUB_OFFLINE is set and" if offline else "the Hub is unreachable and"
    known = {  # most specific first: a gated repo is also a repo not found
        errors.RevisionNotFoundError: (
            f"revision {revision!r} does not exist in {repo_id}; use a branch, tag or commit of it"
        ),
        errors.GatedRepoError: (
            f"{repo_id} is gated: accept its licence on the Hub and set HF_TOKEN (or run `hf auth login`)"
        ),
        errors.RepositoryNotFoundError: (
            f"Hugging Face repo {repo_id!r} was not found (or is private: set HF_TOKEN); check the spelling"
        ),
        errors.LocalEntryNotFoundError: (
            f"{repo_id}@{revision} is not available: {where} the local Hugging Face cache has no snapshot of that "
            "revision. Download it once while online, or pick a cached revision"
        ),
    }
    try:
        path = snapshot_download(
            repo_id=repo_id, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=offline
        )
    except (OSError, ValueError) as e:  # every huggingface_hub error is one of these
        # from None: the library's own exception may carry the server's echo of a token or header
        generic = f"could not fetch {repo_id}@{revision}: {type(e).__name__}: {e}"
        raise ModelSourceError(next((m for cls, m in known.items() if isinstance(e, cls)), generic)) from None
    return path, os.path.basename(os.path.normpath(path))


def _freeze(pipe, device: str) -> tuple[int, bool]:
    """Turn gradients off on every weight (from_pretrained / from_single_file already return eval mode), in one
    pass that also counts the bytes of every weight and buffer as stored, and tells whether any is not on
    ``device``."""
    import torch

    target, nbytes, elsewhere = torch.device(device), 0, False
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            for p in comp.parameters():
                p.requires_grad = False
                nbytes += p.nbytes
                elsewhere = elsewhere or p.device != target
            nbytes += sum(b.nbytes for b in comp.buffers())
    return nbytes, elsewhere


def _open_source(spec: ModelSpec, torch_dtype):
    """(pipeline, family, identity, resolved revision) for the spec's source."""
    kind = spec.resolved_kind()
    if kind == "split":
        if spec.family not in ("auto", "zimage"):
            raise WrongFamilyError(f"split files are supported for Z-Image only, not {spec.family!r}")
        files = [spec.source, spec.text_encoder, spec.vae]
        check_split_files(files)
        pipe = load_zimage_split(*files, tokenizer=spec.tokenizer, dtype=torch_dtype)
        return pipe, "zimage", f"split:{fingerprint(files)}", spec.revision
    if kind == "single_file":
        if spec.family not in ("auto", "sd1"):
            raise WrongFamilyError(f"single-file checkpoints are supported for SD1.x only, not {spec.family!r}")
        pipe = load_sd1_single_file(spec.source, tokenizer=spec.tokenizer, dtype=torch_dtype)
        return pipe, "sd1", f"single:{fingerprint([spec.source])}", spec.revision
    if kind == "hub":
        folder, commit = hub_snapshot(spec.source, spec.revision)
        identity = f"hub:{spec.source}@{commit}"
    else:
        folder, commit = os.path.abspath(os.path.expanduser(spec.source)), spec.revision
        identity = f"diffusers:{folder}:{fingerprint(_spec_files(spec))}"
    family = inspect_diffusers_folder(folder, spec.family)
    kwargs = NO_SAFETY_CHECKER if family == "sd1" else {}
    with explained(f"the diffusers model in {folder}"):
        cls = defaults_for(family).pipeline_class()
        pipe = cls.from_pretrained(folder, dtype=torch_dtype, use_safetensors=True, local_files_only=True, **kwargs)
    return pipe, family, identity, commit


def check_split_files(files: list[str]) -> None:
    """All three split files at once: one message names every missing one."""
    roles = ("diffusion model", "text encoder", "VAE")
    missing = [f"{role} {path!r}" for role, path in zip(roles, files, strict=True) if not os.path.isfile(path)]
    if missing:
        raise ModelSourceError("missing split files: " + "; ".join(missing) + ". Put each file in its ComfyUI folder "
                               "(models/diffusion_models, models/text_encoders, models/vae)")


def load_model(spec: ModelSpec) -> TurboModel:
    """Load a model from its spec (uncached; use ``cache.get_model`` for the shared cache).

    Always loads outside ``torch.inference_mode`` (ComfyUI runs nodes inside
    it): inference-mode weights could never be trained on afterwards.
    """
    import torch

    with torch.inference_mode(False), torch.no_grad():
        device = resolve_device(spec.device)
        torch_dtype, storage = resolve_torch_dtype(spec.dtype, device)
        pipe, family, identity, revision = _open_source(spec, torch_dtype)
        if revision:
            identity += f"@{revision}"
        pipe.set_progress_bar_config(disable=True)
        if storage is not None:
            # 8-bit storage is for the denoiser only. 16-bit storage covers Z-Image's text encoder too, but not
            # SD1.x's CLIP: its pipeline gives the prompt embeddings its text encoder's reported dtype (the first
            # parameter's).
            store_weights(getattr(pipe, defaults_for(family).denoiser), storage, torch_dtype)
            if storage.itemsize == 2 and family == "zimage":
                store_weights(pipe.text_encoder, storage, torch_dtype)
        nbytes, elsewhere = _freeze(pipe, device)
        if spec.offload != "none" and device.startswith("cuda"):
            getattr(pipe, f"enable_{spec.offload}_cpu_offload")(device=device)  # enable_model_ / enable_sequential_
        else:
            if spec.offload != "none":
                logger.warning("offload=%s needs a CUDA device; running on %s without offload", spec.offload, device)
            if elsewhere:  # from_pretrained builds on the CPU; pipe.to walks every module even when nothing moves
                pipe.to(device)
        variant = ""
        if family == "zimage":
            variant = spec.variant if spec.variant != "auto" else detect_variant(
                [spec.source, pipe.config.get("_name_or_path")], pipe.scheduler.config.get("shift"))
        model = TurboModel(spec=spec, family=family, pipe=pipe, identity=identity, device=device, nbytes=nbytes,
                           extras={"stamp": file_stamp(spec)}, variant=variant)
        logger.info("loaded %s (%s, %.1f MB) from %s", model.defaults.label, spec.dtype, model.nbytes / 2**20,
                    spec.source)
        return model


#: the layers whose weights are stored narrow and cast as they run (the ones diffusers' layerwise casting covers)
CAST_LAYERS = ("Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
               "Embedding")


def store_weights(module, storage, compute) -> None:
    """Keep ``module``'s layer weights in ``storage`` and give each layer ``compute``-dtype copies while it runs.

    Not diffusers' layerwise casting: its hook casts the whole layer up before each call and back down after it,
    two full copies of every weight per call. Casting once into a temporary, as ComfyUI's manual-cast layers do,
    measured 1.08x the fp32 time on the mid-size Z-Image at 256² on a CPU, against 1.22x for the hook. Under
    backward the temporary is what autograd keeps, exactly as with the hook.
    """
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    # the layers diffusers' own enable_layerwise_casting leaves alone: norms, embeddings, and each model's declared
    # precision-sensitive ones (Z-Image: t_embedder, cap_embedder, whose callers read the weight dtype)
    skip = list(DEFAULT_SKIP_MODULES_PATTERN)
    for attr in ("_keep_in_fp32_modules", "_skip_layerwise_casting_patterns"):
        skip += list(getattr(module, attr, None) or ())
    for name, layer in module.named_modules():
        if type(layer).__name__ in CAST_LAYERS and not any(re.search(p, name) for p in skip):
            layer.to(storage)
            layer.register_forward_pre_hook(CastIn(compute))
            layer.register_forward_hook(_restore, always_call=True)


class CastIn:
    """Forward pre-hook: the layer's parameters as ``compute`` copies for this call (the stored ones kept aside)."""

    def __init__(self, compute):
        self.compute = compute

    def __call__(self, layer, _args) -> None:
        if "_turbobooth_stored" in layer.__dict__:  # a call inside a call of the same layer: already cast
            return
        stored = {n: p for n, p in layer._parameters.items() if p is not None}
        layer._turbobooth_stored = stored
        for n, p in stored.items():
            layer._parameters[n] = p.to(self.compute)


def _restore(layer, _args, _output) -> None:
    """Forward hook (also after an error): the stored parameters back in place."""
    stored = layer.__dict__.pop("_turbobooth_stored", None)
    if stored:
        layer._parameters.update(stored)
