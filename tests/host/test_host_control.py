"""The server's own controls on the pack's nodes: Cancel (/interrupt), "Free model and node cache" (/free),
and a cancelled DreamBooth run that resumes when the same graph is queued again."""

from __future__ import annotations

import glob
import os
import time

import comfy_harness as ch
import pytest
from comfy_harness import Graph, unique_prefix
from PIL import Image

pytestmark = pytest.mark.host

WAIT = 600.0  # only a bound on a hung host, never a speed requirement


def _log_size(server: ch.ComfyServer) -> int:
    try:
        return os.path.getsize(server.log_path)
    except OSError:
        return 0


def _log_since(server: ch.ComfyServer, offset: int) -> str:
    with open(server.log_path, encoding="utf-8", errors="replace") as f:
        f.seek(offset)
        return f.read()


def _wait_log(server: ch.ComfyServer, offset: int, needle: str, timeout: float = WAIT) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = _log_since(server, offset)
        if needle in text:
            return text
        time.sleep(0.2)
    raise AssertionError(f"{needle!r} did not appear in the server log\n--- log since ---\n{_log_since(server, offset)[-4000:]}")


def _check_worker(server: ch.ComfyServer) -> None:
    """Fail at once if ComfyUI's prompt worker thread died: the server still answers HTTP but never runs a prompt."""
    log = _log_since(server, 0)
    if "Exception in thread" in log and "(prompt_worker)" in log:
        start = log.index("Exception in thread")
        raise AssertionError(f"ComfyUI's prompt worker thread crashed; queued prompts never run:\n{log[start:start + 4000]}")


def _running_ids(server: ch.ComfyServer) -> list[str]:
    queue = server.get_json("/queue")
    return [item[1] for item in queue.get("queue_running", [])]


def _queue(server: ch.ComfyServer, prompt: dict) -> str:
    status, resp = server.queue_prompt(prompt)
    assert status == 200 and "prompt_id" in resp, f"HTTP {status}: {resp}"
    return resp["prompt_id"]


def _interrupt_when(server: ch.ComfyServer, prompt_id: str, ready) -> dict:
    """Once ``prompt_id`` runs and ``ready()`` holds, POST /interrupt (again, until the prompt ends).

    ComfyUI clears the interrupt flag when a prompt starts executing, so one early
    request could be lost; repeating it while the prompt runs is what a user's
    second click on Cancel does. Returns the prompt's history entry.
    """
    deadline = time.monotonic() + WAIT
    sent = 0
    while time.monotonic() < deadline:
        if server.proc is not None and server.proc.poll() is not None:
            raise ch.HostError(f"ComfyUI exited while running {prompt_id}\n{server.log_tail()}")
        _check_worker(server)
        hist = server.get_json(f"/history/{prompt_id}")
        if prompt_id in hist:
            assert sent, "the prompt finished before it could be interrupted"
            return hist[prompt_id]
        if prompt_id in _running_ids(server) and ready():
            status, body = server.request("POST", "/interrupt")
            assert status == 200, body
            sent += 1
        time.sleep(0.2)
    raise ch.HostError(f"prompt {prompt_id} did not end after /interrupt\n{server.log_tail()}")


def _run(server: ch.ComfyServer, prompt: dict) -> ch.PromptResult:
    """``server.run_prompt``, but fail at once if ComfyUI's prompt worker thread died (it then never answers)."""
    prompt_id = _queue(server, prompt)
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if prompt_id in server.get_json(f"/history/{prompt_id}"):
            break
        _check_worker(server)
        time.sleep(0.2)
    return _result(server, prompt_id)


def _result(server: ch.ComfyServer, prompt_id: str) -> ch.PromptResult:
    entry = server.wait_history(prompt_id, timeout=WAIT)
    st = entry.get("status") or {}
    messages = [{"event": ev, "data": data} for ev, data in st.get("messages", [])]
    errors = [m["data"] for m in messages if m["event"] in ("execution_error", "execution_interrupted")]
    success = st.get("status_str", "success") == "success" and not errors
    return ch.PromptResult(prompt_id=prompt_id, success=success, outputs=entry.get("outputs") or {},
                           output_dir=server.output_dir, error="" if success else f"status {st}",
                           messages=messages, raw=entry)


def _messages(entry: dict) -> dict:
    st = entry.get("status") or {}
    return {ev: data for ev, data in st.get("messages", [])}


def _loader(g: Graph, tiny: dict):
    name = os.path.basename(tiny["zimage_diffusers"].rstrip(os.sep))
    return g.node("TurboBoothLoader", source="diffusers folder", diffusers_model=name, device="cpu")


def _generate_prompt(server: ch.ComfyServer, tiny: dict, *, steps: int, size: int, seed: int) -> tuple[dict, str]:
    g = Graph(server.object_info())
    loader = _loader(g, tiny)
    sample = g.node("TurboBoothSample", model=loader.out("TURBO_MODEL"), prompt="a photo of a red dog\na cat",
                    seed=seed, steps=steps, width=size, height=size, images_per_prompt=1)
    save = g.node("SaveImage", images=sample.out("IMAGE"), filename_prefix=unique_prefix("control"))
    return g.prompt, save.id


def _unique_seed() -> int:
    # ComfyUI caches node outputs by inputs: a fresh seed makes the sampler run again
    return int.from_bytes(os.urandom(4), "little")


