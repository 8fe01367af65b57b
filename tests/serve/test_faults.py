"""Faults: a client that leaves mid-request, and the refusal to listen publicly without a token."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from serve_helpers import TOKEN, metric

WAIT_BOUND_S = 120


def _send_and_leave(service, body: dict) -> None:
    data = json.dumps(body).encode()
    head = (f"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as s:
        s.sendall(head + data)
        time.sleep(0.05)  # the request is queued (max_wait_ms is 300), then the client is gone


def test_client_disconnect_mid_request_leaks_nothing(service, client):
    client.post("/v1/images/generations", json={"prompt": "warm up"})
    before = client.get("/metrics").text
    threads = service.threads()
    for i in range(5):
        _send_and_leave(service, {"prompt": f"left {i}", "seed": i, "steps": 8, "size": "96x96"})
    deadline = time.monotonic() + WAIT_BOUND_S
    while time.monotonic() < deadline:
        text = client.get("/metrics").text
        gone = metric(text, "turbobooth_cancelled_requests_total") - metric(before, "turbobooth_cancelled_requests_total")
        if gone >= 5 and metric(text, "turbobooth_queue_depth") == 0:
            break
        time.sleep(0.1)
    assert gone >= 5, text
    assert metric(text, "turbobooth_queue_depth") == 0
    assert service.threads() <= threads + 1
    r = client.post("/v1/images/generations", json={"prompt": "after"})
    assert r.status_code == 200


def test_public_bind_without_a_token_is_refused():
    env = {k: v for k, v in os.environ.items() if k != "TURBOBOOTH_API_TOKEN"}
    out = subprocess.run([sys.executable, "-m", "turbobooth", "serve", "--host", "0.0.0.0", "--port", "1"],
                         capture_output=True, text=True, env=env, cwd="/", timeout=120)
    assert out.returncode == 2
    assert "refusing to listen on '0.0.0.0' without a token" in out.stderr and "TURBOBOOTH_API_TOKEN" in out.stderr


def test_bad_limits_are_refused_by_name():
    out = subprocess.run([sys.executable, "-m", "turbobooth", "serve", "--max-images", "9", "--max-batch", "4"],
                         capture_output=True, text=True, cwd="/", timeout=120)
    assert out.returncode == 2 and "max_images" in out.stderr
