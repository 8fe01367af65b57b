#!/usr/bin/env python3
"""Write the example workflows in workflows/ from the nodes a live ComfyUI registers.

    .venv/bin/python scripts/make_workflows.py [--object-info FILE] [--check]

Each workflow below is described by node type, widget values by name, and
links by input/output name. The script reads the host's ``/object_info``
(started through tests/host/comfy_harness.py, or read from ``--object-info``)
and lays the values out exactly as the graph editor saves them: widgets in
input order, a "control_after_generate" value after every seed, link inputs
and outputs with their slots. ``--check`` only reports whether the files on
disk are up to date.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS_DIR = os.path.join(REPO_ROOT, "workflows")
sys.path.insert(0, os.path.join(REPO_ROOT, "tests", "host"))

from workflow_api import CONTROL, link_inputs, widget_names  # noqa: E402

# The real model files the examples expect (what users download for Z-Image-Turbo).
SPLIT_FILES = {
    "diffusion_model": "z_image_turbo_bf16.safetensors",
    "text_encoder": "qwen_3_4b.safetensors",
    "vae": "ae.safetensors",
}
_HF = "https://huggingface.co/Comfy-Org/z_image_turbo/resolve/main/split_files"
MODEL_URLS = {
    "z_image_turbo_bf16.safetensors": f"{_HF}/diffusion_models/z_image_turbo_bf16.safetensors",
    "qwen_3_4b.safetensors": f"{_HF}/text_encoders/qwen_3_4b.safetensors",
    "ae.safetensors": f"{_HF}/vae/ae.safetensors",
}
DIFFUSERS_FOLDER = "Z-Image-Turbo"
MODEL_FILES_NOTE = (
    "Model files (either layout):\n"
    "- split files: models/diffusion_models/z_image_turbo_bf16.safetensors, "
    "models/text_encoders/qwen_3_4b.safetensors, models/vae/ae.safetensors\n"
    "- or the diffusers folder models/diffusers/Z-Image-Turbo (set TurboLoader's source to \"diffusers folder\").\n"
    "Z-Image-Turbo runs at 8 steps with guidance 0; steps 0 on TurboSample means that default."
)

LOADER_SPLIT = dict(
    source="split files",
    diffusers_model=DIFFUSERS_FOLDER,
    repo_id="Tongyi-MAI/Z-Image-Turbo",
    revision="main",
    **SPLIT_FILES,
    checkpoint="(none)",
    family="auto",
    dtype="auto",
    device="auto",
    offload="none",
)
LOADER_DIFFUSERS = {**LOADER_SPLIT, "source": "diffusers folder"}

SIZES = {
    "Note": [420, 220],
    "TurboBoothLoader": [340, 330],
    "TurboBoothGuidance": [340, 200],
    "TurboBoothSample": [360, 470],
    "TurboBoothPriorImageGen": [340, 250],
    "TurboBoothDreamBoothTrain": [380, 930],  # with the web extension's live loss chart
    "TurboBoothCheckpointSave": [320, 160],
    "TurboBoothImageBatch": [220, 230],
    "SaveImage": [420, 460],
    "PreviewImage": [360, 300],
    "LoadImage": [300, 260],
}


class Spec:
    """One workflow: nodes with widget values by name, links by slot name."""

    def __init__(self, name: str, title: str) -> None:
        self.name = name
        self.title = title
        self.nodes: list[dict] = []
        self.links: list[tuple[int, str, int, str]] = []

    def add(self, node_type: str, pos, widgets: dict | None = None, title: str | None = None, **inputs) -> int:
        node_id = len(self.nodes) + 1
        self.nodes.append({"id": node_id, "type": node_type, "pos": list(pos), "widgets": widgets or {}, "title": title})
        for input_name, (src, out_name) in inputs.items():
            self.links.append((src, out_name, node_id, input_name))
        return node_id

    def note(self, pos, text: str, size=None) -> int:
        node_id = self.add("Note", pos, {"text": text}, title="About this workflow")
        if size:
            self.nodes[-1]["size"] = list(size)
        return node_id


def _out_slot(info: dict, name: str) -> int:
    names = list(info.get("output_name") or info.get("output") or [])
    types = list(info.get("output") or [])
    if name in names:
        return names.index(name)
    if name in types:
        return types.index(name)
    raise KeyError(f"{info.get('name')} has no output {name!r} (outputs {names})")


def _widget_values(node_type: str, info: dict, given: dict) -> list:
    spec = {**(info["input"].get("required") or {}), **(info["input"].get("optional") or {})}
    names = widget_names(info)
    unknown = set(given) - set(names)
    if unknown:
        raise KeyError(f"{node_type}: no widgets {sorted(unknown)}; it has {names}")
    values = []
    for i, name in enumerate(names):
        if name == CONTROL:
            values.append(given.get(f"{names[i - 1]}_control", "fixed"))
            continue
        if name in given:
            values.append(given[name])
            continue
        s = spec[name]
        opts = s[1] if len(s) > 1 and isinstance(s[1], dict) else {}
        if "default" in opts:
            values.append(opts["default"])
        elif isinstance(s[0], list):
            values.append(s[0][0] if s[0] else "")
        else:
            values.append({"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[s[0]])
    return values


def _order(spec: Spec) -> dict[int, int]:
    deps = {n["id"]: set() for n in spec.nodes}
    for src, _, dst, _ in spec.links:
        deps[dst].add(src)
    order, done = {}, set()
    while len(done) < len(deps):
        ready = sorted(n for n, d in deps.items() if n not in done and d <= done)
        if not ready:
            raise ValueError(f"{spec.name}: the graph has a cycle")
        for n in ready:
            order[n] = len(order)
            done.add(n)
    return order


def build(spec: Spec, object_info: dict) -> dict:
    """The UI-format JSON of ``spec`` for the host whose ``/object_info`` is given."""
    order = _order(spec)
    links = []
    out_links: dict[tuple[int, int], list[int]] = {}
    in_links: dict[tuple[int, str], int] = {}
    types = {n["id"]: n["type"] for n in spec.nodes}
    for link_id, (src, out_name, dst, in_name) in enumerate(spec.links, start=1):
        info = object_info[types[src]]
        slot = _out_slot(info, out_name)
        ltype = info["output"][slot]
        dst_inputs = link_inputs(object_info[types[dst]])
        dst_names = [name for name, _, _ in dst_inputs]
        if in_name not in dst_names:
            raise KeyError(f"{spec.name}: {types[dst]} has no link input {in_name!r} ({dst_names})")
        want = dst_inputs[dst_names.index(in_name)][1]
        if want != ltype and want != "*":
            raise TypeError(f"{spec.name}: {types[src]}.{out_name} is {ltype}, {types[dst]}.{in_name} wants {want}")
        links.append([link_id, src, slot, dst, dst_names.index(in_name), ltype])
        out_links.setdefault((src, slot), []).append(link_id)
        in_links[(dst, in_name)] = link_id

    nodes = []
    for n in spec.nodes:
        ntype = n["type"]
        node = {
            "id": n["id"],
            "type": ntype,
            "pos": n["pos"],
            "size": n.get("size") or SIZES.get(ntype, [320, 200]),
            "flags": {},
            "order": order[n["id"]],
            "mode": 0,
        }
        if ntype == "Note":
            node.update(
                inputs=[], outputs=[], title=n["title"], properties={"text": ""},
                widgets_values=[n["widgets"]["text"]], color="#432", bgcolor="#653",
            )
            nodes.append(node)
            continue
        info = object_info[ntype]
        node["inputs"] = [
            {"name": name, "type": itype, "link": in_links.get((n["id"], name))}
            for name, itype, _ in link_inputs(info)
        ]
        outputs = []
        for slot, otype in enumerate(info.get("output") or []):
            names = info.get("output_name") or info.get("output")
            outputs.append({"name": names[slot], "type": otype, "links": out_links.get((n["id"], slot)) or None, "slot_index": slot, "shape": 3})
        node["outputs"] = outputs
        node["properties"] = {"Node name for S&R": ntype}
        if ntype == "TurboBoothLoader" and model_links(n["widgets"]):
            node["properties"]["models"] = model_links(n["widgets"])
        values = _widget_values(ntype, info, n["widgets"])
        if ntype == "LoadImage":
            values.append("image")  # the frontend's upload button saves this value too
        node["widgets_values"] = values
        if n.get("title"):
            node["title"] = n["title"]
        nodes.append(node)

    return {
        "last_node_id": len(spec.nodes),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": saved_view(nodes), "turbobooth": {"title": spec.title, "slug": spec.name}},
        "version": 0.4,
    }


# The saved view: every node inside a 1600x1000 window, clear of both frontends' chrome (the current
# frontend's top bar and side bar, the early-2024 frontend's floating menu on the right).
VIEW = {"left": 70, "top": 100, "right": 1340, "bottom": 960}
TITLE_HEIGHT = 30


def saved_view(nodes: list[dict]) -> dict:
    x0 = min(n["pos"][0] for n in nodes)
    y0 = min(n["pos"][1] for n in nodes) - TITLE_HEIGHT
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes)
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes)
    w, h = VIEW["right"] - VIEW["left"], VIEW["bottom"] - VIEW["top"]
    scale = round(min(1.0, w / (x1 - x0), h / (y1 - y0)) * 0.97, 3)
    # screen = (graph + offset) * scale: centre the graph's box in the free area
    ox = (VIEW["left"] + (w - (x1 - x0) * scale) / 2) / scale - x0
    oy = (VIEW["top"] + (h - (y1 - y0) * scale) / 2) / scale - y0
    return {"scale": scale, "offset": [round(ox, 1), round(oy, 1)]}


def file_name(spec: Spec) -> str:
    """Custom-node templates are listed by file name (the current frontend has no other title for them)."""
    return f"{spec.title}.json"


def model_links(values: dict) -> list[dict]:
    """TurboLoader's ``properties.models``: the current frontend offers these downloads when they are missing."""
    out = []
    if values.get("source") != "split files":
        return out
    for widget, folder in (("diffusion_model", "diffusion_models"), ("text_encoder", "text_encoders"), ("vae", "vae")):
        name = values.get(widget)
        if name in MODEL_URLS:
            out.append({"name": name, "url": MODEL_URLS[name], "directory": folder})
    return out