def test_interrupt_stops_sampling(comfy_server, host_tiny_models):
    prompt, save_id = _generate_prompt(comfy_server, host_tiny_models, steps=200, size=256, seed=_unique_seed())
    prompt_id = _queue(comfy_server, prompt)
    entry = _interrupt_when(comfy_server, prompt_id, lambda: True)

    status = entry.get("status") or {}
    messages = _messages(entry)
    assert "execution_interrupted" in messages, f"history does not record the interruption: {status}"
    assert messages["execution_interrupted"]["node_type"] in ("TurboBoothLoader", "TurboBoothSample")
    assert "execution_error" not in messages, messages["execution_error"]
    assert status.get("status_str") == "error" and not status.get("completed")
    assert not (entry.get("outputs") or {}).get(save_id), "an interrupted prompt saved an image"

    # the server is still healthy and the interruption does not leak into the next prompt
    prompt, save_id = _generate_prompt(comfy_server, host_tiny_models, steps=2, size=64, seed=_unique_seed())
    result = _run(comfy_server, prompt).check()
    pngs = result.images(save_id)
    assert len(pngs) == 2  # one per prompt line
    for png in pngs:
        with Image.open(png) as im:
            assert im.size == (64, 64)


def test_free_releases_the_model(comfy_server, host_tiny_models):
    prompt, save_id = _generate_prompt(comfy_server, host_tiny_models, steps=2, size=64, seed=_unique_seed())
    _run(comfy_server, prompt).check()

    offset = _log_size(comfy_server)
    status, body = comfy_server.request("POST", "/free", {"unload_models": True, "free_memory": True})
    assert status == 200, body
    name = os.path.basename(host_tiny_models["zimage_diffusers"].rstrip(os.sep))
    # several cached models may be released, one line each: wait for the one this graph loaded
    deadline = time.monotonic() + WAIT
    released: list[str] = []
    while time.monotonic() < deadline:
        released = [ln for ln in _log_since(comfy_server, offset).splitlines() if "released TurboModel(zimage" in ln]
        if any(name in line for line in released):
            break
        time.sleep(0.2)
    assert any(name in line for line in released), f"{name} was not released; released: {released}"
    time.sleep(1.0)  # let the worker finish the rest of its /free handling
    _check_worker(comfy_server)

    # the node cache was dropped too: the same graph loads the model again and still runs
    offset = _log_size(comfy_server)
    result = _run(comfy_server, prompt).check()
    assert result.images(save_id)
    after = _log_since(comfy_server, offset)
    assert "loaded Z-Image" in after and name in after, f"the model was not loaded again:\n{after[-3000:]}"


def test_dreambooth_cancel_then_resume(comfy_server, host_tiny_models):
    steps = 40
    run = unique_prefix("resume")
    image_name = f"{run}.png"
    Image.new("RGB", (72, 72), (150, 110, 60)).save(os.path.join(comfy_server.host.input_dir, image_name))

    g = Graph(comfy_server.object_info())
    loader = _loader(g, host_tiny_models)
    image = g.node("LoadImage", image=image_name)
    train = g.node("TurboBoothDreamBoothTrain", model=loader.out("TURBO_MODEL"), instance_images=image.out("IMAGE"),
                   instance_prompt="a photo of sks dog", class_prompt="a photo of a dog", steps=steps, rank=2,
                   resolution=64, checkpoint_every=0, run_name=run)
    save = g.node("TurboBoothCheckpointSave", lora=train.out("lora"), name=run, overwrite=True)

    root = os.path.join(comfy_server.output_dir, "turbobooth_training")
    run_dirs = lambda: glob.glob(os.path.join(root, f"{run}-*"))  # noqa: E731

    offset = _log_size(comfy_server)
    prompt_id = _queue(comfy_server, g.prompt)
    entry = _interrupt_when(comfy_server, prompt_id, lambda: bool(run_dirs()))
    messages = _messages(entry)
    assert "execution_interrupted" in messages, f"history does not record the interruption: {entry.get('status')}"
    assert messages["execution_interrupted"]["node_type"] == "TurboBoothDreamBoothTrain"
    assert not (entry.get("outputs") or {}).get(save.id), "CheckpointSave ran after a cancelled training"

    [run_dir] = run_dirs()
    ckpts = sorted(glob.glob(os.path.join(run_dir, "checkpoint-*")))
    assert len(ckpts) == 1, f"expected the one checkpoint saved on cancel, found {ckpts}\n{_log_since(comfy_server, offset)[-4000:]}"
    k = int(os.path.basename(ckpts[0]).split("-")[1])
    assert 1 <= k < steps
    assert f"training stopped at step {k} of {steps}" in _log_since(comfy_server, offset)

    # queue the very same graph: training resumes from checkpoint-k and finishes
    offset = _log_size(comfy_server)
    result = _run(comfy_server, g.prompt).check()
    log = _log_since(comfy_server, offset)
    assert f"resumed from {ckpts[0]} at step {k}" in log, f"training did not resume:\n{log[-4000:]}"
    [path] = result.outputs[save.id]["text"]
    assert os.path.isfile(path) and path.endswith(".safetensors")

    from turbobooth.manager.lora import load_lora_file

    lora = load_lora_file(path)
    assert lora.family == "zimage" and lora.rank == 2
    assert lora.metadata.get("steps") == str(steps)
    assert sorted(glob.glob(os.path.join(run_dir, "checkpoint-*"))) == ckpts, "no new checkpoint with checkpoint_every=0"
