"""Ray Serve: a local Ray with 2 CPU replicas on the tiny model; both serve, images equal the single-process ones."""

from __future__ import annotations

import base64
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_helpers import AUTH, TOKEN, free_port

START_BOUND_S = 300


@pytest.fixture(scope="module")
def ray_url(tmp_path_factory):
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e .[ray]")
    from ray import serve

    data = tmp_path_factory.mktemp("ray")
    env = {"TURBOBOOTH_MODEL": "tiny", "TURBOBOOTH_DATA_DIR": str(data), "TURBOBOOTH_API_TOKEN": TOKEN}
    try:
        ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
    except Exception as e:  # noqa: BLE001 - whatever stops a local Ray from starting is the skip reason
        pytest.skip(f"a local Ray could not start here: {type(e).__name__}: {e}")
    port = free_port()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # ray_app builds its config at import, here as in the replicas
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        from turbobooth.serve.ray_app import TurboBoothDeployment

        app = TurboBoothDeployment.options(num_replicas=2, autoscaling_config=None).bind()
        serve.run(app, name="turbobooth", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_two_replicas_serve_the_same_images(ray_url, client):
    bodies = [{"prompt": f"a photo of a dog {i}", "seed": i, "steps": 2, "size": "64x64"} for i in range(16)]

    def one(body):
        r = httpx.post(ray_url + "/ray/v1/images/generations", json=body, headers=AUTH, timeout=START_BOUND_S)
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, bodies))
    assert len({a["replica"] for a in answers}) == 2
    for body, got in zip(bodies[:4], answers[:4], strict=True):
        single = client.post("/v1/images/generations", json=body).json()["data"][0]["b64_json"]
        assert base64.b64decode(got["data"][0]["b64_json"]) == base64.b64decode(single)
    assert httpx.get(ray_url + "/healthz").status_code == 200
    assert httpx.get(ray_url + "/readyz").status_code == 401  # the same app: its token guard holds on Ray too
