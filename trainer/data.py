"""Instance and class images: loading, checking, resizing to the training resolution."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..manager.errors import InvalidInputError, get_logger

logger = get_logger(__name__)

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


def _to_pil_list(images) -> list:
    """Accept PIL images, a [B,H,W,C] 0..1 tensor / numpy array, or a list mixing those."""
    import numpy as np
    from PIL import Image

    if images is None:
        return []
    out = []
    for i, item in enumerate(images):
        if hasattr(item, "detach"):
            item = item.detach().to("cpu").float().numpy()
        if not isinstance(item, Image.Image):
            arr = np.asarray(item) if hasattr(item, "shape") else None
            if arr is None or arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
                raise InvalidInputError(
                    f"image {i} is a {type(item).__name__}; give PIL images or an IMAGE tensor of shape [B,H,W,C]"
                )
            arr = np.clip(arr * 255.0 + 0.5, 0, 255).astype("uint8")
            item = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
        out.append(item)
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
                img = im.copy()  # copy() loads the pixels before the file closes
        except Exception as e:  # PIL raises many types for broken files
            logger.warning("skipping unreadable image %s: %s", path, e)
            continue
        txt = os.path.splitext(path)[0] + ".txt"
        try:  # an empty caption file is no caption
            caption = (Path(txt).read_text(encoding="utf-8").strip() or None) if os.path.isfile(txt) else None
        except UnicodeDecodeError as e:
            raise InvalidInputError(
                f"caption file {txt!r} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        out.append((img, path, caption))
    return out


def bucket_size(width: int, height: int, resolution: int, multiple: int) -> tuple[int, int]:
    """The aspect-ratio bucket of a ``width`` x ``height`` image: about ``resolution``**2 pixels with the image's
    aspect, sides multiples of ``multiple``, never larger than the image (small images are not upscaled)."""
    aspect = width / height
    area = min(resolution * resolution, width * height)
    bw = max(multiple, int((area * aspect) ** 0.5 // multiple * multiple))
    bh = max(multiple, int((area / aspect) ** 0.5 // multiple * multiple))
    return min(bw, max(multiple, width // multiple * multiple)), min(bh, max(multiple, height // multiple * multiple))


def prepare_image(img, resolution: int, center_crop: bool = True, label: str = "image", multiple: int = 8):
    """RGB at the training size: a ``resolution`` square (centre crop), or, without ``center_crop``, the image's
    aspect-ratio bucket, downscaled to cover it and trimmed by at most a few pixels to the bucket's multiple.
    Other modes than RGB are converted with a warning; transparency is composited onto white."""
    from PIL import Image

    if img.mode != "RGB":
        logger.warning("%s is %s, not RGB; converting it to RGB", label, img.mode)
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.new("RGB", rgba.size, (255, 255, 255))
            img.paste(rgba, mask=rgba.split()[-1])
        else:
            img = img.convert("RGB")
    w, h = img.size
    tw, th = (resolution, resolution) if center_crop else bucket_size(w, h, resolution, multiple)
    scale = max(tw / w, th / h)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - tw) // 2, (nh - th) // 2
    return img.crop((left, top, left + tw, top + th))


def apply_trigger(caption: str, trigger: str, source: str) -> str:
    """``[trigger]`` in a caption becomes the instance token."""
    if "[trigger]" not in caption:
        return caption
    if not trigger:
        raise InvalidInputError(
            f"the caption of {source} uses [trigger] but no trigger word is known; set trigger (the unique token, "
            "e.g. 'sks') or put one rare word in the instance prompt")
    return caption.replace("[trigger]", trigger)


def caption_lines(text: str) -> tuple:
    """The ``captions`` of a multiline text: one per line (a final newline ends the last one); "" = none given."""
    if not isinstance(text, str) or not text.strip():
        return ()
    return tuple(line.strip() for line in text.splitlines())


def with_captions(images: list[TrainImage], captions) -> list[TrainImage]:
    """``captions`` (one per image, in order) in place of the images' own; an empty one = the instance prompt."""
    if not captions:
        return images
    if len(captions) != len(images):
        raise InvalidInputError(
            f"{len(captions)} captions were given for {len(images)} instance images; give one caption line per "
            "image, in batch order (an empty line trains that image with the instance prompt)")
    return [TrainImage(t.image, c.strip() or None, t.source) for t, c in zip(images, captions, strict=True)]


def load_images(images_or_folder, resolution: int, center_crop: bool = True, what: str = "instance",
                multiple: int = 8) -> list[TrainImage]:
    """Load training images from PIL images / an IMAGE tensor / a folder (``.txt`` captions beside images)."""
    folder = os.fspath(images_or_folder) if isinstance(images_or_folder, (str, os.PathLike)) else None
    if folder is not None:
        raw = _from_folder(folder)
    else:
        raw = [(img, f"image {i}", None) for i, img in enumerate(_to_pil_list(images_or_folder))]
    if not raw:
        where = "" if folder is None else f" in {folder!r}"
        raise InvalidInputError(f"no {what} images{where}: DreamBooth needs 3-5 photos of the subject")
    sizes = {img.size for img, _, _ in raw}
    if len(sizes) > 1:
        logger.info("%s images have %d different sizes; each is resized and cropped to %d", what, len(sizes), resolution)
    out = [
        TrainImage(prepare_image(img, resolution, center_crop, f"{what} {label}", multiple), caption, label)
        for img, label, caption in raw
    ]
    if what == "instance" and len(out) == 1:
        logger.warning("only 1 instance image: the LoRA will overfit to it; 3-5 photos in different settings work better")
    return out


def class_train_images(model, cfg, output_dir: str, accelerator, class_images=None, should_stop=None,
                       multiple: int = 8) -> list[TrainImage] | None:
    """The class images of prior preservation: the given ones, else generated once into the prior cache
    (by the main process; the others wait) and read back. None when prior preservation is off."""
    from . import priors

    if not cfg.with_prior_preservation:
        if class_images is not None:
            logger.warning("class images were given but with_prior_preservation is off; they are not used")
        return None
    if class_images is None:
        root = cfg.class_data_dir or os.path.join(output_dir, "class_images")
        cache = priors.PriorCache(model, cfg.class_prompt, seed=cfg.seed, width=cfg.resolution,
                                  height=cfg.resolution, steps=cfg.class_steps, guidance=cfg.class_guidance, root=root)
        if accelerator.is_main_process:
            cache.ensure(cfg.num_class_images, should_stop=should_stop)
        accelerator.wait_for_everyone()
        class_images = cache.load(cfg.num_class_images)
    return load_images(class_images, cfg.resolution, cfg.center_crop, what="class", multiple=multiple)


def unique_words(instance_prompt: str, class_prompt: str = "") -> list[str]:
    """Words of the instance prompt that are neither in the class prompt nor common words: the likely trigger."""
    class_words = set(re.findall(r"[\w<>\[\]]+", (class_prompt or "").lower()))
    return [w for w in re.findall(r"[\w<>\[\]]+", instance_prompt)
            if w.lower() not in class_words and w.lower() not in _COMMON_WORDS]


def check_instance_prompt(instance_prompt: str, class_prompt: str = "") -> bool:
    """Warn when the instance prompt seems to lack a unique identifier token. Returns True when it looks fine."""
    if not unique_words(instance_prompt, class_prompt):
        logger.warning(
            "the instance prompt %r has no unique identifier token (a rare word such as 'sks' that is not in the "
            "class prompt); the subject will bleed into the whole class",
            instance_prompt,
        )
        return False
    return True