# --------------------------------------------------------------------------- the workflows


def turbo_text_to_image() -> Spec:
    s = Spec("turbo_text_to_image", "Text to image with Z-Image-Turbo")
    s.note(
        (20, 20),
        "Text to image with Z-Image-Turbo in 8 steps.\n\n"
        "TurboLoader loads the model once into TurboBooth's shared cache; TurboSample writes one image per "
        "prompt line; SaveImage saves them to ComfyUI's output folder.\n\n" + MODEL_FILES_NOTE,
        size=(420, 300),
    )
    loader = s.add("TurboBoothLoader", (20, 360), LOADER_SPLIT)
    sample = s.add(
        "TurboBoothSample", (480, 20),
        dict(prompt="a photo of a red fox in fresh snow, golden hour, sharp focus", seed=42, steps=0,
             width=1024, height=1024, images_per_prompt=1, sampler="euler", shift=0.0),
        model=(loader, "model"),
    )
    s.add("SaveImage", (880, 20), dict(filename_prefix="turbobooth/text_to_image"), images=(sample, "images"))
    return s


def negative_prompt_cfg_batch() -> Spec:
    s = Spec("negative_prompt_cfg_batch", "Batch of prompts with negative prompt and CFG")
    s.note(
        (20, 20),
        "A batch of three prompts, two images each, with a negative prompt and classifier-free guidance.\n\n"
        "TurboSample takes one prompt per line. Prompt i uses seed + i (here 1000, 1001, 1002), so each prompt "
        "gives the same image alone or in the batch; images_per_prompt adds more seeds per prompt.\n"
        "NegativePrompt/CFG: one negative line applies to every prompt (or give one per prompt line); "
        "per_prompt_scales sets a guidance scale per prompt. CFG is on whenever the scale is above 0 and "
        "doubles the work per step; cfg_truncation stops it for the last part of the schedule.\n\n" + MODEL_FILES_NOTE,
        size=(420, 380),
    )
    loader = s.add("TurboBoothLoader", (20, 440), LOADER_SPLIT)
    guidance = s.add(
        "TurboBoothGuidance", (480, 560),
        dict(negative_prompt="blurry, low quality, watermark, text", guidance_scale=3.0, cfg_truncation=0.9,
             cfg_normalization=0.0, per_prompt_scales="2.5, 3, 3.5"),
    )
    sample = s.add(
        "TurboBoothSample", (480, 20),
        dict(prompt="a lighthouse on a cliff at dusk, dramatic clouds\n"
                    "a bowl of ramen on a wooden table, steam rising\n"
                    "an astronaut riding a horse on the moon, film photo",
             seed=1000, steps=0, width=1024, height=1024, images_per_prompt=2, sampler="euler", shift=0.0),
        model=(loader, "model"), guidance=(guidance, "guidance"),
    )
    s.add("SaveImage", (880, 20), dict(filename_prefix="turbobooth/batch"), images=(sample, "images"))
    return s


