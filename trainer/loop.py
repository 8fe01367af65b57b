"""``train`` under the name earlier releases gave it (``turbobooth.trainer.loop.train``); it lives in :mod:`.runs`."""

from .runs import TrainResult, train

__all__ = ["TrainResult", "train"]
