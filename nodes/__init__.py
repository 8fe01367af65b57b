"""ComfyUI node classes (V1 registration). Thin glue: each node reads its inputs and makes one call."""

from .guidance import TurboGuidance
from .loader import TurboLoader
from .sample import TurboSample

NODE_CLASS_MAPPINGS = {
    "TurboBoothLoader": TurboLoader,
    "TurboBoothGuidance": TurboGuidance,
    "TurboBoothSample": TurboSample,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "TurboBoothLoader": "TurboLoader",
    "TurboBoothGuidance": "NegativePrompt/CFG",
    "TurboBoothSample": "TurboSample",
}

try:  # DreamBooth nodes need the trainer; a missing optional dependency only disables them
    from .training import TRAINING_DISPLAY_NAMES, TRAINING_NODES

    NODE_CLASS_MAPPINGS.update(TRAINING_NODES)
    NODE_DISPLAY_NAME_MAPPINGS.update(TRAINING_DISPLAY_NAMES)
except ImportError as _e:  # pragma: no cover - depends on the environment
    import logging

    logging.getLogger("turbobooth").warning("TurboBooth DreamBooth nodes are disabled: %s", _e)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
