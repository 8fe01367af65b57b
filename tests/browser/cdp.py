"""Headless Chromium driven over the DevTools protocol (CDP), with aiohttp's websocket client.

No browser download and no extra package: Debian's ``chromium`` (apt) plus
``aiohttp``, which ComfyUI itself needs. A background thread runs the event
loop, so page events (exceptions, console errors) are collected while tests
call plain synchronous methods:

    with Browser.launch(find_chromium(), profile_dir) as browser:
        page = browser.new_page(1600, 1000)
        page.goto("http://127.0.0.1:8188")
        page.wait_for("!!window.app")
        page.evaluate("app.graph._nodes.length")
        page.screenshot("shot.png")
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request

import aiohttp

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--hide-scrollbars",
    "--mute-audio",
)


class BrowserError(RuntimeError):
    pass


class JSError(BrowserError):
    """An exception thrown by evaluated JavaScript."""


def find_chromium() -> str | None:
    """$TURBOBOOTH_CHROMIUM, else the first Chromium/Chrome on PATH."""
    env = os.environ.get("TURBOBOOTH_CHROMIUM")
    if env:
        return env if os.path.isfile(env) and os.access(env, os.X_OK) else None
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class _Loop:
    """An asyncio loop on a daemon thread; ``run(coro)`` waits for its result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="cdp-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float | None = None):
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


class _Connection:
    """One CDP websocket: request/response by id, events to listeners."""

    def __init__(self, loop: _Loop, ws_url: str) -> None:
        self._loop = loop
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self.listeners: list = []
        self._session, self._ws = loop.run(self._open(ws_url), timeout=30)
        self._reader = asyncio.run_coroutine_threadsafe(self._read(), loop.loop)

    async def _open(self, url):
        session = aiohttp.ClientSession()
        ws = await session.ws_connect(url, max_msg_size=0, heartbeat=None)
        return session, ws

    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
            else:
                for listener in list(self.listeners):
                    try:
                        listener(data)
                    except Exception:  # a listener must never kill the reader
                        pass
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(BrowserError("the DevTools connection closed"))

    async def _send(self, method: str, params: dict, session_id: str | None):
        msg_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        body = {"id": msg_id, "method": method, "params": params}
        if session_id:
            body["sessionId"] = session_id
        await self._ws.send_str(json.dumps(body))
        return await fut

    def send(self, method: str, params: dict | None = None, session_id: str | None = None, timeout: float = 60) -> dict:
        reply = self._loop.run(self._send(method, params or {}, session_id), timeout=timeout)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def close(self) -> None:
        async def _close():
            await self._ws.close()
            await self._session.close()

        try:
            self._loop.run(_close(), timeout=10)
        except Exception:
            pass


