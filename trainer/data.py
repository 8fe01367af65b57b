"""Instance and class images: loading, checking, resizing to the training resolution."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any

from ..manager.errors import InvalidInputError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# Words that never make a unique identifier on their own.
_COMMON_WORDS = frozenset(
    "a an the of in on at with and or photo picture image portrait style painting drawing close up closeup "
    "high quality detailed my our this that dog cat man woman person people boy girl face toy".split()
)


@dataclass
class TrainImage:
    """One training image, already RGB and at the training resolution."""

    image: Any  # PIL.Image.Image
    caption: str | None = None
    source: str = ""


def _to_pil_list(images) -> list[tuple[Any, str]]:
    """Accept PIL images, a [B,H,W,C] 0..1 tensor / numpy array, or a list mixing those."""
    from PIL import Image

    if images is None:
        return []
    if hasattr(images, "shape") and len(getattr(images, "shape", ())) == 4:
        images = list(images)
    out = []
    for i, item in enumerate(images):
        if isinstance(item, Image.Image):
            out.append((item, f"image {i}"))
            continue
        if hasattr(item, "detach"):
            item = item.detach().to("cpu").float().numpy()
        if hasattr(item, "shape"):
            import numpy as np

            arr = np.asarray(item)
            if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
                arr = np.clip(arr * 255.0 + 0.5, 0, 255).astype("uint8")
                if arr.shape[-1] == 1:
                    arr = arr[..., 0]
                out.append((Image.fromarray(arr), f"image {i}"))
                continue
        raise InvalidInputError(
            f"image {i} is a {type(item).__name__}; give PIL images or an IMAGE tensor of shape [B,H,W,C]"
        )
    return out


def _from_folder(folder: str) -> list[tuple[Any, str, str | None]]:
    from PIL import Image

    if not os.path.isdir(folder):
        raise InvalidInputError(f"image folder {folder!r} does not exist")
    out = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not name.lower().endswith(IMAGE_SUFFIXES) or not os.path.isfile(path):
            continue
        try:
            with Image.open(path) as im:
                im.load()
                img = im.copy()
        except Exception as e:  # PIL raises many types for broken files
            logger.warning("skipping unreadable image %s: %s", path, e)
            continue
        caption = None
        txt = os.path.splitext(path)[0] + ".txt"
        if os.path.isfile(txt):
            with open(txt, encoding="utf-8") as f:
                caption = f.read().strip() or None
        out.append((img, path, caption))
    return out


def to_rgb(img, label: str = "image"):
    """Convert any PIL mode to RGB; transparency is composited onto white. Warns when converting."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    logger.warning("%s is %s, not RGB; converting it to RGB", label, img.mode)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.split()[-1])
        return background
    return img.convert("RGB")


def prepare_image(img, resolution: int, center_crop: bool = True, label: str = "image"):
    """RGB, shorter side scaled to ``resolution``, then centre-cropped to a square (or squashed)."""
    from PIL import Image

    img = to_rgb(img, label)
    if not center_crop:
        return img.resize((resolution, resolution), Image.Resampling.BICUBIC)
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def load_images(images_or_folder, resolution: int, center_crop: bool = True, what: str = "instance") -> list[TrainImage]:
    """Load training images from PIL images / an IMAGE tensor / a folder (``.txt`` captions beside images)."""
    if isinstance(images_or_folder, (str, os.PathLike)):
        raw = _from_folder(os.fspath(images_or_folder))
    else:
        raw = [(img, label, None) for img, label in _to_pil_list(images_or_folder)]
    if not raw:
        where = f" in {os.fspath(images_or_folder)!r}" if isinstance(images_or_folder, (str, os.PathLike)) else ""
        raise InvalidInputError(f"no {what} images{where}: DreamBooth needs 3-5 photos of the subject")
    sizes = {img.size for img, _, _ in raw}
    if len(sizes) > 1:
        logger.info("%s images have %d different sizes; each is resized and cropped to %d", what, len(sizes), resolution)
    out = [
        TrainImage(prepare_image(img, resolution, center_crop, f"{what} {label}"), caption, label)
        for img, label, caption in raw
    ]
    if what == "instance" and len(out) == 1:
        logger.warning("only 1 instance image: the LoRA will overfit to it; 3-5 photos in different settings work better")
    return out


def pil_to_tensor(img):
    """PIL RGB -> float tensor [3,H,W] in [-1, 1]."""
    import numpy as np
    import torch

    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def check_instance_prompt(instance_prompt: str, class_prompt: str = "") -> bool:
    """Warn when the instance prompt seems to lack a unique identifier token. Returns True when it looks fine."""
    words = set(re.findall(r"[\w<>\[\]]+", instance_prompt.lower()))
    class_words = set(re.findall(r"[\w<>\[\]]+", (class_prompt or "").lower()))
    unique = words - class_words - _COMMON_WORDS
    if not unique:
        logger.warning(
            "the instance prompt %r has no unique identifier token (a rare word such as 'sks' that is not in the "
            "class prompt); the subject will bleed into the whole class",
            instance_prompt,
        )
        return False
    return True
