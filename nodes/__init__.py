"""ComfyUI node classes (V1 registration). Thin glue: each node reads its inputs and makes one call."""

from .guidance import TurboGuidance
from .images import IMAGE_DISPLAY_NAMES, IMAGE_NODES
from .loader import TurboLoader
from .sample import TurboSample

NODE_CLASS_MAPPINGS = {
    "TurboBoothLoader": TurboLoader,
    "TurboBoothGuidance": TurboGuidance,
    "TurboBoothSample": TurboSample,
    **IMAGE_NODES,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "TurboBoothLoader": "TurboLoader",
    "TurboBoothGuidance": "NegativePrompt/CFG",
    "TurboBoothSample": "TurboSample",
    **IMAGE_DISPLAY_NAMES,
}

try:  # DreamBooth nodes need the trainer; a missing optional dependency only disables them
    from .training import TRAINING_DISPLAY_NAMES, TRAINING_NODES

    NODE_CLASS_MAPPINGS.update(TRAINING_NODES)
    NODE_DISPLAY_NAME_MAPPINGS.update(TRAINING_DISPLAY_NAMES)
except ImportError as _e:  # pragma: no cover - depends on the environment
    import logging

    logging.getLogger("turbobooth").warning("TurboBooth DreamBooth nodes are disabled: %s", _e)

from .routes import register_with_comfyui  # noqa: E402  (the web extension's /turbobooth/ routes)

register_with_comfyui()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