class Browser:
    """A Chromium process with a fresh profile, controlled through its browser-level CDP endpoint."""

    def __init__(self, proc: subprocess.Popen, port: int, profile_dir: str, log_path: str) -> None:
        self.proc = proc
        self.port = port
        self.profile_dir = profile_dir
        self.log_path = log_path
        self._loop = _Loop()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/version", timeout=10) as resp:
            info = json.load(resp)
        self.version = info.get("Browser", "")
        self.conn = _Connection(self._loop, info["webSocketDebuggerUrl"])

    @classmethod
    def launch(cls, executable: str, profile_dir: str, timeout: float = 60) -> Browser:
        os.makedirs(profile_dir, exist_ok=True)
        port_file = os.path.join(profile_dir, "DevToolsActivePort")
        if os.path.exists(port_file):
            os.remove(port_file)
        log_path = os.path.join(profile_dir, "chromium.log")
        cmd = [executable, *FLAGS, f"--user-data-dir={profile_dir}", "--remote-debugging-port=0",
               "--remote-debugging-address=127.0.0.1", "about:blank"]
        with open(log_path, "w", encoding="utf-8") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BrowserError(f"{executable} exited with {proc.returncode}:\n{_tail(log_path)}")
            try:
                with open(port_file, encoding="utf-8") as f:
                    port = int(f.readline().strip())
                return cls(proc, port, profile_dir, log_path)
            except (OSError, ValueError):
                time.sleep(0.1)
        proc.kill()
        raise BrowserError(f"{executable} did not open its DevTools port within {timeout:.0f}s:\n{_tail(log_path)}")

    def new_page(self, width: int = 1600, height: int = 1000) -> Page:
        target = self.conn.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.conn.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self.conn, target, session)
        page.setup(width, height)
        return page

    def close(self) -> None:
        try:
            self.conn.send("Browser.close", timeout=10)
        except Exception:
            pass
        self.conn.close()
        self._loop.close()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Page:
    """One tab. ``errors`` collects uncaught exceptions and console errors as strings."""

    def __init__(self, conn: _Connection, target_id: str, session_id: str) -> None:
        self.conn = conn
        self.target_id = target_id
        self.session_id = session_id
        self.errors: list[str] = []
        self.console: list[str] = []
        self._load_events = 0
        conn.listeners.append(self._on_event)

    def _on_event(self, msg: dict) -> None:
        if msg.get("sessionId") != self.session_id:
            return
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.exceptionThrown":
            d = params.get("exceptionDetails", {})
            text = (d.get("exception") or {}).get("description") or d.get("text", "")
            self.errors.append(f"uncaught: {text}")
        elif method == "Runtime.consoleAPICalled":
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.console.append(f"{params.get('type')}: {args}")
        elif method == "Page.loadEventFired":
            self._load_events += 1

    def send(self, method: str, params: dict | None = None, timeout: float = 60) -> dict:
        return self.conn.send(method, params, session_id=self.session_id, timeout=timeout)

    def serve_empty_scripts(self, url_pattern: str) -> None:
        """Answer every request matching ``url_pattern`` with an empty JavaScript module (an extension that is
        not there), from the next navigation on."""

        def fulfil(msg: dict) -> None:
            if msg.get("sessionId") == self.session_id and msg.get("method") == "Fetch.requestPaused":
                params = {"requestId": msg["params"]["requestId"], "responseCode": 200, "body": "",
                          "responseHeaders": [{"name": "Content-Type", "value": "application/javascript"}]}
                asyncio.ensure_future(self.conn._send("Fetch.fulfillRequest", params, self.session_id))

        self.conn.listeners.append(fulfil)
        self.send("Fetch.enable", {"patterns": [{"urlPattern": url_pattern, "requestStage": "Request"}]})

    def setup(self, width: int, height: int) -> None:
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.set_viewport(width, height)

    def set_viewport(self, width: int, height: int) -> None:
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def goto(self, url: str, timeout: float = 60) -> None:
        before = self._load_events
        reply = self.send("Page.navigate", {"url": url})
        if reply.get("errorText"):
            raise BrowserError(f"navigating to {url}: {reply['errorText']}")
        deadline = time.monotonic() + timeout
        while self._load_events == before:
            if time.monotonic() > deadline:
                raise BrowserError(f"{url} did not finish loading within {timeout:.0f}s")
            time.sleep(0.05)

    def evaluate(self, expression: str, timeout: float = 60):
        """Evaluate ``expression`` (awaiting a promise) and return its JSON value."""
        reply = self.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True, "userGesture": True},
            timeout=timeout,
        )
        if "exceptionDetails" in reply:
            d = reply["exceptionDetails"]
            text = (d.get("exception") or {}).get("description") or d.get("text", "")
            raise JSError(f"{text}\n--- in ---\n{expression[:2000]}")
        return reply.get("result", {}).get("value")

    def call(self, function_source: str, *args, timeout: float = 60):
        """Call a JS function expression with JSON arguments: ``call("(a, b) => a + b", 1, 2)``."""
        return self.evaluate(f"({function_source})(...{json.dumps(list(args))})", timeout=timeout)

    def wait_for(self, expression: str, timeout: float = 60, interval: float = 0.2, what: str | None = None):
        """Poll until ``expression`` is truthy; returns its value. JS errors while polling count as falsy."""
        deadline = time.monotonic() + timeout
        last_error = ""
        while True:
            try:
                value = self.evaluate(expression)
                if value:
                    return value
            except JSError as e:
                last_error = str(e).splitlines()[0]
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out after {timeout:.0f}s waiting for {what or expression!r}" + (f" ({last_error})" if last_error else ""))
            time.sleep(interval)

    def click(self, selector: str) -> None:
        """A real mouse click at the centre of the first visible element matching ``selector``."""
        box = self.evaluate(
            "((sel) => { const els = [...document.querySelectorAll(sel)].filter(e => e.offsetParent !== null);"
            " if (!els.length) return null; const r = els[0].getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })(" + json.dumps(selector) + ")"
        )
        if not box:
            raise BrowserError(f"no visible element matches {selector!r}")
        x, y = box
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            params = {"type": kind, "x": x, "y": y}
            if kind != "mouseMoved":
                params.update(button="left", clickCount=1)
            self.send("Input.dispatchMouseEvent", params)

    def screenshot(self, path: str) -> str:
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.conn.listeners.remove(self._on_event)
        except ValueError:
            pass
        try:
            self.conn.send("Target.closeTarget", {"targetId": self.target_id}, timeout=10)
        except Exception:
            pass


def _tail(path: str, n: int = 3000) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""
