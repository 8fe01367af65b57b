"""The shared, module-level model cache: one copy of each base model per process.

Keyed by the frozen ModelSpec. Least-recently-used models are evicted when
the byte budget is exceeded, and an evicted model really lets go of its
weights (its pipeline components are dropped), so memory returns even if a
stale TURBO_MODEL reference is still held somewhere (ComfyUI's output cache,
for example). Holders call :func:`ensure_loaded` to get a live model back.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
from collections import OrderedDict
from collections.abc import Callable

from .errors import get_logger
from .loading import estimate_bytes, file_stamp, load_model
from .spec import ModelSpec, TurboModel

logger = get_logger(__name__)

DEFAULT_BUDGET = int(float(os.environ.get("TURBOBOOTH_CACHE_GB", "48")) * 2**30)


class ModelCache:
    def __init__(self, budget_bytes: int = DEFAULT_BUDGET):
        self.budget = int(budget_bytes)
        self._items: OrderedDict[ModelSpec, TurboModel] = OrderedDict()
        self._lock = threading.RLock()
        self._listeners: list[Callable[[TurboModel], None]] = []
        self._load = load_model
        self.loads = 0

    def get(self, spec: ModelSpec) -> TurboModel:
        """The cached model for ``spec``; loads it on a miss."""
        with self._lock:
            model = self._items.get(spec)
            if model is not None and model.extras.get("stamp", "") != file_stamp(spec):
                logger.info("the files of %s changed on disk; loading them again", spec.source)
                self.release(spec)
                model = None
            if model is not None:
                self._items.move_to_end(spec)
                return model
            # release first what the new model's files would not fit beside, so two models that do not fit together
            # are never in memory at once (Base goes before Turbo loads); then what it outgrew its estimate by
            self._evict(estimate_bytes(spec))
            model = self._load(spec)
            self.loads += 1
            self._items[spec] = model
            self._evict(0, keep=spec)
            return model

    def peek(self, spec: ModelSpec) -> TurboModel | None:
        with self._lock:
            return self._items.get(spec)

    def __contains__(self, spec: ModelSpec) -> bool:
        with self._lock:
            return spec in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(m.nbytes for m in self._items.values())

    def on_release(self, listener: Callable[[TurboModel], None]) -> None:
        """Call ``listener(model)`` whenever a model leaves the cache."""
        self._listeners.append(listener)

    def _evict(self, need: int, keep: ModelSpec | None = None) -> None:
        """Release least-recently-used models (never ``keep``) until ``need`` more bytes fit the budget."""
        while self._items and self.total_bytes + need > self.budget:
            oldest = next(iter(self._items))
            if oldest == keep:
                break
            self.release(oldest)

    def release(self, spec: ModelSpec) -> bool:
        """Drop one model and free its weights. Returns whether it was cached."""
        with self._lock:
            model = self._items.pop(spec, None)
        if model is None:
            return False
        _free(model)
        for listener in list(self._listeners):
            try:
                listener(model)
            except Exception:  # a listener must never break unloading
                logger.exception("model release listener failed")
        return True

    def clear(self) -> None:
        """Release every model."""
        with self._lock:
            specs = list(self._items)
        for spec in specs:
            self.release(spec)


def _free(model: TurboModel) -> None:
    import torch

    pipe = model.pipe
    model.extras.clear()
    if pipe is not None:
        with contextlib.suppress(Exception):  # offload hooks may be absent
            pipe.maybe_free_model_hooks()
        for name in list(getattr(pipe, "components", {})):
            setattr(pipe, name, None)
    model.pipe = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    logger.info("released %r", model)


CACHE = ModelCache()


def get_model(spec: ModelSpec) -> TurboModel:
    return CACHE.get(spec)


def is_released(model: TurboModel) -> bool:
    return model.pipe is None


def ensure_loaded(model: TurboModel) -> TurboModel:
    """Return a live model for ``model``'s spec, reloading it if it was released meanwhile."""
    if not is_released(model):
        return model
    logger.info("model %s was freed; loading it again", model.spec.source)
    return CACHE.get(model.spec)
