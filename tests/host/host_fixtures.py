"""Fixtures for the real-ComfyUI host tests (``@pytest.mark.host``) and the browser tests.

tests/conftest.py imports them, so every test folder can use them.

comfy_host     session; a prepared ComfyUI (see comfy_harness.ComfyHost) with the
               tiny models in its models dir. Run prompts with
               ``comfy_host.run_prompt_inprocess(prompt) -> PromptResult``.
comfy_server   session; ComfyUI's HTTP server (comfy_harness.ComfyServer): ``.url``,
               ``.object_info()``, ``.run_prompt(prompt) -> PromptResult``.
comfy_server_url   the server's base URL as a string.
host_tiny_models   the tiny model paths inside the host's models dir; fails if they could not be written.

When the host cannot be prepared these tests skip locally and fail under CI=true.
"""

from __future__ import annotations

import os

import comfy_harness as ch
import pytest


def _unavailable(reason: str) -> None:
    if ch.in_ci():
        pytest.fail(f"ComfyUI host unavailable under CI: {reason}", pytrace=False)
    pytest.skip(f"ComfyUI host unavailable: {reason}")


@pytest.fixture(scope="session")
def comfy_host(tmp_path_factory) -> ch.ComfyHost:
    work = tmp_path_factory.mktemp("comfy-host")
    try:
        host = ch.prepare_host(str(work))
    except ch.HostUnavailable as e:
        _unavailable(str(e))
    # the in-process host reads object_info once per session, so LoadImage's file list must already hold every
    # picture a host test names, whichever test runs first
    from PIL import Image
    from tiny_inputs import write_input_images

    Image.new("RGB", (40, 24), (200, 30, 30)).save(os.path.join(host.input_dir, "harness_input.png"))
    write_input_images(host.input_dir)
    try:
        host.tiny_models = ch.write_tiny_models(host.models_dir)
    except Exception as e:  # reported by host_tiny_models, so core-only tests still run
        host.tiny_models_error = f"{type(e).__name__}: {e}"
    return host


@pytest.fixture(scope="session")
def host_tiny_models(comfy_host) -> dict:
    if comfy_host.tiny_models_error:
        pytest.fail(f"could not write the tiny models into {comfy_host.models_dir}: {comfy_host.tiny_models_error}")
    return comfy_host.tiny_models


@pytest.fixture(scope="session")
def comfy_server(comfy_host):
    server = ch.ComfyServer(comfy_host)
    try:
        server.start()
    except ch.HostError as e:
        server.stop()
        pytest.fail(f"ComfyUI server failed to start: {e}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def comfy_server_url(comfy_server) -> str:
    return comfy_server.url


class HostRunner:
    """One way of running prompts on the host: ``name``, ``object_info()``, ``run(prompt)``, ``output_dir``."""

    def __init__(self, name: str, object_info, run, output_dir: str) -> None:
        self.name = name
        self.object_info = object_info
        self.run = run
        self.output_dir = output_dir

    def __repr__(self) -> str:
        return f"HostRunner({self.name})"


@pytest.fixture(params=["inprocess", "http"])
def host_runner(request, comfy_host) -> HostRunner:
    """Parametrizes a test over both modes: the in-process executor and the HTTP server."""
    if request.param == "inprocess":
        return HostRunner("inprocess", comfy_host.object_info, comfy_host.run_prompt_inprocess, comfy_host.output_dir)
    server = request.getfixturevalue("comfy_server")
    return HostRunner("http", server.object_info, server.run_prompt, server.output_dir)