def img2img_inpaint() -> Spec:
    s = Spec("img2img_inpaint", "Image to image and inpainting")
    s.note(
        (20, 20),
        "Image to image and inpainting with Z-Image-Turbo.\n\n"
        "LoadImage gives the picture and its mask (the transparent pixels, or what you paint with right-click > "
        "Open in MaskEditor). TurboSample repaints the masked area from the prompt; denoise 1 repaints it "
        "completely, lower values keep more of the original. Disconnect the mask for plain img2img. The output "
        "takes the picture's size (Z-Image needs multiples of 16; scale it with ImageScale if not).\n\n"
        "Put your picture in ComfyUI/input (or upload it on the LoadImage node).\n\n" + MODEL_FILES_NOTE,
        size=(420, 380),
    )
    image = s.add("LoadImage", (20, 440), dict(image="turbobooth_example.png"))
    loader = s.add("TurboBoothLoader", (360, 740), LOADER_SPLIT)
    sample = s.add(
        "TurboBoothSample", (480, 20),
        dict(prompt="a vase of sunflowers on the table", seed=7, steps=0, width=1024, height=1024,
             images_per_prompt=1, sampler="euler", shift=0.0, denoise=0.8),
        model=(loader, "model"), init_image=(image, "IMAGE"), mask=(image, "MASK"),
    )
    s.add("SaveImage", (880, 20), dict(filename_prefix="turbobooth/inpaint"), images=(sample, "images"))
    return s


