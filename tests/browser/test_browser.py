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
from tiny_inputs import H, W, tiny_overrides, write_input_images
from workflow_api import FRONTEND_ONLY, load_workflow, nodes_of_type, widget_names

pytestmark = [pytest.mark.browser, pytest.mark.host]

WORKFLOWS_DIR = os.path.join(REPO_ROOT, "workflows")
DOCS_DIR = os.path.join(REPO_ROOT, "docs")
NAMES = sorted(os.path.splitext(f)[0] for f in os.listdir(WORKFLOWS_DIR) if f.endswith(".json"))
THUMB_SIZE = (640, 400)


def _update_screenshots() -> bool:
    return os.environ.get("TURBOBOOTH_UPDATE_SCREENSHOTS", "").strip() not in ("", "0", "false", "no")


def _slug(name: str) -> str:
    return load_workflow(os.path.join(WORKFLOWS_DIR, f"{name}.json"))["extra"]["turbobooth"]["slug"]


# Every node's corners and title must be on the bare canvas: inside the window, below the top bar, clear of
# side bars and floating menus (whatever the frontend puts over the canvas).
VIEW_JS = """(() => {
  const c = app.canvas.canvas, r = c.getBoundingClientRect(), ds = app.canvas.ds;
  const th = LiteGraph.NODE_TITLE_HEIGHT || 30, bad = [];
  const onCanvas = (x, y) => { if (x < 0 || y < 0 || x >= innerWidth || y >= innerHeight) return false;
    const e = document.elementFromPoint(x, y); return e === c || (e && /^(TEXTAREA|INPUT)$/.test(e.tagName)); };
  for (const n of app.graph._nodes) {
    const [x0, y0] = ds.convertOffsetToCanvas([n.pos[0], n.pos[1] - th]);
    const [x1, y1] = ds.convertOffsetToCanvas([n.pos[0] + n.size[0], n.pos[1] + n.size[1]]);
    const pts = [[x0 + 2, y0 + 2], [x1 - 2, y0 + 2], [x0 + 2, y1 - 2], [x1 - 2, y1 - 2], [(x0 + x1) / 2, y0 + 4]];
    if (!pts.every(([x, y]) => onCanvas(r.left + x, r.top + y)))
      bad.push({id: n.id, type: n.type, box: [x0, y0, x1, y1].map(Math.round)});
  }
  return bad; })()"""
DEPRECATED_JS = """app.graph._nodes.filter(n => (n.constructor.nodeData || {}).deprecated).map(n => n.type)"""


def _write_docs_and_thumbnail(shot: str, name: str) -> None:
    doc = os.path.join(DOCS_DIR, f"{_slug(name)}.png")
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
        if node["type"].startswith("TurboBooth"):  # plus what the web extension draws (never saved)
            assert [w for w in shown["widgets"] if w not in ("dashboard", "saved_path")] == want
            assert shown["values"][: len(want)] == node["widgets_values"][: len(want)], (
                f"{name}: {node['type']} widget values changed on load: {shown['values']} vs {node['widgets_values']}"
            )
    assert not comfy_page.page.errors, comfy_page.page.errors
    assert not comfy_page.page.evaluate(DEPRECATED_JS), f"{name}: deprecated nodes"
    if comfy_page.frontend == "modern" and "split files" in str(nodes_of_type(wf, "TurboBoothLoader")):
        # the current frontend's one missing-models dialog names the real files, with their downloads
        comfy_page.page.wait_for("[...document.querySelectorAll('.p-dialog')].some(d => "
                                 "d.innerText.includes('ae.safetensors') && d.innerText.includes('qwen_3_4b'))",
                                 timeout=20, what="the missing-models dialog")
    comfy_page.dismiss_dialogs()
    comfy_page.page.wait_for("!document.querySelector('.p-dialog-mask, .p-dialog')", timeout=15, what="no dialog")
    if comfy_page.frontend == "legacy":  # the early-2024 frontend keeps the old view: apply the saved one
        comfy_page.page.call("""(ds) => { app.canvas.ds.scale = ds.scale; app.canvas.ds.offset = ds.offset.slice();
            app.canvas.setDirty(true, true); app.canvas.draw(true, true); }""", wf["extra"]["ds"])
    outside = comfy_page.page.evaluate(VIEW_JS)
    assert not outside, f"{name}: nodes outside the saved view or under the frontend's bars: {outside}"
    comfy_page.page.screenshot(os.path.join(artifacts_dir, f"{name}-saved-view.png"))

    comfy_page.fit_view(hide_menu=True)
    shot = comfy_page.page.screenshot(os.path.join(artifacts_dir, f"{name}.png"))
    with Image.open(shot) as im:
        assert im.size == (1600, 1000)
    if comfy_host.source != "COMFYUI_PATH" or _update_screenshots():
        _write_docs_and_thumbnail(shot, name)


