"""The encoders' part of the training data: VAE latents of the images and the frozen text encoder's prompt
embeddings (token ids when the text encoder is trained), in memory or also on disk (``cache_to_disk``, so a
resumed or re-queued run skips the encoders).

The file is ``<run folder>/data_cache.safetensors``: one tensor per image latent (``instance.<i>``, ``class.<i>``)
and per prompt embedding (``embed.<j>``). Its metadata holds a key built the way the run folder's name is
(:func:`~.runs.run_folder`: the model identity and the image pixels, whose sizes are the buckets) plus the
prompts (captions with the trigger applied), the encoders' dtypes, the device type and the VAE's latent scaling,
and a SHA-256 of the tensor bytes. A file with another key, missing tensors or other bytes is ignored with one
warning and written again. Writes go through :func:`~turbobooth.manager.paths.atomic_file`: the file is whole
or absent.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

from ..manager.errors import Interrupted, TurboBoothError, get_logger
from ..manager.families import defaults_for
from ..manager.paths import atomic_file
from . import objective as O

logger = get_logger(__name__)

CACHE_FILE = "data_cache.safetensors"
_FORMAT = "1"


def _check_stop(should_stop: Callable[[], bool] | None, what: str) -> None:
    if should_stop is not None and should_stop():
        raise Interrupted(f"training stopped while {what}; nothing was trained yet. Queue it again to start")


def _batched(latents: list) -> Any:
    """[N, C, h, w] when every image is in one bucket, else the list of [C, h, w] tensors."""
    import torch

    return torch.stack(latents) if len({tuple(t.shape) for t in latents}) == 1 else latents


def _encode_latents(pipe, family: str, images: list, device, should_stop: Callable[[], bool] | None = None) -> Any:
    """The images' latents (frozen VAE, the family's shift and scale), :func:`_batched`."""
    import torch

    vae = pipe.vae
    out = []
    with torch.no_grad():
        for img in images:
            _check_stop(should_stop, "caching image latents")
            px = pipe.image_processor.preprocess(img).contiguous().to(device=device, dtype=vae.dtype)  # -1..1
            lat = vae.encode(px).latent_dist.mode().float()
            if family == "zimage":
                lat = (lat - vae.config.shift_factor) * vae.config.scaling_factor
            else:
                lat = lat * vae.config.scaling_factor
            out.append(lat[0].cpu())
    return _batched(out)


def _encode_prompt(pipe, family: str, prompt: str, device):
    import torch

    with torch.no_grad():
        if family == "zimage":
            max_len = defaults_for("zimage").max_sequence_length
            emb, _ = pipe.encode_prompt([prompt], device, False, max_sequence_length=max_len)
        else:
            emb, _ = pipe.encode_prompt(prompt, device, 1, False)
    return emb[0].float().cpu()


def cache_key(pipe, identity: str, family: str, device, data: O.TrainData, instance: list, class_data) -> str:
    """What decides the cached tensors, hashed: model, encoders, device type, prompts and image pixels."""
    import torch

    from .runs import image_bytes

    vae = pipe.vae
    h = hashlib.sha256(identity.encode())
    h.update(
        json.dumps(
            {
                "format": _FORMAT,
                "family": family,
                "device": torch.device(device).type,
                "vae": str(vae.dtype),
                "text_encoder": str(pipe.text_encoder.dtype),
                "scaling_factor": vae.config.get("scaling_factor"),
                "shift_factor": vae.config.get("shift_factor"),
                "prompts": data.prompts,
            },
            sort_keys=True,
            default=str,
        ).encode()
    )
    for i, images in enumerate((instance, class_data or [])):
        h.update(f"|{i}|".encode())
        for raw in image_bytes([t.image for t in images]):
            h.update(raw)
    return h.hexdigest()


def _digest(tensors: dict) -> str:
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load(path: str, key: str, names: list) -> dict | None:
    """The tensors ``names`` of the cache file at ``path`` when it is whole and made for ``key``, else None
    (with one warning when a file is there but cannot be used)."""
    if not os.path.isfile(path):
        return None
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {n: f.get_tensor(n) for n in names} if set(f.keys()) == set(names) else None
        if meta.get("format") != _FORMAT or meta.get("key") != key:
            why = "it was made for other images, prompts or another model"
        elif tensors is None:
            why = "it holds other tensors than this run needs"
        elif meta.get("sha256") != _digest(tensors):
            why = "its contents are damaged"
        else:
            return tensors
    except Exception as e:  # a truncated or foreign file raises many types
        why = f"it cannot be read ({type(e).__name__}: {e})"
    logger.warning("ignoring the data cache %s: %s; encoding the images and prompts again", path, why)
    return None


def save(path: str, key: str, tensors: dict) -> None:
    """Write the cache atomically; a failed write only warns (the run goes on with the tensors in memory)."""
    from safetensors.torch import save_file

    owned = {n: t.detach().to("cpu").contiguous().clone() for n, t in tensors.items()}
    meta = {"format": _FORMAT, "key": key, "sha256": _digest(owned)}
    try:  # atomic_file checks the folder and creates it
        atomic_file(path, lambda tmp: save_file(owned, tmp, metadata=meta))
    except (OSError, TurboBoothError) as e:
        logger.warning("could not write the data cache %s (%s); training goes on without it", path, e)


def train_data(
    pipe,
    family: str,
    identity: str,
    config,
    instance: list,
    class_data,
    device,
    should_stop: Callable[[], bool] | None = None,
    folder: str | None = None,
    write: bool = True,
) -> O.TrainData:
    """The run's :class:`~.objective.TrainData` with its tensors: read from ``folder``'s cache file when it
    matches, else encoded and, when ``write``, saved there. ``folder=None``: in memory only."""
    data = O.plan_prompts(config, instance, class_data)
    prompts = [] if config.train_text_encoder else data.prompts  # a trained text encoder runs every step
    parts = {"instance": instance, "class": class_data or [], "embed": prompts}
    names = [f"{what}.{i}" for what, items in parts.items() for i in range(len(items))]
    path = key = tensors = None
    if folder is not None:
        path = os.path.join(folder, CACHE_FILE)
        key = cache_key(pipe, identity, family, device, data, instance, class_data)
        tensors = load(path, key, names)
    if tensors is not None:
        logger.info("read the cached latents and prompt embeddings from %s", path)
    else:
        tensors = {}
        for what in ("instance", "class"):
            latents = _encode_latents(pipe, family, [t.image for t in parts[what]], device, should_stop)
            tensors.update({f"{what}.{i}": t for i, t in enumerate(latents)})
        for j, p in enumerate(prompts):
            _check_stop(should_stop, "encoding prompts")
            tensors[f"embed.{j}"] = _encode_prompt(pipe, family, p, device)
        if folder is not None and write:
            save(path, key, tensors)
    stored = {what: [tensors[f"{what}.{i}"] for i in range(len(items))] for what, items in parts.items()}
    data.inst_latents = _batched(stored["instance"])
    data.class_latents = None if class_data is None else _batched(stored["class"])
    data.embeds = stored["embed"]
    if config.train_text_encoder:
        tok = pipe.tokenizer
        ids = tok(
            data.prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        )
        data.ids = list(ids.input_ids)
    return data


def cache_data(
    pipe, family: str, config, instance: list, class_data, device, should_stop: Callable[[], bool] | None = None
) -> O.TrainData:
    """:func:`train_data` in memory only."""
    return train_data(pipe, family, "", config, instance, class_data, device, should_stop)