def _photos_to_lora(s: Spec, loader_widgets: dict, loader_title: str | None, name: str) -> tuple[int, int]:
    """3 photos -> ImageBatch, a TurboLoader -> PriorImageGen -> DreamBoothTrain -> CheckpointSave + loss preview;
    returns (loader, train) node ids."""
    photos = [s.add("LoadImage", (20, 500 + 300 * i), dict(image=f"subject_{i + 1}.png"), title=f"Subject photo {i + 1}")
              for i in range(3)]
    batch = s.add("TurboBoothImageBatch", (360, 620), **{f"image{i + 1}": (p, "IMAGE") for i, p in enumerate(photos)})
    loader = s.add("TurboBoothLoader", (620, 20), loader_widgets, title=loader_title)
    prior = s.add(
        "TurboBoothPriorImageGen", (620, 420),
        dict(class_prompt="a photo of a dog", count=50, seed=0, width=1024, height=1024, steps=0),
        model=(loader, "model"),
    )
    train = s.add(
        "TurboBoothDreamBoothTrain", (1000, 20),
        dict(instance_prompt="a photo of sks dog", class_prompt="a photo of a dog", steps=400, learning_rate=1e-4,
             rank=16, resolution=1024, train_mode="lora", prior_loss_weight=1.0, seed=0, run_name=name,
             validation_prompt="", validation_every=0, checkpoint_every=100, batch_size=1),
        model=(loader, "model"), instance_images=(batch, "IMAGE"), class_images=(prior, "class_images"),
    )
    s.add("TurboBoothCheckpointSave", (1400, 20), dict(name=name, overwrite=False), lora=(train, "lora"))
    s.add("PreviewImage", (1000, 990), title="Loss", images=(train, "loss_plot"))
    return loader, train