def _point_page_at_tiny_models(page, wf: dict, tiny: dict, prefix: str) -> dict:
    """Set the loaded workflow's widgets in the page to the tiny models; returns its SaveImage node."""
    for node_type, values in tiny_overrides(tiny, prefix).items():
        for node in nodes_of_type(wf, node_type):
            for widget, value in values.items():
                page.set_widget(node["id"], widget, value)
    [save] = nodes_of_type(wf, "SaveImage")
    page.set_widget(save["id"], "filename_prefix", prefix)
    return save


@pytest.mark.slow
def test_queue_text_to_image_from_the_page(comfy_page, comfy_server, host_tiny_models, artifacts_dir):
    """Load the text-to-image workflow, point it at the tiny models, press Queue, and see the image in the page."""
    wf = load_workflow(os.path.join(WORKFLOWS_DIR, "Text to image with Z-Image-Turbo.json"))
    comfy_page.load(wf)
    if comfy_page.frontend == "modern":  # its missing-models dialog for the real file names covers the Run button
        comfy_page.page.wait_for("!!document.querySelector('.p-dialog')", timeout=20, what="the missing-models dialog")
    comfy_page.dismiss_dialogs()
    comfy_page.page.wait_for("!document.querySelector('.p-dialog-mask, .p-dialog')", timeout=15, what="no dialog")
    prefix = unique_prefix("browser_t2i")
    save = _point_page_at_tiny_models(comfy_page, wf, host_tiny_models, prefix)
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


@pytest.fixture
def page_without_extension(browser, comfy_server, artifacts_dir):
    """A tab where TurboBooth's web extension is absent (its modules answer empty), as with web/ removed."""
    from comfy_page import ComfyPage

    page = browser.new_page(1600, 1000)
    page.serve_empty_scripts("*/extensions/ComfyUI-TurboBooth/*")
    cp = ComfyPage(page, comfy_server)
    try:
        cp.open()
        yield cp
    finally:
        with open(os.path.join(artifacts_dir, "without_extension.log"), "w", encoding="utf-8") as f:
            f.write("\n".join(["# errors", *page.errors, "# console", *page.console]) + "\n")
        page.close()


@pytest.mark.slow
def test_workflows_load_and_run_without_the_extension(page_without_extension, comfy_server, host_tiny_models,
                                                      comfy_host):
    """Every workflow loads with all its widgets shown, and the text-to-image one runs from the page."""
    cp = page_without_extension
    assert cp.page.evaluate("app.extensions.filter(e => /turbobooth/i.test(e.name)).length") == 0
    for name in NAMES:
        wf = load_workflow(os.path.join(WORKFLOWS_DIR, f"{name}.json"))
        cp.load(wf)
        cp.dismiss_dialogs()
        by_id = {n["id"]: n for n in cp.nodes()}
        for node in nodes_of_type(wf, "TurboBoothLoader"):
            assert len(by_id[node["id"]]["widgets"]) == 13  # every widget shown (12 + the optional variant)
        for node in nodes_of_type(wf, "TurboBoothDreamBoothTrain"):
            assert cp.page.evaluate(f"app.graph.getNodeById({node['id']}).turbobooth === undefined")
    wf = load_workflow(os.path.join(WORKFLOWS_DIR, "Text to image with Z-Image-Turbo.json"))
    cp.load(wf)
    prefix = unique_prefix("browser_noext")
    write_input_images(comfy_host.input_dir)
    save = _point_page_at_tiny_models(cp, wf, host_tiny_models, prefix)
    cp.dismiss_dialogs()
    cp.page.wait_for("!document.querySelector('.p-dialog-mask, .p-dialog')", timeout=15, what="no dialog")
    before = set(comfy_server.get_json("/history"))
    cp.click_queue()
    deadline = time.monotonic() + 300
    while not set(comfy_server.get_json("/history")) - before:
        assert time.monotonic() < deadline, "the prompt queued without the extension never finished"
        time.sleep(0.5)
    [entry] = [v for k, v in comfy_server.get_json("/history").items() if k not in before]
    assert (entry.get("status") or {}).get("status_str", "success") == "success", entry.get("status")
    cp.wait_image_shown(save["id"], prefix, timeout=60)
    assert not cp.page.errors, cp.page.errors
