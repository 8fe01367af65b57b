"""The example workflows in workflows/: valid, current, and runnable in the real ComfyUI host.

Each workflow is converted from the editor's UI format to an API prompt here
(``workflow_api.ui_to_api``, driven by the host's ``/object_info``), its model
widgets are pointed at the tiny models the harness writes into the host's
models folders, and it runs through the host's HTTP server.
"""

from __future__ import annotations

import json
import os
import sys
from urllib.parse import quote

import pytest
from comfy_harness import REPO_ROOT, unique_prefix
from PIL import Image
from tiny_inputs import H, W, point_at_tiny_models, write_input_images, write_tiny_lora
from workflow_api import (
    CONTROL,
    FRONTEND_ONLY,
    check_widgets,
    copy_workflow,
    get_widget,
    load_workflow,
    nodes_of_type,
    set_widgets,
    ui_to_api,
    widget_names,
    workflow_files,
)

WORKFLOWS_DIR = os.path.join(REPO_ROOT, "workflows")
# Current ComfyUI lists a custom node's templates by file name alone, so the file names are the titles.
SLUGS = {
    "Batch of prompts with negative prompt and CFG": "negative_prompt_cfg_batch",
    "DreamBooth from photos to a LoRA and new images": "dreambooth_end_to_end",
    "Generate with a LoRA file": "load_lora_and_generate",
    "Image to image and inpainting": "img2img_inpaint",
    "Text to image with Z-Image-Turbo": "turbo_text_to_image",
    "Train on Z-Image Base, sample on Turbo": "base_train_turbo_sample",
}
EXPECTED = sorted(SLUGS)
REAL_MODEL_FILES = ("z_image_turbo_bf16.safetensors", "qwen_3_4b.safetensors", "ae.safetensors")
# Folder names current ComfyUI scans for a custom node's templates (app/custom_node_manager.py).
TEMPLATE_FOLDERS = ("example_workflows", "example", "examples", "workflow", "workflows")


def _name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _ui_workflows() -> dict[str, dict]:
    return {_name(p): load_workflow(p) for p in workflow_files(WORKFLOWS_DIR)}


# --------------------------------------------------------------------------- files alone (no host)


def test_workflow_files_are_the_expected_set():
    assert sorted(_ui_workflows()) == EXPECTED
    assert os.path.basename(WORKFLOWS_DIR) in TEMPLATE_FOLDERS, "ComfyUI would not list these as templates"


@pytest.mark.parametrize("name", EXPECTED)
def test_workflow_file_is_valid_ui_format(name):
    wf = load_workflow(os.path.join(WORKFLOWS_DIR, f"{name}.json"))
    for key in ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"):
        assert key in wf, f"{name}: missing {key!r}"
    assert wf["version"] == 0.4
    ids = [n["id"] for n in wf["nodes"]]
    assert len(ids) == len(set(ids)) and max(ids) == wf["last_node_id"]
    assert sorted(n["order"] for n in wf["nodes"]) == list(range(len(ids)))
    nodes = {n["id"]: n for n in wf["nodes"]}
    link_ids = [link[0] for link in wf["links"]]
    assert len(link_ids) == len(set(link_ids)) and max(link_ids) == wf["last_link_id"]
    for lid, src, src_slot, dst, dst_slot, ltype in wf["links"]:
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert lid in (out["links"] or []), f"{name}: link {lid} not listed on node {src} output {src_slot}"
        assert inp["link"] == lid, f"{name}: link {lid} not set on node {dst} input {dst_slot}"
        assert out["type"] == inp["type"] == ltype
        assert nodes[src]["order"] < nodes[dst]["order"], f"{name}: node {dst} runs before its input {src}"
    for node in wf["nodes"]:
        for inp in node.get("inputs") or []:
            if inp["link"] is not None:
                assert inp["link"] in link_ids
    notes = nodes_of_type(wf, "Note")
    assert len(notes) == 1, f"{name}: needs one Note saying what it does"
    text = notes[0]["widgets_values"][0]
    assert "models/" in text and ("z_image_turbo_bf16.safetensors" in text or "Z-Image-Turbo" in text)
    loaders = nodes_of_type(wf, "TurboBoothLoader")
    assert loaders, f"{name}: no TurboLoader"
    for loader in loaders:
        values = loader["widgets_values"]
        assert values[0] in ("split files", "diffusers folder")
        # the real model: Z-Image-Turbo, or Z-Image Base for the Base-training workflow's first loader
        assert ("Z-Image-Turbo" in values or "Z-Image" in values) and all(f in values for f in REAL_MODEL_FILES), values


