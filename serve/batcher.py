"""The single-process batcher: concurrent requests with one BatchKey coalesce into one ``Engine.run_rows`` call.

A call takes up to ``max_batch`` rows, waiting at most ``max_wait_ms`` after the oldest waiting request of its
key. The model runs in one worker thread, so the event loop stays free. A request whose client has gone (its
future is cancelled) before its batch starts is dropped; one cancelled while its batch runs is finished and its
result thrown away. Ray Serve uses ``@serve.batch`` instead (ray_app.py); both call ``Engine.run_rows``.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..manager.errors import get_logger
from .engine import BatchKey, Row

logger = get_logger(__name__)


class QueueFull(Exception):
    """More requests wait than ``max_queue``."""


@dataclass
class _Pending:
    key: BatchKey
    rows: list
    future: asyncio.Future
    since: float = field(default_factory=time.monotonic)


class Batcher:
    def __init__(self, run_rows, max_batch: int, max_wait_ms: float, max_queue: int, metrics=None):
        self.run_rows, self.max_batch = run_rows, max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.metrics = metrics
        self.pending: list[_Pending] = []
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="turbobooth-gen")
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.batches = 0
        self.running = 0  # requests in the batch that is running now

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for p in self.pending:
            if not p.future.done():
                p.future.set_exception(RuntimeError("the service is shutting down"))
        self.pending.clear()
        self.executor.shutdown(wait=False, cancel_futures=True)

    @property
    def depth(self) -> int:
        return len(self.pending)

    def submit(self, key: BatchKey, rows: list[Row]) -> asyncio.Future:
        """A future for the PNGs of ``rows``; raises QueueFull past ``max_queue`` waiting requests."""
        self._drop_cancelled()
        if len(self.pending) >= self.max_queue:
            raise QueueFull(f"{len(self.pending)} requests are waiting (limit max_queue={self.max_queue})")
        fut = asyncio.get_running_loop().create_future()
        self.pending.append(_Pending(key, list(rows), fut))
        self._gauge()
        self._wake.set()
        return fut

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self.pending))

    def _drop_cancelled(self) -> None:
        before = len(self.pending)
        self.pending = [p for p in self.pending if not p.future.done()]
        if self.metrics is not None and before != len(self.pending):
            self.metrics.cancelled.inc(before - len(self.pending))
        self._gauge()

    def _take(self, now: float) -> tuple[BatchKey, list[_Pending]] | None:
        """The next batch to run, or None while the oldest key may still fill up."""
        self._drop_cancelled()
        if not self.pending:
            return None
        oldest = self.pending[0]
        group = [p for p in self.pending if p.key == oldest.key]
        chosen, used = [], 0
        for p in group:
            if used + len(p.rows) <= self.max_batch:
                chosen.append(p)
                used += len(p.rows)
        full = used >= self.max_batch or len(chosen) < len(group)
        if not full and now - oldest.since < self.max_wait:
            return None
        ids = {id(p) for p in chosen}
        self.pending = [p for p in self.pending if id(p) not in ids]
        self._gauge()
        return oldest.key, chosen

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.pending:
                self._wake.clear()
                await self._wake.wait()
            taken = self._take(time.monotonic())
            if taken is None:
                if self.pending:
                    wait = max(0.0, self.max_wait - (time.monotonic() - self.pending[0].since))
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), timeout=wait + 0.001)
                    except asyncio.TimeoutError:
                        pass
                continue
            await self._run(loop, *taken)

    async def _run(self, loop, key: BatchKey, chosen: list[_Pending]) -> None:
        rows = [r for p in chosen for r in p.rows]
        self.running = len(chosen)
        started = time.monotonic()
        try:
            images = await loop.run_in_executor(self.executor, self.run_rows, key, rows)
        except Exception as e:  # every waiting request gets the error; the loop keeps serving
            for p in chosen:
                if not p.future.done():
                    p.future.set_exception(e)
            return
        finally:
            self.running = 0
        self.batches += 1
        if self.metrics is not None:
            self.metrics.batch_requests.observe(len(chosen))
            self.metrics.batch_rows.observe(len(rows))
            self.metrics.batch_seconds.observe(time.monotonic() - started)
        at = 0
        for p in chosen:
            part, at = images[at : at + len(p.rows)], at + len(p.rows)
            if not p.future.done():
                p.future.set_result(part)
            elif self.metrics is not None:
                self.metrics.cancelled.inc()
