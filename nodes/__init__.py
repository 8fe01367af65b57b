"""ComfyUI node classes (V1 registration). Thin glue: each node reads its inputs and makes one call."""

from .images import ImageBatch
from .loader import TurboLoader
from .sample import TurboGuidance, TurboSample

#: node id -> (class, the name ComfyUI shows)
_NODES = {
    "TurboBoothLoader": (TurboLoader, "TurboLoader"),
    "TurboBoothGuidance": (TurboGuidance, "NegativePrompt/CFG"),
    "TurboBoothSample": (TurboSample, "TurboSample"),
    "TurboBoothImageBatch": (ImageBatch, "ImageBatch"),
}

try:  # DreamBooth nodes need the trainer; a missing optional dependency only disables them
    from .training import CheckpointSave, DreamBoothTrain, PriorImageGen

    _NODES["TurboBoothPriorImageGen"] = (PriorImageGen, "PriorImageGen")
    _NODES["TurboBoothDreamBoothTrain"] = (DreamBoothTrain, "DreamBoothTrain")
    _NODES["TurboBoothCheckpointSave"] = (CheckpointSave, "CheckpointSave")
except ImportError as _e:  # pragma: no cover - depends on the environment
    import logging

    logging.getLogger("turbobooth").warning("TurboBooth DreamBooth nodes are disabled: %s", _e)

NODE_CLASS_MAPPINGS = {node_id: cls for node_id, (cls, _) in _NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: name for node_id, (_, name) in _NODES.items()}

from .comfy import register_with_comfyui  # noqa: E402  (the web extension's /turbobooth/ routes)

register_with_comfyui()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