@pytest.mark.parametrize("name", EXPECTED)
def test_workflow_title_slug_and_saved_view(name):
    """The file name reads as a title; the saved view puts every node inside a 1600x1000 window, clear of the
    frontends' bars (the browser test checks the same on the real page)."""
    sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))
    try:
        from make_workflows import TITLE_HEIGHT, VIEW
    finally:
        sys.path.pop(0)
    wf = _ui_workflows()[name]
    assert wf["extra"]["turbobooth"] == {"title": name, "slug": SLUGS[name]}
    ds = wf["extra"]["ds"]
    scale, (ox, oy) = ds["scale"], ds["offset"]
    for n in wf["nodes"]:
        x0, y0 = (n["pos"][0] + ox) * scale, (n["pos"][1] - TITLE_HEIGHT + oy) * scale
        x1, y1 = (n["pos"][0] + n["size"][0] + ox) * scale, (n["pos"][1] + n["size"][1] + oy) * scale
        assert VIEW["left"] <= x0 and x1 <= VIEW["right"] and VIEW["top"] <= y0 and y1 <= VIEW["bottom"], (
            name, n["type"], (x0, y0, x1, y1))
    for loader in nodes_of_type(wf, "TurboBoothLoader"):  # the current frontend's missing-model downloads
        models = loader["properties"].get("models", [])
        if loader["widgets_values"][0] == "split files":
            assert sorted(m["name"] for m in models) == sorted(REAL_MODEL_FILES)
            assert all(m["url"].startswith("https://huggingface.co/Comfy-Org/z_image_turbo/") for m in models)
        else:
            assert models == []


@pytest.mark.parametrize("name", EXPECTED)
def test_workflow_has_a_thumbnail(name):
    """Current ComfyUI's template browser shows <name>.jpg beside <name>.json."""
    path = os.path.join(WORKFLOWS_DIR, f"{name}.jpg")
    assert os.path.isfile(path), f"{path} missing; run the browser tests to draw it"
    with Image.open(path) as im:
        assert im.format == "JPEG" and min(im.size) >= 64


# --------------------------------------------------------------------------- against the host's node definitions


@pytest.fixture(scope="session")
def object_info(comfy_host) -> dict:
    desc = comfy_host.describe()
    assert desc["pack_loaded"], "ComfyUI did not import the pack:\n" + "\n".join(desc["log"])
    return desc["object_info"]


@pytest.mark.host
@pytest.mark.parametrize("name", EXPECTED)
def test_workflow_node_types_and_widgets_match_the_host(name, object_info):
    wf = _ui_workflows()[name]
    missing = sorted({n["type"] for n in wf["nodes"]} - set(object_info) - FRONTEND_ONLY)
    assert not missing, f"{name} uses node types this ComfyUI does not have: {missing}"
    deprecated = sorted({n["type"] for n in wf["nodes"] if (object_info.get(n["type"]) or {}).get("deprecated")})
    assert not deprecated and "ImageBatch" not in {n["type"] for n in wf["nodes"]}, deprecated
    assert not check_widgets(wf, object_info)
    for node in wf["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        names = widget_names(object_info[node["type"]])
        extra = len(node["widgets_values"]) - len(names)
        assert extra == (1 if node["type"] == "LoadImage" else 0), (name, node["type"], names, node["widgets_values"])
        for i, n in enumerate(names):
            if n == CONTROL:
                assert names[i - 1] == "seed" and node["widgets_values"][i] == "fixed"
    prompt = ui_to_api(wf, object_info)
    assert sorted(prompt) == sorted(str(n["id"]) for n in wf["nodes"] if n["type"] not in FRONTEND_ONLY)


@pytest.mark.host
def test_workflows_are_up_to_date_with_the_nodes(object_info):
    """workflows/*.json are what scripts/make_workflows.py writes for the nodes as they are now."""
    sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))
    try:
        import make_workflows
    finally:
        sys.path.pop(0)
    for fname, text in make_workflows.render_all(object_info).items():
        with open(os.path.join(WORKFLOWS_DIR, fname), encoding="utf-8") as f:
            assert f.read() == text, f"workflows/{fname} is stale: run `.venv/bin/python scripts/make_workflows.py`"


