"""Every limit answers its own 4xx naming the limit, and the service stays up afterwards."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image
from serve_helpers import Service, metric


def _photo(color=(200, 30, 30), size=32, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format=fmt)
    return buf.getvalue()


def _form(**kw) -> dict:
    base = {"instance_prompt": "a photo of sks dog", "class_prompt": "a photo of dog", "lora_name": "limit-test",
            "steps": "2", "resolution": "32", "num_class_images": "1", "class_steps": "1"}
    base.update(kw)
    return base


def _files(count: int, data: bytes | None = None) -> list:
    return [("images", (f"p{i}.png", data or _photo(), "image/png")) for i in range(count)]


def _limit(r: httpx.Response) -> str:
    return r.json()["error"]["limit"]


@pytest.mark.parametrize("body, status, limit", [
    ({"prompt": "x", "n": 5}, 422, "max_images"),
    ({"prompt": "x", "size": "128x128"}, 422, "max_pixels"),
    ({"prompt": "x", "steps": 9}, 422, "max_steps"),
    ({"prompt": "x" * 201}, 422, "max_prompt_chars"),
    ({"prompt": "x", "negative_prompt": "y" * 201}, 422, "max_prompt_chars"),
])
def test_generation_limits(client, body, status, limit):
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == status and _limit(r) == limit, r.text
    assert limit in r.json()["error"]["message"]
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("raw, field", [
    ('{"prompt": "x", "guidance": NaN}', "guidance"),
    ('{"prompt": "x", "guidance": Infinity}', "guidance"),
    ('{"prompt": "x", "loras": [{"name": "a", "strength": -Infinity}]}', "strength"),
    ('{"prompt": "x", "seed": NaN}', "seed"),
    ('{"prompt": "x", "steps": 1e400}', "steps"),
])
def test_nan_and_inf_are_422_naming_the_field(client, raw, field):
    r = client.post("/v1/images/generations", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert field in [str(p) for e in r.json()["detail"] for p in e["loc"]], r.text


def test_schema_errors(client):
    for body in ({"prompt": "   "}, {"prompt": "x", "size": "64"}, {"prompt": "x", "bogus": 1},
                 {"prompt": "x", "response_format": "png"}, {"prompt": "x", "n": 0}, {"prompt": "x", "seed": -1}):
        assert client.post("/v1/images/generations", json=body).status_code == 422, body


def test_body_size_limit_with_and_without_content_length(client):
    big = {"prompt": "x", "negative_prompt": "y" * (3 * 2**20)}
    r = client.post("/v1/images/generations", json=big)
    assert r.status_code == 413 and _limit(r) == "max_body_bytes"

    def chunks():
        for _ in range(40):
            yield b"x" * 100_000

    r = client.post("/v1/images/generations", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and _limit(r) == "max_body_bytes"
    assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize("files, form, status, limit", [
    (2, {}, 422, "min_uploads"),
    (6, {}, 413, "max_uploads"),
    (3, {"steps": "6000"}, 422, "max_train_steps"),
    (3, {"lora_name": "../escape"}, 422, "lora_name"),
    (3, {"bogus": "1"}, 422, "form"),
    (3, {"lr": "nan"}, 422, "form"),
    (3, {"steps": "inf"}, 422, "form"),
])
def test_upload_and_training_limits(client, files, form, status, limit):
    r = client.post("/v1/jobs", data=_form(**form), files=_files(files))
    assert r.status_code == status and _limit(r) == limit, r.text


def test_upload_size_and_content(client):
    noise = Image.effect_noise((400, 400), 100).convert("RGB")
    buf = io.BytesIO()
    noise.save(buf, format="PNG")
    assert len(buf.getvalue()) > 256 * 1024
    r = client.post("/v1/jobs", data=_form(), files=_files(2) + [("images", ("big.png", buf.getvalue(), "image/png"))])
    assert r.status_code == 413 and _limit(r) == "max_upload_bytes", r.text
    r = client.post("/v1/jobs", data=_form(), files=_files(2) + [("images", ("x.png", b"not an image", "image/png"))])
    assert r.status_code == 422 and _limit(r) == "images", r.text
    assert client.get("/healthz").status_code == 200


def test_queue_limit_is_429_with_retry_after(tmp_path):
    svc = Service(str(tmp_path / "q"), "--max-queue", "1", "--max-batch", "1", "--max-images", "1",
                  "--max-wait-ms", "0", "--default-steps", "6").start()
    try:
        def one(i):
            with svc.client() as c:
                return c.post("/v1/images/generations", json={"prompt": "a dog", "seed": i, "size": "96x96"})

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, range(8)))
        codes = sorted(r.status_code for r in answers)
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}, codes
        full = next(r for r in answers if r.status_code == 429)
        assert _limit(full) == "max_queue" and int(full.headers["retry-after"]) >= 1
        with svc.client() as c:
            assert metric(c.get("/metrics").text, "turbobooth_rejected_total", 'limit="max_queue"') >= 1
            assert c.post("/v1/images/generations", json={"prompt": "a dog"}).status_code == 200
    finally:
        svc.stop()
