"""Latents and prompt embeddings kept on disk (``cache_to_disk``): a resumed or re-queued run skips the encoders.

The file is ``<run folder>/data_cache.safetensors``: one tensor per image latent (``instance.<i>``, ``class.<i>``)
and per prompt embedding (``embed.<j>``), named as :func:`~.objective.tensor_names` names them. Its metadata
holds a key built the way the run folder's name is (:func:`~.runs.run_folder`: the model identity and the image
pixels, whose sizes are the buckets) plus the prompts (captions with the trigger applied), the encoders' dtypes,
the device type and the VAE's latent scaling, and a SHA-256 of the tensor bytes. A file with another key, missing
tensors or other bytes is ignored with one warning and written again. Writes go through
:func:`~turbobooth.manager.paths.atomic_file`: the file is whole or absent.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable

from ..manager.errors import TurboBoothError, get_logger
from . import objective as O

logger = get_logger(__name__)

CACHE_FILE = "data_cache.safetensors"
_FORMAT = "1"


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

    from ..manager.paths import atomic_file

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
    """:func:`~.objective.cache_data`, read from ``folder``'s cache file when it matches; else encoded and, when
    ``write``, saved there. ``folder=None``: in memory only."""
    n_class = None if class_data is None else len(class_data)
    if folder is None:
        return O.cache_data(pipe, family, config, instance, class_data, device, should_stop)
    data = O.plan_prompts(config, instance, class_data)
    path = os.path.join(folder, CACHE_FILE)
    key = cache_key(pipe, identity, family, device, data, instance, class_data)
    tensors = load(path, key, O.tensor_names(config, data, len(instance), n_class or 0))
    if tensors is None:
        tensors = O.encode_data(pipe, family, config, data, instance, class_data, device, should_stop)
        if write:
            save(path, key, tensors)
    else:
        logger.info("read the cached latents and prompt embeddings from %s", path)
    return O.fill_data(pipe, config, data, tensors, len(instance), n_class)
