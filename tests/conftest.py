"""Fixtures shared by every test layer."""

from __future__ import annotations

import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The real-ComfyUI fixtures (comfy_host, comfy_server, comfy_server_url, host_runner,
# host_tiny_models) live in tests/host/host_fixtures.py; importing them here shares them
# with every test folder. tests/host also holds comfy_harness, importable from tests.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "host"))
from host_fixtures import (  # noqa: E402,F401
    comfy_host,
    comfy_server,
    comfy_server_url,
    host_runner,
    host_tiny_models,
)


def in_ci() -> bool:
    """True when CI is set (CI=true): missing prerequisites then fail instead of skipping."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _skip_or_fail(reason: str) -> None:
    if in_ci():
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def skip_or_fail():
    """``skip_or_fail(reason)``: skip locally, fail under CI=true, where no test layer may vanish silently."""
    return _skip_or_fail


@pytest.fixture(scope="session")
def repo_root() -> str:
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """The tiny random Z-Image and SD1.x models in every layout, written once per session.

    Keys: zimage_diffusers, sd1_diffusers (folders), zimage_split (dict of files),
    sd1_single_file, sd1_tokenizer; plus "root".
    """
    from turbobooth.manager.tiny import write_tiny_models

    root = tmp_path_factory.mktemp("tiny-models")
    paths = dict(write_tiny_models(str(root)))
    paths["root"] = str(root)
    return paths


@pytest.fixture
def one_thread():
    """One torch thread for the test. Multi-threaded CPU conv gradients (SD1.x's UNet) differ from run to run, resumed or not."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

