"""TurboBooth: fast few-step generation (Z-Image-Turbo, SD1.x) and DreamBooth personalization for ComfyUI.

ComfyUI imports this folder as a custom-node package and reads
NODE_CLASS_MAPPINGS. Installed with pip it is the ``turbobooth`` package;
``manager`` and ``trainer`` work without ComfyUI.
"""

__version__ = "0.1.0"

if __package__:  # imported as a package: by ComfyUI (custom_nodes/<folder>) or as `turbobooth`
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # read as a lone file (a test collector walking the checkout): nothing to register
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}

# The web extension (plain JS modules): the live training dashboard, the source-aware TurboLoader and the
# saved path on CheckpointSave. The nodes work the same without it.
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY", "__version__"]
