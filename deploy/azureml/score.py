"""Azure ML scoring script: ``init()`` loads the model from AZUREML_MODEL_DIR, ``run()`` answers one request.

It calls the service's own code (turbobooth.serve: the request schema, the limits, ``Engine.run_rows``), so an
image from /score is byte-equal to the same request on ``python -m turbobooth serve``. Run it locally as the
endpoint does::

    AZUREML_MODEL_DIR=/path/to/model azmlinfsrv --entry_script deploy/azureml/score.py --port 5001

Environment: AZUREML_MODEL_DIR (a diffusers folder, or a folder holding one; a ``loras/`` folder beside it is the
LoRA folder), TURBOBOOTH_MODEL (overrides it: a repo id[@revision], or "tiny"), TURBOBOOTH_MAX_BATCH (default 4),
TURBOBOOTH_DEFAULT_SIZE (default: the family's).
"""

from __future__ import annotations

import json
import logging
import os

logger = logging.getLogger("turbobooth.azureml")
_state: dict = {}


def _model_folder(root: str) -> str:
    if os.path.isfile(os.path.join(root, "model_index.json")):
        return root
    for name in sorted(os.listdir(root)):
        if os.path.isfile(os.path.join(root, name, "model_index.json")):
            return os.path.join(root, name)
    raise RuntimeError(f"AZUREML_MODEL_DIR={root} holds no diffusers folder (no model_index.json)")


def init() -> None:
    from turbobooth.serve.config import Limits, ServeConfig
    from turbobooth.serve.engine import Engine, model_spec

    root = os.environ.get("AZUREML_MODEL_DIR", "")
    source = os.environ.get("TURBOBOOTH_MODEL") or _model_folder(root)
    max_batch = int(os.environ.get("TURBOBOOTH_MAX_BATCH", "4"))
    data_dir = os.environ.get("TURBOBOOTH_DATA_DIR", os.path.join(os.getcwd(), "turbobooth_service"))
    size = os.environ.get("TURBOBOOTH_DEFAULT_SIZE")
    config = ServeConfig(model=source, data_dir=data_dir, max_batch=max_batch, default_size=int(size) if size else None,
                         limits=Limits(max_images=min(4, max_batch)))
    lora_dir = os.path.join(root, "loras") if root and os.path.isdir(os.path.join(root, "loras")) else config.lora_dir
    spec = model_spec(source, tiny_root=os.path.join(data_dir, "tiny_models"))
    engine = Engine(spec, lora_dir, max_batch, tiny=source == "tiny")
    engine.load()
    _state.update(engine=engine, config=config)
    logger.info("TurboBooth model loaded from %s", source)


def run(raw_data):
    """A GenerationRequest as JSON -> ``{"created", "data": [{"b64_json", "seed"}]}``; bad input -> 422 body."""
    from pydantic import ValidationError
    from turbobooth.manager.errors import TurboBoothError
    from turbobooth.serve.oneshot import generate_once
    from turbobooth.serve.schemas import LimitError

    try:
        return generate_once(_state["engine"], _state["config"], raw_data)
    except ValidationError as e:
        return _error(422, json.dumps(e.errors(include_url=False, include_input=False, include_context=False)))
    except LimitError as e:
        return _error(e.status, str(e), e.limit)
    except TurboBoothError as e:
        return _error(422, str(e))


def _error(status: int, message: str, limit: str | None = None):
    try:
        from azureml.contrib.services.aml_response import AMLResponse
    except ImportError:  # outside the inference server
        return {"error": {"message": message, "limit": limit}, "status": status}
    return AMLResponse(json.dumps({"error": {"message": message, "limit": limit}}), status,
                       {"Content-Type": "application/json"})