# --------------------------------------------------------------------------- running them


@pytest.mark.host
@pytest.mark.slow
@pytest.mark.parametrize("name", EXPECTED)
def test_workflow_runs_in_comfyui(name, comfy_host, comfy_server, host_tiny_models, object_info):
    wf = copy_workflow(_ui_workflows()[name])
    prefix = unique_prefix(name)
    point_at_tiny_models(wf, object_info, host_tiny_models, prefix)
    write_input_images(comfy_host.input_dir)
    lora_path = None
    if SLUGS[name] == "load_lora_and_generate":
        lora_name = f"{prefix}.safetensors"
        lora_path = write_tiny_lora(os.path.join(comfy_host.models_dir, "loras"), lora_name)
        set_widgets(wf, object_info, "TurboBoothSample", lora_file=lora_name)

    prompt = ui_to_api(wf, object_info)
    result = comfy_server.run_prompt(prompt).check()

    samples = nodes_of_type(wf, "TurboBoothSample")
    for save in nodes_of_type(wf, "SaveImage"):
        pngs = result.images(str(save["id"]))
        n_prompts = len([ln for ln in get_widget(samples[0], object_info, "prompt").splitlines() if ln.strip()])
        per = get_widget(samples[0], object_info, "images_per_prompt")
        assert len(pngs) == n_prompts * per, f"{name}: {pngs}"
        for png in pngs:
            assert os.path.isfile(png), png
            with Image.open(png) as im:
                assert im.format == "PNG" and im.size == (W, H)
    if SLUGS[name] in ("dreambooth_end_to_end", "base_train_turbo_sample"):
        [ckpt] = nodes_of_type(wf, "TurboBoothCheckpointSave")
        written = result.outputs[str(ckpt["id"])]["text"][0]
        assert os.path.isfile(written) and written.endswith(".safetensors"), written
        # ComfyUI's first models/loras folder (its own, or the one a user's extra paths put first)
        loras_dirs = {os.path.realpath(os.path.join(comfy_host.comfyui_dir, "models", "loras")),
                      os.path.realpath(os.path.join(comfy_host.models_dir, "loras"))}
        assert os.path.realpath(os.path.dirname(written)) in loras_dirs, written
        from turbobooth.manager.lora import load_lora_file

        assert load_lora_file(written).family == "zimage"
        [loss] = nodes_of_type(wf, "PreviewImage")
        assert result.outputs[str(loss["id"])]["images"], "no loss plot"
    if lora_path:
        assert os.path.isfile(lora_path)


def test_template_listing_matches_current_comfyui(tmp_path):
    """Mimic current ComfyUI's /workflow_templates scan (custom_nodes/*/<folder>/*.json) on a copy of the layout."""
    import glob

    pack = tmp_path / "custom_nodes" / "ComfyUI-TurboBooth"
    pack.parent.mkdir(parents=True)
    os.symlink(REPO_ROOT, pack, target_is_directory=True)
    found = {}
    for folder in TEMPLATE_FOLDERS:
        for f in glob.glob(os.path.join(str(tmp_path / "custom_nodes"), f"*/{folder}/*.json")):
            found.setdefault(os.path.basename(os.path.dirname(os.path.dirname(f))), []).append(_name(f))
    assert sorted(found.get("ComfyUI-TurboBooth", [])) == EXPECTED
    assert list(found) == ["ComfyUI-TurboBooth"]


@pytest.mark.host
def test_workflow_templates_route_lists_ours(comfy_host, comfy_server):
    """Current ComfyUI serves custom-node templates at /workflow_templates; the pinned early-2024 one does not."""
    status, body = comfy_server.request("GET", "/workflow_templates")
    if comfy_host.source != "COMFYUI_PATH":
        if status == 404:
            pytest.skip("the pinned ComfyUI predates /workflow_templates; set COMFYUI_PATH to check a current one")
    assert status == 200, body[:500]
    listing = json.loads(body)
    module = os.path.basename(comfy_host.pack_dir)
    assert sorted(listing.get(module, [])) == EXPECTED, listing
    for name in EXPECTED:
        url = f"/api/workflow_templates/{quote(module)}/{quote(name)}"
        st, data = comfy_server.request("GET", url + ".json")
        assert st == 200 and json.loads(data)["nodes"], name
        st, _ = comfy_server.request("GET", url + ".jpg")
        assert st == 200, f"thumbnail {name}.jpg not served"

