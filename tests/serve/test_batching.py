"""Batching: coalesced requests, bit-exact results alone or batched, per-request LoRAs that never leak, load."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import pytest
from serve_helpers import metric


def _png(client, **kw) -> bytes:
    body = {"prompt": "a photo of a dog", "seed": 11, "negative_prompt": "blurry", "guidance": 2.0, **kw}
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    return base64.b64decode(r.json()["data"][0]["b64_json"])


def _batches(client) -> tuple[float, float]:
    text = client.get("/metrics").text
    return metric(text, "turbobooth_batch_requests_count"), metric(text, "turbobooth_batch_requests_sum")


def _concurrent(service, bodies: list[dict]) -> list[bytes]:
    def one(kw):
        with service.client() as c:
            return _png(c, **kw)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(one, bodies))


def test_a_request_is_bit_identical_alone_or_in_a_batch(service, client):
    alone = _png(client)
    before = _batches(client)
    # the same request among three others with their own seeds, negative prompts and prompts
    bodies = [{}, {"seed": 5, "negative_prompt": "bad quality"}, {"prompt": "a blue city in snow", "seed": 99},
              {"prompt": "portrait of a person", "negative_prompt": ""}]
    got = _concurrent(service, bodies)
    after = _batches(client)
    assert got[0] == alone  # byte-equal PNG
    assert len(set(got)) == 4  # each kept its own seed / negative prompt / prompt
    assert after[1] - before[1] == 4 and after[0] - before[0] < 4, (before, after)  # they shared batches


def test_the_engine_pads_every_call_to_one_shape(tmp_path):
    """In-process: the same row at other positions and beside other rows gives equal tensors (torch.equal)."""
    import torch
    from turbobooth.manager import sampling
    from turbobooth.serve.engine import BatchKey, Engine, Row, model_spec

    engine = Engine(model_spec("tiny", tiny_root=str(tmp_path / "tiny")), str(tmp_path / "loras"), max_batch=3)
    engine.load()
    key = BatchKey(32, 32, 2, 1.5)
    row = Row("a photo of a dog", "blurry", 3)
    seen = []
    real = sampling.generate

    def spy(*a, **kw):
        out = real(*a, **kw)
        seen.append(out.images[[p.strip() for p in a[1]].index(row.prompt)])
        return out

    sampling.generate = spy
    try:
        alone = engine.run_rows(key, [row])
        mixed = engine.run_rows(key, [Row("city", "", 8), Row("snow", "x", 1), row])
    finally:
        sampling.generate = real
    assert alone[0] == mixed[2]
    assert torch.equal(seen[0], seen[1])


def test_loras_apply_to_their_batch_only(service, client, trained_lora):
    plain = _png(client)
    with_lora = _png(client, loras=[{"name": trained_lora, "strength": 1.0}])
    assert with_lora != plain
    assert _png(client) == plain  # nothing left attached
    # concurrent: one with the LoRA, one with another, two without; different LoRA sets never share a call
    got = _concurrent(service, [{}, {"loras": [{"name": trained_lora}]}, {"loras": [{"name": "other-lora"}]}, {}])
    assert got[0] == got[3] == plain
    assert got[1] == with_lora
    assert got[2] not in (plain, with_lora)


def test_unknown_lora_is_404_and_a_path_is_refused(client):
    r = client.post("/v1/images/generations", json={"prompt": "x", "loras": [{"name": "nope"}]})
    assert r.status_code == 404 and "nope" in r.text
    for bad in ("../jobs", "/etc/passwd", "a/b", ".hidden", "x..y"):
        r = client.post("/v1/images/generations", json={"prompt": "x", "loras": [{"name": bad}]})
        assert r.status_code == 422, (bad, r.text)


@pytest.mark.slow
def test_fifty_requests_from_ten_clients(service, client):
    """All succeed, memory stays flat, and batches formed (seen through /metrics)."""
    def burst(count):
        bodies = [{"prompt": f"a photo of a dog {i % 3}", "seed": i, "guidance": 0.0} for i in range(count)]
        with ThreadPoolExecutor(10) as pool:
            return list(pool.map(lambda kw: _concurrent_one(service, kw), bodies))

    burst(10)  # warm up: caches, allocator pools
    rss_before, threads_before = service.rss_kb(), service.threads()
    before = _batches(client)
    pngs = burst(50)
    after = _batches(client)
    assert len(pngs) == 50 and all(p.startswith(b"\x89PNG") for p in pngs)
    assert after[1] - before[1] == 50
    calls = after[0] - before[0]
    assert calls < 50 and (after[1] - before[1]) / calls > 1.5, (before, after)
    growth_mb = (service.rss_kb() - rss_before) / 1024
    assert growth_mb < 64, f"RSS grew {growth_mb:.1f} MB over 50 requests"
    assert service.threads() <= threads_before + 2
    assert metric(client.get("/metrics").text, "turbobooth_queue_depth") == 0


def _concurrent_one(service, kw) -> bytes:
    with service.client() as c:
        return _png(c, **kw)


def test_the_engine_reloads_a_model_the_cache_released(tmp_path):
    """The engine holds the shared cache's model; when the cache lets it go (budget, changed files), the next
    batch loads it again instead of failing on a released pipeline."""
    from turbobooth.manager import cache as cache_mod
    from turbobooth.serve.engine import BatchKey, Engine, Row, model_spec

    engine = Engine(model_spec("tiny", tiny_root=str(tmp_path / "tiny")), str(tmp_path / "loras"), max_batch=2)
    engine.load()
    key, row = BatchKey(32, 32, 2, 1.5), Row("a photo of a dog", "", 3)
    before = engine.run_rows(key, [row])
    cache_mod.CACHE.release(engine.model.spec)
    assert cache_mod.is_released(engine.model)
    assert engine.run_rows(key, [row]) == before and not cache_mod.is_released(engine.model)
