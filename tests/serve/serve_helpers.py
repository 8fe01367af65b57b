"""Helpers: a real `python -m turbobooth serve` process on 127.0.0.1 with the tiny model, driven with httpx."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
START_TIMEOUT_S = 180  # a bound on waiting for a start (2 slow cores); not a performance assertion


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """One `python -m turbobooth serve` process."""

    def __init__(self, data_dir: str, *args: str, token: str | None = TOKEN):
        self.data_dir, self.args, self.token = data_dir, list(args), token
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(data_dir, f"service-{self.port}.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=AUTH if self.token else {}, timeout=kw.pop("timeout", 300), **kw)

    def start(self) -> Service:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("TURBOBOOTH_API_TOKEN", None)
        if self.token:
            env["TURBOBOOTH_API_TOKEN"] = self.token
        os.makedirs(self.data_dir, exist_ok=True)
        cmd = [sys.executable, "-m", "turbobooth", "serve", "--model", "tiny", "--host", "127.0.0.1",
               "--port", str(self.port), "--data-dir", self.data_dir, *self.args]
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd="/")
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the service exited with {self.proc.returncode}:\n{self.read_log()}")
            try:
                if httpx.get(self.url + "/readyz", headers=AUTH, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the service did not become ready:\n{self.read_log()}")

    def read_log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()[-4000:]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.log.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.log.close()

    def rss_kb(self) -> int:
        with open(f"/proc/{self.proc.pid}/status", encoding="ascii") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/task"))


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of ``name{labels}`` in Prometheus text (0 when absent)."""
    want = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


def train_tiny_lora(tiny_root: str, out_dir: str, path: str, color=(250, 20, 20)) -> str:
    """A tiny Z-Image LoRA trained in this process (0.5 s), saved where the service looks for LoRAs."""
    from PIL import Image
    from turbobooth.manager.cache import get_model
    from turbobooth.manager.lora import save_lora_file
    from turbobooth.manager.spec import ModelSpec
    from turbobooth.manager.tiny import write_tiny_models
    from turbobooth.trainer.config import TrainConfig
    from turbobooth.trainer.runs import train

    paths = write_tiny_models(tiny_root, formats=("diffusers",))
    model = get_model(ModelSpec(paths["zimage_diffusers"]))
    cfg = TrainConfig(family="zimage", resolution=32, steps=4, lr=5e-2, rank=4, output_dir=out_dir,
                      log_tensorboard=False, instance_prompt="a photo of sks dog", class_prompt="a photo of dog")
    result = train(model, cfg, [Image.new("RGB", (32, 32), color)] * 3)
    return save_lora_file(result.lora, path)
