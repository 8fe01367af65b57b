"""Ray Serve deployment: the same FastAPI app behind ``serve.ingress``, Ray's ``@serve.batch`` for batching and
``serve.multiplexed`` for LoRA sets. Every batch goes to ``Engine.run_rows``, as in the single-process service.

    serve run deploy/ray/serve_config.yaml

Ray's batcher does not group by key, so one Ray batch is split by BatchKey here and each group runs as its own
``run_rows`` calls (at the fixed max_batch shape, so images equal the single-process ones bit for bit).
"""

from __future__ import annotations

import asyncio
import os

from ray import serve

from .app import create_app
from .config import ServeConfig
from .engine import Engine, model_spec
from .oneshot import answer, parse

_config = ServeConfig(model=os.environ.get("TURBOBOOTH_MODEL", "tiny"),
                      data_dir=os.environ.get("TURBOBOOTH_DATA_DIR", "turbobooth_service"),
                      max_batch=int(os.environ.get("TURBOBOOTH_MAX_BATCH", "4")))
fastapi_app = create_app(_config)


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 4},
    max_ongoing_requests=16,
)
@serve.ingress(fastapi_app)
class TurboBoothDeployment:
    def __init__(self):
        # its own Engine on the module-level model cache: the same TurboModel the app's lifespan loads
        spec = model_spec(_config.model, tiny_root=os.path.join(os.path.abspath(_config.data_dir), "tiny_models"))
        self.engine = Engine(spec, _config.lora_dir, _config.max_batch, _config.lora_cache,
                             tiny=_config.model == "tiny")
        self.engine.load()

    @serve.multiplexed(max_num_models_per_replica=8)
    async def lora_set(self, model_id: str) -> tuple:
        """A LoRA set ("name:strength,..."), loaded into this replica's LRU once."""
        names = [part.split(":")[0] for part in model_id.split(",") if part]
        await asyncio.to_thread(lambda: [self.engine.loras.get(n) for n in names])
        return tuple(names)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def _generate(self, items: list) -> list:
        """Ray's batch of (key, rows) -> PNG lists; grouped by key, each group in calls of at most max_batch rows."""
        groups: dict = {}
        for i, (key, _) in enumerate(items):
            groups.setdefault(key, []).append(i)
        out: list = [None] * len(items)
        for key, idx in groups.items():
            chunk: list = []
            for i in idx:
                if chunk and sum(len(items[j][1]) for j in chunk) + len(items[i][1]) > self.engine.max_batch:
                    await self._run_chunk(key, chunk, items, out)
                    chunk = []
                chunk.append(i)
            await self._run_chunk(key, chunk, items, out)
        return out

    async def _run_chunk(self, key, chunk: list, items: list, out: list) -> None:
        rows = [r for i in chunk for r in items[i][1]]
        pngs = await asyncio.to_thread(self.engine.run_rows, key, rows)
        at = 0
        for i in chunk:
            n = len(items[i][1])
            out[i], at = pngs[at : at + n], at + n

    @fastapi_app.post("/ray/v1/images/generations", tags=["ray"])
    async def ray_generations(self, body: dict) -> dict:
        """The generation route through Ray's batching; answers like POST /v1/images/generations (b64_json)."""
        req, key, rows = parse(self.engine, _config, body)
        if key.loras:
            await self.lora_set(",".join(f"{n}:{s}" for n, s in key.loras))
        pngs = await self._generate((key, rows))
        result = answer(rows, pngs)
        result["replica"] = serve.get_replica_context().replica_id.unique_id
        return result


app = TurboBoothDeployment.bind()
