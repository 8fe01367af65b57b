"""TurboBooth's web extension (web/) in the real frontend: the live training dashboard, the source-aware
TurboLoader, CheckpointSave's saved path, the /turbobooth/ routes, and the workflows without the extension.

Runs on the pinned host's early-2024 frontend and, with COMFYUI_PATH, on a current ComfyUI's frontend. The
README screenshots docs/dashboard_live.png and docs/loader_sources.png are written on the pinned host (or
always with TURBOBOOTH_UPDATE_SCREENSHOTS=1).
"""

from __future__ import annotations

import os
import shutil
import time

import pytest
from comfy_harness import REPO_ROOT, unique_prefix
from tiny_inputs import tiny_overrides, write_input_images
from workflow_api import load_workflow, nodes_of_type

pytestmark = [pytest.mark.browser, pytest.mark.host]

WORKFLOWS_DIR = os.path.join(REPO_ROOT, "workflows")
DREAMBOOTH = os.path.join(WORKFLOWS_DIR, "DreamBooth from photos to a LoRA and new images.json")
TEXT_TO_IMAGE = os.path.join(WORKFLOWS_DIR, "Text to image with Z-Image-Turbo.json")
PER_SOURCE = {
    "diffusers folder": ["diffusers_model"],
    "hub repo": ["repo_id", "revision"],
    "split files": ["diffusion_model", "text_encoder", "vae"],
    "single file": ["checkpoint"],
}
ALWAYS = ["source", "family", "dtype", "device", "offload", "variant"]
STEPS_A, STEPS_B = 120, 4

SHOWN_JS = """(id) => { const n = app.graph.getNodeById(id);
  const hidden = (w) => (typeof n.isWidgetVisible === 'function') ? !!w.hidden : w.type === 'turbobooth.hidden';
  return {shown: n.widgets.filter(w => !hidden(w)).map(w => w.name), values: n.widgets.map(w => w.value),
          height: n.size[1]}; }"""
CHART_JS = """(id) => { const n = app.graph.getNodeById(id); const s = n && n.turbobooth;
  return s ? {run: s.run, phase: s.phase, step: s.step, total: s.total, points: s.points.length,
              it_s: s.itPerSec, events: s.events, preview: !!s.preview} : null; }"""


def _write_doc(shot: str, name: str, comfy_host) -> None:
    if comfy_host.source == "COMFYUI_PATH" and os.environ.get("TURBOBOOTH_UPDATE_SCREENSHOTS", "") in ("", "0"):
        return
    os.makedirs(os.path.join(REPO_ROOT, "docs"), exist_ok=True)
    shutil.copyfile(shot, os.path.join(REPO_ROOT, "docs", name))


# The current frontend's missing-models dialog asks huggingface.co for the files' sizes; offline that fails.
OFFLINE_NOISE = ("Error fetching file size",)


def _js_errors(page) -> list[str]:
    console = [c for c in page.console if c.startswith("error:") and not any(n in c for n in OFFLINE_NOISE)]
    return page.errors + console


