"""TurboBooth: fast few-step generation (Z-Image-Turbo, SD1.x) and DreamBooth personalization for ComfyUI.

ComfyUI imports this folder as a custom-node package and reads
NODE_CLASS_MAPPINGS. Installed with pip it is the ``turbobooth`` package;
``manager`` and ``trainer`` work without ComfyUI.
"""

__version__ = "0.1.0"

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "__version__"]
