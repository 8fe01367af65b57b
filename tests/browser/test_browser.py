"""The example workflows in a real ComfyUI frontend, driven by headless Chromium.

Runs against the pinned host (legacy frontend from the vendored ComfyUI) and,
with COMFYUI_PATH set, against that ComfyUI (modern frontend from pip
``comfyui-frontend-package``). Screenshots go to artifacts/browser/<host>/.

The README screenshots (docs/<workflow>.png) and the template thumbnails
(workflows/<workflow>.jpg) are written when missing, or always with
TURBOBOOTH_UPDATE_SCREENSHOTS=1.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest
from comfy_harness import REPO_ROOT, unique_prefix
from PIL import Image
from tiny_inputs import H, W, tiny_overrides
from workflow_api import FRONTEND_ONLY, load_workflow, nodes_of_type, widget_names

pytestmark = [pytest.mark.browser, pytest.mark.host]

WORKFLOWS_DIR = os.path.join(REPO_ROOT, "workflows")
DOCS_DIR = os.path.join(REPO_ROOT, "docs")
NAMES = sorted(os.path.splitext(f)[0] for f in os.listdir(WORKFLOWS_DIR) if f.endswith(".json"))
THUMB_SIZE = (640, 400)


def _update_screenshots() -> bool:
    return os.environ.get("TURBOBOOTH_UPDATE_SCREENSHOTS", "").strip() not in ("", "0", "false", "no")


def _write_docs_and_thumbnail(shot: str, name: str) -> None:
    doc = os.path.join(DOCS_DIR, f"{name}.png")
    thumb = os.path.join(WORKFLOWS_DIR, f"{name}.jpg")
    if _update_screenshots() or not os.path.exists(doc):
        os.makedirs(DOCS_DIR, exist_ok=True)
        shutil.copyfile(shot, doc)
    if _update_screenshots() or not os.path.exists(thumb):
        with Image.open(shot) as im:
            im = im.convert("RGB")
            im.thumbnail(THUMB_SIZE, Image.LANCZOS)
            im.save(thumb, "JPEG", quality=85, optimize=True)


@pytest.mark.parametrize("name", NAMES)
def test_workflow_loads_in_the_frontend(name, comfy_page, comfy_server, comfy_host, artifacts_dir):
    wf = load_workflow(os.path.join(WORKFLOWS_DIR, f"{name}.json"))
    object_info = comfy_server.object_info()
    comfy_page.load(wf)
    nodes = comfy_page.nodes()

    broken = [n for n in nodes if n["has_errors"] and not n["registered"]]
    assert not broken, f"{name}: node types missing from the frontend: {[n['type'] for n in broken]}"
    assert not any(not n["registered"] for n in nodes), [n["type"] for n in nodes if not n["registered"]]
    assert not comfy_page.visible(".comfy-missing-nodes"), comfy_page.visible(".comfy-missing-nodes")
    assert sorted(n["id"] for n in nodes) == sorted(n["id"] for n in wf["nodes"])

    by_id = {n["id"]: n for n in nodes}
    for node in wf["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        shown = by_id[node["id"]]
        want = widget_names(object_info[node["type"]])
        # the frontend may add button widgets (LoadImage's "upload"); ours show exactly their inputs
        got = [w for w in shown["widgets"] if w in want]
        assert got == want, f"{name}: {node['type']} shows widgets {shown['widgets']}, expected {want}"
        if node["type"].startswith("TurboBooth"):
            assert shown["widgets"] == want
            assert shown["values"][: len(want)] == node["widgets_values"][: len(want)], (
                f"{name}: {node['type']} widget values changed on load: {shown['values']} vs {node['widgets_values']}"
            )
    assert not comfy_page.page.errors, comfy_page.page.errors

    comfy_page.fit_view(hide_menu=True)
    shot = comfy_page.page.screenshot(os.path.join(artifacts_dir, f"{name}.png"))
    with Image.open(shot) as im:
        assert im.size == (1600, 1000)
    if comfy_host.source != "COMFYUI_PATH" or _update_screenshots():
        _write_docs_and_thumbnail(shot, name)


@pytest.mark.slow
def test_queue_text_to_image_from_the_page(comfy_page, comfy_server, host_tiny_models, artifacts_dir):
    """Load the text-to-image workflow, point it at the tiny models, press Queue, and see the image in the page."""
    wf = load_workflow(os.path.join(WORKFLOWS_DIR, "turbo_text_to_image.json"))
    comfy_page.load(wf)
    prefix = unique_prefix("browser_t2i")
    for node_type, values in tiny_overrides(host_tiny_models, prefix).items():
        for node in nodes_of_type(wf, node_type):
            for widget, value in values.items():
                comfy_page.set_widget(node["id"], widget, value)
    [save] = nodes_of_type(wf, "SaveImage")
    comfy_page.set_widget(save["id"], "filename_prefix", prefix)
    [sample] = nodes_of_type(wf, "TurboBoothSample")
    assert comfy_page.widget_value(sample["id"], "width") == W

    before = set(comfy_server.get_json("/history"))
    comfy_page.click_queue()

    deadline = time.monotonic() + 600
    entry = None
    while entry is None:
        assert time.monotonic() < deadline, "the queued prompt never reached /history"
        for pid, item in comfy_server.get_json("/history").items():
            if pid not in before:
                entry = item
        time.sleep(0.5)
    status = entry.get("status") or {}
    errors = [d for ev, d in status.get("messages", []) if ev == "execution_error"]
    assert status.get("status_str", "success") == "success", [
        (e.get("node_type"), e.get("exception_type"), e.get("exception_message")) for e in errors
    ] or status
    images = entry["outputs"][str(save["id"])]["images"]
    assert len(images) == 1 and images[0]["filename"].startswith(prefix), images
    png = os.path.join(comfy_server.output_dir, images[0].get("subfolder", ""), images[0]["filename"])
    with Image.open(png) as im:
        assert im.size == (W, H)

    shown = comfy_page.wait_image_shown(save["id"], prefix)
    assert (shown["w"], shown["h"]) == (W, H), shown
    comfy_page.fit_view(hide_menu=False)
    comfy_page.page.screenshot(os.path.join(artifacts_dir, "turbo_text_to_image-queued.png"))
    assert not comfy_page.page.errors, comfy_page.page.errors
