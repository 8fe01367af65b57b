"""Fixtures for the browser tests (``@pytest.mark.browser``).

The ComfyUI host and its HTTP server (comfy_host, comfy_server, host_tiny_models)
are the host harness's fixtures, shared from tests/conftest.py.

chromium        session; path of the Chromium binary. Missing: skip locally, fail under CI=true.
browser         session; a headless Chromium (tests/browser/cdp.py) with a fresh profile.
comfy_page      function; a new tab showing the ComfyUI frontend, ready for ``app.loadGraphData``.
artifacts_dir   <repo>/artifacts/browser/<host>: screenshots and page logs (git-ignored).
"""

from __future__ import annotations

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
REPO_ROOT = os.path.dirname(TESTS)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(TESTS, "host"))


from cdp import Browser, BrowserError, find_chromium  # noqa: E402
from comfy_page import ComfyPage  # noqa: E402


@pytest.fixture(scope="session")
def chromium(skip_or_fail) -> str:
    path = find_chromium()
    if path is None:
        skip_or_fail(
            "no Chromium found (install Debian's: `apt-get install -y chromium`, or set TURBOBOOTH_CHROMIUM "
            "to a Chromium/Chrome binary)"
        )
    return path


@pytest.fixture(scope="session")
def browser(chromium, tmp_path_factory):
    profile = str(tmp_path_factory.mktemp("chromium-profile"))
    try:
        b = Browser.launch(chromium, profile)
    except BrowserError as e:
        pytest.fail(f"Chromium did not start: {e}", pytrace=False)
    yield b
    b.close()


@pytest.fixture(scope="session")
def artifacts_dir(comfy_host) -> str:
    label = "comfyui_path" if comfy_host.source == "COMFYUI_PATH" else "pinned"
    path = os.path.join(REPO_ROOT, "artifacts", "browser", label)
    os.makedirs(path, exist_ok=True)
    return path


@pytest.fixture
def comfy_page(browser, comfy_server, artifacts_dir, request):
    page = browser.new_page(1600, 1000)
    cp = ComfyPage(page, comfy_server)
    try:
        cp.open()
        yield cp
    finally:
        name = request.node.name.replace("/", "_")
        log = os.path.join(artifacts_dir, f"{name}.log")
        with open(log, "w", encoding="utf-8") as f:
            f.write("\n".join(["# errors", *page.errors, "# console", *page.console]) + "\n")
        if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
            try:
                page.screenshot(os.path.join(artifacts_dir, f"{name}-FAILED.png"))
            except Exception:
                pass
        page.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.rep_call = rep