def test_loader_shows_the_widgets_of_its_source_and_keeps_every_value(comfy_page, artifacts_dir, comfy_host):
    page = comfy_page.page
    wf = load_workflow(TEXT_TO_IMAGE)
    comfy_page.load(wf)
    comfy_page.dismiss_dialogs()
    [loader] = nodes_of_type(wf, "TurboBoothLoader")
    lid = loader["id"]
    saved = page.call(SHOWN_JS, lid)["values"]
    assert saved[: len(loader["widgets_values"])] == loader["widgets_values"]
    heights = {}
    for source, own in PER_SOURCE.items():
        comfy_page.set_widget(lid, "source", source)
        page.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        got = page.call(SHOWN_JS, lid)
        assert sorted(got["shown"]) == sorted(ALWAYS + own), (source, got["shown"])
        heights[source] = got["height"]
    assert heights["split files"] > heights["single file"], heights  # the node shrinks to what it shows

    comfy_page.set_widget(lid, "source", "split files")
    comfy_page.set_widget(lid, "repo_id", "someone/other-repo")  # a hidden widget's value is kept too
    comfy_page.fit_view(hide_menu=False)
    shot = page.screenshot(os.path.join(artifacts_dir, "loader_sources.png"))
    saved = page.evaluate("JSON.stringify(app.graph.serialize())")
    prompt = page.evaluate("app.graphToPrompt().then(p => p.output)")
    assert prompt[str(lid)]["inputs"]["repo_id"] == "someone/other-repo"
    assert prompt[str(lid)]["inputs"]["diffusers_model"] == loader["widgets_values"][1]
    comfy_page.set_widget(lid, "source", "hub repo")
    before = page.call(SHOWN_JS, lid)["values"]
    comfy_page.page.call("async (wf) => { await app.loadGraphData(JSON.parse(wf)); }", saved)
    page.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    after = page.call(SHOWN_JS, lid)
    assert after["values"][1:] == before[1:] and after["values"][0] == "split files", (before, after)
    assert sorted(after["shown"]) == sorted(ALWAYS + PER_SOURCE["split files"])
    assert not _js_errors(page), _js_errors(page)
    _write_doc(shot, "loader_sources.png", comfy_host)


def _train_graph(comfy_page, tiny, prefix) -> dict:
    """The DreamBooth workflow on the tiny models, plus a second DreamBoothTrain node that runs after it."""
    wf = load_workflow(DREAMBOOTH)
    comfy_page.load(wf)
    comfy_page.dismiss_dialogs()
    for node_type, values in tiny_overrides(tiny, prefix).items():
        for node in nodes_of_type(wf, node_type):
            for widget, value in values.items():
                comfy_page.set_widget(node["id"], widget, value)
    [train] = nodes_of_type(wf, "TurboBoothDreamBoothTrain")
    for widget, value in dict(steps=STEPS_A, validation_every=40, validation_prompt="a photo of sks dog").items():
        comfy_page.set_widget(train["id"], widget, value)
    for save in nodes_of_type(wf, "SaveImage"):
        comfy_page.set_widget(save["id"], "filename_prefix", prefix)
    [loader] = nodes_of_type(wf, "TurboBoothLoader")
    [batch] = nodes_of_type(wf, "TurboBoothImageBatch")
    second = comfy_page.page.call(
        """(loaderId, batchId, trainId) => {
            const a = app.graph.getNodeById(trainId);
            const b = LiteGraph.createNode('TurboBoothDreamBoothTrain');
            b.pos = [a.pos[0] + 420, a.pos[1] + 240];
            app.graph.add(b);
            app.graph.getNodeById(loaderId).connect(0, b, b.findInputSlot('model'));
            app.graph.getNodeById(batchId).connect(0, b, b.findInputSlot('instance_images'));
            const p = LiteGraph.createNode('PreviewImage');
            p.pos = [b.pos[0], b.pos[1] + b.size[1] + 40];
            app.graph.add(p);
            b.connect(2, p, 0);
            return b.id; }""",
        loader["id"], batch["id"], train["id"])
    for widget, value in dict(tiny_overrides(tiny, prefix + "_b")["TurboBoothDreamBoothTrain"], steps=STEPS_B).items():
        comfy_page.set_widget(second, widget, value)
    return {"a": train["id"], "b": second, "save": nodes_of_type(wf, "TurboBoothCheckpointSave")[0]["id"]}


def _chart(page, node_id):
    return page.call(CHART_JS, node_id)


