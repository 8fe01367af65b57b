"""Every route of the service, over HTTP, on the tiny model."""

from __future__ import annotations

import base64
import json

import httpx
from serve_helpers import AUTH, metric

PNG = b"\x89PNG\r\n\x1a\n"


def _gen(client, **kw):
    body = {"prompt": "a photo of a dog", "seed": 1, **kw}
    return client.post("/v1/images/generations", json=body)


def test_healthz_is_open_and_everything_else_needs_the_token(service):
    assert httpx.get(service.url + "/healthz").json() == {"status": "ok"}
    for path in ("/readyz", "/metrics", "/openapi.json", "/v1/loras"):
        r = httpx.get(service.url + path)
        assert r.status_code == 401, path
        assert r.json()["error"]["limit"] == "auth"
        assert httpx.get(service.url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(service.url + path, headers=AUTH).status_code == 200, path
    r = httpx.post(service.url + "/v1/images/generations", json={"prompt": "x"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert service.token not in service.read_log()


def test_openapi_lists_the_routes(client):
    spec = client.get("/openapi.json").json()
    for path in ("/v1/images/generations", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events",
                 "/v1/jobs/{job_id}/resume", "/v1/loras", "/healthz", "/readyz", "/metrics"):
        assert path in spec["paths"], path
    gen = spec["components"]["schemas"]["GenerationRequest"]["properties"]
    assert {"prompt", "n", "size", "response_format", "seed", "steps", "guidance", "negative_prompt",
            "loras"} <= set(gen)
    assert "multipart/form-data" in spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]


def test_readyz_once_loaded(client):
    assert client.get("/readyz").json() == {"status": "ready"}


def test_generation_answers_openai_shaped_pngs(client):
    r = _gen(client, n=2, size="64x48")
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"created", "data"} and isinstance(body["created"], int)
    assert [d["seed"] for d in body["data"]] == [1, 2]
    import io

    from PIL import Image

    for d in body["data"]:
        png = base64.b64decode(d["b64_json"])
        assert png.startswith(PNG)
        assert Image.open(io.BytesIO(png)).size == (64, 48)
    assert body["data"][0]["b64_json"] != body["data"][1]["b64_json"]


def test_same_seed_same_image_and_a_random_seed_is_returned(client):
    a, b = _gen(client).json()["data"][0], _gen(client).json()["data"][0]
    assert a["b64_json"] == b["b64_json"]
    c = client.post("/v1/images/generations", json={"prompt": "a photo of a dog"}).json()["data"][0]
    assert isinstance(c["seed"], int)


def test_url_response_format_serves_the_file(client):
    r = _gen(client, response_format="url")
    url = r.json()["data"][0]["url"]
    assert url.startswith(str(client.base_url)) and "b64_json" not in r.json()["data"][0]
    got = client.get(url)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert got.content == base64.b64decode(_gen(client).json()["data"][0]["b64_json"])
    for bad in ("../jobs.sqlite", "%2e%2e%2fjobs.sqlite", "x.png"):
        assert client.get(f"/v1/images/files/{bad}").status_code == 404


def test_loras_route_lists_names_only(client, trained_lora):
    names = [d["name"] for d in client.get("/v1/loras").json()["data"]]
    assert trained_lora in names


def test_metrics_are_prometheus_text(client):
    _gen(client)
    text = client.get("/metrics").text
    assert "# TYPE turbobooth_queue_depth gauge" in text
    assert metric(text, "turbobooth_batch_requests_count") >= 1
    assert metric(text, "turbobooth_request_seconds_count", 'route="generations"') >= 1
    assert 'turbobooth_jobs{state="succeeded"}' in text
    assert metric(text, "turbobooth_model_ready") == 1


def test_generation_job_with_events(client):
    r = client.post("/v1/jobs", json={"type": "generation", "generation": {"prompt": "a red cat", "seed": 4}})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    events = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        for line in s.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert events[-1]["type"] == "end" and events[-1]["state"] == "succeeded", events
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "succeeded" and job["kind"] == "generation"
    png = client.get(job["result"]["data"][0]["url"]).content
    same = client.post("/v1/images/generations", json={"prompt": "a red cat", "seed": 4}).json()
    assert png == base64.b64decode(same["data"][0]["b64_json"])


def test_unknown_and_malformed_job_ids(client):
    for bad in ("0" * 32, "..%2f..%2fetc", "ABC"):
        assert client.get(f"/v1/jobs/{bad}").status_code == 404
        assert client.delete(f"/v1/jobs/{bad}").status_code == 404
        assert client.post(f"/v1/jobs/{bad}/resume").status_code == 404
        assert client.get(f"/v1/jobs/{bad}/events").status_code == 404
