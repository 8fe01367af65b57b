"""Fixtures: the shared service (real uvicorn on 127.0.0.1, tiny model) and LoRAs for it."""

from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e .[serve]")
pytest.importorskip("httpx", reason="the serve extra is not installed: pip install -e .[serve]")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_helpers import Service, train_tiny_lora  # noqa: E402


@pytest.fixture(scope="session")
def service(tmp_path_factory):
    """The shared service: small limits, a long max_wait_ms so concurrent requests surely batch."""
    svc = Service(str(tmp_path_factory.mktemp("service")), "--max-batch", "4", "--max-wait-ms", "300",
                  "--default-steps", "2", "--max-steps", "8", "--max-pixels", str(96 * 96), "--max-prompt-chars",
                  "200", "--max-body-bytes", str(2 * 2**20), "--max-upload-bytes", str(256 * 1024),
                  "--max-queue", "32", "--preview-every", "2")
    svc.start()
    yield svc
    svc.stop()


@pytest.fixture()
def client(service):
    with service.client() as c:
        yield c


@pytest.fixture(scope="session")
def trained_lora(service, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-train")
    for name, color in (("test-lora", (250, 20, 20)), ("other-lora", (20, 20, 250))):
        train_tiny_lora(str(root / "tiny"), str(root / name), os.path.join(service.data_dir, "loras",
                                                                             name + ".safetensors"), color)
    return "test-lora"