def dreambooth_end_to_end() -> Spec:
    s = Spec("dreambooth_end_to_end", "DreamBooth from photos to a LoRA and new images")
    s.note(
        (20, 20),
        "DreamBooth in one graph: 3 photos of your subject -> class-prior images -> LoRA training -> saved "
        "LoRA -> the subject in a new scene.\n\n"
        "1. Put 3-5 photos of the subject in ComfyUI/input and pick them in the LoadImage nodes (TurboBooth's "
        "ImageBatch joins them; connect up to 8).\n"
        "2. The instance prompt names the subject with a rare token (\"sks\") plus its class; the class prompt "
        "is the class alone. PriorImageGen makes the class images once and caches them on disk.\n"
        "3. DreamBoothTrain trains a LoRA; cancel saves its state and queueing again resumes. CheckpointSave "
        "writes models/loras/sks_dog.safetensors, which ComfyUI's LoraLoader and the load_lora_and_generate "
        "workflow can use.\n"
        "Training on the distilled Turbo weights erodes its few-step ability: set training_adapter to a "
        "de-distillation LoRA if you have one.\n\n" + MODEL_FILES_NOTE,
        size=(460, 440),
    )
    loader, train = _photos_to_lora(s, LOADER_SPLIT, None, "sks_dog")
    sample = s.add(
        "TurboBoothSample", (1400, 200),
        dict(prompt="a photo of sks dog on a beach at sunset\na photo of sks dog wearing a red scarf in the snow",
             seed=11, steps=0, width=1024, height=1024, images_per_prompt=1, sampler="euler", shift=0.0,
             lora_strength=1.0),
        model=(loader, "model"), lora=(train, "lora"),
    )
    s.add("SaveImage", (1800, 200), dict(filename_prefix="turbobooth/dreambooth"), images=(sample, "images"))
    return s


def base_train_turbo_sample() -> Spec:
    s = Spec("base_train_turbo_sample", "Train on Z-Image Base, sample on Turbo")
    s.note(
        (20, 20),
        "LoRAs trained on the distilled Turbo weights come out grainy or off-identity; train on Z-Image Base and "
        "generate with Turbo instead, all in one graph.\n\n"
        "1. The first TurboLoader loads Base (variant base: class images at 50 steps with CFG), the second Turbo. "
        "With room for one model only, TurboBooth's cache lets Base go before Turbo loads.\n"
        "2. PriorImageGen -> DreamBoothTrain -> CheckpointSave as in the DreamBooth workflow.\n"
        "3. TurboSample applies the trained LoRA on Turbo at Turbo's 8 steps. For a Base-trained LoRA on Turbo, "
        "put ComfyUI's z_image_turbo_distill_patch_lora_bf16.safetensors in models/loras and pick it as lora_file: "
        "it stacks on the trained LoRA.\n\n"
        "Model files: Base as the diffusers folder models/diffusers/Z-Image (Tongyi-MAI/Z-Image); Turbo as the "
        "split files z_image_turbo_bf16.safetensors, qwen_3_4b.safetensors, ae.safetensors.",
        size=(460, 440),
    )
    _, train = _photos_to_lora(s, {**LOADER_DIFFUSERS, "diffusers_model": "Z-Image", "variant": "base"},
                               "TurboLoader (Base)", "sks_dog_base")
    turbo = s.add("TurboBoothLoader", (1400, 200), {**LOADER_SPLIT, "variant": "turbo"}, title="TurboLoader (Turbo)")
    sample = s.add(
        "TurboBoothSample", (1800, 20),
        dict(prompt="a photo of sks dog on a beach at sunset", seed=11, steps=0, width=1024, height=1024,
             images_per_prompt=1, sampler="euler", shift=0.0, lora_strength=1.0, lora_file="(none)",
             lora_file_strength=1.0),
        model=(turbo, "model"), lora=(train, "lora"),
    )
    s.add("SaveImage", (2200, 20), dict(filename_prefix="turbobooth/base_to_turbo"), images=(sample, "images"))
    return s


