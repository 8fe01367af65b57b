"""Azure ML: score.py under Microsoft's inference server (azmlinfsrv), and the deployment YAMLs offline."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time

import httpx
import pytest
from serve_helpers import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(REPO, "deploy", "azureml")
START_BOUND_S = 180
# azmlinfsrv's own run(), with its hard-coded 0.0.0.0 replaced by 127.0.0.1 (test servers bind loopback only)
LAUNCH = ("import sys; import azureml_inference_server_http.amlserver as s; s.DEFAULT_HOST = '127.0.0.1'; "
          "sys.argv[0] = 'azmlinfsrv'; sys.exit(s.run())")


@pytest.fixture(scope="module")
def scoring_server(tmp_path_factory):
    pytest.importorskip("azureml_inference_server_http", reason="pip install -e .[azureml]")
    from turbobooth.manager.tiny import write_tiny_models

    root = tmp_path_factory.mktemp("azureml")
    model_dir = write_tiny_models(str(root / "tiny"), formats=("diffusers",))["zimage_diffusers"]
    port, health = free_port(), free_port()
    env = dict(os.environ, AZUREML_MODEL_DIR=model_dir, TURBOBOOTH_DATA_DIR=str(root / "data"),
               AML_APP_ROOT=str(root), PYTHONUNBUFFERED="1")
    log = open(root / "azmlinfsrv.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, "--entry_script", os.path.join(DEPLOY, "score.py"),
                             "--port", str(port), "--health_port", str(health)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(root))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_BOUND_S
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            raise RuntimeError((root / "azmlinfsrv.log").read_text(errors="replace")[-3000:])
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_score_returns_the_services_image(scoring_server, client):
    body = {"prompt": "a photo of a dog", "seed": 21, "steps": 2, "size": "64x64"}
    r = httpx.post(scoring_server + "/score", json=body, timeout=300)
    assert r.status_code == 200, r.text
    png = base64.b64decode(r.json()["data"][0]["b64_json"])
    assert png.startswith(b"\x89PNG")
    same = client.post("/v1/images/generations", json=body).json()["data"][0]["b64_json"]
    assert png == base64.b64decode(same)  # same service code, same bytes


def test_score_refuses_bad_input_by_name(scoring_server):
    r = httpx.post(scoring_server + "/score", content='{"prompt": "x", "guidance": NaN}',
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 422 and "guidance" in r.text
    r = httpx.post(scoring_server + "/score", json={"prompt": "x", "n": 9}, timeout=60)
    assert r.status_code == 422 and "max_images" in r.text


@pytest.mark.parametrize("name", ["deployment.yml", "deployment-container.yml"])
def test_deployment_yaml_loads_offline(name):
    ml = pytest.importorskip("azure.ai.ml", reason="pip install -e .[azureml]")
    d = ml.load_online_deployment(os.path.join(DEPLOY, name))
    assert d.request_settings.request_timeout_ms >= 60000
    assert d.request_settings.max_concurrent_requests_per_instance > 1
    assert d.instance_type.startswith("Standard_NC")
    assert d.liveness_probe.failure_threshold and d.readiness_probe.failure_threshold
    if name == "deployment-container.yml":
        routes = d.environment.inference_config
        assert routes["livenessRoute"]["path"] == "/healthz" and routes["readinessRoute"]["path"] == "/readyz"
    assert ml.load_online_endpoint(os.path.join(DEPLOY, "endpoint.yml")).auth_mode == "key"
