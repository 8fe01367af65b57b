"""ImageBatch: up to ``SLOTS`` IMAGE inputs (each an image or a batch) -> one IMAGE batch, in order, at the first
one's size. ComfyUI 0.8.0 marks its core ImageBatch (two inputs) deprecated."""

from __future__ import annotations

from .comfy import Node

SLOTS = 8


def batch_images(images: list):
    """IMAGE tensors [B,H,W,C] -> one [sum B, H, W, 3] batch at the first image's size (bilinear)."""
    import torch

    from ..manager.errors import InvalidInputError

    out = []
    height, width = images[0].shape[1:3]
    for i, image in enumerate(images):
        if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
            raise InvalidInputError(f"ImageBatch input {i + 1} is not an IMAGE [B,H,W,C] (shape {tuple(image.shape)})")
        image = image[..., :3] if image.shape[-1] != 1 else image.expand(-1, -1, -1, 3)
        if image.shape[1:3] != (height, width):
            image = torch.nn.functional.interpolate(image.movedim(-1, 1), size=(height, width), mode="bilinear",
                                                    align_corners=False).movedim(1, -1).clamp(0, 1)
        out.append(image.to(images[0].dtype))
    return torch.cat(out, dim=0)


class ImageBatch(Node, category="TurboBooth/image", returns={"images": "IMAGE"}, function="batch"):
    DESCRIPTION = (
        f"Joins up to {SLOTS} images or image batches into one batch, in input order (for example the 3-5 subject "
        "photos of DreamBooth). Images of another size are resized to the first one's. Chain two for more."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"image1": ("IMAGE",)},
            "optional": {f"image{i}": ("IMAGE",) for i in range(2, SLOTS + 1)},
        }

    def batch(self, image1, **more):
        given = [more[f"image{i}"] for i in range(2, SLOTS + 1) if more.get(f"image{i}") is not None]
        return (batch_images([image1, *given]),)