@pytest.mark.slow
def test_dashboard_live_reload_and_two_trainings(comfy_page, comfy_server, comfy_host, host_tiny_models,
                                                 artifacts_dir):
    page = comfy_page.page
    write_input_images(comfy_host.input_dir)
    prefix = unique_prefix("browser_train")
    ids = _train_graph(comfy_page, host_tiny_models, prefix)
    comfy_page.fit_view(hide_menu=False)
    page.screenshot(os.path.join(artifacts_dir, "dashboard-before.png"))
    assert _chart(page, ids["a"])["points"] == 0

    # an event for a node that is not (or no longer) in the graph is ignored, without an error
    page.evaluate("""(async () => { const { api } = await import('/scripts/api.js');
        for (const node of ['9999', '1:2', null]) api.dispatchEvent(new CustomEvent('turbobooth.train',
            {detail: {node, run: 'x-0123456789', phase: 'step', step: 1, total: 2, loss: 1}})); })()""")

    comfy_page.click_queue()
    seen = []
    deadline = time.monotonic() + 600
    while not seen or seen[-1] < 10:
        assert time.monotonic() < deadline, f"the chart never filled: {seen} {_chart(page, ids['a'])}"
        got = _chart(page, ids["a"])["points"]
        if not seen or got != seen[-1]:
            seen.append(got)
        time.sleep(0.1)
    assert len(seen) >= 3 and seen == sorted(seen), seen  # it rises step by step
    mid = _chart(page, ids["a"])
    assert 0 < mid["points"] < STEPS_A and mid["phase"] == "running" and mid["total"] == STEPS_A, mid
    comfy_page.fit_view(hide_menu=False)
    shot = page.screenshot(os.path.join(artifacts_dir, "dashboard_live.png"))
    _write_doc(shot, "dashboard_live.png", comfy_host)

    # reload mid-run: the chart refills from the run's log and goes on
    comfy_page.open(fresh=False)
    refilled = page.wait_for(f"(({CHART_JS})({ids['a']}) || {{}}).points > 0", timeout=60, what="refilled chart")
    assert refilled
    page.wait_for(f"(({CHART_JS})({ids['a']}) || {{}}).points === {STEPS_A}", timeout=600, what="the whole run")
    page.wait_for(f"(({CHART_JS})({ids['b']}) || {{}}).points === {STEPS_B}", timeout=600, what="the second run")
    a, b = _chart(page, ids["a"]), _chart(page, ids["b"])
    assert a["run"] != b["run"] and a["step"] == STEPS_A and b["step"] == STEPS_B, (a, b)
    assert a["preview"], a  # validation was on every 40 steps
    page.wait_for(f"!!(app.graph.getNodeById({ids['save']}).turbobooth_saved_path || '').endsWith('.safetensors')",
                  timeout=600, what="CheckpointSave's path in the node")
    path = page.evaluate(f"app.graph.getNodeById({ids['save']}).turbobooth_saved_path")
    assert os.path.isfile(path) and os.path.basename(path).startswith(prefix), path
    time.sleep(1)
    assert _chart(page, ids["a"])["points"] == STEPS_A and _chart(page, ids["b"])["points"] == STEPS_B
    comfy_page.fit_view(hide_menu=False)
    page.screenshot(os.path.join(artifacts_dir, "dashboard-after.png"))

    # the run log route: a real run, then unknown and path-like ids are 404
    status, _ = comfy_server.request("GET", f"/turbobooth/runs/{a['run']}/log")
    assert status == 200
    for bad in ("nope-0123456789", "..%2F..%2Fetc", "%2E%2E", "x%2F..%2F" + a["run"], ".." , "a" * 300):
        status, _ = comfy_server.request("GET", f"/turbobooth/runs/{bad}/log")
        assert status == 404, bad
    assert not _js_errors(page), _js_errors(page)


def test_run_log_route_refuses_unknown_and_path_like_ids(comfy_server):
    for bad in ("nope-0123456789", "%2E%2E", "..%2F..%2Fsecret-0123456789", "turbobooth_training"):
        for what in ("log", "preview"):
            status, _ = comfy_server.request("GET", f"/turbobooth/runs/{bad}/{what}")
            assert status == 404, (bad, what)
    status, body = comfy_server.request("GET", "/turbobooth/active")
    assert status == 200 and b"runs" in body
