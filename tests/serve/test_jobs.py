"""Personalization jobs: upload -> class images -> DreamBooth -> a named LoRA; events; cancel; resume; SIGKILL."""

from __future__ import annotations

import io
import json
import os
import time

import pytest
from PIL import Image
from serve_helpers import Service

POLL_S = 0.05
WAIT_BOUND_S = 300  # a bound on waiting, so a broken service fails instead of hanging; not a timing assertion


def _photos(n=3) -> list:
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (40, 36), (240 - 20 * i, 30, 20 + 10 * i)).save(buf, format="JPEG")
        out.append(("images", (f"any/../name{i}.jpg", buf.getvalue(), "image/jpeg")))
    return out


def _submit(client, lora_name: str, **kw) -> str:
    form = {"instance_prompt": "a photo of sks dog", "class_prompt": "a photo of dog", "lora_name": lora_name,
            "steps": "6", "resolution": "32", "rank": "4", "lr": "0.001", "seed": "3", "num_class_images": "2",
            "class_steps": "1", "checkpoint_every": "2"}
    form.update({k: str(v) for k, v in kw.items()})
    r = client.post("/v1/jobs", data=form, files=_photos())
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _wait(client, job_id: str, until) -> dict:
    deadline = time.monotonic() + WAIT_BOUND_S
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if until(job):
            return job
        time.sleep(POLL_S)
    raise AssertionError(f"job never reached the state wanted: {job}")


def _done(job) -> bool:
    return job["state"] in ("succeeded", "failed", "cancelled", "interrupted")


def _lora_tensors(service, name):
    from safetensors.torch import load_file

    return load_file(os.path.join(service.data_dir, "loras", name + ".safetensors"))


def _same(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_personalization_job_makes_a_usable_lora(service, client):
    job_id = _submit(client, "sks-dog", steps=4)
    events = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as s:
        for line in s.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    kinds = [e["type"] for e in events]
    assert events[-1]["type"] == "end" and events[-1]["state"] == "succeeded", events[-1]
    steps = [e["step"] for e in events if e["type"] == "step"]
    assert steps == [1, 2, 3, 4]
    previews = [e for e in events if e["type"] == "step" and "preview" in e]
    assert [e["step"] for e in previews] == [2, 4]  # --preview-every 2
    assert previews[0]["preview"].startswith("data:image/png;base64,")
    assert kinds.count("loss") == 4
    last_step = len(kinds) - 1 - kinds[::-1].index("step")
    assert kinds.index("loss") < last_step, "the loss streams live, step by step, not after the run"
    assert all("loss" in e for e in events if e["type"] == "step")
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["result"]["lora"] == "sks-dog" and len(job["progress"]["losses"]) == 4
    assert "sks-dog" in [d["name"] for d in client.get("/v1/loras").json()["data"]]
    # the uploaded names never reached the disk
    stored = os.listdir(os.path.join(service.data_dir, "jobs", job_id, "instance"))
    assert sorted(stored) == ["000.png", "001.png", "002.png"]
    r = client.post("/v1/images/generations", json={"prompt": "a photo of sks dog", "loras": [{"name": "sks-dog"}]})
    assert r.status_code == 200, r.text


def test_cancel_keeps_the_checkpoint_and_resume_finishes_the_same(service, client):
    ref = _submit(client, "ref-cancel", steps=40)
    _wait(client, ref, _done)
    job_id = _submit(client, "cancelled", steps=40)
    _wait(client, job_id, lambda j: (j["progress"] or {}).get("step", 0) >= 3)
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 200
    job = _wait(client, job_id, _done)
    assert job["state"] == "cancelled" and job["progress"]["step"] < 40, job
    assert client.post(f"/v1/jobs/{job_id}/resume").status_code == 202
    job = _wait(client, job_id, _done)
    assert job["state"] == "succeeded", job
    assert _same(_lora_tensors(service, "cancelled"), _lora_tensors(service, "ref-cancel"))
    assert client.post(f"/v1/jobs/{job_id}/resume").status_code == 409  # a finished job does not resume


@pytest.mark.slow
def test_sigkill_during_training_then_resume_gives_the_uninterrupted_lora(tmp_path):
    svc = Service(str(tmp_path / "svc"), "--preview-every", "1000").start()
    try:
        with svc.client() as c:
            ref = _submit(c, "reference", steps=60)
            assert _wait(c, ref, _done)["state"] == "succeeded"
            job_id = _submit(c, "killed", steps=60)
            _wait(c, job_id, lambda j: (j["progress"] or {}).get("step", 0) >= 5)
        svc.kill()  # SIGKILL mid-training: no shutdown code runs
        svc.start()
        with svc.client() as c:
            job = c.get(f"/v1/jobs/{job_id}").json()
            assert job["state"] == "interrupted", job
            assert 5 <= job["progress"]["step"] < 60
            assert 'turbobooth_jobs{state="interrupted"} 1.0' in c.get("/metrics").text
            assert c.post(f"/v1/jobs/{job_id}/resume").status_code == 202
            job = _wait(c, job_id, _done)
            assert job["state"] == "succeeded", job
        assert _same(_lora_tensors(svc, "killed"), _lora_tensors(svc, "reference"))
    finally:
        svc.stop()
