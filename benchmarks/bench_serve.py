"""The REST service under load: concurrent clients against the batcher vs the same requests one at a time.

    .venv/bin/python benchmarks/bench_serve.py [--requests 40] [--clients 8] [--steps 2] [--size 64]
        [--model tiny|<diffusers folder>] [--max-batch 4]

Two services run in turn on 127.0.0.1 (each its own process, real uvicorn):
  batched: --max-batch N, the clients' requests coalesce;
  serial:  --max-batch 1, the same requests, served one at a time by the one model worker.
Prints `name: value` lines (throughput in images/s, p50/p95 latency in s, mean batch size); judges nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "bench-token"


def emit(name: str, value) -> None:
    print(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}", flush=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args, max_batch: int, data_dir: str):
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "turbobooth", "serve", "--model", args.model, "--host", "127.0.0.1", "--port",
           str(port), "--data-dir", data_dir, "--max-batch", str(max_batch), "--max-images", "1",
           "--max-wait-ms", str(args.max_wait_ms), "--max-queue", str(args.requests + 1)]
    env = dict(os.environ, TURBOBOOTH_API_TOKEN=TOKEN)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    for _ in range(900):
        try:
            if httpx.get(url + "/readyz", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the service exited with {proc.returncode}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the service did not become ready")


def _load(url: str, args) -> tuple[float, list[float], float]:
    import httpx

    headers = {"Authorization": f"Bearer {TOKEN}"}
    size = f"{args.size}x{args.size}"

    def one(i):
        body = {"prompt": f"a photo of a dog {i % 5}", "seed": i, "steps": args.steps, "size": size}
        t0 = time.perf_counter()
        with httpx.Client(headers=headers, timeout=600) as c:
            r = c.post(url + "/v1/images/generations", json=body)
        r.raise_for_status()
        return time.perf_counter() - t0

    with httpx.Client(headers=headers, timeout=600) as c:  # warm-up
        c.post(url + "/v1/images/generations", json={"prompt": "warm up", "steps": args.steps, "size": size})
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        lat = list(pool.map(one, range(args.requests)))
    wall = time.perf_counter() - t0
    text = httpx.get(url + "/metrics", headers=headers).text
    vals = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln.startswith("turbobooth_batch_requests_")}
    mean_batch = vals.get("turbobooth_batch_requests_sum", 0) / max(vals.get("turbobooth_batch_requests_count", 1), 1)
    return wall, lat, mean_batch


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--max-wait-ms", type=float, default=25.0)
    args = p.parse_args(argv)
    emit("model", args.model)
    emit("requests", args.requests)
    emit("clients", args.clients)
    with tempfile.TemporaryDirectory() as tmp:
        for name, max_batch in (("batched", args.max_batch), ("serial", 1)):
            proc, url = _start(args, max_batch, os.path.join(tmp, name))
            try:
                wall, lat, mean_batch = _load(url, args)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
            emit(f"{name}_max_batch", max_batch)
            emit(f"{name}_throughput_images_per_s", args.requests / wall)
            emit(f"{name}_latency_p50_s", _pct(lat, 50))
            emit(f"{name}_latency_p95_s", _pct(lat, 95))
            emit(f"{name}_mean_requests_per_batch", mean_batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