def load_lora_and_generate() -> Spec:
    s = Spec("load_lora_and_generate", "Generate with a LoRA file")
    s.note(
        (20, 20),
        "Generate with a LoRA file from models/loras, such as the one the DreamBooth workflow saves "
        "(sks_dog.safetensors) or a Z-Image LoRA from elsewhere. Mention the trigger word in the prompt. "
        "lora_file_strength scales it; 0 turns it off.\n\n"
        "This one loads the diffusers folder models/diffusers/Z-Image-Turbo; switch TurboLoader's source to "
        "\"split files\" to use z_image_turbo_bf16.safetensors, qwen_3_4b.safetensors and ae.safetensors "
        "instead.",
        size=(420, 260),
    )
    loader = s.add("TurboBoothLoader", (20, 320), LOADER_DIFFUSERS)
    sample = s.add(
        "TurboBoothSample", (480, 20),
        dict(prompt="a photo of sks dog as an astronaut, studio lighting", seed=5, steps=0, width=1024,
             height=1024, images_per_prompt=1, sampler="euler", shift=0.0, lora_file="sks_dog.safetensors",
             lora_file_strength=1.0),
        model=(loader, "model"),
    )
    s.add("SaveImage", (880, 20), dict(filename_prefix="turbobooth/lora"), images=(sample, "images"))
    return s


WORKFLOWS = [turbo_text_to_image, negative_prompt_cfg_batch, img2img_inpaint, dreambooth_end_to_end,
             base_train_turbo_sample, load_lora_and_generate]


def render_all(object_info: dict) -> dict[str, str]:
    """File name -> JSON text for every workflow."""
    out = {}
    for make in WORKFLOWS:
        spec = make()
        out[file_name(spec)] = json.dumps(build(spec, object_info), indent=2) + "\n"
    return out


def host_object_info() -> dict:
    import comfy_harness as ch

    with tempfile.TemporaryDirectory(prefix="make-workflows-") as work:
        host = ch.prepare_host(work)
        desc = host.describe()
    if not desc.get("pack_loaded"):
        raise SystemExit("ComfyUI did not load the pack:\n" + "\n".join(desc.get("log", [])))
    return desc["object_info"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--object-info", help="read /object_info from this JSON file instead of starting the host")
    parser.add_argument("--check", action="store_true", help="exit 1 if a workflow file differs from what would be written")
    args = parser.parse_args(argv)
    if args.object_info:
        with open(args.object_info, encoding="utf-8") as f:
            object_info = json.load(f)
    else:
        object_info = host_object_info()
    stale = []
    for name, text in render_all(object_info).items():
        path = os.path.join(WORKFLOWS_DIR, name)
        try:
            with open(path, encoding="utf-8") as f:
                same = f.read() == text
        except OSError:
            same = False
        if same:
            continue
        stale.append(name)
        if not args.check:
            os.makedirs(WORKFLOWS_DIR, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            print(f"wrote workflows/{name}")
    if args.check and stale:
        print("out of date: " + ", ".join(stale) + " (run scripts/make_workflows.py)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
