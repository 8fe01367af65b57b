"""Personalization requests: the multipart form -> checked settings + decoded photos -> a TrainConfig.

Uploaded bytes are decoded with Pillow and re-encoded as PNG under the job's own folder; the client's file names
are never used.
"""

from __future__ import annotations

import io
import os

from .engine import valid_name
from .schemas import LimitError, TrainSettings

FORM_FIELDS = set(TrainSettings.model_fields) | {"type"}


async def read_form(request, limits) -> tuple[TrainSettings, list]:
    """(settings, PIL images) from a multipart request, or LimitError / ValueError naming what is wrong."""
    form = await request.form(max_files=limits.max_uploads * 4, max_fields=64, max_part_size=64 * 1024)
    try:
        return _parse(form, limits)
    finally:
        await form.close()


def _parse(form, limits) -> tuple[TrainSettings, list]:
    files = [v for k, v in form.multi_items() if k == "images" and hasattr(v, "read")]
    fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    unknown = sorted(set(fields) - FORM_FIELDS)
    if unknown:
        raise LimitError("form", f"unknown form field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(FORM_FIELDS))}")
    if fields.pop("type", "personalization") != "personalization":
        raise LimitError("type", "a multipart job must have type=personalization")
    if not limits.min_uploads <= len(files) <= limits.max_uploads:
        raise LimitError("max_uploads" if len(files) > limits.max_uploads else "min_uploads",
                         f"{len(files)} photos uploaded; give {limits.min_uploads} to {limits.max_uploads} "
                         "(form field 'images')", status=413 if len(files) > limits.max_uploads else 422)
    settings = TrainSettings.model_validate(fields)
    if not valid_name(settings.lora_name):
        raise LimitError("lora_name", f"lora_name {settings.lora_name!r} must be letters, digits, '.', '_' or '-'")
    return settings, [_decode(f, i, limits) for i, f in enumerate(files)]


def _decode(upload, index: int, limits):
    from PIL import Image, UnidentifiedImageError

    data = upload.file.read(limits.max_upload_bytes + 1)
    if len(data) > limits.max_upload_bytes:
        raise LimitError("max_upload_bytes", f"photo {index} is over max_upload_bytes={limits.max_upload_bytes}",
                         status=413)
    try:
        with Image.open(io.BytesIO(data)) as probe:
            w, h = probe.size
            if w * h > limits.max_upload_pixels:
                raise LimitError("max_upload_pixels", f"photo {index} is {w}x{h}, above max_upload_pixels="
                                                      f"{limits.max_upload_pixels}", status=413)
            probe.verify()
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise LimitError("images", f"photo {index} is not an image Pillow can read ({e})") from e
    return image.convert("RGB")


def save_photos(images, folder: str) -> None:
    from turbobooth.manager.paths import atomic_file

    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        atomic_file(os.path.join(folder, f"{i:03d}.png"), lambda tmp, im=image: im.save(tmp, format="PNG"))


def train_config(params: dict, output_dir: str, preview_every: int):
    """The TrainConfig of a job; always ``resume="latest"``, so a resumed job continues from its checkpoint."""
    from turbobooth.trainer.config import TrainConfig

    s = TrainSettings.model_validate({k: v for k, v in params.items() if k in TrainSettings.model_fields})
    return TrainConfig(
        family=params["family"], instance_prompt=s.instance_prompt, class_prompt=s.class_prompt,
        with_prior_preservation=s.with_prior_preservation, num_class_images=s.num_class_images,
        class_steps=s.class_steps, resolution=s.resolution, rank=s.rank, steps=s.steps, lr=s.lr, seed=s.seed,
        output_dir=output_dir, checkpoint_every=s.checkpoint_every, keep_last=2, resume="latest",
        validation_every=preview_every, validation_prompt=s.instance_prompt, validation_steps=s.class_steps,
        log_tensorboard=False,
    )
